"""Argument checks shared by every op, run before any backend sees the inputs.

Every check names the argument, the index and the offending value, so that a bad call fails
with a message a user can act on instead of a wrong answer or a crash inside a kernel.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

#: dtypes a model weight or gradient may have; float64 is accepted by the reference only.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def check_tensor_list(
    name: str,
    tensors: Sequence[torch.Tensor],
    device: torch.device,
    dtypes: Sequence[torch.dtype],
    shapes: Optional[Sequence[torch.Size]] = None,
) -> None:
    """Checks that every element is a dense, contiguous tensor on `device` with an allowed dtype.

    When `shapes` is given, element i must have shape `shapes[i]`.
    """
    if _all_valid(tensors, device, dtypes, shapes):
        return
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"{name}[{i}] is {t.layout}; only dense (strided) tensors are supported")
        if t.device != device:
            raise ValueError(
                f"{name}[{i}] is on {t.device} but the op runs on {device}: all tensors must share one device"
            )
        if t.dtype not in dtypes:
            allowed = ", ".join(str(d) for d in dtypes)
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; expected one of {allowed}")
        if not t.is_contiguous():
            raise ValueError(f"{name}[{i}] ({_describe(t)}) is not contiguous; call .contiguous() first")
        if shapes is not None and t.shape != shapes[i]:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} but params[{i}] has {tuple(shapes[i])}")


def _all_valid(tensors, device, dtypes, shapes) -> bool:
    """The common case, checked with C-level maps (the optimizer runs this every step on
    hundreds of tensors); the element-wise loop that names the culprit runs only on failure."""
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    if {t.layout for t in tensors} - {torch.strided}:
        return False  # is_contiguous is not defined for sparse layouts
    index = -1 if device.type == "cpu" else device.index
    return (
        {t.dtype for t in tensors} <= set(dtypes)
        and all(t.device.type == device.type for t in tensors[:1])
        and set(map(torch.Tensor.get_device, tensors)) <= {index}
        and all(map(torch.Tensor.is_contiguous, tensors))
        and (shapes is None or list(map(torch.Tensor.size, tensors)) == list(shapes))
    )


def check_same_length(**lists: Optional[Sequence]) -> int:
    """Returns the common length of the given lists (None entries are skipped); raises if they differ."""
    lengths = {name: len(v) for name, v in lists.items() if v is not None}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise ValueError(f"list arguments must have the same length, got {detail}")
    return next(iter(lengths.values()), 0)


def check_module_ids(module_ids: Sequence[int], num_modules: int, what: str = "num_modules") -> None:
    """Checks that module_ids holds Python ints in [0, num_modules)."""
    for i, m in enumerate(module_ids):
        if isinstance(m, bool) or not isinstance(m, int):
            raise TypeError(f"module_ids[{i}] must be an int, got {type(m).__name__}")
        if not 0 <= m < num_modules:
            raise ValueError(f"module_ids[{i}] = {m} is outside [0, {what}={num_modules})")


def check_vector(name: str, t: Optional[torch.Tensor], length: int, device: torch.device,
                 dtypes: Sequence[torch.dtype] = (torch.float32,)) -> None:
    """Checks a 1-D per-module buffer (scores, step counts, accumulators)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or not t.is_contiguous():
        raise ValueError(f"{name} must be a dense contiguous tensor")
    if t.dim() != 1 or t.numel() != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the op runs on {device}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected {', '.join(map(str, dtypes))}")


def check_scalar_tensor(name: str, t: Optional[torch.Tensor], device: torch.device,
                        dtypes: Sequence[torch.dtype] = (torch.float32,), allow_cpu: bool = False) -> None:
    """Checks a 0-dim device flag or coefficient (clip_coef, found_inf, lr)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.numel() != 1 or t.dim() > 1:
        raise ValueError(f"{name} must be a 0-dim tensor, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected {', '.join(map(str, dtypes))}")
    if t.device != device and not (allow_cpu and t.device.type == "cpu"):
        raise ValueError(f"{name} is on {t.device} but the op runs on {device}")


def check_hyper(name: str, value: float, low: float, high: float = math.inf,
                low_open: bool = False, high_open: bool = False) -> None:
    """Checks a hyperparameter lies in its interval, naming the bad value."""
    if isinstance(value, torch.Tensor):
        return  # a device tensor (lr) is not read on the host: reading it would synchronise
    if not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"Invalid {name} value: {value}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"Invalid {name} value: {value} (must lie in {lo}{low}, {high}{hi})")
