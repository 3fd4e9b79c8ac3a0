"""Bad input and odd layouts (issue 11): each case gives a clear error at the call that brings it,
naming the option or the parameter, before anything is written; or results equal to
torch.optim.AdamW. One test per case, on every backend available here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import misa
import misa_kernels
from misa_examples import models
from conftest import BACKEND_DEVICE

CPU_BACKENDS = [p for p in BACKEND_DEVICE if p.values[1] == "cpu"]
TINY = models.LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                          num_attention_heads=2, num_key_value_heads=2)


class Cell(nn.Module):
    """A block holding one weight (and optionally a bias) of any shape."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor = None):
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(weight)
        if bias is not None:
            self.proj.bias = nn.Parameter(bias)


def _cells(*weights) -> nn.Module:
    model = nn.Module()
    model.layers = nn.ModuleList(Cell(w) for w in weights)
    return model


def _llama(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return models.build(TINY, "cpu", dtype)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (3, 11), generator=g)


def _train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        x = _batch(i)
        model(x, labels=x).backward()
        opt.step()
        opt.zero_grad()


def _random_grads(model, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = (torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(p.dtype)


def _beside_adamw(model, steps=3, **options):
    """MISA with every parameter active and torch AdamW on a copy, stepped with the same random
    gradients; returns the optimizer and (ours, reference) parameter pairs."""
    ref = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    opt = misa.MISA(model, lr=1e-2, weight_decay=0.1, sampler="full", **options)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(steps):
        _random_grads(model, step)
        for r, p in zip(ref, model.parameters()):
            r.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    return opt, list(zip(model.parameters(), ref))


def _snapshot(model, opt):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()},
            opt._active.steps.clone())


def _unchanged(model, opt, snapshot):
    params, state, steps = snapshot
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert {id(p) for p in opt.state} == set(state)
    assert all(torch.equal(v, state[id(p)][k]) for p, s in opt.state.items() for k, v in s.items())
    assert torch.equal(opt._active.steps, steps)


# ------------------------------------------------------------------ 1. aliasing


def test_case_01_parameters_sharing_memory_are_refused_by_name():
    base = torch.randn(6, 4)
    model = _cells(base.clone(), base.clone())
    model.layers[1].proj.weight = nn.Parameter(model.layers[0].proj.weight.data)  # same storage, two Parameters
    with pytest.raises(ValueError, match=r"layers.0.proj.weight and layers.1.proj.weight share memory"):
        misa.MISA(model, sampler="full")
    flat = torch.randn(40)
    overlapping = _cells(torch.zeros(1), torch.zeros(1))
    overlapping.layers[0].proj.weight = nn.Parameter(flat[:24].view(6, 4))
    overlapping.layers[1].proj.weight = nn.Parameter(flat[20:].view(5, 4))  # elements 20..23 in both
    with pytest.raises(ValueError, match="share memory"):
        misa.MISA(overlapping, sampler="full")


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
def test_case_01_disjoint_views_of_one_storage_and_tied_weights_train_like_adamw(backend, device):
    flat = torch.randn(44, dtype=torch.float64).float()
    model = _cells(torch.zeros(1), torch.zeros(1))
    model.layers[0].proj.weight = nn.Parameter(flat[:24].view(6, 4))
    model.layers[1].proj.weight = nn.Parameter(flat[24:].view(5, 4))
    model.layers[0].proj.tied = model.layers[1].proj.weight  # one Parameter object used twice
    _, pairs = _beside_adamw(model, backend=backend)
    for p, r in pairs:
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


def test_case_01_masters_never_share_memory_with_weights():
    model = _llama(torch.bfloat16)
    opt = misa.MISA(model, lr=1e-2, sampler="full")
    _train(model, opt, 1)
    for p, s in opt.state.items():
        assert s["master"].untyped_storage().data_ptr() != p.untyped_storage().data_ptr()


# ------------------------------------------------------------------ 2. frozen after a first MISA


