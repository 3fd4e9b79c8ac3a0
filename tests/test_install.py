"""The installed build has the backends it should have: a backend named in
MISA_KERNELS_EXPECT_BACKENDS that cannot run here fails the whole pytest run (conftest.py's
session hook), whatever tests are selected, rather than letting its tests silently drop out
of the parametrisation. And the package imports fast, without torch._dynamo."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import misa_kernels
from conftest import EXPECT_VAR, expected_backend_problems

ROOT = Path(__file__).resolve().parents[1]


def test_auto_on_cpu_prefers_the_compiled_backend_when_built():
    if "cpu" in misa_kernels.available_backends("cpu"):
        assert misa_kernels.resolve_backend("auto", "cpu") == "cpu"
    else:
        assert misa_kernels.resolve_backend("auto", "cpu") == "torch"


def test_expected_backends_are_checked_by_name_and_reason(monkeypatch):
    monkeypatch.setenv(EXPECT_VAR, "torch, warp_drive")
    assert expected_backend_problems() == [
        f"'warp_drive' is not a backend (known: {', '.join(misa_kernels.backends.names())})"]
    monkeypatch.setenv(EXPECT_VAR, "torch")
    assert expected_backend_problems() == []
    monkeypatch.setattr(misa_kernels.backends.module("torch"), "unavailable_reason", lambda: "the test said so")
    assert expected_backend_problems() == ["'torch' is unavailable: the test said so"]


def test_triton_outside_its_interpreter_without_a_gpu_is_a_problem(monkeypatch):
    monkeypatch.setenv(EXPECT_VAR, "triton")
    monkeypatch.setattr(misa_kernels.backends.module("triton"), "unavailable_reason", lambda: None)
    monkeypatch.setattr(misa_kernels.backends.module("triton"), "supports_device", lambda device: False)
    assert expected_backend_problems() == [
        "'triton' is installed but runs on no device here (Triton runs on CPU tensors only with TRITON_INTERPRET=1)"]


def _pytest(expected: str, cwd: Path, *selection: str) -> subprocess.CompletedProcess:
    """pytest on this file in a child process, run from `cwd` (not the source tree, whose
    misa_kernels would shadow the installed one under `python -m`)."""
    env = dict(os.environ, **{EXPECT_VAR: expected})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                           str(ROOT / "tests" / "test_install.py"), *selection],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("selection", [("-m", "gpu"), ("-k", "no_test_has_this_name")])
def test_a_missing_expected_backend_fails_any_selection(selection, tmp_path):
    unavailable = [n for n in misa_kernels.backends.names()
                   if misa_kernels.backends.module(n).unavailable_reason() is not None]
    missing = unavailable[0] if unavailable else "warp_drive"
    run = _pytest(f"torch,{missing}", tmp_path, *selection)
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    wanted = (f"'{missing}' is unavailable: {misa_kernels.backends.module(missing).unavailable_reason()}"
              if unavailable else "'warp_drive' is not a backend")
    assert wanted in run.stdout + run.stderr


@pytest.mark.parametrize("package", ["misa_kernels", "misa"])
def test_import_needs_no_dynamo_and_is_fast(package):
    code = (f"import sys, time; import torch; start = time.perf_counter(); import {package}; "
            "print(time.perf_counter() - start); assert 'torch._dynamo' not in sys.modules, 'dynamo imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(run.stdout) < 0.5, f"import {package} took {run.stdout} s beyond import torch"
