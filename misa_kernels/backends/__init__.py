"""Backend registry: which implementation runs an op on a given device.

A backend is a module (or package) in this folder that defines:

- ``NAME``: what users pass as ``backend=`` or ``MISA_KERNELS_BACKEND``;
- ``AUTO_PRIORITY``: a dict ``{device_type: priority}``; "auto" tries the backends that list
  the device type, highest priority first;
- ``unavailable_reason() -> str | None``: why it cannot run here (missing build, no triton);
- ``supports_device(device) -> bool``;
- ``DTYPES``: the weight/gradient dtypes it accepts (public: :func:`supports_dtype` reads it);
- ``grad_sq_norms(...)`` and ``adamw_step_(...)`` with the signatures of ``torch_ref``.

Adding a backend is adding a file here; nothing else changes. The default order, written once:
on CUDA ``cuda`` > ``triton`` > ``torch``; on CPU ``cpu`` > ``torch``. An explicit choice always
wins and fails loudly when it cannot run; "auto" warns once when it passes over a backend that
should have been there (a missing build, say) and never hides a failure inside a kernel.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import warnings
from functools import lru_cache
from types import ModuleType
from typing import Dict, List, Optional

import torch

ENV_VAR = "MISA_KERNELS_BACKEND"


class BackendUnavailable(RuntimeError):
    """Raised when an explicitly requested backend cannot run on this machine or device."""


@lru_cache(maxsize=None)
def _modules() -> Dict[str, ModuleType]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NAME"):
            found[module.NAME] = module
    return found


def names() -> List[str]:
    """All registered backend names, available here or not."""
    return sorted(_modules())


def module(name: str) -> ModuleType:
    """The backend module called `name`, already known to be available (no checks: hot path)."""
    return _modules()[name]


def get(name: str) -> ModuleType:
    """The backend module called `name`; raises if unknown or unavailable on this machine."""
    modules = _modules()
    if name not in modules:
        raise ValueError(f"unknown backend {name!r}; choose one of: auto, {', '.join(sorted(modules))}")
    module = modules[name]
    reason = module.unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} is unavailable: {reason}")
    return module


def available(device_type: Optional[str] = None) -> List[str]:
    """Names of the backends that can run here (on `device_type`, when given)."""
    result = []
    for name, module in sorted(_modules().items()):
        if module.unavailable_reason() is not None:
            continue
        if device_type is not None and not module.supports_device(torch.device(device_type)):
            continue
        result.append(name)
    return result


@lru_cache(maxsize=None)
def _auto(device_type: str) -> ModuleType:
    candidates = sorted(
        (m for m in _modules().values() if device_type in m.AUTO_PRIORITY),
        key=lambda m: -m.AUTO_PRIORITY[device_type],
    )
    passed_over = []
    for module in candidates:
        reason = module.unavailable_reason()
        if reason is None and module.supports_device(torch.device(device_type)):
            if passed_over:
                warnings.warn(
                    f"misa_kernels: using backend {module.NAME!r} on {device_type}; passed over "
                    + "; ".join(passed_over),
                    RuntimeWarning,
                    stacklevel=3,
                )
            return module
        passed_over.append(f"{module.NAME!r} ({reason or 'does not support this device'})")
    raise BackendUnavailable(f"no backend can run on device type {device_type!r}")


def supports_dtype(name: str, dtype: torch.dtype) -> bool:
    """Whether backend `name` takes weights and gradients of `dtype` (float32, float16 and
    bfloat16 everywhere; float64 on 'torch' only). For a caller that wants to refuse a model at
    construction, naming the backend, rather than at its first step."""
    modules = _modules()
    if name not in modules:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(sorted(modules))}")
    return dtype in modules[name].DTYPES


def select(name: Optional[str], device: torch.device, **dtypes: Optional[torch.dtype]) -> ModuleType:
    """:func:`resolve`, then a TypeError naming the backend when it does not take one of the
    given tensor dtypes (keyword: what the dtype is of, as named in the message)."""
    module = resolve(name, device)
    for label, dtype in dtypes.items():
        if dtype is not None and dtype not in module.DTYPES:
            raise TypeError(
                f"backend {module.NAME!r} does not support {label} of dtype {dtype}; it takes "
                f"{', '.join(map(str, module.DTYPES))} (the 'torch' backend takes float64 too)")
    return module


def resolve(name: Optional[str], device: torch.device) -> ModuleType:
    """The backend for `name` ("auto", a backend name, or None for the environment default)."""
    if name is None:
        name = os.environ.get(ENV_VAR, "auto") or "auto"
    if name == "auto":
        return _auto(device.type)
    module = get(name)
    if not module.supports_device(device):
        raise BackendUnavailable(f"backend {name!r} cannot run on device {device}")
    return module