def test_case_02_a_parameter_frozen_after_a_first_optimizer_stays_frozen_for_the_next():
    model = _llama()
    misa.MISA(model, sampler="full")  # makes every parameter trainable and marks it managed
    frozen = model.model.layers[1].mlp.up_proj.weight
    frozen.requires_grad_(False)  # the user freezes it afterwards
    second = misa.MISA(model, lr=1e-2, sampler="full")
    assert all(frozen is not p for m in second.partition.modules for p in m.params)
    before = frozen.detach().clone()
    _train(model, second, 2)
    assert torch.equal(frozen, before) and not frozen.requires_grad


def test_case_02_release_hands_the_model_back():
    model = _llama()
    first = misa.MISA(model, delta=0.1)
    first.release()
    assert all(p.requires_grad for p in model.parameters())
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    second = misa.MISA(model, delta=0.1)
    assert "model.layers.0.self_attn.q_proj" not in [m.name for m in second.partition.modules]
    with pytest.raises(RuntimeError, match="released"):
        first.step()


# ------------------------------------------------------------------ 3. tensor and numpy hyperparameters


@pytest.mark.parametrize("option,value,match", [
    ("weight_decay", torch.tensor(float("nan")), r"Invalid weight_decay: nan"),
    ("betas", (torch.tensor(1.5), 0.999), r"Invalid betas\[0\]: 1.5"),
    ("lr", torch.tensor(-1.0), r"Invalid learning rate: -1.0"),
    ("eps", torch.tensor(-1e-8, dtype=torch.float64), r"Invalid epsilon: -1e-08 \(must be finite"),
    ("eta", torch.tensor(-2.0), r"Invalid eta: -2.0"),
    ("score_beta", torch.tensor(1.0), r"Invalid score_beta: 1.0"),
    ("max_grad_norm", torch.tensor(-1.0), r"Invalid max_grad_norm: -1.0"),
    ("lr", np.float32("nan"), r"Invalid learning rate: nan"),
    ("interval", np.float64(2.5), r"interval must be an int, got 2.5"),
    ("delta", True, r"Invalid delta: True"),
])
def test_case_03_tensor_and_numpy_hyperparameters_are_checked_by_value(option, value, match):
    with pytest.raises(ValueError, match=match):
        misa.MISA(_llama(), **{"delta": 0.1, option: value})


def test_case_03_valid_numpy_scalars_are_accepted_like_floats():
    runs = []
    for lr, interval, beta in ((np.float32(1e-2), np.int64(3), np.float64(0.9)), (float(np.float32(1e-2)), 3, 0.9)):
        model = _llama()
        opt = misa.MISA(model, lr=lr, interval=interval, betas=(beta, 0.999), delta=0.15, seed=1)
        _train(model, opt, 4)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ------------------------------------------------------------------ 4. load_state_dict


def _saved(**options):
    """A state dict holding moments (the step after a switch creates them)."""
    model = _llama(options.pop("dtype", torch.float32))
    opt = misa.MISA(model, **{"lr": 1e-2, "delta": 0.15, "interval": 3, "seed": 2, **options})
    _train(model, opt, 1)
    while not opt.state:
        _train(model, opt, 1, start=opt._step_count)
    return opt.state_dict()


@pytest.mark.parametrize("saved_options,options,match", [
    (dict(dtype=torch.bfloat16), dict(), r"has fp32 master copy, but this optimizer keeps none for its "
                                         r"torch.float32 weights"),
    (dict(), dict(dtype=torch.bfloat16), r"has no fp32 master copy, but this optimizer keeps one"),
    (dict(dtype=torch.bfloat16), dict(dtype=torch.bfloat16, master_weights=False),
     r"other options: master_weights='auto' there, False here"),
    (dict(delta=0.6), dict(delta=0.1), r"other options: delta=0.6 there, 0.1 here"),
    (dict(importance="paper"), dict(), r"importance.*'paper'.*'relative'"),
    (dict(sampler="full", non_block="frozen"), dict(), r"the saved state is for sampler 'full', this optimizer uses 'misa'"),
])
def test_case_04_load_state_dict_refuses_a_state_of_other_options(saved_options, options, match):
    state = _saved(**saved_options)
    model = _llama(options.pop("dtype", torch.float32))
    opt = misa.MISA(model, **{"lr": 1e-2, "delta": 0.15, "interval": 3, "seed": 2, **options})
    _train(model, opt, 1)
    snapshot = _snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    _unchanged(model, opt, snapshot)


