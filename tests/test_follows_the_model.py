"""State that follows the model: an optimizer built before model.to(...) trains exactly like one
built after, as with torch.optim (moments and masters are made at a module's first step)."""
from __future__ import annotations

import pytest
import torch

import misa
from misa_examples import models

CONFIG = models.LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                            num_attention_heads=2, num_key_value_heads=2)


def _run(build_before_cast: bool, dtype, device="cpu", steps=7):
    torch.manual_seed(0)
    model = models.build(CONFIG)
    options = dict(lr=1e-2, delta=0.15, interval=3, seed=5, max_grad_norm=1.0)
    if build_before_cast:
        opt = misa.MISA(model, **options)
        model.to(device=device, dtype=dtype)
    else:
        model.to(device=device, dtype=dtype)
        opt = misa.MISA(model, **options)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, CONFIG.vocab_size, (3, 11), generator=g).to(device)
        model(x, labels=x).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_built_before_a_cast_trains_exactly_like_built_after(dtype):
    before, opt_before = _run(True, dtype)
    after, opt_after = _run(False, dtype)
    for (name, a), b in zip(before.named_parameters(), after.parameters()):
        assert torch.equal(a, b), name
    assert opt_before.active_modules == opt_after.active_modules
    for p, q in zip(before.parameters(), after.parameters()):
        assert (p in opt_before.state) == (q in opt_after.state)
        if p in opt_before.state:
            assert opt_before.state[p].keys() == opt_after.state[q].keys()
            assert ("master" in opt_before.state[p]) == (dtype == torch.bfloat16)
            for key, value in opt_before.state[p].items():
                assert torch.equal(value, opt_after.state[q][key]), key
    assert torch.equal(opt_before.sampler.scores, opt_after.sampler.scores)


def test_a_cast_after_some_steps_keeps_training_with_masters_made_then():
    torch.manual_seed(0)
    model = models.build(CONFIG)
    opt = misa.MISA(model, lr=1e-2, sampler="full")
    x = torch.randint(0, CONFIG.vocab_size, (3, 11))
    model(x, labels=x).backward()
    opt.step()
    opt.zero_grad()
    model.to(torch.bfloat16)
    model(x, labels=x).backward()
    opt.step()
    p = next(model.parameters())
    assert opt.state[p]["master"].dtype == torch.float32 and opt.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt.state[p]["master"].to(torch.bfloat16), p)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_built_on_the_cpu_before_the_model_moves_to_the_gpu():
    cpu_built, opt_cpu_built = _run(True, torch.bfloat16, device="cuda")
    gpu_built, opt_gpu_built = _run(False, torch.bfloat16, device="cuda")
    for (name, a), b in zip(cpu_built.named_parameters(), gpu_built.parameters()):
        assert torch.equal(a, b), name
    assert opt_cpu_built.device.type == "cuda" and opt_cpu_built.backend == opt_gpu_built.backend
    assert opt_cpu_built.sampler.scores.device.type == "cuda"
    assert all(t.device.type == "cuda" for s in opt_cpu_built.state.values() for t in s.values())
