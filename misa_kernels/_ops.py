"""The ops declared once with torch.library, with fake kernels, so they trace under torch.compile.

The schemas say which arguments each op mutates. The real kernel of every op resolves the
backend by name (the public wrappers in ``misa_kernels`` pass an already resolved name) and
calls it; the fake kernels only describe output shapes and never alias an input.
"""
from __future__ import annotations

import torch

from . import backends

LIBRARY = "misa_kernels"

torch.library.define(
    f"{LIBRARY}::grad_sq_norms",
    "(Tensor[] grads, int[] module_ids, int num_modules, str device, float? max_norm, "
    "Tensor(a!)? accum, Tensor(b!)? accum_count, Tensor? accum_weight, str accum_rule, "
    "str backend) -> (Tensor, Tensor, Tensor, Tensor)",
)

torch.library.define(
    f"{LIBRARY}::adamw_step_",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!) steps, int[] module_ids, float lr, Tensor? lr_tensor, float beta1, float beta2, "
    "float eps, float weight_decay, bool maximize, Tensor(e!)[]? master_params, Tensor? clip_coef, "
    "Tensor? found_inf, Tensor(f!)? sq_norms_out, str backend) -> ()",
)


def _norm_dtype(grads):
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


@torch.library.impl(f"{LIBRARY}::grad_sq_norms", "CompositeExplicitAutograd")
def _grad_sq_norms_kernel(grads, module_ids, num_modules, device, max_norm, accum, accum_count,
                          accum_weight, accum_rule, backend):
    device = torch.device(device)
    impl = backends.resolve(backend, device)
    return impl.grad_sq_norms(list(grads), list(module_ids), num_modules, device, max_norm, accum,
                              accum_count, accum_weight, accum_rule)


@torch.library.register_fake(f"{LIBRARY}::grad_sq_norms")
def _grad_sq_norms_fake(grads, module_ids, num_modules, device, max_norm, accum, accum_count,
                        accum_weight, accum_rule, backend):
    dtype = _norm_dtype(grads)
    device = torch.device(device)
    sq = torch.empty(num_modules, dtype=dtype, device=device)
    scalars = [torch.empty((), dtype=dtype, device=device) for _ in range(3)]
    return (sq, *scalars)


@torch.library.impl(f"{LIBRARY}::adamw_step_", "CompositeExplicitAutograd")
def _adamw_step_kernel(params, grads, exp_avgs, exp_avg_sqs, steps, module_ids, lr, lr_tensor,
                       beta1, beta2, eps, weight_decay, maximize, master_params, clip_coef,
                       found_inf, sq_norms_out, backend):
    impl = backends.resolve(backend, steps.device)
    impl.adamw_step_(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), steps, list(module_ids),
        lr if lr_tensor is None else lr_tensor, beta1, beta2, eps, weight_decay, maximize,
        None if master_params is None else list(master_params), clip_coef, found_inf, sq_norms_out,
    )


@torch.library.register_fake(f"{LIBRARY}::adamw_step_")
def _adamw_step_fake(params, grads, exp_avgs, exp_avg_sqs, steps, module_ids, lr, lr_tensor,
                     beta1, beta2, eps, weight_decay, maximize, master_params, clip_coef,
                     found_inf, sq_norms_out, backend):
    return None
