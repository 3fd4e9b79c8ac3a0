"""Loads the compiled extensions once and remembers why one could not be loaded.

- ``misa_kernels._cpu_<capability>``: the CPU kernels, compiled for the vector width in the
  module's name. Its name is checked against this CPU before the import: code built for
  AVX-512 would die with an illegal instruction on a CPU without it.
- ``misa_kernels._C``: the CUDA kernels (only ``has_cuda() == False`` in a CPU-only build).
"""
from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache
from types import ModuleType
from typing import Optional, Tuple

import torch

#: vector capabilities in increasing order; a build for a later one cannot run on an earlier.
CAPABILITY_ORDER = ("DEFAULT", "AVX2", "AVX512")
REBUILD = "reinstall with `pip install --no-build-isolation .`"


def _import(name: str) -> Tuple[Optional[ModuleType], Optional[str]]:
    try:
        return importlib.import_module(name), None
    except ImportError as exc:
        return None, f"{name} failed to load ({exc}); {REBUILD}"


def _built_cpu_capability() -> Optional[str]:
    for capability in CAPABILITY_ORDER:
        if importlib.util.find_spec(f"misa_kernels._cpu_{capability.lower()}") is not None:
            return capability
    return None


@lru_cache(maxsize=None)
def _cpu() -> Tuple[Optional[ModuleType], Optional[str]]:
    built = _built_cpu_capability()
    if built is None:
        return None, f"the CPU kernels (misa_kernels._cpu_*) are not built; {REBUILD}"
    here = torch.backends.cpu.get_cpu_capability()
    if here in CAPABILITY_ORDER and CAPABILITY_ORDER.index(built) > CAPABILITY_ORDER.index(here):
        return None, (f"the CPU kernels were compiled for {built} but this CPU offers {here}; rebuild "
                      "here, or with MISA_KERNELS_CPU_CAPABILITY=DEFAULT for any x86 CPU")
    return _import(f"misa_kernels._cpu_{built.lower()}")


@lru_cache(maxsize=None)
def _cuda() -> Tuple[Optional[ModuleType], Optional[str]]:
    module, error = _import("misa_kernels._C")
    if module is not None and not module.has_cuda():
        return None, "misa_kernels._C was built without CUDA kernels (CPU-only torch or no toolkit at build time)"
    return module, error


def cpu_module() -> ModuleType:
    """The CPU kernels' module (call only when :func:`cpu_unavailable_reason` is None)."""
    return _cpu()[0]


def cuda_module() -> ModuleType:
    """The CUDA kernels' module (call only when :func:`cuda_unavailable_reason` is None)."""
    return _cuda()[0]


def cpu_unavailable_reason() -> Optional[str]:
    """Why the compiled CPU kernels cannot run here (None when they can)."""
    return _cpu()[1]


def cuda_unavailable_reason() -> Optional[str]:
    """Why the compiled CUDA kernels cannot run (None when they can)."""
    error = _cuda()[1]
    if error is None and not torch.cuda.is_available():
        return "no CUDA device is available"
    return error
