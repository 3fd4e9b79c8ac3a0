"""Keeping torch.compile's graphs few while MISA switches which parameters require grad.

A compiled graph guards on the ``requires_grad`` of every parameter it reads, and AOTAutograd
builds a different backward for each pattern; MISA flips that flag at every switch, so a graph
over the sampled modules recompiles at nearly every switch and reaches torch._dynamo's
recompile limit (8) after a few, then falls back to eager. The remedy used here: the forward
of each sampled module (a linear layer, an expert stack, an adapted layer) runs outside the
graph, so that a graph break surrounds it and the compiled pieces between them (norms,
attention, activations, residual additions: what compilation fuses) never read a sampled
parameter. Those pieces still see activations that require grad or not depending on whether
an earlier module is active, which gives a handful of variants per piece, a number that does
not grow with the number of switches.

Mechanism: the module's class is swapped for a subclass whose ``forward`` is wrapped in
``torch.compiler.disable``, as FSDP2's ``fully_shard`` swaps classes; ``isinstance`` checks,
hooks and state dicts are unaffected, eager calls cost nothing measurable, pickling and
``copy.deepcopy`` produce the original class, and :func:`restore` undoes it.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

from torch import nn

_EAGER_CLASSES: Dict[type, type] = {}
_MARK = "_misa_eager_base"


def run_outside_graphs(modules: Iterable[nn.Module]) -> List[nn.Module]:
    """Makes every module in `modules` run its forward outside torch.compile graphs; returns
    those changed (already changed ones are skipped)."""
    changed = []
    for module in modules:
        if _MARK in type(module).__dict__:
            continue
        module.__class__ = _eager_class(type(module))
        changed.append(module)
    return changed


def restore(modules: Iterable[nn.Module]) -> None:
    """Gives the modules back their original class."""
    for module in modules:
        base = type(module).__dict__.get(_MARK)
        if base is not None:
            module.__class__ = base


def _new(cls: type):
    """An empty instance of `cls`, which unpickling then fills (see ``__reduce_ex__`` below)."""
    return cls.__new__(cls)


def _eager_class(cls: type) -> type:
    if cls not in _EAGER_CLASSES:
        import torch.compiler  # the wrapper imports torch._dynamo (about 1 s), so only when needed

        def __reduce_ex__(self, protocol):  # pickled and deep-copied as the original class
            reduced = super(eager, self).__reduce_ex__(protocol)
            return (_new, (cls,)) + tuple(reduced[2:])

        eager = type(cls.__name__, (cls,), {
            "forward": torch.compiler.disable(cls.forward),
            "__reduce_ex__": __reduce_ex__,
            _MARK: cls,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        })
        _EAGER_CLASSES[cls] = eager
    return _EAGER_CLASSES[cls]
