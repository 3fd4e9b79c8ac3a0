"""Issue 12 items 2 and 4: the work tables of the multi-tensor kernels are built once per set of
tensors and kept on the device (so repeated calls and CUDA graph replays copy nothing from the
host), rebuilt when the set changes; and the Triton finalize kernels run one program per block
of modules, with the same results.

Triton runs in its interpreter on CPU tensors here; the CUDA checks (profiler, graph capture)
are marked gpu and run where a GPU is.
"""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

import misa_kernels as mk

pytest.importorskip("triton")
from misa_kernels.backends.triton import work_table  # noqa: E402  (needs triton)

TRITON_DEVICES = [
    pytest.param(d, marks=[pytest.mark.gpu] if d == "cuda" else [])
    for d in ("cpu", "cuda")
    if (d == "cpu" or torch.cuda.is_available()) and "triton" in mk.available_backends(d)
]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def counted_builds(monkeypatch):
    """The list of tables built (one entry per call of work_table.build) during the test, which
    starts with empty caches (a freed tensor's address may come back in another test's tensor)."""
    monkeypatch.setattr(work_table, "_cache", OrderedDict())
    monkeypatch.setattr(work_table, "_captured", {})
    builds = []
    original = work_table.build

    def counting(*args, **kwargs):
        builds.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(work_table, "build", counting)
    return builds


def _adam(device, sizes=(7, 300, 33)):
    params = [torch.randn(n, device=device) for n in sizes]
    return dict(params=params, grads=[torch.randn_like(p) for p in params],
                exp_avgs=[torch.zeros_like(p) for p in params], exp_avg_sqs=[torch.zeros_like(p) for p in params],
                steps=torch.zeros(len(sizes), device=device), module_ids=list(range(len(sizes))))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_tables_persist_for_one_tensor_set_and_follow_a_new_one(device, counted_builds):
    args = _adam(device)
    grads = args["grads"]
    for _ in range(3):
        mk.grad_sq_norms(grads, [0, 1, 2], 3, max_norm=1.0, backend="triton")
        mk.adamw_step_(**args, lr=1e-3, backend="triton")
    assert len(counted_builds) == 2  # one table per op, built at the first call only
    key = work_table._key({"grads": grads}, [0, 1, 2], 3, torch.device(device),
                          work_table.launch_config(torch.device(device)).chunk_size)
    kept = work_table._cache[key]
    mk.grad_sq_norms(grads, [0, 1, 2], 3, backend="triton")
    assert work_table._cache[key] is kept and len(counted_builds) == 2
    # a new gradient tensor (another address), new module ids: each a new table
    new_grads = [g.clone() for g in grads]
    stats = mk.grad_sq_norms(new_grads, [0, 1, 2], 3, backend="triton")
    mk.grad_sq_norms(grads, [0, 2, 1], 3, backend="triton")
    assert len(counted_builds) == 4
    ref = mk.grad_sq_norms([g.cpu().double() for g in new_grads], [0, 1, 2], 3, backend="torch")
    torch.testing.assert_close(stats.module_sq_norms.cpu(), ref.module_sq_norms, rtol=2e-6, atol=0)


