"""The `triton` backend: multi-tensor Triton kernels for float32, float16 and bfloat16 weights.

Each op is one launch over every chunk of every tensor, driven by a work table of element
offsets (``work_table.py``), then one finalize launch, parallel over blocks of modules, that
reduces per module in a fixed order; results are bitwise reproducible. ``grad_sq_norms``: 2
launches (``sq_norms.py``); ``adamw_step_``: 2 launches, the step advance folded into the
finalize (``adamw.py``). Sums of squares are float64 (float32 runs, redone in float64 where
they overflow). Triton is imported on first use only, so ``import misa_kernels`` stays cheap.

Devices: CUDA; or, with ``TRITON_INTERPRET=1`` set before the first use, CPU tensors through
Triton's interpreter (slow, for tests; the interpreter copies only the tensors it is passed to
the host, so it cannot follow the offsets into CUDA memory, and CUDA is off in that mode). The
work table of a set of tensors is built and copied to the device once, then kept there, so
repeated calls copy nothing from the host and can be captured in a CUDA graph after one
warm-up call (see ``work_table.py``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from functools import lru_cache
from types import ModuleType
from typing import Optional

import torch

NAME = "triton"
AUTO_PRIORITY = {"cuda": 15}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unavailable_reason() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports_device(device: torch.device) -> bool:
    return device.type == ("cpu" if _interpreting() else "cuda")


@lru_cache(maxsize=None)
def _op(name: str) -> ModuleType:
    """The op module `name`, imported (and its kernels defined) on first use."""
    return importlib.import_module(f"{__name__}.{name}")


def grad_sq_norms(grads, module_ids, num_modules, device, max_norm, accum, accum_count, accum_weight,
                  accum_rule):
    return _op("sq_norms").grad_sq_norms(grads, module_ids, num_modules, device, max_norm, accum,
                                         accum_count, accum_weight, accum_rule)


def adamw_step_(params, grads, exp_avgs, exp_avg_sqs, steps, module_ids, lr, beta1, beta2, eps,
                weight_decay, maximize, master_params, clip_coef, found_inf, sq_norms_out):
    _op("adamw").adamw_step_(params, grads, exp_avgs, exp_avg_sqs, steps, module_ids, lr, beta1,
                             beta2, eps, weight_decay, maximize, master_params, clip_coef, found_inf,
                             sq_norms_out)
