"""BAdam (Luo et al., 2024): block coordinate descent, one block at a time.

Switches block every `interval` steps in ascending, descending or random order (random: a new
shuffle of all blocks each time every block has been visited, as BAdam does).
"""
from __future__ import annotations

from typing import List

from . import Sampler, register

ORDERS = ("ascending", "descending", "random")


@register
class BAdamSampler(Sampler):
    name = "badam"
    default_granularity = "layer"
    uses_budget = False

    def __init__(self, partition, *, delta, interval, generator, device, order: str = "ascending",
                 **options):
        super().__init__(partition, delta=delta, interval=interval, generator=generator,
                         device=device, **options)
        if order not in ORDERS:
            raise ValueError(f"unknown BAdam order {order!r}; choose one of {', '.join(ORDERS)}")
        self.order = order
        self.queue: List[int] = []

    def select(self, step: int) -> List[int]:
        if not self.queue:
            blocks = list(range(len(self.sizes)))
            if self.order == "descending":
                blocks.reverse()
            elif self.order == "random":
                blocks = self.random_order(blocks)
            self.queue = blocks
        return [self.queue.pop(0)]

    def state_dict(self) -> dict:
        return {"queue": list(self.queue)}

    def load_state_dict(self, state: dict) -> None:
        self.queue = list(state["queue"])
