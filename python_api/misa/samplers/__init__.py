"""Samplers decide which modules train. One class per file; each registers itself by name.

A sampler sees the partition's module sizes, owns whatever state its choice needs (importance
scores, an order, last-use times) and is asked for a new active set when
:meth:`Sampler.should_resample` says so. Randomness comes only from the generator the
optimizer passes, so the same seed gives the same sequence of active sets, and
state_dict() / load_state_dict() resume it exactly.
"""
from __future__ import annotations

from typing import ClassVar, Dict, List, Optional, Type

import torch

from ..partition import Partition

_REGISTRY: Dict[str, Type["Sampler"]] = {}


def register(cls: Type["Sampler"]) -> Type["Sampler"]:
    """Class decorator: makes `cls` available as ``MISA(..., sampler=cls.name)``."""
    _REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> Type["Sampler"]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def names() -> List[str]:
    return sorted(_REGISTRY)


class Sampler:
    """Base class. Subclasses set `name` and the defaults below, and implement :meth:`select`."""

    name: ClassVar[str]
    #: partition granularity used when the user gives none.
    default_granularity: ClassVar[str] = "module"
    #: what happens to embeddings, head and norms when the user gives no policy.
    default_non_block: ClassVar[str] = "frozen"
    #: whether the budget delta limits the active set.
    uses_budget: ClassVar[bool] = True

    def __init__(self, partition: Partition, *, delta: float, interval: int,
                 generator: torch.Generator, device: torch.device, **options):
        if options:
            raise TypeError(f"sampler {self.name!r} got unexpected options: {', '.join(sorted(options))}")
        self.partition = partition
        self.sizes = [m.numel for m in partition.modules]
        self.delta = delta
        self.interval = interval
        self.generator = generator
        self.device = device
        self.budget = partition.budget(delta) if self.uses_budget else sum(self.sizes)
        if self.budget < min(self.sizes):
            raise ValueError(
                f"delta={delta:g} allows {self.budget} parameters, fewer than the smallest module "
                f"({min(self.sizes)} parameters): no module can ever be active; raise delta to at least "
                f"{min(self.sizes) / partition.total_params:.2g}"
            )

    def should_resample(self, step: int) -> bool:
        """Whether to draw a new active set after optimizer step number `step` (1-based)."""
        return step % self.interval == 0

    def select(self, step: int) -> List[int]:
        """Indices of the modules active from step `step` on."""
        raise NotImplementedError

    def accumulation(self) -> Optional[dict]:
        """Keyword arguments for misa_kernels.grad_sq_norms that accumulate per-step
        importance values, or None when the sampler needs none."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def fill(self, order: List[int], chosen: Optional[List[int]] = None) -> List[int]:
        """Greedy fill: walks `order`, taking each module that still fits the budget."""
        chosen = [] if chosen is None else chosen
        used = sum(self.sizes[b] for b in chosen)
        for b in order:
            if b not in chosen and used + self.sizes[b] <= self.budget:
                chosen.append(b)
                used += self.sizes[b]
        return chosen

    def random_order(self, candidates: List[int], weights: Optional[torch.Tensor] = None) -> List[int]:
        """A random permutation of `candidates`; with `weights`, distributed like successive
        weighted draws without replacement (Efraimidis-Spirakis keys u^(1/w))."""
        if not candidates:
            return []
        u = torch.rand(len(candidates), generator=self.generator, dtype=torch.float64)
        if weights is None:
            keys = u
        else:
            w = weights.to(torch.float64)
            keys = torch.where(w > 0, u.log() / w, torch.full_like(u, -float("inf")))
        ranked = torch.sort(keys, descending=True, stable=True).indices.tolist()
        return [candidates[i] for i in ranked]


# Registration happens at import: each file defines and registers one sampler.
from . import badam, full, lisa, misa  # noqa: E402,F401
