"""The installed build has the backends it should have: a missing compiled backend must fail
CI rather than let every test of it silently drop out of the parametrisation."""
from __future__ import annotations

import os

import pytest

import misa_kernels

EXPECTED = [b for b in os.environ.get("MISA_KERNELS_EXPECT_BACKENDS", "").split(",") if b]


@pytest.mark.skipif(not EXPECTED, reason="MISA_KERNELS_EXPECT_BACKENDS not set (README's test command sets it)")
@pytest.mark.parametrize("name", EXPECTED)
def test_expected_backend_is_available_on_cpu(name):
    assert name in misa_kernels.available_backends("cpu"), misa_kernels.backends._modules()[name].unavailable_reason()


def test_auto_on_cpu_prefers_the_compiled_backend_when_built():
    if "cpu" in misa_kernels.available_backends("cpu"):
        assert misa_kernels.resolve_backend("auto", "cpu") == "cpu"
    else:
        assert misa_kernels.resolve_backend("auto", "cpu") == "torch"
