"""Checks specific to the C++ `cpu` backend: results that do not depend on the thread count,
chunk boundaries and vector tails, dtype combinations, and the TORCH_CHECKs that guard a
direct call into the compiled CPU module (misa_kernels._cpu_<capability>).

Tolerance rule as in test_ops.py: error against float64 <= 2 x the float32 'torch' backend's
error + a small floor.
"""
from __future__ import annotations

import math

import pytest
import torch

import misa_kernels as mk
from misa_kernels import _extension

pytestmark = pytest.mark.skipif("cpu" not in mk.available_backends("cpu"),
                                reason=f"cpu backend unavailable: {_extension.cpu_unavailable_reason()}")

#: elements per work chunk (kChunkElements in csrc/cpu/multi_tensor.h); 32768 only to collect
#: the tests on a machine without the build, where they all skip.
CHUNK = _extension.cpu_module().chunk_elements if "cpu" in mk.available_backends("cpu") else 32768
#: sizes around chunk boundaries, plus one that spans many chunks.
CHUNK_SIZES = [CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 37, 1_000_003]
#: every tail length of a 16- or 32-element vector step, and sizes around the 8 x 32 elements
#: below which the sum of squares reads a single run.
TAIL_SIZES = [*range(1, 70), 255, 256, 257, 1000]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _close_to_reference(name, got, ref64, ref32, atol):
    got, ref64, ref32 = (t.detach().double() for t in (got, ref64, ref32))
    err = (got - ref64).abs().max().item()
    base = (ref32 - ref64).abs().max().item()
    assert err <= 2 * base + atol, f"{name}: error {err:.3e} > 2 x reference error {base:.3e} + {atol:.1e}"


def _adamw_state(params, master):
    gen = torch.Generator().manual_seed(5)
    state = {
        "exp_avgs": [torch.rand(p.shape, generator=gen) * 0.1 for p in params],
        "exp_avg_sqs": [torch.rand(p.shape, generator=gen) * 0.01 for p in params],
    }
    if master:
        state["master_params"] = [p.float() + 1e-3 * torch.randn(p.shape, generator=gen) for p in params]
    return state


def _clone_all(params, state):
    return [p.clone() for p in params], {k: [t.clone() for t in v] for k, v in state.items()}


def _adamw_vs_reference(sizes, param_dtype, grad_dtype, *, master, module_ids=None, **hyper):
    """One cpu-backend step and float32/float64 reference steps on the same data; returns all three."""
    params = [torch.randn(n, dtype=torch.float64).to(param_dtype) for n in sizes]
    grads = [torch.randn(n, dtype=torch.float64).to(grad_dtype) for n in sizes]
    module_ids = module_ids or list(range(len(sizes)))
    state = _adamw_state(params, master)
    steps = torch.arange(max(module_ids) + 1, dtype=torch.float32) * 3
    runs = {}
    for kind in ("cpu", "torch32", "ref64"):
        p, st = _clone_all(params, state)
        g, s = grads, steps.clone()
        if kind == "ref64":
            p = [t.double() for t in st.pop("master_params", p)]
            st = {k: [t.double() for t in v] for k, v in st.items()}
            g = [t.double() for t in grads]
        extra = {"master_params": st["master_params"]} if "master_params" in st else {}
        args = dict(hyper)
        mk.adamw_step_(p, g, st["exp_avgs"], st["exp_avg_sqs"], s, module_ids,
                       backend="cpu" if kind == "cpu" else "torch", **extra, **args)
        runs[kind] = (p, st, s)
    return runs


# ------------------------------------------------------------------------ thread independence