def test_case_04_a_wrongly_shaped_moment_is_named_before_anything_loads():
    state = _saved()
    slot = next(iter(state["state"]))
    state["state"][slot]["exp_avg"] = torch.zeros(3)
    model = _llama()
    opt = misa.MISA(model, lr=1e-2, delta=0.15, interval=3, seed=2)
    snapshot = _snapshot(model, opt)
    name = state["misa"]["param_names"][slot]
    with pytest.raises(ValueError, match=rf"the saved exp_avg of {name} has shape \(3,\)"):
        opt.load_state_dict(state)
    _unchanged(model, opt, snapshot)


def test_case_04_another_model_is_named_by_its_first_differing_parameter():
    state = _saved()
    opt = misa.MISA(_llama().requires_grad_(True), lr=1e-2, delta=0.15, interval=3, seed=2,
                    patterns=[r"layers\.\d+\.self_attn"], non_block="trained")
    with pytest.raises(ValueError, match=r"trained tensor 4 is 'model.layers.0.mlp.gate_proj.weight' there and "
                                         r"'model.layers.1.self_attn.q_proj.weight' here"):
        opt.load_state_dict(state)


# ------------------------------------------------------------------ 5. huge finite gradients


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_case_05_huge_finite_gradients_give_a_finite_norm_and_a_step(backend, device):
    model = _cells(torch.randn(7, 5, device=device), torch.randn(3, 9, device=device))
    opt = misa.MISA(model, lr=1e-2, sampler="full", max_grad_norm=1.0, backend=backend)
    _random_grads(model, 0, scale=1e21)
    grads = [p.grad.double() for p in model.parameters()]
    expected = math.sqrt(sum(float((g * g).sum()) for g in grads))
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.last_stats.found_inf.item() == 0.0
    assert math.isfinite(opt.last_stats.total_norm.item())
    assert opt.last_stats.total_norm.item() == pytest.approx(expected, rel=1e-5)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ------------------------------------------------------------------ 6. eta


@pytest.mark.parametrize("eta", [math.inf, -math.inf, math.nan])
def test_case_06_non_finite_eta_is_refused(eta):
    with pytest.raises(ValueError, match="Invalid eta"):
        misa.MISA(_llama(), delta=0.1, eta=eta)


# ------------------------------------------------------------------ 7. tensor learning rates


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
def test_case_07_a_one_element_lr_tensor_is_a_scalar_and_two_elements_are_refused(backend, device):
    runs = []
    for lr in (torch.tensor([1e-2]), torch.tensor(1e-2), 1e-2):
        model = _llama()
        opt = misa.MISA(model, lr=lr, sampler="full", backend=backend)
        _train(model, opt, 2)
        runs.append([p.detach().clone() for p in model.parameters()])
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match=r"learning rate must be a number or a one-element tensor, got a tensor of "
                                         r"shape \(2,\)"):
        misa.MISA(_llama(), lr=torch.tensor([1e-2, 1e-3]), sampler="full")


# ------------------------------------------------------------------ 8. layouts


def test_case_08_non_contiguous_parameters_are_refused_at_construction_by_name():
    model = _cells(torch.randn(4, 6).t(), torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"parameter layers.0.proj.weight \(shape \(6, 4\), strides \(1, 6\)\) is "
                                         r"not contiguous"):
        misa.MISA(model, sampler="full")


def test_case_08_a_bad_gradient_is_named_and_nothing_is_written():
    model = _cells(torch.randn(4, 6), torch.randn(3, 3))
    opt = misa.MISA(model, lr=1e-2, sampler="full")
    _random_grads(model, 0)
    opt.step()
    _random_grads(model, 1)
    model.layers[1].proj.weight.grad = torch.randn(3, 3).t()  # non-contiguous
    snapshot = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"grads\[1\] \('layers.1.proj.weight'\) \(\(3, 3\) torch.float32 on cpu\) "
                                         r"is not contiguous"):
        opt.step()
    _unchanged(model, opt, snapshot)
    model.layers[1].proj.weight.grad = torch.randn(3, 3).to_sparse()
    with pytest.raises(ValueError, match=r"grads\[1\] \('layers.1.proj.weight'\) is torch.sparse_coo"):
        opt.step()
    _unchanged(model, opt, snapshot)


