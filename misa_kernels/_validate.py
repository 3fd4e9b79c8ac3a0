"""Argument checks shared by every op, run before any backend sees the inputs.

Every check names the argument, the index (and the parameter's name when the caller gives
``names``) and the offending value, so that a bad call fails with a message a user can act on
instead of a wrong answer, a crash inside a kernel, or a step written half-way.
"""
from __future__ import annotations

import bisect
import math
import numbers
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

#: dtypes a model weight or gradient may have; float64 is accepted by the reference only.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: dtypes an lr tensor may have.
LR_DTYPES = (torch.float32, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def label(name: str, i: Optional[int] = None, names: Optional[Sequence[str]] = None) -> str:
    """How an argument is named in messages: ``params[3]``, or ``params[3] ('layer.weight')``."""
    if i is None:
        return name
    text = f"{name}[{i}]"
    return text if names is None else f"{text} ({names[i]!r})"


def check_names(names: Optional[Sequence[str]], count: int) -> Optional[list]:
    """`names` as a list of `count` strings (None stays None)."""
    if names is None:
        return None
    names = list(names)
    if len(names) != count or not all(isinstance(n, str) for n in names):
        raise ValueError(f"names must hold one string per tensor ({count}), got {len(names)} entries")
    return names


def check_tensor_list(
    name: str,
    tensors: Sequence[torch.Tensor],
    device: torch.device,
    dtypes: Sequence[torch.dtype],
    shapes: Optional[Sequence[torch.Size]] = None,
    names: Optional[Sequence[str]] = None,
) -> None:
    """Checks that every element is a dense, contiguous tensor on `device` with an allowed dtype.

    When `shapes` is given, element i must have shape `shapes[i]`.
    """
    if _all_valid(tensors, device, dtypes, shapes):
        return
    for i, t in enumerate(tensors):
        what = label(name, i, names)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"{what} is {t.layout}; only dense (strided) tensors are supported")
        if t.device != device:
            raise ValueError(
                f"{what} is on {t.device} but the op runs on {device}: all tensors must share one device"
            )
        if t.dtype not in dtypes:
            allowed = ", ".join(str(d) for d in dtypes)
            raise TypeError(f"{what} has dtype {t.dtype}; expected one of {allowed}")
        if not t.is_contiguous():
            raise ValueError(f"{what} ({_describe(t)}) is not contiguous; call .contiguous() first")
        if shapes is not None and t.shape != shapes[i]:
            raise ValueError(f"{what} has shape {tuple(t.shape)} but params[{i}] has {tuple(shapes[i])}")


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
                        dtypes: Sequence[torch.dtype] = (torch.float32,),
                        allow_cpu: bool = False) -> Optional[torch.Tensor]:
    """Checks a one-element device flag or coefficient (clip_coef, found_inf, lr) and returns it
    as a 0-dim view (a [1] tensor would broadcast a 0-dim parameter's update to shape [1])."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{name} is {t.layout}; only dense tensors are supported")
    if t.numel() != 1:
        raise ValueError(f"{name} must be a 0-dim (or one-element) tensor, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected {', '.join(map(str, dtypes))}")
    if t.device != device and not (allow_cpu and t.device.type == "cpu"):
        raise ValueError(f"{name} is on {t.device} but the op runs on {device}")
    return t.reshape(())


def check_hyper(name: str, value, low: float, high: float = math.inf,
                low_open: bool = False, high_open: bool = False) -> Union[float, torch.Tensor]:
    """Checks a hyperparameter is a finite number in its interval, naming the bad value, and
    returns it as a Python float.

    Takes what torch.optim takes: a Python or numpy number (not a bool), or a one-element
    tensor. A tensor in host memory is read and checked like a number (free: no device is
    involved). A tensor on a GPU is returned unread, as a 0-dim view: reading it would make
    the host wait for the device, so its value is not checked (only lr may be one; see
    :func:`check_lr`). Under torch.compile tensors are returned unread too (no graph break).
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"Invalid {name} value: a tensor of dtype {value.dtype}")
        if value.device.type != "cpu" or torch.compiler.is_compiling():
            return value.reshape(())
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Invalid {name} value: {value!r} (a real number is needed)")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name} value: {value} (must be finite)")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"Invalid {name} value: {value} (must lie in {lo}{low}, {high}{hi})")
    return value


def check_host_hyper(name: str, value, low: float, high: float = math.inf,
                     low_open: bool = False, high_open: bool = False) -> float:
    """:func:`check_hyper` for a hyperparameter the kernels take as a number (betas, eps,
    weight decay, max_norm): a tensor on a GPU is refused, since reading it would synchronise."""
    checked = check_hyper(name, value, low, high, low_open, high_open)
    if isinstance(checked, torch.Tensor):
        raise TypeError(f"{name} is a tensor on {checked.device}: pass a number or a CPU tensor "
                        "(only lr is read on the device)")
    return checked