def test_sq_norms_bitwise_identical_for_any_thread_count(restore_threads):
    # one module per multi-chunk tensor: a partition that moved with the thread count would
    # change the fp32 chunk sums, and some of these 31 float32 totals would round differently
    sizes = [*CHUNK_SIZES, 5, 0, *(CHUNK * k + 1000 * k for k in range(1, 25))]
    grads = [torch.randn(n) for n in sizes]
    module_ids = list(range(len(grads)))
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        accum = torch.ones(len(grads))
        stats = mk.grad_sq_norms(grads, module_ids, len(grads), max_norm=1.0, accum=accum,
                                 accum_rule="clipped_norm", backend="cpu")
        results.append([*stats, accum])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_adamw_bitwise_identical_for_any_thread_count(restore_threads, dtype, master):
    sizes = (*CHUNK_SIZES, 33, 0)
    params = [torch.randn(n).to(dtype) for n in sizes]
    grads = [torch.randn(n).to(dtype) for n in sizes]
    module_ids = [0, 1, 1, 2, 0, 3, 2]
    state = _adamw_state(params, master)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        p, st = _clone_all(params, state)
        steps, norms = torch.zeros(4), torch.zeros(4, dtype=torch.float64)
        for _ in range(2):
            mk.adamw_step_(p, grads, st["exp_avgs"], st["exp_avg_sqs"], steps, module_ids, lr=1e-2,
                           weight_decay=0.1, master_params=st.get("master_params"),
                           clip_coef=torch.tensor(0.6), sq_norms_out=norms, backend="cpu")
        results.append(p + [t for v in st.values() for t in v] + [steps, norms])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# ------------------------------------------------------------------ chunk boundaries and tails


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sq_norms_across_chunks_and_vector_tails(dtype):
    sizes = [*CHUNK_SIZES, *TAIL_SIZES]
    grads = [torch.randn(n, dtype=torch.float64).to(dtype) for n in sizes]
    module_ids = [i % 5 for i in range(len(sizes))]
    stats = mk.grad_sq_norms(grads, module_ids, 5, backend="cpu")
    ref = mk.grad_sq_norms([g.double() for g in grads], module_ids, 5, backend="torch")
    # fp32 sums over short blocks, double beyond: within a few float32 roundings of float64
    torch.testing.assert_close(stats.module_sq_norms.double(), ref.module_sq_norms, rtol=3e-7, atol=0)
    torch.testing.assert_close(stats.total_norm.double(), ref.total_norm, rtol=3e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_sq_norms_across_chunks_and_vector_tails(dtype):
    sizes = [*CHUNK_SIZES, *TAIL_SIZES]
    grads = [torch.randn(n, dtype=torch.float64).to(dtype) for n in sizes]
    module_ids = [i % 5 for i in range(len(sizes))]
    params = [torch.zeros_like(g) for g in grads]
    state = _adamw_state(params, master=False)
    out = torch.zeros(5, dtype=torch.float64)
    mk.adamw_step_(params, grads, state["exp_avgs"], state["exp_avg_sqs"], torch.zeros(5), module_ids, lr=1e-3,
                   sq_norms_out=out, backend="cpu")
    ref = mk.grad_sq_norms([g.double() for g in grads], module_ids, 5, backend="torch")
    torch.testing.assert_close(out, ref.module_sq_norms, rtol=3e-7, atol=0)


def test_adamw_across_chunks_and_vector_tails():
    sizes = [*CHUNK_SIZES, *TAIL_SIZES]
    runs = _adamw_vs_reference(sizes, torch.float32, torch.float32, master=False,
                               module_ids=[i % 4 for i in range(len(sizes))], lr=1e-2, weight_decay=0.1,
                               clip_coef=torch.tensor(0.8))
    (pc, sc, stc), (pt, st, _), (pr, sr, str_) = runs["cpu"], runs["torch32"], runs["ref64"]
    for i in range(len(sizes)):
        _close_to_reference(f"param {i}", pc[i], pr[i], pt[i], 1e-7)
        _close_to_reference(f"exp_avg {i}", sc["exp_avgs"][i], sr["exp_avgs"][i], st["exp_avgs"][i], 1e-8)
        _close_to_reference(f"exp_avg_sq {i}", sc["exp_avg_sqs"][i], sr["exp_avg_sqs"][i], st["exp_avg_sqs"][i], 1e-9)
    assert stc.tolist() == str_.tolist()


# --------------------------------------------------------------------------- dtype combinations


@pytest.mark.parametrize("param_dtype,grad_dtype,master", [
    (torch.bfloat16, torch.float32, True),
    (torch.float16, torch.bfloat16, True),
    (torch.float32, torch.bfloat16, False),
    (torch.float32, torch.float32, True),
])
def test_adamw_mixed_param_and_grad_dtypes(param_dtype, grad_dtype, master):
    sizes = [3, 4097, CHUNK + 5]
    runs = _adamw_vs_reference(sizes, param_dtype, grad_dtype, master=master, lr=1e-2, weight_decay=0.01,
                               maximize=True)
    (pc, sc, _), (pt, st, _), (pr, sr, _) = runs["cpu"], runs["torch32"], runs["ref64"]
    for i in range(len(sizes)):
        weight = sc["master_params"][i] if master else pc[i]
        weight32 = st["master_params"][i] if master else pt[i]
        _close_to_reference(f"weight {i}", weight, pr[i], weight32, 1e-7)
        _close_to_reference(f"exp_avg {i}", sc["exp_avgs"][i], sr["exp_avgs"][i], st["exp_avgs"][i], 1e-8)
        if master:
            assert torch.equal(pc[i], sc["master_params"][i].to(param_dtype)), f"param {i} is not the rounded master"


@pytest.mark.parametrize("beta1", [0.0, 0.3, 0.6])
def test_adamw_first_moment_for_any_beta1(beta1):
    """1 - beta1 >= 0.5 takes the other form of torch's lerp; beta1 = 0 makes m the clipped grad."""
    runs = _adamw_vs_reference([4099, 17], torch.float32, torch.float32, master=False, lr=1e-3, beta1=beta1,
                               clip_coef=torch.tensor(0.5))
    (pc, sc, _), (pt, st, _), (pr, sr, _) = runs["cpu"], runs["torch32"], runs["ref64"]
    for i in range(2):
        _close_to_reference(f"exp_avg {i}", sc["exp_avgs"][i], sr["exp_avgs"][i], st["exp_avgs"][i], 1e-8)
        _close_to_reference(f"param {i}", pc[i], pr[i], pt[i], 1e-7)
        if beta1 == 0.0:
            assert torch.equal(sc["exp_avgs"][i], st["exp_avgs"][i])


def test_nonfinite_norms_skip_the_step_but_still_report_norms():
    grads = [torch.randn(n) for n in (CHUNK + 3, 300)]
    grads[0][CHUNK + 1] = math.inf
    params = [torch.randn_like(g) for g in grads]
    state = _adamw_state(params, master=False)
    steps = torch.tensor([1.0, 1.0])
    stats = mk.grad_sq_norms(grads, [0, 1], 2, max_norm=1.0, backend="cpu")
    assert stats.found_inf.item() == 1.0 and stats.clip_coef.item() == 1.0
    before = [t.clone() for t in params + state["exp_avgs"] + state["exp_avg_sqs"]]
    out = torch.zeros(2, dtype=torch.float64)
    mk.adamw_step_(params, grads, state["exp_avgs"], state["exp_avg_sqs"], steps, [0, 1], lr=0.1,
                   clip_coef=stats.clip_coef, found_inf=stats.found_inf, sq_norms_out=out, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(before, params + state["exp_avgs"] + state["exp_avg_sqs"]))
    assert steps.tolist() == [1.0, 1.0]
    assert out[0].item() == math.inf
    torch.testing.assert_close(out[1], grads[1].double().square().sum(), rtol=2e-6, atol=0)


# ------------------------------------------------------------------- checks on a direct C++ call


def _direct_adamw(**overrides):
    params = [torch.randn(5), torch.randn(5)]
    args = dict(params=params, grads=[torch.randn(5), torch.randn(5)], exp_avgs=[torch.zeros(5), torch.zeros(5)],
                exp_avg_sqs=[torch.zeros(5), torch.zeros(5)], steps=torch.zeros(2), module_ids=[0, 1], lr=0.1,
                lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False,
                master_params=None, clip_coef=None, found_inf=None, sq_norms_out=None)
    args.update(overrides)
    _extension.cpu_module().cpu_adamw_step_(*args.values())


@pytest.mark.parametrize("overrides,message", [
    ({"grads": [torch.randn(5)]}, r"grads has 1 entries but params has 2"),
    ({"module_ids": [0, 2]}, r"module_ids\[1\] = 2 is outside \[0, steps.numel\(\)=2\)"),
    ({"params": [torch.randn(10)[::2], torch.randn(5)]}, r"params\[0\] is not a dense contiguous tensor"),
    ({"params": [torch.randn(5), torch.randn(5, dtype=torch.float64)]}, r"params\[1\] has dtype Double"),
    ({"grads": [torch.randn(5), torch.randn(5).half()]}, r"grads\[1\] has dtype Half but grads\[0\] has Float"),
    ({"exp_avgs": [torch.zeros(5), torch.zeros(4)]}, r"exp_avgs\[1\] has 4 elements but params\[1\] has 5"),
    ({"exp_avg_sqs": [torch.zeros(5).bfloat16(), torch.zeros(5)]}, r"exp_avg_sqs\[0\] has dtype BFloat16"),
    ({"master_params": [torch.zeros(5)]}, r"master_params has 1 entries but params has 2"),
    ({"steps": torch.zeros(2, dtype=torch.int64)}, r"steps has dtype Long"),
    ({"steps": torch.zeros(2, dtype=torch.float64)}, r"steps has dtype Double; expected float32"),
    ({"sq_norms_out": torch.zeros(2)}, r"sq_norms_out has dtype Float; expected one of \[Double\]"),
    ({"found_inf": torch.zeros((), dtype=torch.float64)}, r"found_inf has dtype Double; expected float32"),
    ({"lr_tensor": torch.zeros((), dtype=torch.float16)}, r"lr_tensor has dtype Half; expected float32 or float64"),
    ({"sq_norms_out": torch.zeros(3)}, r"sq_norms_out must have shape \(2,\)"),
    ({"clip_coef": torch.ones(2)}, r"clip_coef must hold one element"),
    ({"found_inf": torch.zeros((), dtype=torch.int32)}, r"found_inf has dtype Int"),
])
def test_direct_adamw_call_rejects_bad_arguments(overrides, message):
    with pytest.raises(RuntimeError, match=message):
        _direct_adamw(**overrides)


@pytest.mark.parametrize("args,message", [
    (([torch.ones(3)], [0, 1], 2, None, None, None, None, 0), r"module_ids has 2 entries but grads has 1"),
    (([torch.ones(3)], [0], 1, None, None, None, None, 2), r"accum_rule must be 0 \(sq\) or 1"),
    (([torch.ones(3)], [1], 1, None, None, None, None, 0), r"module_ids\[0\] = 1 is outside \[0, num_modules=1\)"),
    (([torch.ones(3, dtype=torch.float64)], [0], 1, None, None, None, None, 0), r"grads\[0\] has dtype Double"),
    (([torch.ones(3)], [0], 2, None, torch.zeros(3), None, None, 0), r"accum must have shape \(2,\)"),
    (([torch.ones(3)], [0], 1, 0.0, None, None, None, 0), r"max_norm must be positive"),
])
def test_direct_sq_norms_call_rejects_bad_arguments(args, message):
    with pytest.raises(RuntimeError, match=message):
        _extension.cpu_module().cpu_grad_sq_norms(*args)
