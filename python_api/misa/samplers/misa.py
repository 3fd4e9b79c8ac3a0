"""MISA: importance-weighted sampling of modules under a parameter budget.

Every step the optimizer accumulates, for each active module, a per-step importance value
(``||g_b||^2 / n_b``; the released code: clipped ``||g_b|| / T``) through
misa_kernels.grad_sq_norms. At a resampling the scores are updated and turned into
probabilities by misa_kernels.importance_update_ (see its docstring for the rules: "relative",
the default, is the paper's rule with the scores in units of their mean, so that eta is a
temperature independent of the gradient scale), then:

1. the modules never sampled are tried first, oldest first, each taken if it still fits the
   budget (the warm-up sweep);
2. the `sample_last` least recently used modules are tried next. At every other resampling
   they may take the whole budget, as in the released code, which bounds how long any module
   waits; in between they take at most `LRU_BUDGET_SHARE` of it, so that at small budgets (one
   or two modules' worth) the importance draw still places modules at least every other time
   (with the whole budget always open to them, the least recently used picks would fill it and
   the scores would never matter). `lru_budget_share=1.0` restores the released behaviour;
3. the rest are taken in the order of successive weighted draws without replacement, each
   taken if it fits (a greedy fill), until none is left.

While some candidate module has never been sampled, and `warmup_sweep` is on, this happens
after every step (the released code's warm-up sweep), then every `interval` steps. The sweep
covers the candidates only (modules that fit the budget), so it always ends.
"""
from __future__ import annotations

from typing import List, Optional

import torch

import misa_kernels

from . import Sampler, register

IMPORTANCE_RULES = ("relative", "paper", "released")
#: eta when none is given: the paper's and the release's 1.0 for their rules; 0.1 for "relative",
#: the temperature the ablation in bench/RESULTS.md chose (no loss against uniform sampling in
#: fine-tuning or pre-training, every module keeps a chance, a module with 100x the gradient is
#: still drawn 3x as often as the average one; at 1.0 the draw saturates into a fixed top-k).
DEFAULT_ETA = {"relative": 0.1, "paper": 1.0, "released": 1.0}
#: the largest share of the budget the least-recently-used picks may take (see step 2 above).
LRU_BUDGET_SHARE = 0.5


@register
class MISASampler(Sampler):
    name = "misa"

    def __init__(self, partition, *, delta, interval, generator, device, eta: Optional[float] = None,
                 score_beta: float = 0.8, importance: str = "relative", sample_last: int = 2,
                 warmup_sweep: bool = True, max_logit: float = 5.0,
                 lru_budget_share: float = LRU_BUDGET_SHARE, **options):
        super().__init__(partition, delta=delta, interval=interval, generator=generator,
                         device=device, **options)
        if importance not in IMPORTANCE_RULES:
            raise ValueError(f"unknown importance rule {importance!r}; choose one of {', '.join(IMPORTANCE_RULES)}")
        if isinstance(sample_last, bool) or not isinstance(sample_last, int) or sample_last < 0:
            raise ValueError(f"sample_last must be a non-negative int, got {sample_last!r}")
        misa_kernels._validate.check_hyper("lru_budget_share", lru_budget_share, 0.0, 1.0)
        self.eta = DEFAULT_ETA[importance] if eta is None else eta
        self.score_beta = score_beta
        self.importance = importance
        self.sample_last = sample_last
        self.warmup_sweep = warmup_sweep
        self.max_logit = max_logit
        self.lru_budget_share = float(lru_budget_share)
        n = len(self.sizes)
        self.scores = torch.zeros(n, dtype=torch.float32, device=device)
        # one extra slot: the optimizer gives non-block parameters their own id, which must
        # not take part in the importance update.
        self.accum = torch.zeros(n + 1, dtype=torch.float32, device=device)
        self.accum_count = torch.zeros(n + 1, dtype=torch.float32, device=device)
        self.update_count = torch.zeros(n, dtype=torch.float32, device=device)
        if importance == "released":
            weight = torch.tensor([1.0 / interval] * n + [0.0], dtype=torch.float64)
        else:
            weight = torch.tensor([1.0 / max(s, 1) for s in self.sizes] + [0.0], dtype=torch.float64)
        self.accum_weight = weight.to(device=device, dtype=torch.float32)
        self.probs = torch.full((n,), 1.0 / n, dtype=torch.float64)
        self.last_used = [-1] * n
        self.draws = 0  # resamplings so far: the least recently used picks alternate their share
        self._unvisited = set(self.candidates)

    _DEVICE_BUFFERS = ("scores", "accum", "accum_count", "update_count", "accum_weight")

    def to(self, device: torch.device) -> None:
        super().to(device)
        for key in self._DEVICE_BUFFERS:
            setattr(self, key, getattr(self, key).to(device))

    def accumulation(self) -> Optional[dict]:
        return {
            "accum": self.accum,
            "accum_count": self.accum_count,
            "accum_weight": self.accum_weight,
            "accum_rule": "clipped_norm" if self.importance == "released" else "sq",
        }

    def should_resample(self, step: int) -> bool:
        return super().should_resample(step) or (self.warmup_sweep and bool(self._unvisited))

    def select(self, step: int) -> List[int]:
        n = len(self.sizes)
        if step > 0:
            probs = misa_kernels.importance_update_(
                self.scores, self.accum[:n], self.accum_count[:n], beta=self.score_beta,
                eta=self.eta, rule=self.importance, update_count=self.update_count,
                max_logit=self.max_logit)
            self.accum[n:].zero_()
            self.accum_count[n:].zero_()
            self.probs = probs.to("cpu", torch.float64)  # the one host synchronisation of an interval
        by_age = sorted(self.candidates, key=lambda b: (self.last_used[b], b))
        never = [b for b in by_age if self.last_used[b] == -1]
        least_recent = [b for b in by_age if self.last_used[b] != -1][: self.sample_last]
        chosen = self.fill(never)
        share = 1.0 if self.draws % 2 else self.lru_budget_share
        chosen = self.fill(least_recent, chosen, limit=int(share * self.budget))
        self.draws += 1
        taken = set(chosen)
        rest = [b for b in self.candidates if b not in taken]
        chosen = self.fill(self.random_order(rest, self.probs[rest]), chosen)
        for b in chosen:
            self.last_used[b] = step
        self._unvisited.difference_update(chosen)
        return chosen

    def state_dict(self) -> dict:
        return {
            "scores": self.scores.clone(),
            "accum": self.accum.clone(),
            "accum_count": self.accum_count.clone(),
            "update_count": self.update_count.clone(),
            "probs": self.probs.clone(),
            "last_used": list(self.last_used),
            "draws": self.draws,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("scores", "accum", "accum_count", "update_count"):
            getattr(self, key).copy_(state[key])
        self.probs = state["probs"].to("cpu", torch.float64).clone()
        self.last_used = list(state["last_used"])
        self.draws = state["draws"]
        self._unvisited = {b for b in self.candidates if self.last_used[b] == -1}
