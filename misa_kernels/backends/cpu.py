"""The `cpu` backend: vectorised, multi-threaded C++ kernels (csrc/cpu/) for float32, float16
and bfloat16 weights. Chunk boundaries do not depend on the thread count, so results are
bitwise reproducible on one machine whatever the number of threads."""
from __future__ import annotations

import torch

from .. import _extension
from ._compiled import bind

NAME = "cpu"
AUTO_PRIORITY = {"cpu": 10}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
unavailable_reason = _extension.cpu_unavailable_reason
grad_sq_norms, adamw_step_ = bind(_extension.cpu_module, "cpu")


def supports_device(device: torch.device) -> bool:
    return device.type == "cpu"
