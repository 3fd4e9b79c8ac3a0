"""Importance-score update at a resampling: EMA of the interval's accumulated values, then the
sampling probabilities. Tiny ([num_modules] elements, once every T steps), so one PyTorch
implementation serves every backend and device; it reads nothing on the host.

Three rules (see MISA_SPEC.md, section 2). ``"paper"`` and ``"relative"`` share the paper's
score: accum holds the sum over the interval of ||g_b||^2 / n_b and count the number of
(non-skipped) steps module b was active::

    for b with count_b > 0:  G_b <- beta * G_b + (1 - beta) * accum_b / count_b

``"paper"``: ``P = softmax(eta * G)``, the maximiser of ``sum_b p_b G_b - (1/eta) KL(p || uniform)``.
G is a per-element squared gradient (about 1e-11..3e-4 on real models, ~1e-10 for a 7B model
in bf16 with clipping), so at eta = 1 this is uniform sampling to within 1e-4 or better: eta
must be tuned to the gradient scale.

``"relative"`` (the optimizer's default): ``P = softmax(eta * G / mean(G))``, the mean taken
over the modules scored so far (G > 0). The same objective with the scores measured in units
of their mean, so eta is a dimensionless temperature: multiplying every gradient by a constant
(a loss scale, a model's size, clipping) leaves P unchanged. With eta = 1 a module at twice the
mean score is e times as likely as one at the mean. Modules not scored yet have logit 0.

``"released"`` (the authors' code), with accum holding the sum of clipped ||g_b|| / T::

    for b with accum_b != 0:  G_b <- ((1 - beta) * accum_b + beta * G_b) / (1 - beta ** (u_b + 1))
                              u_b <- u_b + 1
    P_b = w_b / sum(w),  w_b = exp(min(max_logit, eta * G_b ** 2))

Kept exactly as released: the bias correction divides the stored score again at every update
(it is applied in place, not to a separate estimate), so it compounds. At beta = 0.8 the score
of a module with a constant input x is x, 2.8x, 5.0x, 7.1x ... after 1, 2, 3, 4 updates,
peaks at about 10x after 7 and only settles back to x after some 40 updates: a module's score
depends on how often it was updated, which is part of why this rule steers.

All rules reset accum and count to zero.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _validate

RULES = ("relative", "paper", "released")


def importance_update_(
    scores: torch.Tensor,
    accum: torch.Tensor,
    accum_count: torch.Tensor,
    *,
    beta: float,
    eta: float,
    rule: str = "paper",
    update_count: Optional[torch.Tensor] = None,
    max_logit: float = 5.0,
) -> torch.Tensor:
    """Updates `scores` in place from the interval's accumulators and returns the probabilities.

    Args:
        scores (Tensor): [M] float32 (or float64) importance scores G, updated in place.
        accum (Tensor): [M] values accumulated by :func:`grad_sq_norms` over the interval; reset to 0.
        accum_count (Tensor): [M] number of accumulated steps per module; reset to 0.
        beta (float): EMA factor of the scores, in [0, 1).
        eta (float): temperature, >= 0.
        rule (str, optional): "relative", "paper" or "released" (default: "paper").
        update_count (Tensor, optional): [M] EMA updates per module, needed by "released" for its
            bias correction; incremented in place.
        max_logit (float, optional): cap on eta * G^2 under "released" (default: 5.0).

    Returns:
        Tensor: [M] probabilities (same dtype as `scores`), summing to 1.
    """
    if rule not in RULES:
        raise ValueError(f"unknown importance rule {rule!r}; choose one of {', '.join(RULES)}")
    _validate.check_hyper("beta", beta, 0.0, 1.0, high_open=True)
    _validate.check_hyper("eta", eta, 0.0)
    float_dtypes = (torch.float32, torch.float64)
    device = scores.device
    n = scores.numel()
    _validate.check_vector("scores", scores, n, device, float_dtypes)
    _validate.check_vector("accum", accum, n, device, float_dtypes)
    _validate.check_vector("accum_count", accum_count, n, device, float_dtypes)
    _validate.check_vector("update_count", update_count, n, device, float_dtypes)
    if rule == "released" and update_count is None:
        raise ValueError("rule 'released' needs update_count (its bias correction counts updates per module)")

    with torch.no_grad():
        if rule in ("paper", "relative"):
            active = accum_count > 0
            mean = accum / accum_count.clamp(min=1)
            scores.copy_(torch.where(active, beta * scores + (1 - beta) * mean.to(scores.dtype), scores))
            logits = scores if rule == "paper" else scores / _mean_of_scored(scores)
            probs = torch.softmax(eta * logits, dim=0)
        else:
            active = accum != 0
            correction = 1 - beta ** (update_count.to(torch.float64) + 1)
            updated = ((1 - beta) * accum.to(scores.dtype) + beta * scores) / correction.to(scores.dtype)
            scores.copy_(torch.where(active, updated, scores))
            update_count.add_(active.to(update_count.dtype))
            weights = torch.exp(torch.clamp(eta * scores.square(), max=max_logit))
            probs = weights / weights.sum()
        accum.zero_()
        accum_count.zero_()
    return probs


def _mean_of_scored(scores: torch.Tensor) -> torch.Tensor:
    """Mean of the positive scores (1 when none is positive yet), on the device."""
    scored = scores > 0
    total = torch.where(scored, scores, torch.zeros_like(scores)).sum()
    mean = total / scored.sum().clamp(min=1).to(scores.dtype)
    return torch.where(mean > 0, mean, torch.ones_like(mean))
