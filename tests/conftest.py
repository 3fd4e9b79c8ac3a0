"""Shared test fixtures: which (backend, device) pairs to run, and seeded random data."""
from __future__ import annotations

import os

import pytest
import torch

import misa_kernels


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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def pytest_report_header(config):
    return [f"misa_kernels backends here: cpu={misa_kernels.available_backends('cpu')}"
            + (f", cuda={misa_kernels.available_backends('cuda')}" if torch.cuda.is_available() else ", no GPU"),
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}"]
