"""The op functions of the compiled backends (cpu, cuda): the reference's signatures, adapted
to the C++ types of csrc/ops.h and bound to ``<module>.<prefix>_<op>`` of an extension."""
from __future__ import annotations

from typing import Callable, Tuple

import torch

ACCUM_RULE_CODES = {"sq": 0, "clipped_norm": 1}


def _empty_norms(num_modules: int, device: torch.device):
    zeros = torch.zeros(num_modules + 2, dtype=torch.float32, device=device)
    return zeros[:num_modules], zeros[num_modules], torch.ones((), device=device), zeros[num_modules + 1]


def bind(module: Callable, prefix: str) -> Tuple[Callable, Callable]:
    """(grad_sq_norms, adamw_step_) calling the `prefix` kernels of the extension that
    `module()` returns (looked up at call time: the backend may be unavailable here)."""

    def grad_sq_norms(grads, module_ids, num_modules, device, max_norm, accum, accum_count,
                      accum_weight, accum_rule):
        if not grads:
            return _empty_norms(num_modules, device)
        fn = getattr(module(), f"{prefix}_grad_sq_norms")
        return tuple(fn(grads, module_ids, num_modules, max_norm, accum, accum_count,
                        accum_weight, ACCUM_RULE_CODES[accum_rule]))

    def adamw_step_(params, grads, exp_avgs, exp_avg_sqs, steps, module_ids, lr, beta1, beta2,
                    eps, weight_decay, maximize, master_params, clip_coef, found_inf,
                    sq_norms_out):
        if not params:
            if sq_norms_out is not None:
                sq_norms_out.zero_()
            return
        if isinstance(lr, torch.Tensor):
            lr_float, lr_tensor = 0.0, lr.to(torch.float32)
        else:
            lr_float, lr_tensor = float(lr), None
        fn = getattr(module(), f"{prefix}_adamw_step_")
        fn(params, grads, exp_avgs, exp_avg_sqs, steps, module_ids, lr_float, lr_tensor, beta1,
           beta2, eps, weight_decay, maximize, master_params, clip_coef, found_inf, sq_norms_out)

    return grad_sq_norms, adamw_step_
