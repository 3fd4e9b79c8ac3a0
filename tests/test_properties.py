"""Property-based tests (hypothesis, a fixed derandomized profile sized for CI): over parameter
shapes (zero-size and odd), dtypes, views of one storage, hyperparameters and backends, MISA
with every parameter active equals a float64 torch.optim.AdamW, a checkpoint round trip
resumes bitwise, and a hyperparameter is accepted exactly when it is valid."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import misa
import misa_kernels

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROFILE = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BACKENDS = misa_kernels.available_backends("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
#: how far a dtype's result may be from float64 AdamW, relative to the total update lr * steps
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-9}

shape = st.one_of(st.tuples(st.integers(0, 6), st.integers(1, 9)),
                  st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5)))
hyper = st.fixed_dictionaries({
    "lr": st.floats(1e-4, 1e-1),
    "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999)),
    "eps": st.floats(1e-10, 1e-3),
    "weight_decay": st.floats(0.0, 0.5),
    "maximize": st.booleans(),
})


def _model(shapes, dtype, as_views: bool, seed: int) -> nn.Module:
    """A stack of blocks, one weight each; with `as_views`, the weights are disjoint views of
    one flat storage at odd offsets."""
    g = torch.Generator().manual_seed(seed)
    total = sum(math.prod(s) + 3 for s in shapes)
    flat = torch.randn(total, generator=g, dtype=torch.float64).to(dtype)
    model = nn.Module()
    model.layers = nn.ModuleList()
    offset = 1
    for s in shapes:
        numel = math.prod(s)
        weight = flat[offset:offset + numel].view(s) if as_views else flat[offset:offset + numel].clone().view(s)
        block = nn.Module()
        block.proj = nn.Module()
        block.proj.weight = nn.Parameter(weight)
        model.layers.append(block)
        offset += numel + 2
    return model


def _grads(model, step, seed):
    g = torch.Generator().manual_seed(1000 * seed + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in model.parameters()]


@PROFILE
@given(shapes=st.lists(shape, min_size=1, max_size=4), dtype=st.sampled_from(DTYPES), hyper=hyper,
       clip=st.one_of(st.none(), st.floats(0.05, 5.0)), as_views=st.booleans(), steps=st.integers(1, 3),
       backend=st.sampled_from(BACKENDS), seed=st.integers(0, 2 ** 16))
def test_every_parameter_active_equals_float64_adamw(shapes, dtype, hyper, clip, as_views, steps, backend, seed):
    model = _model(shapes, dtype, as_views, seed)
    ref = [p.detach().double().clone().requires_grad_(True) for p in model.parameters()]
    if dtype == torch.float64 and backend != "torch":
        with pytest.raises(ValueError, match=f"backend '{backend}' does not update torch.float64"):
            misa.MISA(model, sampler="full", backend=backend, **hyper)
        return
    opt = misa.MISA(model, sampler="full", backend=backend, max_grad_norm=clip, **hyper)
    ref_opt = torch.optim.AdamW(ref, foreach=False, **hyper)
    for step in range(steps):
        grads = _grads(model, step, seed)
        for p, r, g in zip(model.parameters(), ref, grads):
            p.grad = g
            r.grad = g.double()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ref, clip)
        opt.step()
        ref_opt.step()
    tolerance = TOLERANCE[dtype] * hyper["lr"] * steps * (1 + (clip is not None and dtype == torch.float64) * 100)
    for p, r in zip(model.parameters(), ref):
        state = opt.state.get(p, {})
        ours = state["master"] if "master" in state else p
        torch.testing.assert_close(ours.double(), r.detach(), rtol=1e-6, atol=tolerance)
        if "master" in state:
            assert torch.equal(p, state["master"].to(dtype))  # the weight is its master, rounded


@PROFILE
@given(shapes=st.lists(shape, min_size=2, max_size=4), dtype=st.sampled_from(DTYPES[:3]),
       delta=st.floats(0.3, 1.0), interval=st.integers(1, 3), importance=st.sampled_from(["relative", "paper",
                                                                                          "released"]),
       split=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_a_checkpoint_round_trip_resumes_bitwise(shapes, dtype, delta, interval, importance, split, seed):
    sizes = [math.prod(s) for s in shapes]
    if max(sizes) > delta * sum(sizes) or max(sizes) == 0:
        delta = 1.0
    options = dict(lr=1e-2, delta=delta, interval=interval, importance=importance, seed=seed, oversized="freeze")

    def run(model, opt, start, stop):
        for step in range(start, stop):
            for p, g in zip(model.parameters(), _grads(model, step, seed)):
                p.grad = g if p.requires_grad else None
            opt.step()
            opt.zero_grad()

    model = _model(shapes, dtype, False, seed)
    opt = misa.MISA(model, **options)
    run(model, opt, 0, split)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    run(model, opt, split, split + 4)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _model(shapes, dtype, False, seed + 1)
    resumed_opt = misa.MISA(resumed, **options)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    run(resumed, resumed_opt, split, split + 4)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert resumed_opt.active_modules == opt.active_modules


finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
value = st.one_of(finite, st.sampled_from([math.nan, math.inf, -math.inf]), st.integers(-3, 3))
as_given = st.sampled_from(["float", "tensor", "numpy"])


@PROFILE
@given(option=st.sampled_from(["lr", "eps", "weight_decay", "eta", "score_beta", "max_grad_norm", "delta"]),
       number=value, form=as_given)
def test_a_hyperparameter_is_accepted_exactly_when_valid(option, number, form):
    import numpy as np

    low, high, low_open, high_open = {
        "lr": (0, math.inf, False, False), "eps": (0, math.inf, False, False),
        "weight_decay": (0, math.inf, False, False), "eta": (0, math.inf, False, False),
        "score_beta": (0, 1, False, True), "max_grad_norm": (0, math.inf, True, False), "delta": (0, 1, True, False),
    }[option]
    x = float(number)
    valid = math.isfinite(x) and (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
    given_value = {"float": number, "tensor": torch.tensor(x, dtype=torch.float64), "numpy": np.float64(x)}[form]
    model = _model([(4, 4), (4, 4)], torch.float32, False, 0)
    options = {"delta": 1.0, option: given_value}
    if valid:
        misa.MISA(model, **options)
    else:
        with pytest.raises(ValueError, match=r"Invalid (learning rate|epsilon|weight_decay|eta|score_beta|"
                                             r"max_grad_norm|delta)"):
            misa.MISA(model, **options)
