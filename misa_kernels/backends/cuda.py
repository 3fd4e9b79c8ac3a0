"""The `cuda` backend: multi_tensor_apply-style kernels (csrc/cuda/) for float32, float16 and
bfloat16 weights. A work table of tensor chunks lives in device memory, built once per set of
tensors and kept there (so repeated calls, and CUDA graph replays after a warm-up call, copy
nothing from the host), and one launch covers any number of tensors; loads are 16 bytes wide
where the tensors are aligned. grad_sq_norms is
one launch (its last block reduces the per-chunk partial sums in a fixed order, so results are
deterministic); adamw_step_ is one launch (its last block advances the step counters)."""
from __future__ import annotations

import torch

from .. import _extension
from ._compiled import bind

NAME = "cuda"
AUTO_PRIORITY = {"cuda": 20}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
unavailable_reason = _extension.cuda_unavailable_reason
grad_sq_norms, adamw_step_ = bind(_extension.cuda_module, "cuda")


def supports_device(device: torch.device) -> bool:
    return device.type == "cuda"
