"""The op functions of the compiled backends (cpu, cuda): the reference's signatures, adapted
to the C++ types of csrc/ops.h and bound to ``<module>.<prefix>_<op>`` of an extension."""
from __future__ import annotations

from typing import Callable, Tuple

import torch

ACCUM_RULE_CODES = {"sq": 0, "clipped_norm": 1}


def _empty_norms(num_modules: int, device: torch.device):
    """The outputs for no gradient at all: zero sums and norm (float64), coefficient 1, no flag."""
    zeros = torch.zeros(num_modules + 1, dtype=torch.float64, device=device)
    return (zeros[:num_modules], zeros[num_modules], torch.ones((), device=device),
            torch.zeros((), device=device))


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
        # a tensor lr goes as it is (float32 or float64): the kernels read it in its dtype
        lr_float, lr_tensor = (0.0, lr) if isinstance(lr, torch.Tensor) else (float(lr), None)
        fn = getattr(module(), f"{prefix}_adamw_step_")
        fn(params, grads, exp_avgs, exp_avg_sqs, steps, module_ids, lr_float, lr_tensor, beta1,
           beta2, eps, weight_decay, maximize, master_params, clip_coef, found_inf, sq_norms_out)

    return grad_sq_norms, adamw_step_
