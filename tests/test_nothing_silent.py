"""Nothing silent: modules that cannot fit, parameters frozen by policy, what has trained, and
least-recently-used picks that must not crowd out the importance draw."""
from __future__ import annotations

import logging

import pytest
import torch

import misa
from misa_examples import models

# a 2-block toy LLaMA whose MLP modules exceed 3% of the model
TOY = models.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)


def _toy(seed=0):
    torch.manual_seed(seed)
    return models.build(TOY)


def _steps(model, opt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, TOY.vocab_size, (2, 8), generator=g)
        model(x, labels=x).backward()
        opt.step()
        opt.zero_grad()


def test_a_module_larger_than_the_budget_is_refused_with_the_delta_that_fits():
    model = _toy()
    total = sum(p.numel() for p in model.parameters())
    mlp = 32 * 80
    with pytest.raises(ValueError) as info:
        misa.MISA(model, delta=0.03)
    message = str(info.value)
    assert "6 of 14 modules are larger than the budget" in message
    assert f"model.layers.0.mlp.gate_proj ({mlp:,})" in message and f"{int(0.03 * total):,} parameters" in message
    smallest = float(message.split("smallest delta that fits every module is ")[1].split(";")[0])
    assert int(smallest * total) >= mlp and int((smallest - 1e-4) * total) < mlp  # smallest to 4 digits
    opt = misa.MISA(model, delta=smallest)  # and it does fit
    assert opt.sampler.oversized == []


def test_oversized_freeze_warns_with_the_names_and_the_sweep_ends():
    model = _toy()
    with pytest.warns(UserWarning, match=r"6 of 14 modules are larger than the budget.*stay frozen"):
        opt = misa.MISA(model, lr=1e-2, delta=0.03, interval=5, oversized="freeze", seed=0)
    frozen = set(opt.sampler.oversized)
    assert len(frozen) == 6 and all(".mlp." in n for n in frozen)
    switches = []
    opt.register_switch_hook(lambda o: switches.append(o._step_count))
    _steps(model, opt, 40)
    sweep_end = max(s for s in switches if s % 5)  # the warm-up sweep resamples at every step
    assert sweep_end < 10, switches
    assert all(s % 5 == 0 for s in switches if s > sweep_end), f"interval ignored after the sweep: {switches}"
    coverage = opt.coverage()
    assert set(coverage.never_trained) >= frozen
    assert all(coverage.steps[n] > 0 for n in coverage.steps if n not in frozen)
    assert all(coverage.steps[n] == 0 for n in frozen)


def test_construction_logs_the_frozen_non_block_parameters(caplog):
    model = _toy()
    with caplog.at_level(logging.INFO, logger="misa"):
        misa.MISA(model, delta=0.1, oversized="freeze")
    (record,) = [r for r in caplog.records if "non-block" in r.message]
    assert record.levelno == logging.WARNING  # the default policy, not chosen explicitly
    embed = TOY.vocab_size * TOY.hidden_size
    count = 2 * embed + (2 * TOY.num_hidden_layers + 1) * TOY.hidden_size
    assert f"non_block='frozen' leaves 7 non-block parameters frozen ({count:,} parameters" in record.message
    assert "model.embed_tokens.weight" in record.message and "lm_head.weight" in record.message
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="misa"):
        misa.MISA(_toy(), delta=0.1, oversized="freeze", non_block="embed_head")
    (record,) = [r for r in caplog.records if "non-block" in r.message]
    assert record.levelno == logging.INFO and "leaves 5 non-block parameters frozen" in record.message


def test_coverage_counts_trained_parameters_and_active_steps():
    model = _toy()
    opt = misa.MISA(model, lr=1e-2, delta=0.2, interval=3, seed=1, non_block="embed_head")
    assert opt.coverage().fraction == 0.0
    _steps(model, opt, 30)
    coverage = opt.coverage()
    assert set(coverage.steps) == {m.name for m in opt.partition.modules}
    norms = [n for n, p in opt.partition.non_block if opt.partition.non_block_kind[n] == "norm"]
    assert set(coverage.never_trained) == set(norms)  # every module trained; norms frozen by policy
    total = sum(p.numel() for p in model.parameters())
    norm_numel = sum(dict(model.named_parameters())[n].numel() for n in norms)
    assert coverage.fraction == pytest.approx((total - norm_numel) / total)


def test_least_recently_used_picks_leave_room_for_the_draw_at_small_budgets():
    """Budget of one module: without a share limit the least-recently-used pick would take the
    whole budget at every resampling and the scores would never choose."""
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.Linear(10, 10, bias=False) for _ in range(6))
    part = misa.partition(model)
    sampler = misa.samplers.get("misa")(part, delta=100 / part.total_params, interval=1,
                                        generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                                        warmup_sweep=False, eta=50.0)
    sampler.scores[5] = 1.0  # the draw all but always wants module 5
    picks = [sampler.select(step)[0] for step in range(1, 47)]
    assert picks[:6] == list(range(6))  # never-sampled modules first
    assert picks[6:].count(5) >= 20  # then at least every other resampling is the importance draw's
    assert set(picks[6:]) == set(range(6))  # and the least recently used still come back
