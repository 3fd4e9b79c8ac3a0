"""The ops trace under torch.compile in one graph (fullgraph), on every backend, and give the
eager results; the backend is resolved, and its dtypes checked, inside the library op at run
time (so a traced graph holds no backend choice and the package imports no torch._dynamo)."""
from __future__ import annotations

import pytest
import torch

import misa_kernels as mk
from conftest import BACKEND_DEVICE


def _state(device, sizes=(7, 300, 33)):
    params = [torch.randn(n, device=device) for n in sizes]
    return dict(params=params, grads=[torch.randn_like(p) for p in params],
                exp_avgs=[torch.zeros_like(p) for p in params], exp_avg_sqs=[torch.zeros_like(p) for p in params],
                steps=torch.zeros(len(sizes), device=device), module_ids=[0, 2, 0])


def _step(state, lr, backend):
    stats = mk.grad_sq_norms(state["grads"], state["module_ids"], 3, max_norm=1.0, backend=backend)
    out = torch.empty(3, dtype=torch.float64, device=state["steps"].device)
    mk.adamw_step_(**state, lr=lr, weight_decay=0.1, clip_coef=stats.clip_coef, found_inf=stats.found_inf,
                   sq_norms_out=out, backend=backend)
    return stats.total_norm, out


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_a_compiled_step_is_one_graph_and_equals_eager(backend, device):
    torch._dynamo.reset()
    eager, compiled = _state(device), _state(device)
    for key in eager:
        if key != "module_ids":
            for a, b in zip(eager[key] if isinstance(eager[key], list) else [eager[key]],
                            compiled[key] if isinstance(compiled[key], list) else [compiled[key]]):
                b.copy_(a)
    lr = torch.tensor(1e-2, device=device)
    step = torch.compile(lambda state, lr: _step(state, lr, backend), fullgraph=True, backend="aot_eager")
    for _ in range(2):
        want = _step(eager, lr, backend)
        got = step(compiled, lr)
        assert all(torch.equal(a, b) for a, b in zip(want, got))
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        assert all(torch.equal(a, b) for a, b in zip(eager[key], compiled[key])), key
    assert compiled["steps"].tolist() == [2.0, 0.0, 2.0]


def test_compiled_ops_see_separate_copies_of_overlapping_tensors():
    """A compiled graph hands a mutating op fresh copies of what it writes (functionalization),
    so a parameter passed as its own gradient cannot race there: the result is that of an eager
    call with a separate gradient (eager refuses the overlap, see test_kernels_bad_input)."""
    torch._dynamo.reset()
    compiled, eager = _state("cpu"), _state("cpu")
    for key in ("params", "grads"):
        for a, b in zip(compiled[key], eager[key]):
            b.copy_(a)
    compiled["grads"][1] = compiled["params"][1]
    eager["grads"][1] = eager["params"][1].clone()
    step = torch.compile(lambda state: mk.adamw_step_(**state, lr=1e-2, backend="torch"), fullgraph=True,
                         backend="aot_eager")
    step(compiled)
    mk.adamw_step_(**eager, lr=1e-2, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(compiled["params"], eager["params"]))
