"""The `torch` backend: plain PyTorch, one tensor at a time. It is the ground truth.

Readable rather than fast: every other backend is tested against it. It runs on any device
and in float64 (pass float64 weights, moments and buffers), and it never reads a device value
on the host, so it adds no synchronisation either. Module sums are formed in a fixed order,
so results are deterministic on every device.
"""
from __future__ import annotations

from collections import defaultdict
from typing import List, Optional, Sequence, Tuple, Union

import torch

NAME = "torch"
AUTO_PRIORITY = {"cpu": 0, "cuda": 0}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: added to the total norm before dividing, as torch.nn.utils.clip_grad_norm_ does.
CLIP_EPS = 1e-6


def unavailable_reason() -> Optional[str]:
    return None


def supports_device(device: torch.device) -> bool:
    return True


def _acc_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _module_groups(module_ids: Sequence[int]) -> dict:
    groups = defaultdict(list)
    for i, m in enumerate(module_ids):
        groups[m].append(i)
    return groups


def grad_sq_norms(
    grads: List[torch.Tensor],
    module_ids: List[int],
    num_modules: int,
    device: torch.device,
    max_norm: Optional[float],
    accum: Optional[torch.Tensor],
    accum_count: Optional[torch.Tensor],
    accum_weight: Optional[torch.Tensor],
    accum_rule: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = _acc_dtype(grads)
    sq = torch.zeros(num_modules, dtype=acc, device=device)
    groups = _module_groups(module_ids)
    present = sorted(groups)
    if present:
        module_sums = [
            torch.stack([grads[i].to(acc).square().sum() for i in groups[m]]).sum() for m in present
        ]
        index = torch.tensor(present, dtype=torch.long, device=device)
        sq.index_copy_(0, index, torch.stack(module_sums))
    return (sq, *finalize_norms(sq, present, max_norm, accum, accum_count, accum_weight, accum_rule))


def finalize_norms(
    sq: torch.Tensor,
    present: List[int],
    max_norm: Optional[float],
    accum: Optional[torch.Tensor],
    accum_count: Optional[torch.Tensor],
    accum_weight: Optional[torch.Tensor],
    accum_rule: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total_norm, clip_coef, found_inf) from per-module sums `sq`, and the accumulation into
    accum / accum_count for the `present` modules (sorted) when the total is finite."""
    total_sq = sq.sum()
    total_norm = total_sq.sqrt()
    found_inf = (~torch.isfinite(total_sq)).to(sq.dtype)
    one = torch.ones((), dtype=sq.dtype, device=sq.device)
    if max_norm is None:
        clip_coef = one.clone()
    else:
        clip_coef = torch.clamp(max_norm / (total_norm + CLIP_EPS), max=1.0)
        clip_coef = torch.where(found_inf != 0, one, clip_coef)
    if present and (accum is not None or accum_count is not None):
        keep = found_inf == 0
        index = torch.tensor(present, dtype=torch.long, device=sq.device)
        if accum is not None:
            value = sq[index]
            if accum_rule == "clipped_norm":
                value = value.sqrt() * clip_coef
            if accum_weight is not None:
                value = value * accum_weight[index].to(sq.dtype)
            value = torch.where(keep, value, torch.zeros_like(value))
            accum.index_add_(0, index, value.to(accum.dtype))
        if accum_count is not None:
            accum_count.index_add_(0, index, keep.to(accum_count.dtype).expand(len(present)))
    return total_norm, clip_coef, found_inf


def adamw_step_(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    exp_avgs: List[torch.Tensor],
    exp_avg_sqs: List[torch.Tensor],
    steps: torch.Tensor,
    module_ids: List[int],
    lr: Union[float, torch.Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    master_params: Optional[List[torch.Tensor]],
    clip_coef: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor],
    sq_norms_out: Optional[torch.Tensor],
) -> None:
    device = steps.device
    groups = _module_groups(module_ids)
    present = sorted(groups)
    if sq_norms_out is not None:
        acc = sq_norms_out.dtype
        sq_norms_out.zero_()
        for m in present:
            sq_norms_out[m] = torch.stack([grads[i].to(acc).square().sum() for i in groups[m]]).sum()
    if not present:
        return
    skip = None if found_inf is None else found_inf.to(device) != 0
    lr_t = torch.as_tensor(lr, dtype=torch.float64).to(device)
    step_all = steps.to(torch.float64) + 1
    for i, (param, grad, exp_avg, exp_avg_sq) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        weight = param if master_params is None else master_params[i]
        compute = exp_avg.dtype
        g = grad.to(compute)
        if clip_coef is not None:
            g = g * clip_coef.to(compute)
        if maximize:
            g = -g
        step = step_all[module_ids[i]]
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = (1 - beta2 ** step).sqrt()
        step_size = lr_t / bias_correction1

        new_weight = weight.to(compute) * (1 - lr_t * weight_decay).to(compute)
        new_exp_avg = exp_avg.lerp(g, 1 - beta1)
        new_exp_avg_sq = exp_avg_sq.mul(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (new_exp_avg_sq.sqrt() / bias_correction2_sqrt.to(compute)).add_(eps)
        new_weight = new_weight - step_size.to(compute) * (new_exp_avg / denom)

        if skip is not None:
            new_weight = torch.where(skip, weight.to(compute), new_weight)
            new_exp_avg = torch.where(skip, exp_avg, new_exp_avg)
            new_exp_avg_sq = torch.where(skip, exp_avg_sq, new_exp_avg_sq)
        exp_avg.copy_(new_exp_avg)
        exp_avg_sq.copy_(new_exp_avg_sq)
        weight.copy_(new_weight)
        if master_params is not None:
            rounded = weight.to(param.dtype)
            param.copy_(rounded if skip is None else torch.where(skip, param, rounded))
    index = torch.tensor(present, dtype=torch.long, device=device)
    increment = torch.ones(len(present), dtype=steps.dtype, device=device)
    if skip is not None:
        increment = torch.where(skip, torch.zeros_like(increment), increment)
    steps.index_add_(0, index, increment)