def test_the_cache_is_bounded_and_keeps_tables_used_in_a_graph_capture(counted_builds, monkeypatch):
    device = torch.device("cpu")
    captured_grads = [torch.randn(5)]
    work_table.get({"grads": captured_grads}, [0], 1, device, 16)
    monkeypatch.setattr(work_table, "_capturing", lambda device: True)  # as inside torch.cuda.graph
    in_capture = work_table.get({"grads": captured_grads}, [0], 1, device, 16)
    with pytest.raises(RuntimeError, match="Run the op once with the same tensors before capturing"):
        work_table.get({"grads": [torch.randn(5)]}, [0], 1, device, 16)
    monkeypatch.setattr(work_table, "_capturing", lambda device: False)
    keep_alive = [[torch.randn(5)] for _ in range(work_table.CACHE_SIZE + 3)]
    for grads in keep_alive:
        work_table.get({"grads": grads}, [0], 1, device, 16)
    assert work_table.cached_tables() == work_table.CACHE_SIZE
    builds = len(counted_builds)
    assert work_table.get({"grads": captured_grads}, [0], 1, device, 16) is in_capture
    assert len(counted_builds) == builds  # evicted from the cache, kept for the graph


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_finalize_kernels_over_several_blocks_of_modules(device):
    """More modules than one finalize program takes: several programs, each its block, the
    same sums, flags, accumulation and step counts as the reference."""
    config = work_table.launch_config(torch.device(device))
    num_modules = 2 * config.module_block + 37
    ids = [m for m in range(num_modules) if m % 5 != 3]  # a few absent modules in every block
    grads = [torch.randn(3 + m % 7, device=device) for m in ids]
    accum, count = torch.rand(num_modules, device=device), torch.zeros(num_modules, device=device)
    accum_ref, count_ref = accum.cpu().clone(), count.cpu().clone()
    stats = mk.grad_sq_norms(grads, ids, num_modules, max_norm=2.0, accum=accum, accum_count=count,
                             accum_rule="clipped_norm", backend="triton")
    ref = mk.grad_sq_norms([g.cpu().double() for g in grads], ids, num_modules, max_norm=2.0, accum=accum_ref,
                           accum_count=count_ref, accum_rule="clipped_norm", backend="torch")
    for name, got, want in zip(ref._fields, stats, ref):
        torch.testing.assert_close(got.cpu(), want, rtol=2e-6, atol=0, msg=name)
    torch.testing.assert_close(accum.cpu(), accum_ref, rtol=2e-6, atol=0)
    assert torch.equal(count.cpu(), count_ref)
    params = [torch.zeros_like(g) for g in grads]
    steps = torch.full((num_modules,), 4.0, device=device)
    out = torch.full((num_modules,), -1.0, dtype=torch.float64, device=device)
    mk.adamw_step_(params, grads, [torch.zeros_like(g) for g in grads], [torch.zeros_like(g) for g in grads],
                   steps, ids, lr=1e-3, sq_norms_out=out, backend="triton")
    torch.testing.assert_close(out.cpu(), ref.module_sq_norms, rtol=2e-6, atol=0)
    expected = torch.full((num_modules,), 4.0)
    expected[ids] = 5.0
    assert torch.equal(steps.cpu(), expected)


# ------------------------------------------------------------------------------ on a GPU


def _memcpy_host_to_device(fn):
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if "HtoD" in e.name)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_repeated_calls_copy_nothing_to_the_gpu(backend):
    if backend not in mk.available_backends("cuda"):
        pytest.skip(f"{backend} unavailable")
    args = _adam("cuda")

    def step():
        stats = mk.grad_sq_norms(args["grads"], args["module_ids"], 3, max_norm=1.0, backend=backend)
        mk.adamw_step_(**args, lr=1e-3, clip_coef=stats.clip_coef, found_inf=stats.found_inf, backend=backend)

    assert _memcpy_host_to_device(step) > 0  # the first call copies its tables
    assert _memcpy_host_to_device(step) == 0


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_graph_replay_equals_eager_and_capture_needs_a_warm_up(backend):
    if backend not in mk.available_backends("cuda"):
        pytest.skip(f"{backend} unavailable")
    eager, graphed = _adam("cuda"), _adam("cuda")
    for a, b in zip(eager["params"], graphed["params"]):
        b.copy_(a)
    new_grads = [[torch.randn_like(g) for g in eager["grads"]] for _ in range(5)]

    def step(args):
        stats = mk.grad_sq_norms(args["grads"], args["module_ids"], 3, max_norm=1.0, backend=backend)
        mk.adamw_step_(**args, lr=1e-3, clip_coef=stats.clip_coef, found_inf=stats.found_inf, backend=backend)

    fresh = _adam("cuda")
    with pytest.raises(RuntimeError, match="before capturing"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            step(fresh)  # no warm-up: its tables would be copied during the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(graphed)  # warm-up: builds the tables
    torch.cuda.current_stream().wait_stream(side)
    for key in ("params", "exp_avgs", "exp_avg_sqs"):  # back to where the eager run starts
        for dst, src in zip(graphed[key], eager[key]):
            dst.copy_(src)
    graphed["steps"].copy_(eager["steps"])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graphed)
    for grads in new_grads:
        for dst, src in zip(graphed["grads"], grads):
            dst.copy_(src)
        graph.replay()
        mk.grad_sq_norms(eager["grads"][:1], [0], 1, backend=backend)  # another call between replays
        for dst, src in zip(eager["grads"], grads):
            dst.copy_(src)
        step(eager)
    torch.cuda.synchronize()
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        assert all(torch.equal(a, b) for a, b in zip(eager[key], graphed[key])), key
