"""Importance-score update at a resampling: EMA of the interval's accumulated values, then the
sampling probabilities. Tiny ([num_modules] elements, once every T steps), so one PyTorch
implementation serves every backend and device; it reads nothing on the host.

Two rules (see MISA_SPEC.md, section 2):

``"paper"`` (default), with accum holding the sum over the interval of ||g_b||^2 / n_b and
count the number of (non-skipped) steps module b was active::

    for b with count_b > 0:  G_b <- beta * G_b + (1 - beta) * accum_b / count_b
    P = softmax(eta * G)

``"released"`` (the authors' code), with accum holding the sum of clipped ||g_b|| / T::

    for b with accum_b != 0:  G_b <- ((1 - beta) * accum_b + beta * G_b) / (1 - beta ** (u_b + 1))
                              u_b <- u_b + 1
    P_b = w_b / sum(w),  w_b = exp(min(max_logit, eta * G_b ** 2))

Both reset accum and count to zero.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _validate

RULES = ("paper", "released")


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
        rule (str, optional): "paper" or "released" (default: "paper").
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
        if rule == "paper":
            active = accum_count > 0
            mean = accum / accum_count.clamp(min=1)
            scores.copy_(torch.where(active, beta * scores + (1 - beta) * mean.to(scores.dtype), scores))
            probs = torch.softmax(eta * scores, dim=0)
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
