r"""grad_sq_norms on Triton: per-module squared gradient norms, the total norm, the clip
coefficient, the non-finite flag and the importance accumulation, in two launches.

Maths (float32 accumulation; see ``misa_kernels.grad_sq_norms``)::

    s_m        = sum over tensors i of module m of sum_j g_ij^2        (0 for an absent module)
    total_norm = sqrt(sum_m s_m)
    found_inf  = 1 if sum_m s_m is not finite else 0
    clip_coef  = min(1, max_norm / (total_norm + 1e-6)), or 1 without max_norm or when found_inf
    accum[m]  += accum_weight[m] * (s_m, or sqrt(s_m) * clip_coef)    for present m, if not found_inf
    count[m]  += 1                                                     for present m, if not found_inf

Launches:

1. ``_chunk_sq_sums_kernel``: one program per chunk of the work table writes the chunk's sum of
   squares (a [BLOCK] accumulator over the chunk, then one tree sum).
2. ``_finalize_kernel``: one program sums each present module's run of chunk partials in chunk
   order, the total (in float64, rounded once to float32), then the flag, the clip coefficient
   and, vectorised over modules, the zeros of absent modules and the accumulation.

Nothing depends on the order in which programs run, so the results are bitwise reproducible.
With no element at all only the finalize runs. Learned from apex ``multi_tensor_l2norm`` (per
chunk partials, then a cleanup kernel that forms per-tensor and total norms) and PyTorch's
``torch.nn.utils.clip_grad_norm_`` (the 1e-6 term, the clamp at 1).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import work_table
from ..torch_ref import CLIP_EPS
from .work_table import (chunk_pointer, header_counts, header_scalar, presence_block, present_module_sum,
                         program_chunk)

#: header slot of the clipping threshold, the one scalar grad_sq_norms passes
_MAX_NORM = tl.constexpr(work_table.SCALARS_AT)
_CLIP_EPS = tl.constexpr(CLIP_EPS)
#: the largest finite float32; anything else (inf, NaN) fails `abs(x) <= _FLOAT32_MAX`.
_FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def chunk_sq_sum(x, length, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Sum of x[0:length]^2 in ACC_DTYPE: whole blocks unmasked (vector loads), then the tail."""
    offsets = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], ACC_DTYPE)
    num_full = length // BLOCK
    for b in range(0, num_full):
        value = tl.load(x + b * BLOCK + offsets).to(ACC_DTYPE)
        acc += value * value
    tail = num_full * BLOCK + offsets
    value = tl.load(x + tail, mask=tail < length, other=0.0).to(ACC_DTYPE)
    acc += value * value
    return tl.sum(acc, axis=0)


@triton.jit
def _chunk_sq_sums_kernel(grad_base, table, partials, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    tensor_at, start, length = program_chunk(table)
    grad = chunk_pointer(grad_base, table, tensor_at, start, 0, ALIGNED)
    tl.store(partials + tl.program_id(0), chunk_sq_sum(grad, length, tl.float32, BLOCK))


@triton.jit
def _finalize_kernel(
    table, partials, module_sq_norms, total_norm_out, clip_coef_out, found_inf_out, accum, accum_count,
    accum_weight, HAS_MAX_NORM: tl.constexpr, HAS_ACCUM: tl.constexpr, HAS_COUNT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, CLIPPED_NORM_RULE: tl.constexpr, BLOCK: tl.constexpr,
):
    """The four outputs, then the accumulation."""
    num_modules, num_present = header_counts(table)
    total = tl.zeros((), tl.float64)
    for i in range(0, num_present):
        module, module_sq = present_module_sum(table, partials, i, BLOCK)
        tl.store(module_sq_norms + module, module_sq)
        total += module_sq.to(tl.float64)
    total_sq = total.to(tl.float32)
    found_inf = tl.where(tl.abs(total_sq) <= _FLOAT32_MAX, 0.0, 1.0)
    total_norm = tl.sqrt_rn(total_sq)
    clip_coef = tl.full((), 1.0, tl.float32)
    if HAS_MAX_NORM:
        max_norm = header_scalar(table, _MAX_NORM).to(tl.float32)
        clip_coef = tl.minimum(tl.div_rn(max_norm, total_norm + _CLIP_EPS), 1.0)
        clip_coef = tl.where(found_inf != 0, 1.0, clip_coef)
    tl.store(total_norm_out, total_norm)
    tl.store(clip_coef_out, clip_coef)
    tl.store(found_inf_out, found_inf)
    # the module sums stored above are read back below, possibly by other threads
    tl.debug_barrier()
    for first in range(0, num_modules, BLOCK):
        modules, in_range, present = presence_block(table, first, num_modules, BLOCK)
        tl.store(module_sq_norms + modules, 0.0, mask=in_range & (present == 0))
        keep = tl.where(found_inf == 0, present, False)  # (`&` with a scalar fails in the interpreter)
        if HAS_ACCUM:
            value = tl.load(module_sq_norms + modules, mask=keep, other=0.0)
            if CLIPPED_NORM_RULE:
                value = tl.sqrt_rn(value) * clip_coef
            if HAS_WEIGHT:
                value = value * tl.load(accum_weight + modules, mask=keep, other=0.0)
            tl.store(accum + modules, tl.load(accum + modules, mask=keep, other=0.0) + value, mask=keep)
        if HAS_COUNT:
            tl.store(accum_count + modules, tl.load(accum_count + modules, mask=keep, other=0.0) + 1.0, mask=keep)


def grad_sq_norms(
    grads: Sequence[torch.Tensor],
    module_ids: Sequence[int],
    num_modules: int,
    device: torch.device,
    max_norm: Optional[float],
    accum: Optional[torch.Tensor],
    accum_count: Optional[torch.Tensor],
    accum_weight: Optional[torch.Tensor],
    accum_rule: str,
    *,
    chunk_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backend op (arguments validated upstream); `chunk_size` overrides the device's."""
    config = work_table.launch_config(device, chunk_size)
    work = work_table.build({"grads": grads}, module_ids, num_modules, device, config.chunk_size,
                            scalars=[0.0 if max_norm is None else max_norm])
    module_sq_norms = torch.empty(num_modules, dtype=torch.float32, device=device)
    total_norm, clip_coef, found_inf = (torch.empty((), dtype=torch.float32, device=device) for _ in range(3))
    partials = torch.empty(max(work.num_chunks, 1), dtype=torch.float32, device=device)
    with work_table.device_guard(device):
        if work.num_chunks:
            _chunk_sq_sums_kernel[(work.num_chunks,)](
                work.bases[0], work.table, partials, ALIGNED=work.aligned, BLOCK=config.block,
                num_warps=config.num_warps)
        _finalize_kernel[(1,)](
            work.table, partials, module_sq_norms, total_norm, clip_coef, found_inf,
            partials if accum is None else accum,
            partials if accum_count is None else accum_count,
            partials if accum_weight is None else accum_weight,
            HAS_MAX_NORM=max_norm is not None, HAS_ACCUM=accum is not None,
            HAS_COUNT=accum_count is not None, HAS_WEIGHT=accum_weight is not None,
            CLIPPED_NORM_RULE=accum_rule == "clipped_norm", BLOCK=work_table.FINALIZE_BLOCK,
            num_warps=config.num_warps)
    return module_sq_norms, total_norm, clip_coef, found_inf
