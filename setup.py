"""Builds the compiled kernels: the C++ CPU kernels always (misa_kernels._cpu_<capability>), the
CUDA kernels (misa_kernels._C) when they can be built.

Build with the torch you will run against, outside an isolated build environment:

    pip install torch                      # first: the kernels compile against it
    pip install --no-build-isolation -v .  # -v shows ninja's [n/N] progress lines

Switches (environment variables):

- ``MISA_KERNELS_BUILD_CUDA=auto|0|1``: build the CUDA kernels: when torch is a CUDA build and
  a CUDA toolkit is found (auto, the default), never (0), or always, failing if impossible (1).
- ``MISA_KERNELS_CPU_CAPABILITY=auto|DEFAULT|AVX2|AVX512``: the x86 vector width the CPU
  kernels are compiled for; auto takes what this machine's torch reports. The package checks,
  before importing them, that the CPU it runs on has it, and otherwise falls back to the
  'torch' backend.
- ``TORCH_CUDA_ARCH_LIST`` (e.g. "9.0"), ``MAX_JOBS``: read by torch.utils.cpp_extension. With
  no TORCH_CUDA_ARCH_LIST, the build targets the visible GPUs, or, when none is visible (a build
  machine or container without a GPU), DEFAULT_CUDA_ARCHS below, trimmed to what the toolkit
  compiles; the build log says which.
- ``MISA_KERNELS_DEBUG=1``: -O0 -g, and device-side line info.
"""
import glob
import os
import subprocess
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, is_ninja_available
except ImportError as missing:  # a plain `pip install .` builds in an isolated environment without torch
    sys.exit(
        f"misa-kernels: cannot import torch here ({missing}).\n"
        "The kernels compile against the torch they will run with, so the build needs it installed and\n"
        "visible. Run:\n"
        "    pip install torch\n"
        "    pip install --no-build-isolation .\n"
        "(--no-build-isolation lets the build see that torch; add -v to watch the compile progress.)")

HERE = os.path.dirname(os.path.abspath(__file__))

#: CUDA architectures built when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible: Ampere
#: (A100 8.0; A10, RTX 30 8.6), Ada (L4, L40, RTX 40: 8.9), Hopper (H100, H200: 9.0), plus PTX of
#: the last for newer GPUs (Blackwell) to compile at load time.
DEFAULT_CUDA_ARCHS = ("8.0", "8.6", "8.9", "9.0")
#: minutes of a build on 2 cores, measured on a shared 2-core Xeon: the CPU kernels took 3.6 (pip
#: install -e, both extensions); nvcc spent 2.7 on csrc/cuda/adamw_step.cu for the four
#: DEFAULT_CUDA_ARCHS and PTX (the longest file; the other CUDA sources compile beside it).
BUILD_MINUTES_CPU, BUILD_MINUTES_CUDA = 4, 3

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


def _toolkit_archs():
    """The compute capabilities the CUDA toolkit compiles ("8.0", ...), or None if nvcc says nothing."""
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    try:
        listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    archs = {f"{code[:-1]}.{code[-1]}" for code in (line.strip().replace("compute_", "") for line in listed.split())
             if code.isdigit()}
    return archs or None


def _choose_cuda_archs() -> str:
    """Sets TORCH_CUDA_ARCH_LIST when it is unset and no GPU is visible (torch's own detection
    would fail there) and returns a line for the build log saying what is built."""
    given = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if given:
        return f"CUDA architectures from TORCH_CUDA_ARCH_LIST: {given}"
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        capabilities = sorted({".".join(map(str, torch.cuda.get_device_capability(i)))
                               for i in range(torch.cuda.device_count())})
        return f"CUDA architectures of the visible GPUs: {';'.join(capabilities)} (set TORCH_CUDA_ARCH_LIST to change)"
    supported = _toolkit_archs()
    archs = [a for a in DEFAULT_CUDA_ARCHS if supported is None or a in supported]
    if not archs:
        raise RuntimeError(f"the CUDA toolkit at {CUDA_HOME} compiles none of {', '.join(DEFAULT_CUDA_ARCHS)}; "
                           "set TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs[:-1] + [archs[-1] + "+PTX"])
    return (f"no GPU visible and TORCH_CUDA_ARCH_LIST unset: building for {os.environ['TORCH_CUDA_ARCH_LIST']} "
            "(setup.py DEFAULT_CUDA_ARCHS, trimmed to what this toolkit compiles)")


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


class Build(BuildExtension.with_options(use_ninja=True)):
    """torch's extension builder (ninja: parallel, with [n/N] progress lines), saying first what
    it builds and for how long."""

    def build_extensions(self):
        with_cuda = any(source.endswith(".cu") for e in self.extensions for source in e.sources)
        parts = [f"the {_cpu_capability()} CPU kernels"]
        if with_cuda:
            parts.append("the CUDA kernels (" + _choose_cuda_archs() + ")")
        minutes = BUILD_MINUTES_CPU + (BUILD_MINUTES_CUDA if with_cuda else 0)
        print(f"misa_kernels: compiling {' and '.join(parts)}; about {minutes} minutes on 2 cores "
              "(MAX_JOBS sets the parallel jobs)", flush=True)
        if not is_ninja_available():
            print("misa_kernels: ninja not found (pip install ninja): compiling one file at a time, without "
                  "progress lines", flush=True)
        super().build_extensions()


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": Build},
)
