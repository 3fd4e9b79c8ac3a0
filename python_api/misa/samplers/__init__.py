"""Samplers decide which modules train. One class per file; each registers itself by name.

A sampler sees the partition's module sizes, owns whatever state its choice needs (importance
scores, an order, last-use times) and is asked for a new active set when
:meth:`Sampler.should_resample` says so. Randomness comes only from the generator the
optimizer passes, so the same seed gives the same sequence of active sets, and
state_dict() / load_state_dict() resume it exactly.
"""
from __future__ import annotations

import math
import warnings
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


#: what to do with a module larger than the budget: refuse the model, or leave it frozen.
OVERSIZED_POLICIES = ("error", "freeze")


class Sampler:
    """Base class. Subclasses set `name` and the defaults below, and implement :meth:`select`.

    `candidates` are the modules a draw may choose: every module, less those larger than the
    budget when ``oversized="freeze"`` (they stay frozen; with "error", the default, such a
    module is refused at construction)."""

    name: ClassVar[str]
    #: partition granularity used when the user gives none.
    default_granularity: ClassVar[str] = "module"
    #: what happens to embeddings, head and norms when the user gives no policy.
    default_non_block: ClassVar[str] = "frozen"
    #: whether the budget delta limits the active set.
    uses_budget: ClassVar[bool] = True

    def __init__(self, partition: Partition, *, delta: float, interval: int,
                 generator: torch.Generator, device: torch.device, oversized: str = "error", **options):
        if options:
            raise TypeError(f"sampler {self.name!r} got unexpected options: {', '.join(sorted(options))}")
        if oversized not in OVERSIZED_POLICIES:
            raise ValueError(f"oversized must be one of {', '.join(OVERSIZED_POLICIES)}, got {oversized!r}")
        self.partition = partition
        self.sizes = [m.numel for m in partition.modules]
        self.delta = delta
        self.interval = interval
        self.generator = generator
        self.device = device
        self.budget = partition.budget(delta) if self.uses_budget else sum(self.sizes)
        too_big = [b for b, size in enumerate(self.sizes) if size > self.budget]
        if too_big:
            message = self._oversized_message(too_big)
            if oversized == "error" or len(too_big) == len(self.sizes):
                hint = ("raise delta, or pass oversized='freeze' to leave them frozen"
                        if len(too_big) < len(self.sizes) else "no module can ever be active: raise delta")
                raise ValueError(f"{message}; {hint}")
            warnings.warn(f"{message}; oversized='freeze': they stay frozen and never train", UserWarning,
                          stacklevel=4)
        self.oversized = [partition.modules[b].name for b in too_big]
        excluded = set(too_big)
        self.candidates = [b for b in range(len(self.sizes)) if b not in excluded]

    def _oversized_message(self, too_big: List[int]) -> str:
        modules = self.partition.modules
        listed = ", ".join(f"{modules[b].name} ({self.sizes[b]:,})" for b in too_big[:4])
        more = f" and {len(too_big) - 4} more" if len(too_big) > 4 else ""
        largest = max(self.sizes[b] for b in too_big)
        return (f"{len(too_big)} of {len(self.sizes)} modules are larger than the budget of {self.budget:,} "
                f"parameters (delta={self.delta:g} of {self.partition.total_params:,}): {listed}{more}; the "
                f"smallest delta that fits every module is {smallest_delta(largest, self.partition.total_params)}")

    def to(self, device: torch.device) -> None:
        """Moves the sampler's device buffers to `device` (the model moved after construction)."""
        self.device = device

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

    def fill(self, order: List[int], chosen: Optional[List[int]] = None, limit: Optional[int] = None) -> List[int]:
        """Greedy fill: walks `order`, taking each module that still fits the budget (and, with
        `limit`, adds at most `limit` parameters to `chosen`)."""
        chosen = [] if chosen is None else chosen
        taken = set(chosen)
        used = sum(self.sizes[b] for b in chosen)
        room = self.budget if limit is None else min(self.budget, used + limit)
        for b in order:
            if b not in taken and used + self.sizes[b] <= room:
                chosen.append(b)
                taken.add(b)
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


def smallest_delta(size: int, total: int) -> str:
    """The smallest delta, rounded up to 4 significant digits, whose budget holds `size` parameters."""
    delta = size / total
    digits = 4 - 1 - math.floor(math.log10(delta))
    rounded = math.ceil(delta * 10 ** digits) / 10 ** digits
    return f"{rounded:.{max(digits, 0)}f}"


# Registration happens at import: each file defines and registers one sampler.
from . import badam, full, lisa, misa  # noqa: E402,F401
