"""Issue 11 at the op level, on every backend: a bad input is refused before anything is written,
with a message naming the argument and index; an odd but valid one gives the reference's result.

Cases (numbered as in the issue): 1 overlapping tensors and disjoint expert slices, 3 tensor and
numpy hyperparameters, 5 huge finite gradients, 7 one-element lr tensors, 10 float64 weights.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import misa_kernels as mk
from conftest import BACKEND_DEVICE

# Triton's interpreter computes in numpy, which warns when the float32 pass overflows (on purpose)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

#: more than one chunk on every backend (C++ cpu 32K, CUDA and the Triton interpreter 64K)
MULTI_CHUNK = 65536 + 77


def _adam_args(sizes, device, dtype=torch.float32, master=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(device, dtype) for s in sizes]
    moment = torch.float64 if dtype == torch.float64 else torch.float32
    args = dict(
        params=params,
        grads=[torch.randn(s, generator=g).to(device, dtype) for s in sizes],
        exp_avgs=[(0.1 * torch.randn(s, generator=g)).to(device, moment) for s in sizes],
        exp_avg_sqs=[(0.01 * torch.rand(s, generator=g)).to(device, moment) for s in sizes],
        steps=torch.arange(len(sizes), dtype=torch.float32, device=device),
        module_ids=list(range(len(sizes))),
    )
    if master:
        args["master_params"] = [p.float() + 1e-3 for p in params]
    return args


def _tensors(args):
    out = []
    for value in args.values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            out.extend(value)
    return out


def _refused_untouched(call, args, error, match):
    """`call(**args)` raises `error` matching `match` and leaves every tensor of `args` as it was."""
    before = [t.clone() for t in _tensors(args)]
    with pytest.raises(error, match=match):
        call(**args)
    for i, (a, b) in enumerate(zip(before, _tensors(args))):
        assert torch.equal(a, b), f"tensor {i} was written by a refused call"


# ------------------------------------------------------------- case 5: huge finite gradients


def _huge(sizes, scale, device, dtype=torch.float32, seed=1):
    """Finite gradients of magnitude up to `scale` (uniform in [-scale, scale])."""
    g = torch.Generator().manual_seed(seed)
    return [((torch.rand(s, generator=g, dtype=torch.float64) * 2 - 1) * scale).to(device, dtype) for s in sizes]


def _sq64(grads, module_ids, num_modules):
    sums = torch.zeros(num_modules, dtype=torch.float64)
    for g, m in zip(grads, module_ids):
        sums[m] += g.cpu().double().square().sum()
    return sums


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e21, 2e19, 3e38])  # per element; squares overflow float32
def test_huge_finite_gradients_have_finite_norms(backend, device, dtype, scale):
    sizes, module_ids = [7, MULTI_CHUNK, 300], [0, 1, 1]
    grads = _huge(sizes, scale, device, dtype)
    ref = _sq64(grads, module_ids, 3)
    max_norm = scale * 1e-20  # a clip coefficient near 1e-22: a normal float32, and a sane step
    stats = mk.grad_sq_norms(grads, module_ids, 3, max_norm=max_norm, backend=backend)
    assert stats.found_inf.item() == 0.0
    torch.testing.assert_close(stats.module_sq_norms.cpu(), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.total_norm.cpu(), ref.sum().sqrt(), rtol=1e-6, atol=0)
    expected_coef = min(1.0, max_norm / (ref.sum().sqrt().item() + 1e-6))
    torch.testing.assert_close(stats.clip_coef.cpu(), torch.tensor(expected_coef, dtype=torch.float32),
                               rtol=1e-6, atol=0)
    # the fused norms of the AdamW pass, and the step itself: taken, clipped to a sane size
    args = _adam_args(sizes, device, dtype, master=dtype != torch.float32)
    args.update(grads=grads, module_ids=module_ids)
    out = torch.zeros(3, dtype=torch.float64, device=device)
    before = [w.clone() for w in args.get("master_params", args["params"])]
    mk.adamw_step_(**args, lr=1e-3, clip_coef=stats.clip_coef, found_inf=stats.found_inf, sq_norms_out=out,
                   backend=backend)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-6, atol=0)
    assert args["steps"].tolist() == [1.0, 2.0, 2.0]  # modules 0 and 1 advanced, 2 is absent
    for w, w0 in zip(args.get("master_params", args["params"]), before):
        assert torch.isfinite(w).all() and not torch.equal(w, w0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the unskipped update
def test_an_inf_or_nan_among_huge_gradients_still_flags(backend, device, bad):
    grads = _huge([MULTI_CHUNK, 9], 1e21, device)
    grads[0][MULTI_CHUNK - 3] = bad  # in a chunk whose float32 sum overflows anyway
    stats = mk.grad_sq_norms(grads, [0, 1], 2, max_norm=1.0, backend=backend)
    assert stats.found_inf.item() == 1.0 and stats.clip_coef.item() == 1.0
    out = torch.zeros(2, dtype=torch.float64, device=device)
    args = _adam_args([MULTI_CHUNK, 9], device)
    args["grads"] = grads
    mk.adamw_step_(**args, lr=1e-3, sq_norms_out=out, backend=backend)
    assert not math.isfinite(out[0].item()) and math.isfinite(out[1].item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_backends_agree_near_float32_overflow():
    """Gradients whose float32 sums of squares overflow only just: both GPU backends take the
    float64 sums, so both report finite norms and the same flag."""
    backends = [b for b in ("cuda", "triton") if b in mk.available_backends("cuda")]
    grads = _huge([MULTI_CHUNK, 4096], 1.9e19, "cuda")  # squares up to 3.6e38 > float32 max
    ref = _sq64(grads, [0, 1], 2)
    for backend in backends:
        stats = mk.grad_sq_norms(grads, [0, 1], 2, max_norm=1.0, backend=backend)
        assert stats.found_inf.item() == 0.0, backend
        torch.testing.assert_close(stats.module_sq_norms.cpu(), ref, rtol=1e-6, atol=0, msg=backend)


# --------------------------------------------------------------------- case 7: lr tensors


def _mixed_shape_args(device):
    """23 parameters, the 12th of them 0-dim (a scalar gain), as in the issue."""
    sizes = [(5,), (3, 4)] * 5 + [(2,), ()] + [(7,)] * 11
    return _adam_args(sizes, device)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("lr", [torch.tensor([2.0 ** -7]), torch.tensor([[2.0 ** -7]]), torch.tensor(2.0 ** -7)])
def test_one_element_lr_tensor_is_a_scalar(backend, device, lr):
    by_float = _mixed_shape_args(device)
    by_tensor = _mixed_shape_args(device)
    mk.adamw_step_(**by_float, lr=2.0 ** -7, weight_decay=0.1, backend=backend)
    mk.adamw_step_(**by_tensor, lr=lr.to(device), weight_decay=0.1, backend=backend)
    for a, b in zip(_tensors(by_float), _tensors(by_tensor)):
        assert a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_lr_with_two_elements_is_refused_before_any_write(backend, device):
    _refused_untouched(lambda **a: mk.adamw_step_(**a, lr=torch.tensor([1e-3, 1e-3]), backend=backend),
                       _mixed_shape_args(device), ValueError,
                       r"lr must be a number or a 0-dim or one-element tensor, got shape \(2,\)")


# ------------------------------------------------------ case 3: tensor and numpy hyperparameters


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("hyper,error,message", [
    ({"weight_decay": torch.tensor(math.nan)}, ValueError, r"Invalid weight_decay value: nan \(must be finite\)"),
    ({"beta1": torch.tensor(1.5)}, ValueError, r"Invalid beta1 value: 1.5 \(must lie in \[0.0, 1.0\)\)"),
    ({"lr": torch.tensor(-1.0)}, ValueError, r"Invalid learning rate value: -1.0"),
    ({"eps": torch.tensor(-0.5)}, ValueError, r"Invalid epsilon value: -0.5"),
    ({"lr": math.inf}, ValueError, r"Invalid learning rate value: inf \(must be finite\)"),
    ({"beta2": np.float64(math.nan)}, ValueError, r"Invalid beta2 value: nan"),
    ({"lr": True}, TypeError, r"Invalid learning rate value: True \(a real number is needed\)"),
    ({"weight_decay": np.bool_(True)}, TypeError, r"Invalid weight_decay value: (np\.)?True"),
    ({"beta1": "0.9"}, TypeError, r"Invalid beta1 value: '0.9'"),
    ({"eps": torch.tensor([1e-8, 1e-8])}, ValueError, r"epsilon must be a number or a one-element tensor"),
    ({"maximize": 1}, TypeError, r"maximize must be a bool, got int"),
])
def test_bad_hyperparameters_are_refused_before_any_write(backend, device, hyper, error, message):
    hyper = {"lr": 1e-3, **hyper}
    _refused_untouched(lambda **a: mk.adamw_step_(**a, **hyper, backend=backend), _adam_args([5, 70], device),
                       error, message)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_numpy_and_host_tensor_hyperparameters_act_as_numbers(backend, device):
    plain = _adam_args([5, 70], device)
    numpy = _adam_args([5, 70], device)
    tensors = _adam_args([5, 70], device)
    mk.adamw_step_(**plain, lr=2.0 ** -7, beta1=0.5, beta2=0.75, eps=2.0 ** -20, weight_decay=1.0, backend=backend)
    mk.adamw_step_(**numpy, lr=np.float32(2.0 ** -7), beta1=np.float64(0.5), beta2=np.float32(0.75),
                   eps=np.float64(2.0 ** -20), weight_decay=np.int64(1), backend=backend)
    mk.adamw_step_(**tensors, lr=torch.tensor(2.0 ** -7), beta1=torch.tensor(0.5), beta2=torch.tensor(0.75),
                   eps=torch.tensor(2.0 ** -20), weight_decay=torch.tensor(1), backend=backend)
    for a, b, c in zip(_tensors(plain), _tensors(numpy), _tensors(tensors)):
        assert torch.equal(a, b) and torch.equal(a, c)
    grads = plain["grads"]
    by_float = mk.grad_sq_norms(grads, [0, 1], 2, max_norm=0.5, backend=backend)
    by_numpy = mk.grad_sq_norms(grads, [0, 1], 2, max_norm=np.float32(0.5), backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(by_float, by_numpy))


def test_bad_max_norm_is_refused():
    with pytest.raises(ValueError, match=r"Invalid max_norm value: nan \(must be finite\)"):
        mk.grad_sq_norms([torch.ones(3)], [0], 1, max_norm=torch.tensor(math.nan))
    with pytest.raises(TypeError, match=r"Invalid max_norm value: False"):
        mk.grad_sq_norms([torch.ones(3)], [0], 1, max_norm=False)


# ------------------------------------------------------ case 1: overlapping and disjoint views


def _share(args, what):
    """Makes the arguments alias as `what` says; returns the message expected."""
    n = args["params"][0].numel()
    if what == "two params on one storage":
        args["params"][1] = args["params"][0].view(args["params"][1].shape)
        return r"params\[0\] and params\[1\] overlap in memory \(\d+ bytes in common\)"
    if what == "overlapping views":
        flat = torch.randn(n + n // 2, device=args["params"][0].device)
        args["params"][0], args["params"][1] = flat[:n], flat[n // 2:]
        return r"params\[0\] and params\[1\] overlap in memory"
    if what == "param is its grad":
        args["grads"][1] = args["params"][1]
        return r"params\[1\] and grads\[1\] overlap in memory"
    if what == "one moment for both":
        args["exp_avg_sqs"][0] = args["exp_avgs"][0]
        return r"exp_avgs\[0\] and exp_avg_sqs\[0\] overlap in memory"
    if what == "steps inside a moment":
        args["steps"] = args["exp_avgs"][1][:2]
        return r"exp_avgs\[1\] and steps overlap in memory"
    raise AssertionError(what)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("what", ["two params on one storage", "overlapping views", "param is its grad",
                                  "one moment for both", "steps inside a moment"])
def test_overlapping_tensors_are_refused_before_any_write(backend, device, what):
    args = _adam_args([MULTI_CHUNK, MULTI_CHUNK], device)
    message = _share(args, what)
    _refused_untouched(lambda **a: mk.adamw_step_(**a, lr=1e-3, backend=backend), args, ValueError, message)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_a_master_sharing_its_weights_storage_is_refused(backend, device):
    args = _adam_args([64, 64], device, torch.bfloat16, master=True)
    storage = torch.zeros(128, dtype=torch.bfloat16, device=device)
    args["params"][0] = storage[:64]
    args["master_params"][0] = storage.view(torch.float32)
    _refused_untouched(lambda **a: mk.adamw_step_(**a, lr=1e-3, backend=backend), args, ValueError,
                       r"params\[0\] and master_params\[0\] overlap in memory")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_overlapping_accumulators_are_refused(backend, device):
    grads = [torch.randn(5, device=device)]
    buffer = torch.zeros(4, device=device)
    with pytest.raises(ValueError, match=r"accum and accum_count overlap in memory"):
        mk.grad_sq_norms(grads, [0], 2, accum=buffer[:2], accum_count=buffer[1:3], backend=backend)
    assert buffer.tolist() == [0.0] * 4


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("expert_shape", [(37, 65), (37, 1901)])  # one chunk; several (unaligned starts)
def test_expert_slices_of_one_weight_train_like_separate_tensors(backend, device, dtype, expert_shape):
    """The optimizer passes w[e] and w.grad[e] of a 3-D MoE weight: disjoint contiguous views at
    element offsets that are no multiple of 16 bytes. Two steps on the views equal two steps of
    the reference on separate copies."""
    experts = 3
    weight = torch.randn(experts, *expert_shape, device=device).to(dtype)
    grads = torch.randn(experts, *expert_shape, device=device).to(dtype)
    exp_avg = torch.zeros(experts, *expert_shape, device=device)
    exp_avg_sq = torch.zeros(experts, *expert_shape, device=device)
    master = weight.float() if dtype != torch.float32 else None
    separate = [[t[e].clone() for e in range(experts)] for t in (weight, grads, exp_avg, exp_avg_sq)]
    separate_master = None if master is None else [master[e].clone() for e in range(experts)]
    steps, steps_ref = torch.zeros(experts, device=device), torch.zeros(experts, device=device)
    ids = list(range(experts))
    for _ in range(2):
        mk.adamw_step_([weight[e] for e in ids], [grads[e] for e in ids], [exp_avg[e] for e in ids],
                       [exp_avg_sq[e] for e in ids], steps, ids, lr=1e-2, weight_decay=0.1,
                       master_params=None if master is None else [master[e] for e in ids], backend=backend)
        mk.adamw_step_(*separate, steps_ref, ids, lr=1e-2, weight_decay=0.1, master_params=separate_master,
                       backend="torch")
    for e in ids:
        torch.testing.assert_close(exp_avg[e], separate[2][e], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(exp_avg_sq[e], separate[3][e], rtol=1e-6, atol=1e-9)
        if master is None:
            torch.testing.assert_close(weight[e], separate[0][e], rtol=1e-6, atol=1e-7)
        else:
            torch.testing.assert_close(master[e], separate_master[e], rtol=1e-6, atol=1e-7)
            assert torch.equal(weight[e], master[e].to(dtype))
    assert steps.tolist() == [2.0] * experts
    stats = mk.grad_sq_norms([grads[e] for e in ids], ids, experts, backend=backend)
    torch.testing.assert_close(stats.module_sq_norms.cpu(), _sq64([grads[e] for e in ids], ids, experts),
                               rtol=2e-6, atol=0)


def test_separate_weights_of_torch_adamw_and_expert_slices_agree():
    """The reference on expert slices against torch.optim.AdamW on separate parameters."""
    weight = torch.randn(3, 5, 7, dtype=torch.float64)
    grads = [torch.randn(5, 7, dtype=torch.float64) for _ in range(3)]
    params = [torch.nn.Parameter(weight[e].clone()) for e in range(3)]
    adamw = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=False)
    exp_avg, exp_avg_sq = torch.zeros_like(weight), torch.zeros_like(weight)
    steps = torch.zeros(3)
    for _ in range(3):
        for p, g in zip(params, grads):
            p.grad = g
        adamw.step()
        mk.adamw_step_([weight[e] for e in range(3)], grads, [exp_avg[e] for e in range(3)],
                       [exp_avg_sq[e] for e in range(3)], steps, [0, 1, 2], lr=1e-2, weight_decay=0.1,
                       backend="torch")
    for e in range(3):
        torch.testing.assert_close(weight[e], params[e].detach(), rtol=1e-12, atol=1e-14)


def test_names_are_quoted_in_messages():
    args = _adam_args([6, 6], "cpu")
    names = ["layers.0.weight", "layers.0.bias"]
    bad = dict(args, grads=[args["grads"][0], torch.randn(12)[::2]])
    with pytest.raises(ValueError, match=r"grads\[1\] \('layers.0.bias'\) \(\(6,\) torch.float32 on cpu\) is not contiguous"):
        mk.adamw_step_(**bad, lr=1e-3, names=names)
    shared = dict(args, params=[args["params"][0], args["params"][0]])
    with pytest.raises(ValueError, match=r"params\[0\] \('layers.0.weight'\) and params\[1\] \('layers.0.bias'\) overlap"):
        mk.adamw_step_(**shared, lr=1e-3, names=names)
    with pytest.raises(ValueError, match=r"names must hold one string per tensor \(2\), got 3 entries"):
        mk.adamw_step_(**args, lr=1e-3, names=names + ["extra"])


# --------------------------------------------------------------------- case 10: float64


def test_float64_weights_on_the_torch_backend_match_torch_adamw():
    """float64 weights and moments; float32 step counts, clip coefficient and flag, as the
    optimizer keeps one float32 step vector for all parameters."""
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(s, generator=g, dtype=torch.float64) for s in ((4, 3), (7,), ())]
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    adamw = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, foreach=False)
    exp_avgs = [torch.zeros_like(w) for w in weights]
    exp_avg_sqs = [torch.zeros_like(w) for w in weights]
    steps = torch.zeros(3)
    for _ in range(4):
        grads = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in weights]
        stats = mk.grad_sq_norms(grads, [0, 1, 2], 3, max_norm=10.0, backend="torch")
        assert stats.module_sq_norms.dtype == torch.float64 and stats.clip_coef.dtype == torch.float32
        for p, grad in zip(params, grads):
            p.grad = grad * stats.clip_coef.double()
        adamw.step()
        out = torch.zeros(3, dtype=torch.float64)
        mk.adamw_step_(weights, grads, exp_avgs, exp_avg_sqs, steps, [0, 1, 2], lr=1e-2, beta1=0.8, beta2=0.99,
                       weight_decay=0.1, clip_coef=stats.clip_coef, found_inf=stats.found_inf, sq_norms_out=out,
                       backend="torch")
        torch.testing.assert_close(out, stats.module_sq_norms, rtol=1e-15, atol=0)
    for w, p in zip(weights, params):
        torch.testing.assert_close(w, p.detach(), rtol=1e-12, atol=1e-14)
    assert steps.dtype == torch.float32 and steps.tolist() == [4.0] * 3


@pytest.mark.parametrize("name", mk.backends.names())
def test_supports_dtype_names_the_float64_backend(name):
    assert mk.supports_dtype(name, torch.float32) and mk.supports_dtype(name, torch.bfloat16)
    assert mk.supports_dtype(name, torch.float64) == (name == "torch")
    with pytest.raises(ValueError, match="unknown backend 'warp_drive'"):
        mk.supports_dtype("warp_drive", torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_float64_state_buffers_are_refused(backend, device):
    args = _adam_args([5, 7], device, torch.float64)
    args["steps"] = args["steps"].double()
    _refused_untouched(lambda **a: mk.adamw_step_(**a, lr=1e-3, backend=backend), args, TypeError,
                       "steps has dtype torch.float64; expected torch.float32")
    args = _adam_args([5, 7], device)
    _refused_untouched(
        lambda **a: mk.adamw_step_(**a, lr=1e-3, sq_norms_out=torch.zeros(2, dtype=torch.float16, device=device),
                                   backend=backend),
        args, TypeError, "sq_norms_out has dtype torch.float16; expected torch.float64, torch.float32")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_a_float32_sq_norms_out_receives_the_float64_sums_rounded(backend, device):
    """float64 is the contract; a float32 buffer (older callers) gets the same sums rounded, and
    inf where a sum of finite squares exceeds float32's range."""
    sums = {}
    for dtype in (torch.float64, torch.float32):
        args = _adam_args([5, 7], device)
        args["grads"][1].fill_(1e21)
        out = torch.full((2,), -1.0, dtype=dtype, device=device)
        mk.adamw_step_(**args, lr=1e-3, sq_norms_out=out, backend=backend)
        sums[dtype] = out
    assert torch.isfinite(sums[torch.float64]).all() and sums[torch.float32][1].item() == float("inf")
    assert sums[torch.float32][0].item() == sums[torch.float64][0].float().item()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_a_late_bad_argument_writes_nothing(backend, device):
    """The checks run in full before any backend sees the call: a bad last argument leaves the
    weights, moments and steps as they were."""
    args = _adam_args([MULTI_CHUNK, 9, 0], device)
    _refused_untouched(lambda **a: mk.adamw_step_(**a, lr=1e-3, found_inf=torch.zeros(2, device=device),
                                                  backend=backend),
                       args, ValueError, r"found_inf must be a 0-dim \(or one-element\) tensor")
    args["module_ids"][2] = 3
    _refused_untouched(lambda **a: mk.adamw_step_(**a, lr=1e-3, backend=backend), args, ValueError,
                       r"module_ids\[2\] = 3 is outside \[0, steps.numel\(\)=3\)")
