"""Shared test fixtures: which (backend, device) pairs to run, seeded random data, and the check
that every backend CI expects is there before any test runs."""
from __future__ import annotations

import os
from typing import List

import pytest
import torch

import misa_kernels

#: comma list of backends that must be able to run here (CI sets it, see README's test command)
EXPECT_VAR = "MISA_KERNELS_EXPECT_BACKENDS"


def backend_device_pairs():
    """Every backend that can run here, on every device here. Triton runs on the CPU only in
    its interpreter (TRITON_INTERPRET=1), which .ci/run sets."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    pairs = []
    for device in devices:
        for name in misa_kernels.available_backends(device):
            marks = [pytest.mark.gpu] if device == "cuda" else []
            pairs.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return pairs


BACKEND_DEVICE = backend_device_pairs()


def expected_backend_problems() -> List[str]:
    """Why the backends named in $MISA_KERNELS_EXPECT_BACKENDS cannot all run their tests here
    (empty when they can). A backend must be known, available, and run on some device here;
    on a machine with a GPU, cuda and triton must run on it (not only in Triton's interpreter)."""
    expected = [name.strip() for name in os.environ.get(EXPECT_VAR, "").split(",") if name.strip()]
    known = misa_kernels.backends.names()
    gpu = torch.cuda.is_available()
    problems = []
    for name in expected:
        if name not in known:
            problems.append(f"{name!r} is not a backend (known: {', '.join(known)})")
            continue
        reason = misa_kernels.backends.module(name).unavailable_reason()
        if reason is not None:
            problems.append(f"{name!r} is unavailable: {reason}")
            continue
        devices = [d for d in ("cpu", "cuda") if (d == "cpu" or gpu) and name in misa_kernels.available_backends(d)]
        hint = " (Triton runs on CPU tensors only with TRITON_INTERPRET=1)" if name == "triton" else ""
        if not devices:
            problems.append(f"{name!r} is installed but runs on no device here{hint}")
        elif gpu and name in ("cuda", "triton") and "cuda" not in devices:
            problems.append(f"{name!r} does not run on this machine's GPU{hint}")
    return problems


def pytest_sessionstart(session):
    """Fails the run, whatever tests it selects (-m gpu, -k ...), when an expected backend is
    missing: otherwise its tests would silently drop out of the parametrisation."""
    problems = expected_backend_problems()
    if problems:
        pytest.exit(f"{EXPECT_VAR}={os.environ[EXPECT_VAR]} but " + "; ".join(problems),
                    returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def pytest_report_header(config):
    return [f"misa_kernels backends here: cpu={misa_kernels.available_backends('cpu')}"
            + (f", cuda={misa_kernels.available_backends('cuda')}" if torch.cuda.is_available() else ", no GPU"),
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}"]
