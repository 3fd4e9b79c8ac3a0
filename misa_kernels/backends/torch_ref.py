"""The `torch` backend: plain PyTorch, one tensor at a time. It is the ground truth.

Readable rather than fast: every other backend is tested against it. It runs on any device
and takes float64 weights with float64 moments (steps, clip_coef and found_inf stay float32,
as on every backend). Sums of squares are formed in float64, so a finite gradient always gives
a finite norm. It never reads a device value on the host and, once the module ids of a call
have been seen on a device, builds no tensor from host data either (the index of the present
modules is kept on the device, see :func:`present_index`), so it adds no synchronisation.
Module sums are formed in a fixed order, so results are deterministic on every device.
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
#: distinct (module ids, device) index tensors kept on their devices: an active set of MISA
#: needs a few (one per dtype group and op), and a resampling makes new ones.
INDEX_CACHE_SIZE = 64


def unavailable_reason() -> Optional[str]:
    return None


def supports_device(device: torch.device) -> bool:
    return True


_indices: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
#: indices used during a CUDA graph capture: a replay reads them, so they are never freed.
_captured_indices: Dict[tuple, torch.Tensor] = {}


def present_index(modules: Sequence[int], device: torch.device) -> torch.Tensor:
    """The int64 tensor of `modules` on `device`, built once per distinct (modules, device) and
    then kept there: repeated calls copy nothing from the host. Read-only: do not modify it.

    One used while a CUDA graph is captured is kept for the life of the process (a replay may
    read it at any time); one that would have to be copied during a capture is refused: run the
    op once before capturing."""
    device = torch.device(device)
    key = (tuple(modules), device)
    index = _captured_indices.get(key)
    if index is None:
        index = _indices.get(key)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if index is None:
        if capturing:
            raise RuntimeError("misa_kernels (torch): the index of these module ids is not on the device yet, "
                               "and it cannot be copied there during a CUDA graph capture; run the op once "
                               "with the same module ids before capturing (a warm-up call)")
        index = _indices[key] = torch.tensor(key[0], dtype=torch.long, device=device)
        if len(_indices) > INDEX_CACHE_SIZE:
            _indices.popitem(last=False)
    elif key in _indices:
        _indices.move_to_end(key)
    if capturing:
        _captured_indices[key] = index
    return index


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
    """([num_modules] float64 per-module sums of squares, 0 where absent; sorted present modules)."""
    sq = torch.zeros(num_modules, dtype=torch.float64, device=device)
    groups = _module_groups(module_ids)
    present = sorted(groups)
    if present:
        module_sums = [torch.stack([_sq_sum(grads[i]) for i in groups[m]]).sum() for m in present]
        sq.index_copy_(0, present_index(present, device), torch.stack(module_sums))
    return sq, present


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
    present: List[int],
    max_norm: Optional[float],
    accum: Optional[torch.Tensor],
    accum_count: Optional[torch.Tensor],
    accum_weight: Optional[torch.Tensor],
    accum_rule: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total_norm, clip_coef, found_inf) from float64 per-module sums `sq`, and the accumulation
    into accum / accum_count for the `present` modules (sorted) when the total is finite.

    total_norm is float64; clip_coef and found_inf are float32 (formed in float64, rounded once).
    No host synchronisation, and no host-to-device copy once `present` has been seen on this
    device (:func:`present_index`)."""
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
    if present and (accum is not None or accum_count is not None):
        keep = ~non_finite
        index = present_index(present, sq.device)
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
    index = present_index(present, device)
    increment = torch.ones(len(present), dtype=steps.dtype, device=device)
    if skip is not None:
        increment = torch.where(skip, torch.zeros_like(increment), increment)
    steps.index_add_(0, index, increment)
