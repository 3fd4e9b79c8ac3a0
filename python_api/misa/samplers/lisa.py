"""LISA (Pan et al., 2024): uniformly random layers, embedding and head trained at every step.

Draws `n_layers` blocks uniformly without replacement every `interval` steps; without
`n_layers`, fills the budget delta with uniformly drawn layers, so that LISA and MISA can be
compared at equal optimizer memory. Unlike LMFlow's LISA, the state of layers switched away
from is freed.
"""
from __future__ import annotations

from typing import List, Optional

from . import Sampler, register


@register
class LISASampler(Sampler):
    name = "lisa"
    default_granularity = "layer"
    default_non_block = "trained"

    def __init__(self, partition, *, delta, interval, generator, device,
                 n_layers: Optional[int] = None, **options):
        if n_layers is not None:
            count = len(partition.modules)
            if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= count:
                raise ValueError(f"n_layers must be an int in [1, {count}], got {n_layers!r}")
            self.uses_budget = False  # a fixed number of layers instead of the budget delta
        super().__init__(partition, delta=delta, interval=interval, generator=generator,
                         device=device, **options)
        self.n_layers = n_layers

    def select(self, step: int) -> List[int]:
        order = self.random_order(list(self.candidates))
        if self.n_layers is not None:
            return order[: self.n_layers]
        return self.fill(order)
