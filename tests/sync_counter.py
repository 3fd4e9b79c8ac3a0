"""Counts, during a block of code, the Python calls that would make the host wait for a GPU
or copy from host memory, so that a CPU-only test can assert a step path has none.

On a GPU these calls block the host until the device catches up (a read of a device value) or
stage a host-to-device copy of Python data; on this CPU they cost nothing, which is why they
slip in unnoticed. Every tensor here is a CPU tensor standing in for a device tensor, so every
call is counted, whatever device the tensor is on.

Counted: ``torch.tensor`` and ``torch.as_tensor`` built from Python or numpy data (not from a
tensor), ``Tensor.item``, ``Tensor.tolist``, ``Tensor.cpu``, and ``bool``, ``float`` or
``int`` of a tensor. Not seen: what compiled code (C++, CUDA) does inside an op, and host-side
work that ends in one copy to the device that does not wait (``.to(device, non_blocking=True)``
of a pinned host tensor): the CUDA and Triton backends refresh their device work tables that
way when the tensors' addresses change (the first step of an active set, whose moments are
new, and a step after the gradients were reallocated), which a GPU's sync debug mode confirms
is not a synchronisation (``../shared/gpu/gpu_check.sh``, step nosync).

    from sync_counter import count_host_syncs

    with count_host_syncs() as syncs:
        optimizer.step()
    assert syncs.count == 0, syncs.report()
"""
from __future__ import annotations

import contextlib
import threading
import traceback
from dataclasses import dataclass, field
from typing import Iterator, List

import torch

_TENSOR_METHODS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__")
_FACTORIES = ("tensor", "as_tensor")


@dataclass
class HostSyncs:
    """The calls seen: `events` holds "what at file:line" for each, in call order."""

    events: List[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.events)

    def report(self) -> str:
        return f"{self.count} host sync(s):\n  " + "\n  ".join(self.events)


_state = threading.local()


def _caller() -> str:
    """The innermost frame outside this file and outside torch itself."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace("\\", "/")
        if not path.endswith("sync_counter.py") and "/torch/" not in path:
            return f"{path}:{frame.lineno} ({frame.line})"
    return "<unknown>"


def _record(what: str) -> None:
    syncs = getattr(_state, "active", None)
    if syncs is not None and not getattr(_state, "inside", False):
        syncs.events.append(f"{what} at {_caller()}")


def _counted_method(name, original):
    def wrapper(self, *args, **kwargs):
        _record(f"Tensor.{name}")
        _state.inside = True  # calls made by the original itself are not the caller's
        try:
            return original(self, *args, **kwargs)
        finally:
            _state.inside = False
    return wrapper


def _counted_factory(name, original):
    def wrapper(data, *args, **kwargs):
        if not isinstance(data, torch.Tensor):
            _record(f"torch.{name} from Python data")
        return original(data, *args, **kwargs)
    return wrapper


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Counts the calls listed in the module docstring made inside the block (this thread)."""
    syncs = HostSyncs()
    originals = {name: getattr(torch.Tensor, name) for name in _TENSOR_METHODS}
    own = {name for name in _TENSOR_METHODS if name in vars(torch.Tensor)}  # the rest is inherited
    factories = {name: getattr(torch, name) for name in _FACTORIES}
    for name, original in originals.items():
        setattr(torch.Tensor, name, _counted_method(name, original))
    for name, original in factories.items():
        setattr(torch, name, _counted_factory(name, original))
    _state.active = syncs
    try:
        yield syncs
    finally:
        _state.active = None
        for name, original in originals.items():
            if name in own:
                setattr(torch.Tensor, name, original)
            else:
                delattr(torch.Tensor, name)
        for name, original in factories.items():
            setattr(torch, name, original)
