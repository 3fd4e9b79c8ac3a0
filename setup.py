"""Builds the compiled kernels: the C++ CPU kernels always (misa_kernels._cpu_<capability>), the
CUDA kernels (misa_kernels._C) when they can be built.

Build with the torch you will run against, outside an isolated build environment:

    pip install --no-build-isolation .

Switches (environment variables):

- ``MISA_KERNELS_BUILD_CUDA=auto|0|1``: build the CUDA kernels: when torch is a CUDA build and
  a CUDA toolkit is found (auto, the default), never (0), or always, failing if impossible (1).
- ``MISA_KERNELS_CPU_CAPABILITY=auto|DEFAULT|AVX2|AVX512``: the x86 vector width the CPU
  kernels are compiled for; auto takes what this machine's torch reports. The package checks,
  before importing them, that the CPU it runs on has it, and otherwise falls back to the
  'torch' backend.
- ``TORCH_CUDA_ARCH_LIST`` (e.g. "9.0"), ``MAX_JOBS``: read by torch.utils.cpp_extension.
- ``MISA_KERNELS_DEBUG=1``: -O0 -g, and device-side line info.
"""
import glob
import os

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))

#: compiler flags per x86 capability, as PyTorch builds its own vectorised CPU kernels.
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


#: at::parallel_for is an inline `#pragma omp parallel` when torch is built with OpenMP: without
#: -fopenmp the CPU kernels would silently run on one thread (csrc/cpu/multi_tensor.h refuses).
OPENMP_FLAGS = ["-fopenmp"] if torch.backends.openmp.is_available() else []


def _env(name, default, allowed):
    value = os.environ.get(name, default)
    if value not in allowed:
        raise RuntimeError(f"{name}={value!r}; expected one of {', '.join(allowed)}")
    return value


def _build_cuda() -> bool:
    mode = _env("MISA_KERNELS_BUILD_CUDA", "auto", ("auto", "0", "1"))
    if mode == "0":
        return False
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None:
        missing.append("no CUDA toolkit found (set CUDA_HOME)")
    if missing and mode == "1":
        raise RuntimeError("MISA_KERNELS_BUILD_CUDA=1 but " + "; ".join(missing))
    if missing:
        print("misa_kernels: building without CUDA kernels: " + "; ".join(missing))
    return not missing


def _cpu_capability() -> str:
    value = _env("MISA_KERNELS_CPU_CAPABILITY", "auto", ("auto", *CPU_CAPABILITY_FLAGS))
    if value != "auto":
        return value
    detected = torch.backends.cpu.get_cpu_capability()
    return detected if detected in CPU_CAPABILITY_FLAGS else "DEFAULT"


def _relative(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _sources(*patterns):
    return _relative([path for pattern in patterns for path in glob.glob(os.path.join(HERE, "csrc", pattern))])


def extensions():
    """Two modules. misa_kernels._cpu_<capability>: the CPU kernels, compiled for the vector
    width in its name, so Python checks this CPU has it before importing. misa_kernels._C: the
    CUDA kernels (bindings only, in a build without CUDA), compiled without vector flags so its
    import is safe anywhere."""
    debug = os.environ.get("MISA_KERNELS_DEBUG", "0") == "1"
    capability = _cpu_capability()
    with_cuda = _build_cuda()
    include_dirs = [os.path.join(HERE, "csrc")]
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-Wno-unknown-pragmas"]  # torch's headers carry clang and CUDA pragmas GCC does not know
    cpu_cxx = cxx + CPU_CAPABILITY_FLAGS[capability] + OPENMP_FLAGS + [
        f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}",
        f'-DMISA_CPU_CAPABILITY="{capability}"']
    cpu = CppExtension(f"misa_kernels._cpu_{capability.lower()}", _sources("cpu/*.cpp"),
                       include_dirs=include_dirs, extra_compile_args={"cxx": cpu_cxx},
                       extra_link_args=OPENMP_FLAGS)
    if not with_cuda:
        return [cpu, CppExtension("misa_kernels._C", _sources("*.cpp"), include_dirs=include_dirs,
                                  extra_compile_args={"cxx": cxx})]
    nvcc = ["-O3", "-lineinfo"] if not debug else ["-O0", "-G"]
    return [cpu, CUDAExtension("misa_kernels._C", _sources("*.cpp", "cuda/*.cu", "cuda/*.cpp"),
                               include_dirs=include_dirs, define_macros=[("MISA_WITH_CUDA", "1")],
                               extra_compile_args={"cxx": cxx, "nvcc": nvcc})]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
