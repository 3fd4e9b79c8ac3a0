"""The `torch` backend: plain PyTorch, one tensor at a time. It is the ground truth.

Readable rather than fast: every other backend is tested against it. It runs on any device
and takes float64 weights with float64 moments (steps, clip_coef and found_inf stay float32,
as on every backend). Sums of squares are formed in float64, so a finite gradient always gives
a finite norm. It never reads a device value on the host and never builds a tensor from host
data: which modules are present travels as a mask stacked on the device (see
:func:`present_mask`), so it adds no synchronisation and copies nothing, even for new module
ids. Module sums are formed in a fixed order, so results are deterministic on every device.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

NAME = "torch"
AUTO_PRIORITY = {"cpu": 0, "cuda": 0}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: added to the total norm before dividing, as torch.nn.utils.clip_grad_norm_ does.
CLIP_EPS = 1e-6
#: distinct (present modules, device) masks kept on their devices: an active set of MISA needs a
#: few (one per dtype group and op), and a resampling makes new ones.
MASK_CACHE_SIZE = 64


def unavailable_reason() -> Optional[str]:
    return None


def supports_device(device: torch.device) -> bool:
    return True


_masks: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
#: masks used during a CUDA graph capture: a replay reads them, so they are never freed.
_captured_masks: Dict[tuple, torch.Tensor] = {}


def present_mask(present: Sequence[int], num_modules: int, device: torch.device) -> torch.Tensor:
    """[num_modules] bool tensor on `device`, True at the `present` modules. Stacked on the device
    from two constant 0-dim tensors, so even a new set copies nothing from the host (and can be
    made during a CUDA graph capture); kept in a small cache, so a repeated set costs a lookup.
    One used during a capture is kept for the life of the process. Read-only."""
    device = torch.device(device)
    key = (tuple(present), num_modules, device)
    mask = _captured_masks.get(key)
    if mask is None:
        mask = _masks.get(key)
    if mask is None:
        chosen = set(present)
        on = torch.ones((), dtype=torch.bool, device=device)
        off = torch.zeros((), dtype=torch.bool, device=device)
        mask = (torch.stack([on if m in chosen else off for m in range(num_modules)]) if num_modules
                else torch.zeros(0, dtype=torch.bool, device=device))
        _masks[key] = mask
        if len(_masks) > MASK_CACHE_SIZE:
            _masks.popitem(last=False)
    elif key in _masks:
        _masks.move_to_end(key)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        _captured_masks[key] = mask
    return mask


def _module_groups(module_ids: Sequence[int]) -> dict:
    groups = defaultdict(list)
    for i, m in enumerate(module_ids):
        groups[m].append(i)
    return groups


def _sq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of squared entries of `t`, formed in float64 (no overflow for any finite input)."""
    flat = t.reshape(-1).to(torch.float64)
    return torch.dot(flat, flat)


def _module_sq_norms(grads: List[torch.Tensor], module_ids: List[int], num_modules: int,
                     device: torch.device) -> Tuple[torch.Tensor, List[int]]:
    """([num_modules] float64 per-module sums of squares, 0 where absent; sorted present modules),
    stacked on the device (no index from the host)."""
    groups = _module_groups(module_ids)
    if not num_modules:
        return torch.zeros(0, dtype=torch.float64, device=device), []
    zero = torch.zeros((), dtype=torch.float64, device=device)
    sq = torch.stack([torch.stack([_sq_sum(grads[i]) for i in groups[m]]).sum() if m in groups else zero
                      for m in range(num_modules)])
    return sq, sorted(groups)


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
    sq, present = _module_sq_norms(grads, module_ids, num_modules, device)
    return (sq, *finalize_norms(sq, present, max_norm, accum, accum_count, accum_weight, accum_rule))


def finalize_norms(
    sq: torch.Tensor,
    present: Union[Sequence[int], torch.Tensor],
    max_norm: Optional[float],
    accum: Optional[torch.Tensor],
    accum_count: Optional[torch.Tensor],
    accum_weight: Optional[torch.Tensor],
    accum_rule: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total_norm, clip_coef, found_inf) from float64 per-module sums `sq`, and the accumulation
    into accum / accum_count for the `present` modules when the total is finite.

    `present`: the module indices (ints), or a [num_modules] bool mask on sq's device (what
    :func:`present_mask` makes; a caller can make it once per active set). total_norm is
    float64; clip_coef and found_inf are float32 (formed in float64, rounded once). No host
    synchronisation and no copy from the host, whatever `present` is."""
    if sq.dtype != torch.float64:
        raise TypeError(f"per-module sums must be float64, got {sq.dtype}")
    total_sq = sq.sum()
    total_norm = total_sq.sqrt()
    non_finite = ~torch.isfinite(total_sq)
    found_inf = non_finite.to(torch.float32)
    one = torch.ones((), dtype=torch.float32, device=sq.device)
    if max_norm is None:
        clip_coef = one
    else:
        clip_coef = torch.clamp(max_norm / (total_norm + CLIP_EPS), max=1.0).to(torch.float32)
        clip_coef = torch.where(non_finite, one, clip_coef)
    if accum is not None or accum_count is not None:
        mask = present if isinstance(present, torch.Tensor) else present_mask(present, sq.numel(), sq.device)
        take = mask & ~non_finite  # every module not taken gets + 0
        if accum is not None:
            value = sq
            if accum_rule == "clipped_norm":
                value = value.sqrt() * clip_coef
            if accum_weight is not None:
                value = value * accum_weight.to(sq.dtype)
            accum.add_(torch.where(take, value, torch.zeros_like(value)).to(accum.dtype))
        if accum_count is not None:
            accum_count.add_(take.to(accum_count.dtype))
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
    """AdamW as torch.optim.AdamW computes it, in the moments' dtype (float32, or float64 for
    float64 weights), the per-module scalars in float64."""
    device = steps.device
    if sq_norms_out is not None:
        sq_norms_out.copy_(_module_sq_norms(grads, module_ids, steps.numel(), device)[0])
    present = sorted(set(module_ids))
    if not present:
        return
    skip = None if found_inf is None else found_inf.to(device) != 0
    if isinstance(lr, torch.Tensor):
        lr_t = lr.reshape(()).to(device=device, dtype=torch.float64)
    else:  # a fill, not a copy of host data
        lr_t = torch.full((), lr, dtype=torch.float64, device=device)
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
    increment = present_mask(present, steps.numel(), device).to(steps.dtype)
    if skip is not None:
        increment = torch.where(skip, torch.zeros_like(increment), increment)
    steps.add_(increment)
