"""The default importance rule steers at any gradient scale; the paper's rule does not.

One module of a small LLaMA gets 100 times the gradient of the others (a hook on its weight);
under the default settings (delta, eta, rule, score EMA, least-recently-used picks; a short
interval only to see many draws) it must be drawn at least twice as often as the average
module, at the model's own gradient scale and with the loss multiplied by 1e-2 (the per-element
gradient scale of a 7B model in bf16 with clipping).
"""
from __future__ import annotations

import pytest
import torch

import misa
from misa_examples import models

CONFIG = models.LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=4)
BOOSTED = "model.layers.2.mlp.down_proj"
STEPS, INTERVAL = 240, 2


def _selection_ratio(loss_scale: float, **options) -> float:
    """How often BOOSTED was active, over the mean of every module's active fraction."""
    torch.manual_seed(0)
    model = models.build(CONFIG)
    model.get_submodule(BOOSTED).weight.register_hook(lambda g: g * 100)
    opt = misa.MISA(model, lr=1e-3, interval=INTERVAL, seed=3, **options)
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        x = torch.randint(0, CONFIG.vocab_size, (2, 16), generator=g)
        (model(x, labels=x) * loss_scale).backward()
        opt.step()
        opt.zero_grad()
    steps = opt.coverage().steps
    mean = sum(steps.values()) / len(steps)
    return steps[BOOSTED] / mean


@pytest.mark.parametrize("loss_scale", [1.0, 1e-2])
def test_default_rule_draws_a_module_with_100x_the_gradient_at_least_twice_as_often(loss_scale):
    assert _selection_ratio(loss_scale) >= 2.0


def test_the_papers_rule_is_uniform_at_small_gradient_scales():
    """Why the default changed: softmax(eta * G) of per-element squared gradients ~1e-8 is flat."""
    assert _selection_ratio(1e-2, importance="paper") < 1.6
