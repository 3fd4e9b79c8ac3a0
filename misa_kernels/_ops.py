"""The ops declared once with torch.library, with fake kernels, so they trace under torch.compile;
and the last checks before a backend runs, shared by the eager call and the library op.

The schemas say which arguments each op mutates; the fake kernels only describe output shapes
and dtypes and never alias an input. The checks that need real tensors (memory overlap, the
backend's choice and dtypes) run in :func:`run_grad_sq_norms` / :func:`run_adamw_step_`: at
the call in eager mode, inside the op when compiled (the backend is resolved there, at run
time, so a traced graph holds no backend choice and importing this package needs no
``torch._dynamo``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import _validate, backends

LIBRARY = "misa_kernels"

torch.library.define(
    f"{LIBRARY}::grad_sq_norms",
    "(Tensor[] grads, int[] module_ids, int num_modules, str device, float? max_norm, "
    "Tensor(a!)? accum, Tensor(b!)? accum_count, Tensor? accum_weight, str accum_rule, "
    "str? backend) -> (Tensor, Tensor, Tensor, Tensor)",
)

torch.library.define(
    f"{LIBRARY}::adamw_step_",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!) steps, int[] module_ids, float lr, Tensor? lr_tensor, float beta1, float beta2, "
    "float eps, float weight_decay, bool maximize, Tensor(e!)[]? master_params, Tensor? clip_coef, "
    "Tensor? found_inf, Tensor(f!)? sq_norms_out, str? backend) -> ()",
)


def _one(t: Optional[torch.Tensor]) -> List[torch.Tensor]:
    return [] if t is None else [t]


def run_grad_sq_norms(grads: List[torch.Tensor], module_ids: List[int], num_modules: int,
                      device: torch.device, max_norm: Optional[float], accum, accum_count, accum_weight,
                      accum_rule: str, backend: Optional[str],
                      names: Optional[Sequence[str]] = None) -> Tuple[torch.Tensor, ...]:
    """Arguments already validated (misa_kernels.grad_sq_norms): the buffers written must not
    overlap the gradients, and the backend must take their dtype; then the backend's op."""
    _validate.check_no_overlap({"accum": _one(accum), "accum_count": _one(accum_count)},
                               {"grads": grads, "accum_weight": _one(accum_weight)}, names, ("grads",))
    impl = backends.select(backend, device, grads=grads[0].dtype if grads else None)
    return impl.grad_sq_norms(grads, module_ids, num_modules, device, max_norm, accum, accum_count,
                              accum_weight, accum_rule)


def run_adamw_step_(params, grads, exp_avgs, exp_avg_sqs, steps, module_ids, lr: Union[float, torch.Tensor],
                    beta1, beta2, eps, weight_decay, maximize, master_params, clip_coef, found_inf,
                    sq_norms_out, backend: Optional[str], names: Optional[Sequence[str]] = None) -> None:
    """Arguments already validated (misa_kernels.adamw_step_): no tensor written may overlap
    another argument, and the backend must take the dtypes; then the backend's op."""
    written = {"params": params, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
               "master_params": master_params or [], "steps": [steps], "sq_norms_out": _one(sq_norms_out)}
    loose = {"clip_coef": clip_coef, "found_inf": found_inf, "lr": lr if isinstance(lr, torch.Tensor) else None}
    _validate.check_no_overlap(written, {"grads": grads}, names,
                               ("params", "exp_avgs", "exp_avg_sqs", "master_params", "grads"), loose)
    impl = backends.select(backend, steps.device, params=params[0].dtype if params else None,
                           grads=grads[0].dtype if grads else None)
    impl.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, steps, module_ids, lr, beta1, beta2, eps,
                     weight_decay, maximize, master_params, clip_coef, found_inf, sq_norms_out)


@torch.library.impl(f"{LIBRARY}::grad_sq_norms", "CompositeExplicitAutograd")
def _grad_sq_norms_kernel(grads, module_ids, num_modules, device, max_norm, accum, accum_count,
                          accum_weight, accum_rule, backend):
    return run_grad_sq_norms(list(grads), list(module_ids), num_modules, torch.device(device), max_norm,
                             accum, accum_count, accum_weight, accum_rule, backend)


@torch.library.register_fake(f"{LIBRARY}::grad_sq_norms")
def _grad_sq_norms_fake(grads, module_ids, num_modules, device, max_norm, accum, accum_count,
                        accum_weight, accum_rule, backend):
    device = torch.device(device)
    sq = torch.empty(num_modules, dtype=torch.float64, device=device)
    total_norm = torch.empty((), dtype=torch.float64, device=device)
    clip_coef, found_inf = (torch.empty((), dtype=torch.float32, device=device) for _ in range(2))
    return sq, total_norm, clip_coef, found_inf


@torch.library.impl(f"{LIBRARY}::adamw_step_", "CompositeExplicitAutograd")
def _adamw_step_kernel(params, grads, exp_avgs, exp_avg_sqs, steps, module_ids, lr, lr_tensor,
                       beta1, beta2, eps, weight_decay, maximize, master_params, clip_coef,
                       found_inf, sq_norms_out, backend):
    if lr_tensor is not None:  # a host tensor is read and checked here, at run time
        lr = _validate.check_lr(lr_tensor, steps.device)
    run_adamw_step_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), steps, list(module_ids),
                    lr, beta1, beta2, eps, weight_decay, maximize,
                    None if master_params is None else list(master_params), clip_coef, found_inf,
                    sq_norms_out, backend)


@torch.library.register_fake(f"{LIBRARY}::adamw_step_")
def _adamw_step_fake(params, grads, exp_avgs, exp_avg_sqs, steps, module_ids, lr, lr_tensor,
                     beta1, beta2, eps, weight_decay, maximize, master_params, clip_coef,
                     found_inf, sq_norms_out, backend):
    return None
