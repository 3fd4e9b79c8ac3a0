"""importance_update_ against the formulas written out by hand, for both rules."""
from __future__ import annotations

import math

import pytest
import torch

import misa_kernels as mk


def test_paper_rule_updates_only_active_modules_and_softmaxes():
    scores = torch.tensor([0.5, 1.0, 2.0, 0.0], dtype=torch.float64)
    accum = torch.tensor([3.0, 0.0, 8.0, 1.0], dtype=torch.float64)
    count = torch.tensor([3.0, 0.0, 4.0, 2.0], dtype=torch.float64)
    probs = mk.importance_update_(scores, accum, count, beta=0.8, eta=2.0)
    expected = [0.8 * 0.5 + 0.2 * 1.0, 1.0, 0.8 * 2.0 + 0.2 * 2.0, 0.8 * 0.0 + 0.2 * 0.5]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64))
    weights = [math.exp(2.0 * g) for g in expected]
    torch.testing.assert_close(probs, torch.tensor([w / sum(weights) for w in weights], dtype=torch.float64))
    assert accum.tolist() == [0.0] * 4 and count.tolist() == [0.0] * 4


def test_released_rule_bias_corrects_squares_and_caps():
    scores = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    accum = torch.tensor([0.2, 0.0, 0.4], dtype=torch.float64)
    count = torch.tensor([5.0, 0.0, 5.0], dtype=torch.float64)
    updates = torch.tensor([0.0, 4.0, 2.0], dtype=torch.float64)
    probs = mk.importance_update_(scores, accum, count, beta=0.8, eta=1.0, rule="released",
                                  update_count=updates, max_logit=5.0)
    g0 = (0.2 * 0.2 + 0.8 * 0.5) / (1 - 0.8 ** 1)
    g2 = (0.2 * 0.4 + 0.8 * 3.0) / (1 - 0.8 ** 3)
    torch.testing.assert_close(scores, torch.tensor([g0, 1.0, g2], dtype=torch.float64))
    assert updates.tolist() == [1.0, 4.0, 3.0]
    weights = [math.exp(min(5.0, g * g)) for g in (g0, 1.0, g2)]
    torch.testing.assert_close(probs, torch.tensor([w / sum(weights) for w in weights], dtype=torch.float64))


def test_large_eta_is_numerically_stable():
    scores = torch.tensor([0.0, 1.0, 2.0])
    probs = mk.importance_update_(scores, torch.zeros(3), torch.zeros(3), beta=0.8, eta=500.0)
    assert torch.isfinite(probs).all() and probs[2].item() == pytest.approx(1.0)


def test_first_update_from_uniform_is_uniform_for_equal_values():
    scores = torch.zeros(5)
    accum = torch.full((5,), 0.3)
    count = torch.ones(5)
    probs = mk.importance_update_(scores, accum, count, beta=0.8, eta=1.0)
    torch.testing.assert_close(probs, torch.full((5,), 0.2))


@pytest.mark.parametrize("kwargs,match", [
    (dict(rule="max"), "unknown importance rule 'max'"),
    (dict(rule="released"), "needs update_count"),
    (dict(beta=1.0), "Invalid beta value"),
    (dict(eta=-1.0), "Invalid eta value"),
])
def test_bad_arguments(kwargs, match):
    args = dict(beta=0.8, eta=1.0) | kwargs
    with pytest.raises(ValueError, match=match):
        mk.importance_update_(torch.zeros(3), torch.zeros(3), torch.zeros(3), **args)


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match=r"accum must have shape \(3,\)"):
        mk.importance_update_(torch.zeros(3), torch.zeros(4), torch.zeros(3), beta=0.8, eta=1.0)
