"""MISA: importance-weighted sampling of modules under a parameter budget.

Every step the optimizer accumulates, for each active module, a per-step importance value
(paper: ||g_b||^2 / n_b; released code: clipped ||g_b|| / T) through
misa_kernels.grad_sq_norms. At a resampling the scores are updated and turned into
probabilities by misa_kernels.importance_update_ (see its docstring for both rules), then:

1. the modules never sampled, and the `sample_last` least recently used ones, are tried in
   that order (oldest first), each taken if it still fits the budget;
2. the rest are taken in the order of successive weighted draws without replacement, each
   taken if it fits (a greedy fill), until none is left.

While some module has never been sampled, and `warmup_sweep` is on, this happens after every
step (the released code's warm-up sweep), then every `interval` steps.
"""
from __future__ import annotations

from typing import List, Optional

import torch

import misa_kernels

from . import Sampler, register

IMPORTANCE_RULES = ("paper", "released")


@register
class MISASampler(Sampler):
    name = "misa"

    def __init__(self, partition, *, delta, interval, generator, device, eta: float = 1.0,
                 score_beta: float = 0.8, importance: str = "paper", sample_last: int = 2,
                 warmup_sweep: bool = True, max_logit: float = 5.0, **options):
        super().__init__(partition, delta=delta, interval=interval, generator=generator,
                         device=device, **options)
        if importance not in IMPORTANCE_RULES:
            raise ValueError(f"unknown importance rule {importance!r}; choose one of {', '.join(IMPORTANCE_RULES)}")
        if isinstance(sample_last, bool) or not isinstance(sample_last, int) or sample_last < 0:
            raise ValueError(f"sample_last must be a non-negative int, got {sample_last!r}")
        self.eta = eta
        self.score_beta = score_beta
        self.importance = importance
        self.sample_last = sample_last
        self.warmup_sweep = warmup_sweep
        self.max_logit = max_logit
        n = len(self.sizes)
        self.scores = torch.zeros(n, dtype=torch.float32, device=device)
        # one extra slot: the optimizer gives non-block parameters their own id, which must
        # not take part in the importance update.
        self.accum = torch.zeros(n + 1, dtype=torch.float32, device=device)
        self.accum_count = torch.zeros(n + 1, dtype=torch.float32, device=device)
        self.update_count = torch.zeros(n, dtype=torch.float32, device=device)
        if importance == "paper":
            weight = torch.tensor([1.0 / s for s in self.sizes] + [0.0], dtype=torch.float64)
        else:
            weight = torch.tensor([1.0 / interval] * n + [0.0], dtype=torch.float64)
        self.accum_weight = weight.to(device=device, dtype=torch.float32)
        self.probs = torch.full((n,), 1.0 / n, dtype=torch.float64)
        self.last_used = [-1] * n

    def accumulation(self) -> Optional[dict]:
        return {
            "accum": self.accum,
            "accum_count": self.accum_count,
            "accum_weight": self.accum_weight,
            "accum_rule": "sq" if self.importance == "paper" else "clipped_norm",
        }

    def should_resample(self, step: int) -> bool:
        return super().should_resample(step) or (self.warmup_sweep and -1 in self.last_used)

    def select(self, step: int) -> List[int]:
        n = len(self.sizes)
        if step > 0:
            probs = misa_kernels.importance_update_(
                self.scores, self.accum[:n], self.accum_count[:n], beta=self.score_beta,
                eta=self.eta, rule="paper" if self.importance == "paper" else "released",
                update_count=self.update_count, max_logit=self.max_logit)
            self.accum[n:].zero_()
            self.accum_count[n:].zero_()
            self.probs = probs.to("cpu", torch.float64)  # the one host synchronisation of an interval
        by_age = sorted(range(n), key=lambda b: (self.last_used[b], b))
        first = [b for rank, b in enumerate(by_age) if self.last_used[b] == -1 or rank < self.sample_last]
        chosen = self.fill(first)
        first_set = set(first)
        rest = [b for b in range(n) if b not in first_set]
        chosen = self.fill(self.random_order(rest, self.probs[rest]), chosen)
        for b in chosen:
            self.last_used[b] = step
        return chosen

    def state_dict(self) -> dict:
        return {
            "scores": self.scores.clone(),
            "accum": self.accum.clone(),
            "accum_count": self.accum_count.clone(),
            "update_count": self.update_count.clone(),
            "probs": self.probs.clone(),
            "last_used": list(self.last_used),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("scores", "accum", "accum_count", "update_count"):
            getattr(self, key).copy_(state[key])
        self.probs = state["probs"].to("cpu", torch.float64).clone()
        self.last_used = list(state["last_used"])
