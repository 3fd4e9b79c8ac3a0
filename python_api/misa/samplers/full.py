"""Full fine-tuning: every parameter active at every step, embedding, head and norms included.

With this sampler the MISA optimizer is AdamW (the tests check it step by step against
torch.optim.AdamW); it is the baseline every memory and convergence comparison needs.
"""
from __future__ import annotations

from typing import List

from . import Sampler, register


@register
class FullSampler(Sampler):
    name = "full"
    default_non_block = "trained"
    uses_budget = False

    def should_resample(self, step: int) -> bool:
        return False

    def select(self, step: int) -> List[int]:
        return list(range(len(self.sizes)))
