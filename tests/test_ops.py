"""Every available backend against the float64 reference, on fresh random data.

Tolerance rule (flash-attention's): a backend's error against float64 is at most twice the
error of the 'torch' backend run at the same precision, plus a small absolute floor.
"""
from __future__ import annotations

import math

import pytest
import torch

import misa_kernels as mk
from conftest import BACKEND_DEVICE

ODD_SIZES = [1, 7, 4097, 65537 + 3]
LOW_PRECISION = [torch.float16, torch.bfloat16]
#: absolute error floor per weight dtype (below rounding noise of one update).
ATOL = {torch.float32: 1e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _grads(sizes, dtype, device, scale=1.0):
    return [(torch.randn(n, dtype=torch.float64) * scale).to(dtype).to(device) for n in sizes]


def _mixed_sizes(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            shapes.append((int(torch.randint(1, 300, (1,), generator=g)),))
        elif kind == 1:
            shapes.append((int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 70, (1,), generator=g))))
        elif kind == 2:
            shapes.append((0,) if i % 8 == 2 else (3, 5, 7))
        else:
            shapes.append((int(torch.randint(1000, 5000, (1,), generator=g)),))
    return shapes


def _assert_close_to_ref(name, got, ref64, torch32, atol):
    """|got - ref64| <= 2 * |torch32 - ref64| + atol, elementwise in the max-norm."""
    got, ref64, torch32 = (t.detach().to("cpu", torch.float64) for t in (got, ref64, torch32))
    assert torch.isfinite(got).all(), f"{name}: non-finite output"
    err = (got - ref64).abs().max().item() if got.numel() else 0.0
    base = (torch32 - ref64).abs().max().item() if got.numel() else 0.0
    assert err <= 2 * base + atol, f"{name}: error {err:.3e} > 2 x reference error {base:.3e} + {atol:.1e}"