def check_lr(lr, device: torch.device) -> Union[float, torch.Tensor]:
    """lr as the backends take it: a float (a number, or a host tensor, read and checked), or a
    0-dim float32/float64 tensor on `device`, read there by the kernels. Its value is then not
    checked: that would mean reading device memory on the host."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"lr must be a number or a 0-dim or one-element tensor, got shape {tuple(lr.shape)}")
    checked = check_hyper("learning rate", lr, 0.0)
    if isinstance(checked, torch.Tensor):
        return check_scalar_tensor("lr", checked, device, LR_DTYPES, allow_cpu=True)
    return checked


# ------------------------------------------------------------------------- memory overlap

#: address sets already found free of overlap, with their written spans; an optimizer meets one
#: per active set and dtype group, so a step pays for the sort only at a resampling.
OVERLAP_CACHE_SIZE = 64
_disjoint: "OrderedDict[tuple, Tuple[list, list, list]]" = OrderedDict()


def check_no_overlap(written: Dict[str, Sequence[torch.Tensor]], read: Dict[str, Sequence[torch.Tensor]],
                     names: Optional[Sequence[str]] = None, indexed: Sequence[str] = (),
                     loose: Dict[str, Optional[torch.Tensor]] = None) -> None:
    """Refuses an op whose written tensors overlap in memory any other tensor of the call (two
    parameters on one storage range, a moment that is also the gradient, overlapping views):
    the kernels update chunks in parallel and would race or lose an update. Tensors only read
    may share memory, and disjoint views of one storage (``w[0]``, ``w[1]``) are fine.

    `written` and `read` map argument names to lists of contiguous tensors on one device. The
    lists named in `indexed` are per-parameter, with equal shapes at each index (checked
    before), and errors name their index (and `names[i]`). `loose` holds small read-only
    tensors that a step makes anew (clip_coef, found_inf, lr): they are checked against the
    written spans at every call (a binary search each) and kept out of the cache key. An
    address set already checked is found in a small cache, so a repeated call costs the
    gathering of the addresses only.
    """
    roles = list(written.items()) + list(read.items())
    numels = next((tuple(map(torch.Tensor.numel, ts)) for role, ts in roles if role in indexed and ts), ())
    # bytes: per-parameter lists share the numels, so one element size per list says it all
    sizes = tuple(ts[0].element_size() if role in indexed and ts else tuple(t.nbytes for t in ts)
                  for role, ts in roles)
    key = (numels, sizes, tuple(tuple(map(torch.Tensor.data_ptr, ts)) for _, ts in roles))
    spans_written = _disjoint.get(key)
    if spans_written is None:
        spans_written = _sweep(roles, written, key, names, indexed)
        _disjoint[key] = spans_written
        if len(_disjoint) > OVERLAP_CACHE_SIZE:
            _disjoint.popitem(last=False)
    else:
        _disjoint.move_to_end(key)
    for role, t in (loose or {}).items():
        if t is not None and t.numel():
            _check_loose(role, t, spans_written, names, indexed)


def _sweep(roles, written, key, names, indexed) -> Tuple[list, list, list]:
    """One pass over the spans sorted by address; raises at the first overlap that involves a
    written tensor. Returns the written spans (starts, ends, spans), sorted and disjoint."""
    numels, sizes, pointers = key
    spans = []
    for order, ((role, _), size, starts) in enumerate(zip(roles, sizes, pointers)):
        is_written = role in written
        nbytes = size if isinstance(size, tuple) else [n * size for n in numels]
        for i, (start, length) in enumerate(zip(starts, nbytes)):
            if length:
                spans.append((start, start + length, is_written, order, i, role))
    spans.sort()
    latest_any = latest_written = None  # the spans seen so far that reach furthest
    for span in spans:
        start, end, is_written = span[:3]
        if is_written and latest_any is not None and start < latest_any[1]:
            _overlap_error(span, latest_any, names, indexed)
        if latest_written is not None and start < latest_written[1]:
            _overlap_error(span, latest_written, names, indexed)
        if latest_any is None or end > latest_any[1]:
            latest_any = span
        if is_written and (latest_written is None or end > latest_written[1]):
            latest_written = span
    kept = [span for span in spans if span[2]]
    return [span[0] for span in kept], [span[1] for span in kept], kept


def _check_loose(role, t, spans_written, names, indexed) -> None:
    starts, ends, spans = spans_written
    start = t.data_ptr()
    end = start + t.nbytes
    i = bisect.bisect_right(starts, start) - 1  # the last written span starting at or before it
    for j in (i, i + 1):
        if 0 <= j < len(starts) and starts[j] < end and start < ends[j]:
            _overlap_error((start, end, False, math.inf, 0, role), spans[j], names, indexed)


def _overlap_error(a, b, names, indexed) -> None:
    def what(span):
        role, i = span[5], span[4]
        return label(role, i, names) if role in indexed else role

    first, second = sorted((a, b), key=lambda s: (s[3], s[4]))  # in argument order
    overlap = min(a[1], b[1]) - max(a[0], b[0])
    raise ValueError(
        f"{what(first)} and {what(second)} overlap in memory ({overlap} bytes in common); the op "
        "writes one of them, so the result would depend on the order of the writes. Pass "
        "tensors that do not share memory (e.g. .clone() one of them); disjoint views of one "
        "tensor are fine")
