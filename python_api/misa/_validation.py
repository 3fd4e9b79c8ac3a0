"""What the optimizer refuses, checked before anything is written.

Hyperparameters are checked by value wherever that costs nothing: Python and numpy numbers, and
one-element tensors on the host. A learning rate held in a device tensor (for schedulers that
update it on the device) is not read, as reading it would synchronise; its shape and dtype
are checked. Parameters are checked at construction for what can be known then (layout, dtype,
contiguity, memory shared between parameters, sparse embeddings); gradients at every step by
misa_kernels' own list check, given the parameters' names.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

#: dtypes a trained parameter may have.
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def number(name: str, value, low: float, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = False, integer: bool = False):
    """`value` as a Python int or float after checking it is a finite real number in its interval;
    a one-element host tensor or a numpy scalar is read. Raises a ValueError naming the option."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got a tensor of shape "
                             f"{tuple(value.shape)}")
        if value.device.type != "cpu":
            raise ValueError(f"{name} is a tensor on {value.device}; pass a number or a CPU tensor (only the "
                             "learning rate may live on the device)")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {name}: {value!r} (expected a number)")
    if integer:
        if not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an int, got {value}")
        value = int(value)
    else:
        value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if not math.isfinite(value) or too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"Invalid {name}: {value!r} (must be finite and lie in {lo}{low:g}, {high:g}{hi})")
    return value


def learning_rate(name: str, value):
    """A float, or a tensor learning rate as a 0-dim view (a one-element 1-D tensor is accepted):
    a host tensor is checked by value, a device tensor only by shape and dtype."""
    if not isinstance(value, torch.Tensor):
        return number(name, value, 0.0)
    if value.numel() != 1 or value.dim() > 1:
        raise ValueError(f"{name} must be a number or a one-element tensor, got a tensor of shape {tuple(value.shape)}")
    if not value.is_floating_point() or value.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be a float32 or float64 tensor, got {value.dtype}")
    if value.device.type == "cpu":
        number(name, value, 0.0)
    return value.view(())


def betas(name: str, value) -> Tuple[float, float]:
    if isinstance(value, torch.Tensor) or not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair of numbers, got {value!r}")
    return tuple(number(f"{name}[{i}]", b, 0.0, 1.0, high_open=True) for i, b in enumerate(value))


def choice(name: str, value, allowed: Sequence) -> None:
    if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def parameters(named: Sequence[Tuple[str, nn.Parameter]], model: nn.Module) -> None:
    """Refuses, naming the parameter, what no backend can train: sparse or complex parameters,
    non-float dtypes, non-contiguous layouts, sparse-gradient embeddings, and distinct
    parameters sharing memory (tied weights are one parameter and are fine)."""
    for name, p in named:
        if p.layout != torch.strided:
            raise ValueError(f"parameter {name} is {p.layout}: MISA trains dense parameters only")
        if p.is_complex():
            raise ValueError(f"parameter {name} is complex ({p.dtype}): MISA trains real floating-point "
                             "parameters only (view it as real pairs with torch.view_as_real)")
        if p.dtype not in PARAM_DTYPES:
            raise ValueError(f"parameter {name} has dtype {p.dtype}; MISA trains "
                             f"{', '.join(str(d) for d in PARAM_DTYPES)}")
        if not _local(p).is_contiguous():
            raise ValueError(f"parameter {name} (shape {tuple(p.shape)}, strides {p.stride()}) is not contiguous: "
                             "the fused kernels need contiguous parameters; make it contiguous before building "
                             "the optimizer (e.g. p.data = p.data.contiguous())")
    trained = {id(p) for _, p in named}
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse and id(module.weight) in trained:
            raise ValueError(f"{module_name or type(module).__name__} is an embedding with sparse=True: MISA's "
                             "kernels need dense gradients; build it with sparse=False")
    _no_shared_memory(named)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _no_shared_memory(named: Sequence[Tuple[str, nn.Parameter]]) -> None:
    """Distinct parameters whose bytes overlap would each be updated from their own gradient,
    and the kernels write tensors in parallel chunks: the result depends on the order."""
    spans: List[Tuple[int, int, int, str]] = []  # (storage, first byte, end byte, name)
    for name, p in named:
        t = _local(p)
        if t.device.type == "meta" or t.numel() == 0:
            continue
        first = t.storage_offset() * t.element_size()
        extent = (1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))) * t.element_size()
        spans.append((t.untyped_storage().data_ptr(), first, first + extent, name))
    spans.sort()
    for (s1, _, end1, name1), (s2, start2, _, name2) in zip(spans, spans[1:]):
        if s1 == s2 and start2 < end1:
            raise ValueError(f"parameters {name1} and {name2} share memory: each would be updated from its own "
                             "gradient in parallel, and one update would be lost. Tie them as one Parameter "
                             "object, or give each its own storage (.clone())")


def optional_number(name: str, value, low: float, **bounds) -> Optional[float]:
    return None if value is None else number(name, value, low, **bounds)