# ----------------------------------------------------------------------------- grad_sq_norms


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
def test_sq_norms_odd_sizes_match_float64(backend, device, dtype):
    grads = _grads(ODD_SIZES, dtype, device)
    module_ids = [2, 0, 2, 1]
    stats = mk.grad_sq_norms(grads, module_ids, 4, max_norm=3.0, backend=backend)
    ref = mk.grad_sq_norms([g.cpu().double() for g in grads], module_ids, 4, max_norm=3.0, backend="torch")
    assert stats.module_sq_norms.dtype == stats.total_norm.dtype == torch.float64
    assert stats.clip_coef.dtype == stats.found_inf.dtype == torch.float32
    assert stats.module_sq_norms.shape == (4,)
    torch.testing.assert_close(stats.module_sq_norms.cpu().double(), ref.module_sq_norms, rtol=2e-6, atol=0)
    assert stats.module_sq_norms[3].item() == 0.0  # a module with no tensor
    torch.testing.assert_close(stats.total_norm.cpu(), ref.total_norm, rtol=2e-6, atol=0)
    torch.testing.assert_close(stats.clip_coef.cpu(), ref.clip_coef, rtol=2e-6, atol=0)
    assert stats.found_inf.item() == 0.0


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_sq_norms_many_tensors_many_modules(backend, device):
    shapes = _mixed_sizes(224)
    grads = [torch.randn(s, device=device) for s in shapes]
    module_ids = [(i * 7919) % 37 for i in range(len(grads))]
    stats = mk.grad_sq_norms(grads, module_ids, 40, backend=backend)
    ref = mk.grad_sq_norms([g.cpu().double() for g in grads], module_ids, 40, backend="torch")
    torch.testing.assert_close(stats.module_sq_norms.cpu().double(), ref.module_sq_norms, rtol=2e-6, atol=0)
    assert stats.clip_coef.item() == 1.0


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("rule", ["sq", "clipped_norm"])
def test_sq_norms_accumulate(backend, device, rule):
    grads = _grads([5, 300, 2049], torch.float32, device)
    module_ids = [0, 2, 0]
    accum = torch.rand(3, device=device)
    count = torch.tensor([1.0, 2.0, 3.0], device=device)
    weight = torch.rand(3, device=device) + 0.5
    accum0, count0 = accum.clone(), count.clone()
    stats = mk.grad_sq_norms(grads, module_ids, 3, max_norm=2.0, accum=accum, accum_count=count,
                             accum_weight=weight, accum_rule=rule, backend=backend)
    sq = stats.module_sq_norms.double().cpu()
    value = sq if rule == "sq" else sq.sqrt() * stats.clip_coef.double().cpu()
    expected = accum0.double().cpu() + torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) * value * weight.double().cpu()
    torch.testing.assert_close(accum.double().cpu(), expected, rtol=1e-6, atol=0)
    assert count.tolist() == [2.0, 2.0, 4.0]  # module 1 is absent: not counted


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_sq_norms_nonfinite_sets_flag_and_accumulates_nothing(backend, device, bad):
    grads = _grads([33, 4097], torch.float32, device)
    grads[1][4000] = bad
    accum = torch.rand(2, device=device)
    count = torch.ones(2, device=device)
    accum0, count0 = accum.clone(), count.clone()
    stats = mk.grad_sq_norms(grads, [0, 1], 2, max_norm=1.0, accum=accum, accum_count=count, backend=backend)
    assert stats.found_inf.item() == 1.0
    assert stats.clip_coef.item() == 1.0
    assert torch.equal(accum, accum0) and torch.equal(count, count0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_sq_norms_empty_and_zero_size(backend, device):
    stats = mk.grad_sq_norms([], [], 3, device=device, backend=backend)
    assert stats.module_sq_norms.tolist() == [0.0, 0.0, 0.0]
    assert stats.total_norm.item() == 0.0 and stats.found_inf.item() == 0.0
    count = torch.zeros(2, device=device)
    stats = mk.grad_sq_norms([torch.empty(0, device=device), torch.ones(3, device=device)], [1, 0], 2,
                             accum=torch.zeros(2, device=device), accum_count=count, backend=backend)
    assert stats.module_sq_norms.tolist() == [3.0, 0.0]
    assert count.tolist() == [1.0, 1.0]  # present, even with no elements


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_sq_norms_large_values_do_not_overflow_in_fp16(backend, device):
    grads = [torch.full((4096,), 60000.0, dtype=torch.float16, device=device)]
    stats = mk.grad_sq_norms(grads, [0], 1, backend=backend)
    assert stats.found_inf.item() == 0.0
    torch.testing.assert_close(stats.module_sq_norms.cpu().double(),
                               torch.tensor([4096 * 60000.0 ** 2], dtype=torch.float64), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- adamw_step_


def _adam_state(params, master=False):
    state = {
        "exp_avgs": [torch.rand_like(p, dtype=torch.float32) * 0.1 for p in params],
        "exp_avg_sqs": [torch.rand_like(p, dtype=torch.float32) * 0.01 for p in params],
    }
    if master:
        state["master_params"] = [p.float() + 1e-3 * torch.randn_like(p, dtype=torch.float32) for p in params]
    return state


def _as64(tensors):
    return [t.detach().cpu().double() for t in tensors]


def _run_three(backend, device, dtype, *, master, weight_decay, clip, lr_tensor, maximize, sizes=ODD_SIZES,
               module_ids=None):
    """Three AdamW steps on `backend` and on the reference in float32 and float64; returns the three."""
    params = [torch.randn(n, dtype=torch.float64).to(dtype).to(device) for n in sizes]
    module_ids = module_ids or list(range(len(params)))
    num_modules = max(module_ids) + 2
    state = _adam_state(params, master)
    steps = torch.arange(num_modules, dtype=torch.float32, device=device)  # modules at different steps
    runs = {}
    for kind in ("backend", "torch32", "ref64"):
        if kind == "ref64":
            p = _as64(state["master_params"]) if master else _as64(params)
            st = {k: _as64(v) for k, v in state.items() if k != "master_params"}
            s = steps.cpu().clone()  # float32 step counts on every backend, float64 weights too
            extra = {}
        else:
            p = [t.clone() for t in params]
            st = {k: [t.clone() for t in v] for k, v in state.items() if k != "master_params"}
            s = steps.clone()
            extra = {"master_params": [t.clone() for t in state["master_params"]]} if master else {}
        runs[kind] = (p, st, s, extra)
    gen = torch.Generator().manual_seed(99)
    for _ in range(3):
        grads64 = [torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in params]
        coef = torch.tensor(0.37) if clip else None
        lr = 1e-2
        for kind, (p, st, s, extra) in runs.items():
            dev = "cpu" if kind == "ref64" else device
            # every run sees the same gradients, rounded to the model dtype
            grads = [g.to(dtype).to(torch.float64 if kind == "ref64" else dtype).to(dev) for g in grads64]
            c = None if coef is None else coef.to(dev)
            lr_arg = torch.tensor(lr, device=dev) if lr_tensor else lr
            mk.adamw_step_(p, grads, st["exp_avgs"], st["exp_avg_sqs"], s, module_ids, lr=lr_arg,
                           beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=weight_decay, maximize=maximize,
                           clip_coef=c, backend="torch" if kind != "backend" else backend, **extra)
    return runs, params


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("clip", [False, True])
def test_adamw_fp32_matches_float64(backend, device, weight_decay, clip):
    runs, _ = _run_three(backend, device, torch.float32, master=False, weight_decay=weight_decay,
                         clip=clip, lr_tensor=False, maximize=False)
    (pb, sb, stb, _), (pt, st, stt, _), (pr, sr, str_, _) = runs["backend"], runs["torch32"], runs["ref64"]
    for i in range(len(pb)):
        _assert_close_to_ref(f"param {i}", pb[i], pr[i], pt[i], 1e-7)
        _assert_close_to_ref(f"exp_avg {i}", sb["exp_avgs"][i], sr["exp_avgs"][i], st["exp_avgs"][i], 1e-8)
        _assert_close_to_ref(f"exp_avg_sq {i}", sb["exp_avg_sqs"][i], sr["exp_avg_sqs"][i], st["exp_avg_sqs"][i], 1e-9)
    assert stb.cpu().tolist() == str_.tolist()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_adamw_master_weights_written_back(backend, device, dtype):
    runs, _ = _run_three(backend, device, dtype, master=True, weight_decay=0.01, clip=True,
                         lr_tensor=True, maximize=False)
    (pb, sb, _, eb), (pt, st, _, et), (pr, sr, _, _) = runs["backend"], runs["torch32"], runs["ref64"]
    for i in range(len(pb)):
        _assert_close_to_ref(f"master {i}", eb["master_params"][i], pr[i], et["master_params"][i], 1e-7)
        _assert_close_to_ref(f"exp_avg {i}", sb["exp_avgs"][i], sr["exp_avgs"][i], st["exp_avgs"][i], 1e-8)
        # the weight is exactly the master rounded to nearest (even)
        assert torch.equal(pb[i], eb["master_params"][i].to(dtype)), f"param {i} is not the rounded master"


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_adamw_low_precision_weights_without_master(backend, device, dtype):
    runs, _ = _run_three(backend, device, dtype, master=False, weight_decay=0.0, clip=False,
                         lr_tensor=False, maximize=True)
    (pb, _, _, _), (pt, _, _, _), (pr, _, _, _) = runs["backend"], runs["torch32"], runs["ref64"]
    for i in range(len(pb)):
        assert pb[i].dtype == dtype
        _assert_close_to_ref(f"param {i}", pb[i], pr[i], pt[i], ATOL[dtype])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_adamw_many_tensors_shared_modules(backend, device):
    shapes = _mixed_sizes(224, seed=3)
    sizes = [math.prod(s) for s in shapes]
    module_ids = [i // 3 for i in range(len(sizes))]  # three tensors per module, like weight + bias
    runs, _ = _run_three(backend, device, torch.float32, master=False, weight_decay=0.1, clip=True,
                         lr_tensor=True, maximize=False, sizes=sizes, module_ids=module_ids)
    (pb, _, stb, _), (pt, _, _, _), (pr, _, str_, _) = runs["backend"], runs["torch32"], runs["ref64"]
    for i in range(len(pb)):
        _assert_close_to_ref(f"param {i}", pb[i], pr[i], pt[i], 1e-7)
    # each present module advanced once per call, absent ones not at all
    assert stb.cpu().tolist() == str_.tolist()
    start = torch.arange(len(stb), dtype=torch.float64)
    moved = (str_ - start).tolist()
    assert moved[: max(module_ids) + 1] == [3.0] * (max(module_ids) + 1) and moved[-1] == 0.0


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("master", [False, True])
def test_adamw_found_inf_writes_nothing(backend, device, master):
    dtype = torch.bfloat16 if master else torch.float32
    params = [torch.randn(n, device=device).to(dtype) for n in (7, 4097)]
    grads = [torch.randn_like(p) for p in params]
    grads[0][3] = math.nan
    state = _adam_state(params, master)
    steps = torch.tensor([4.0, 9.0], device=device)
    before = [t.clone() for t in params + state["exp_avgs"] + state["exp_avg_sqs"] + state.get("master_params", [])]
    mk.adamw_step_(params, grads, state["exp_avgs"], state["exp_avg_sqs"], steps, [0, 1], lr=0.1,
                   weight_decay=0.1, master_params=state.get("master_params"),
                   clip_coef=torch.tensor(0.5, device=device), found_inf=torch.tensor(1.0, device=device),
                   backend=backend)
    after = params + state["exp_avgs"] + state["exp_avg_sqs"] + state.get("master_params", [])
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert steps.tolist() == [4.0, 9.0]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_adamw_fused_sq_norms(backend, device):
    grads = _grads(ODD_SIZES, torch.bfloat16, device)
    params = [torch.randn_like(g) for g in grads]
    state = _adam_state(params, master=True)
    module_ids = [0, 2, 0, 2]
    out = torch.full((3,), 123.0, dtype=torch.float64, device=device)
    mk.adamw_step_(params, grads, state["exp_avgs"], state["exp_avg_sqs"], torch.zeros(3, device=device),
                   module_ids, lr=1e-3, master_params=state["master_params"], sq_norms_out=out, backend=backend)
    ref = mk.grad_sq_norms([g.cpu().double() for g in grads], module_ids, 3, backend="torch")
    torch.testing.assert_close(out.cpu().double(), ref.module_sq_norms, rtol=2e-6, atol=0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_adamw_empty_list_and_zero_size(backend, device):
    steps = torch.zeros(2, device=device)
    mk.adamw_step_([], [], [], [], steps, [], lr=0.1, backend=backend)
    assert steps.tolist() == [0.0, 0.0]
    p = [torch.empty(0, device=device), torch.ones(5, device=device)]
    g = [torch.empty(0, device=device), torch.ones(5, device=device)]
    m = [torch.zeros_like(t) for t in p]
    v = [torch.zeros_like(t) for t in p]
    mk.adamw_step_(p, g, m, v, steps, [0, 1], lr=0.1, backend=backend)
    assert steps.tolist() == [1.0, 1.0]
    torch.testing.assert_close(p[1], torch.full((5,), 0.9, device=device))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_adamw_is_deterministic(backend, device):
    grads = _grads([65537 + 3, 17], torch.float32, device)
    outs = []
    for _ in range(2):
        params = [torch.linspace(-1, 1, g.numel(), device=device) for g in grads]
        m = [torch.full_like(g, 0.01) for g in grads]
        v = [torch.full_like(g, 0.001) for g in grads]
        out = torch.zeros(1, dtype=torch.float64, device=device)
        mk.adamw_step_(params, grads, m, v, torch.zeros(1, device=device), [0, 0], lr=0.01,
                       sq_norms_out=out, backend=backend)
        outs.append(params + m + v + [out])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_sq_norms_mixed_dtypes_match_float64(backend, device):
    grads = [torch.randn(4097, device=device).to(torch.bfloat16), torch.randn(7, device=device),
             torch.randn(300, device=device).to(torch.bfloat16)]
    module_ids = [0, 0, 1]
    accum = torch.zeros(2, device=device)
    count = torch.zeros(2, device=device)
    stats = mk.grad_sq_norms(grads, module_ids, 2, max_norm=1.0, accum=accum, accum_count=count, backend=backend)
    ref = mk.grad_sq_norms([g.cpu().double() for g in grads], module_ids, 2, max_norm=1.0, backend="torch")
    torch.testing.assert_close(stats.module_sq_norms.cpu().double(), ref.module_sq_norms, rtol=2e-6, atol=0)
    torch.testing.assert_close(stats.clip_coef.cpu(), ref.clip_coef, rtol=2e-6, atol=0)
    torch.testing.assert_close(accum.cpu().double(), ref.module_sq_norms, rtol=2e-6, atol=0)
    assert count.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_one_module_over_many_chunks(backend, device):
    """A module spanning dozens of chunks of every backend (CUDA reduces a module's chunks in a
    per-lane loop that runs more than once only past 32 chunks)."""
    grads = _grads([33 * 65536 + 5, 1000], torch.float32, device)
    stats = mk.grad_sq_norms(grads, [1, 1], 2, backend=backend)
    ref = mk.grad_sq_norms([g.cpu().double() for g in grads], [1, 1], 2, backend="torch")
    torch.testing.assert_close(stats.module_sq_norms.cpu().double(), ref.module_sq_norms, rtol=2e-6, atol=0)
    params = [torch.zeros_like(g) for g in grads]
    m = [torch.zeros_like(g) for g in grads]
    v = [torch.zeros_like(g) for g in grads]
    out = torch.zeros(2, dtype=torch.float64, device=device)
    mk.adamw_step_(params, grads, m, v, torch.zeros(2, device=device), [1, 1], lr=0.5, sq_norms_out=out,
                   backend=backend)
    torch.testing.assert_close(out.cpu().double(), ref.module_sq_norms, rtol=2e-6, atol=0)
    # first step from zero moments: the update is -lr * g / (|g| + eps): -lr * sign(g)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p, -0.5 * g / (g.abs() + 1e-8), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unaligned_views(backend, device, dtype):
    """Contiguous views that start one element into their storage: no 16-byte alignment."""
    def view(n):
        return torch.randn(n + 1, device=device).to(dtype)[1:]

    sizes = [4097, 65537 + 3, 9]
    params, grads = [view(n) for n in sizes], [view(n) for n in sizes]
    master = [p.float() for p in params] if dtype != torch.float32 else None
    base = master or params
    m = [torch.rand(n + 1, device=device)[1:] * 0.1 for n in sizes]
    v = [torch.rand(n + 1, device=device)[1:] * 0.01 for n in sizes]
    expected = [t.clone() for t in base], [t.clone() for t in m], [t.clone() for t in v]
    mk.adamw_step_(expected[0], [g.clone() for g in grads], expected[1], expected[2], torch.zeros(3, device=device),
                   [0, 1, 2], lr=0.01, weight_decay=0.1, backend="torch")
    mk.adamw_step_(params, grads, m, v, torch.zeros(3, device=device), [0, 1, 2], lr=0.01, weight_decay=0.1,
                   master_params=master, backend=backend)
    for got, want in zip(base + m + v, expected[0] + expected[1] + expected[2]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    stats = mk.grad_sq_norms(grads, [0, 1, 2], 3, backend=backend)
    ref = mk.grad_sq_norms([g.cpu().double() for g in grads], [0, 1, 2], 3, backend="torch")
    torch.testing.assert_close(stats.module_sq_norms.cpu().double(), ref.module_sq_norms, rtol=2e-6, atol=0)
