"""Loads the compiled extension misa_kernels._C once and remembers why it could not be loaded."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import torch

#: vector capabilities in increasing order; a build for a later one cannot run on an earlier.
_CAPABILITY_ORDER = ("DEFAULT", "AVX2", "AVX512")

_module: Optional[ModuleType] = None
_error: Optional[str] = None
_loaded = False


def load() -> Optional[ModuleType]:
    """The _C module, or None; :func:`error` then says why."""
    global _module, _error, _loaded
    if not _loaded:
        _loaded = True
        try:
            _module = importlib.import_module("misa_kernels._C")
        except ImportError as exc:
            _error = f"misa_kernels._C is not built or failed to load ({exc}); reinstall with `pip install --no-build-isolation .`"
    return _module


def error() -> Optional[str]:
    load()
    return _error


def cpu_unavailable_reason() -> Optional[str]:
    """Why the compiled CPU kernels cannot run on this CPU (None when they can)."""
    module = load()
    if module is None:
        return _error
    built = module.cpu_capability()
    here = torch.backends.cpu.get_cpu_capability()
    if built in _CAPABILITY_ORDER and here in _CAPABILITY_ORDER:
        if _CAPABILITY_ORDER.index(built) > _CAPABILITY_ORDER.index(here):
            return (f"misa_kernels._C was compiled for {built} but this CPU offers {here}; "
                    "rebuild with MISA_KERNELS_CPU_CAPABILITY=DEFAULT (or on this machine)")
    return None


def cuda_unavailable_reason() -> Optional[str]:
    """Why the compiled CUDA kernels cannot run (None when they can)."""
    module = load()
    if module is None:
        return _error
    if not module.has_cuda():
        return "misa_kernels._C was built without CUDA kernels (CPU-only torch or no toolkit at build time)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None