# ------------------------------------------------------------------ 9. zero-size modules


@pytest.mark.parametrize("importance", ["relative", "paper", "released"])
def test_case_09_a_zero_size_module_is_harmless(importance):
    model = _cells(torch.randn(4, 6), torch.zeros(0, 6), torch.randn(4, 6))
    opt = misa.MISA(model, lr=1e-2, delta=0.5, interval=1, importance=importance, seed=0)
    for step in range(6):
        _random_grads(model, step)
        opt.step()
    assert all(math.isfinite(p) for p in opt.importance().values())


# ------------------------------------------------------------------ 10. float64


def test_case_10_float64_models_train_like_float64_adamw():
    opt, pairs = _beside_adamw(_llama(torch.float64))
    assert all(s["exp_avg"].dtype == torch.float64 for s in opt.state.values())
    for p, r in pairs:
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)  # float64 throughout
    # with clipping the clip coefficient is float32 (documented), so agreement is to float32 rounding
    clipped = misa.MISA(_llama(torch.float64), lr=1e-2, sampler="full", max_grad_norm=1.0)
    assert clipped._active.update_groups()[0].backend == "torch"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_case_10_float64_with_a_backend_that_cannot_take_it_is_refused_naming_it(backend):
    if backend not in misa_kernels.available_backends("cpu"):
        pytest.skip(f"backend {backend} is not available here")
    with pytest.raises(ValueError, match=rf"backend '{backend}' does not update torch.float64 parameters such as "
                                         r"model.layers.0.self_attn.q_proj.weight"):
        misa.MISA(_llama(torch.float64), delta=0.15, backend=backend)


# ------------------------------------------------------------------ 11. complex and sparse parameters


def test_case_11_complex_and_sparse_parameters_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=r"parameter layers.0.proj.weight is complex \(torch.complex64\)"):
        misa.MISA(_cells(torch.randn(3, 3, dtype=torch.complex64), torch.randn(3, 3)), sampler="full")
    sparse = _cells(torch.randn(3, 3), torch.randn(3, 3))
    sparse.layers[0].proj.weight = nn.Parameter(torch.randn(3, 3).to_sparse())
    with pytest.raises(ValueError, match=r"parameter layers.0.proj.weight is torch.sparse_coo"):
        misa.MISA(sparse, sampler="full")
    integer = _cells(torch.randn(3, 3), torch.randn(3, 3))
    integer.layers[0].proj.weight = nn.Parameter(torch.zeros(3, 3, dtype=torch.int32), requires_grad=False)
    integer.layers[0].proj.weight.__dict__["_misa_requires_grad"] = False  # as if a MISA had frozen it
    with pytest.raises(ValueError, match=r"parameter layers.0.proj.weight has dtype torch.int32"):
        misa.MISA(integer, sampler="full")


# ------------------------------------------------------------------ 12. skipped steps


def test_case_12_a_skipped_step_leaves_the_state_and_advances_the_schedule():
    model = _llama(torch.bfloat16)
    opt = misa.MISA(model, lr=1e-2, delta=0.15, interval=3, seed=4, warmup_sweep=False)
    _train(model, opt, 4)  # mid-interval: the next step (5) is not a switch, step 6 is
    x = _batch(99)
    model(x, labels=x).backward()
    next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
    snapshot = _snapshot(model, opt)
    accum = opt.sampler.accum.clone(), opt.sampler.accum_count.clone()
    opt.step()
    assert opt.last_stats.found_inf.item() == 1.0
    _unchanged(model, opt, snapshot)
    assert torch.equal(opt.sampler.accum, accum[0]) and torch.equal(opt.sampler.accum_count, accum[1])
    assert opt._step_count == 5  # counted: the resampling stays every 3 optimizer steps
    switches = []
    opt.register_switch_hook(lambda o: switches.append(o._step_count))
    opt.zero_grad()
    _train(model, opt, 1, start=5)
    assert switches == [6]
