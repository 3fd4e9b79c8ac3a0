"""Issue 12 item 1: once a set of tensors and module ids has been seen, calling the ops again
makes no host synchronisation and copies nothing from the host, on every backend and on every
path the optimizer takes (clipping with importance accumulation, the fused norms of the AdamW
pass finished by finalize_norms, bf16 weights with fp32 masters, mixed gradient dtypes), and
the gradient averaging of misa.distributed.GradientSync makes none either.

Counted with tests/sync_counter.py, which sees the Python calls that would block on a GPU. On
this CPU every tensor stands in for a device tensor, so a host tensor lr (read on purpose,
which is free on a GPU machine) would be counted too: these paths pass lr as a number.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.distributed as dist

import misa_kernels as mk
from conftest import BACKEND_DEVICE
from sync_counter import count_host_syncs

PATHS = ["clip_and_accumulate", "fused_norms", "bf16_masters", "mixed_grad_dtypes"]
SIZES = [7, 300, 4097, 33]
MODULE_IDS = [2, 0, 2, 1]
NUM_MODULES = 4


def test_the_counter_sees_each_kind_of_call():
    x = torch.ones(3)
    with count_host_syncs() as syncs:
        torch.tensor([1.0])
        torch.as_tensor(x)  # from a tensor: not counted
        x[0].item()
        x.tolist()
        x.cpu()
        if x[0] > 0:
            float(x[1])
    kinds = [event.split(" at ")[0] for event in syncs.events]
    assert kinds == ["torch.tensor from Python data", "Tensor.item", "Tensor.tolist", "Tensor.cpu",
                     "Tensor.__bool__", "Tensor.__float__"]
    assert "test_kernels_no_sync.py" in syncs.events[0]
    assert torch.Tensor.item is not None and float(x[0]) == 1.0  # patches undone


def _step_function(path, backend, device):
    """One optimizer-like step on fresh tensors, as a function that can be called repeatedly."""
    weight_dtype = torch.bfloat16 if path == "bf16_masters" else torch.float32
    params = [torch.randn(n, device=device).to(weight_dtype) for n in SIZES]
    grads = [torch.randn(n, device=device).to(weight_dtype) * 1e-2 for n in SIZES]
    if path == "mixed_grad_dtypes":
        grads[1] = grads[1].to(torch.bfloat16)
    masters = [p.float() for p in params] if path == "bf16_masters" else None
    exp_avgs = [torch.zeros(n, device=device) for n in SIZES]
    exp_avg_sqs = [torch.zeros(n, device=device) for n in SIZES]
    steps = torch.zeros(NUM_MODULES, device=device)
    accum, count = torch.zeros(NUM_MODULES, device=device), torch.zeros(NUM_MODULES, device=device)
    weight = torch.rand(NUM_MODULES, device=device)
    scaler_found_inf = torch.zeros((), device=device)
    sq_out = torch.zeros(NUM_MODULES, dtype=torch.float64, device=device)
    present = sorted(set(MODULE_IDS))

    def step():
        if path == "fused_norms":
            mk.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, steps, MODULE_IDS, lr=1e-3,
                           found_inf=scaler_found_inf, sq_norms_out=sq_out, backend=backend)
            mk.torch_ref.finalize_norms(sq_out, present, None, accum, count, weight, "sq")
            return
        stats = mk.grad_sq_norms(grads, MODULE_IDS, NUM_MODULES, max_norm=1.0, accum=accum, accum_count=count,
                                 accum_weight=weight, accum_rule="clipped_norm", backend=backend)
        # one AdamW call per gradient dtype, as the optimizer groups them
        groups = [[i for i, g in enumerate(grads) if g.dtype == dtype] for dtype in {g.dtype: 0 for g in grads}]
        for group in groups:
            mk.adamw_step_([params[i] for i in group], [grads[i] for i in group], [exp_avgs[i] for i in group],
                           [exp_avg_sqs[i] for i in group], steps, [MODULE_IDS[i] for i in group], lr=1e-3,
                           weight_decay=0.1, master_params=None if masters is None else [masters[i] for i in group],
                           clip_coef=stats.clip_coef, found_inf=stats.found_inf, backend=backend)

    return step, steps


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("path", PATHS)
def test_repeated_steps_make_no_host_sync(backend, device, path):
    step, steps = _step_function(path, backend, device)
    step()  # the first call with these tensors builds what later calls reuse
    with count_host_syncs() as syncs:
        step()
        step()
    assert syncs.count == 0, syncs.report()
    assert steps.tolist() == [3.0, 3.0, 3.0, 0.0]  # the steps ran


def test_finalize_norms_copies_nothing_even_for_new_module_ids(monkeypatch):
    """What the optimizer's fused, FSDP2 and mixed-dtype paths call every step: a set of module
    ids never seen before, or a mask made once per active set, costs no copy from the host."""
    sq = torch.tensor([1.0, 4.0, 0.0, 9.0, 0.0, 16.0, 25.0], dtype=torch.float64)
    accum, count = torch.zeros(7), torch.zeros(7)
    weight = torch.full((7,), 0.5)
    monkeypatch.setattr(mk.torch_ref, "_masks", OrderedDict())  # nothing seen before
    unseen = [0, 1, 3, 5]
    mask = mk.torch_ref.present_mask([0, 6], 7, torch.device("cpu"))
    with count_host_syncs() as syncs:
        total, clip, found = mk.torch_ref.finalize_norms(sq, unseen, 2.0, accum, count, weight, "sq")
        mk.torch_ref.finalize_norms(sq, mask, None, accum, count, None, "clipped_norm")
    assert syncs.count == 0, syncs.report()
    assert total.dtype == torch.float64 and total.item() == math.sqrt(55.0)
    assert clip.dtype == found.dtype == torch.float32 and found.item() == 0.0
    expected_count = torch.zeros(7)
    expected_count[unseen] += 1
    expected_count[[0, 6]] += 1
    assert torch.equal(count, expected_count)
    expected = torch.zeros(7, dtype=torch.float64)
    expected[unseen] += 0.5 * sq[unseen]
    expected[[0, 6]] += sq[[0, 6]].sqrt()
    torch.testing.assert_close(accum, expected.float(), rtol=0, atol=0)


@pytest.fixture
def single_process_group():
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_gradient_averaging_makes_no_host_sync_when_every_gradient_is_here(single_process_group):
    from misa.distributed import GradientSync

    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 3, 300)]
    grads = [torch.randn_like(p) for p in params]
    sync = GradientSync(params, lambda: params, group=None, bucket_bytes=64)  # several buckets
    try:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        with count_host_syncs() as syncs:
            sync.all_reduce()
        assert syncs.count == 0, syncs.report()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))  # one rank: the mean is itself
        # a gradient missing on every rank stays None: one read of the counts, after the all-reduce
        params[1].grad = None
        with count_host_syncs() as syncs:
            sync.all_reduce()
        assert params[1].grad is None and torch.equal(params[0].grad, grads[0])
        assert [e.split(" at ")[0] for e in syncs.events] == ["torch.tensor from Python data", "Tensor.tolist"]
    finally:
        sync.remove()
