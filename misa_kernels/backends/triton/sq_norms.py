r"""grad_sq_norms on Triton: per-module squared gradient norms, the total norm, the clip
coefficient, the non-finite flag and the importance accumulation, in two launches.

Maths (see ``misa_kernels.grad_sq_norms``)::

    s_m        = sum over tensors i of module m of sum_j g_ij^2        (0 for an absent module)
    total_norm = sqrt(sum_m s_m)
    found_inf  = 1 if sum_m s_m is not finite else 0
    clip_coef  = min(1, max_norm / (total_norm + 1e-6)), or 1 without max_norm or when found_inf
    accum[m]  += accum_weight[m] * (s_m, or sqrt(s_m) * clip_coef)    for present m, if not found_inf
    count[m]  += 1                                                     for present m, if not found_inf

Precision: each chunk is summed in float32 ([BLOCK] lanes, then a tree sum) and, only when that
sum is not finite, again in float64; everything after the chunk sums is float64. A finite
gradient thus always has a finite norm (an element above ~1.8e19 squares to inf in float32),
while an inf or NaN element still makes the sum inf or NaN. s_m and total_norm are float64,
clip_coef and found_inf float32.

Launches:

1. ``_chunk_sq_sums_kernel``: one program per chunk of the work table writes the chunk's sum of
   squares.
2. ``_finalize_kernel``: one program per block of modules sums each module's run of chunk
   partials in chunk order (zero for an absent module); every program also sums all chunk
   partials in one fixed order for the total (the same value in each), from which it derives
   the flag and the clip coefficient (stored by program 0) and its modules' accumulation.

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
from .work_table import all_chunks_sum, arg_float64, chunk_pointer, module_block, module_sums, program_chunk

_CLIP_EPS = tl.constexpr(CLIP_EPS)
#: the largest finite float32; anything else (inf, NaN) fails `abs(x) <= _FLOAT32_MAX`.
_FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
#: the largest finite float64.
_FLOAT64_MAX = tl.constexpr(1.7976931348623157e308)


@triton.jit
def block_sq_sum(x, length, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
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
def overflow_safe(fast_sum, x, length, BLOCK: tl.constexpr):
    """`fast_sum` (a float32 sum of squares of x[0:length]) as float64, or the sum redone in
    float64 when the float32 one is not finite (overflow, or a genuine inf or NaN, which the
    float64 sum keeps)."""
    result = fast_sum.to(tl.float64)
    if (fast_sum != fast_sum) | (tl.abs(fast_sum) > _FLOAT32_MAX):
        result = block_sq_sum(x, length, tl.float64, BLOCK)
    return result


@triton.jit
def chunk_sq_sum(x, length, BLOCK: tl.constexpr):
    """Sum of x[0:length]^2 as float64: fast in float32, exact where float32 overflows."""
    return overflow_safe(block_sq_sum(x, length, tl.float32, BLOCK), x, length, BLOCK)


@triton.jit
def _chunk_sq_sums_kernel(grad_base, table, partials, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    tensor_at, start, length = program_chunk(table)
    grad = chunk_pointer(grad_base, table, tensor_at, start, 0, ALIGNED)
    tl.store(partials + tl.program_id(0), chunk_sq_sum(grad, length, BLOCK))


@triton.jit(do_not_specialize=["max_norm_bits"])
def _finalize_kernel(
    table, partials, module_sq_norms, total_norm_out, clip_coef_out, found_inf_out, accum, accum_count,
    accum_weight, max_norm_bits, HAS_MAX_NORM: tl.constexpr, HAS_ACCUM: tl.constexpr,
    HAS_COUNT: tl.constexpr, HAS_WEIGHT: tl.constexpr, CLIPPED_NORM_RULE: tl.constexpr,
    MODULE_BLOCK: tl.constexpr, RUN_BLOCK: tl.constexpr, TOTAL_BLOCK: tl.constexpr,
):
    """The outputs of this program's block of modules; program 0 also the three scalars."""
    modules, in_range, present, first, end = module_block(table, MODULE_BLOCK)
    module_sq = module_sums(partials, first, end, MODULE_BLOCK, RUN_BLOCK)
    tl.store(module_sq_norms + modules, module_sq, mask=in_range)

    total_sq = all_chunks_sum(table, partials, TOTAL_BLOCK)
    finite = tl.abs(total_sq) <= _FLOAT64_MAX
    total_norm = tl.sqrt(total_sq)  # float64: correctly rounded (sqrt_rn is float32-only)
    clip_coef = tl.full((), 1.0, tl.float32)
    if HAS_MAX_NORM:
        coef = tl.minimum(arg_float64(max_norm_bits) / (total_norm + _CLIP_EPS), 1.0).to(tl.float32)
        clip_coef = tl.where(finite, coef, clip_coef)
    if tl.program_id(0) == 0:
        tl.store(total_norm_out, total_norm)
        tl.store(clip_coef_out, clip_coef)
        tl.store(found_inf_out, tl.where(finite, 0.0, 1.0).to(tl.float32))

    keep = tl.where(finite, present, False)  # (`&` with a scalar fails in the interpreter)
    if HAS_ACCUM:
        # in float64, rounded once to the float32 buffer, as torch_ref
        value = module_sq
        if CLIPPED_NORM_RULE:
            value = tl.sqrt(value) * clip_coef.to(tl.float64)
        if HAS_WEIGHT:
            value = value * tl.load(accum_weight + modules, mask=keep, other=0.0).to(tl.float64)
        tl.store(accum + modules, tl.load(accum + modules, mask=keep, other=0.0) + value.to(tl.float32), mask=keep)
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
    work = work_table.get({"grads": grads}, module_ids, num_modules, device, config.chunk_size)
    (grad_base,) = work.bases([grads])
    module_sq_norms = torch.empty(num_modules, dtype=torch.float64, device=device)
    total_norm = torch.empty((), dtype=torch.float64, device=device)
    clip_coef, found_inf = (torch.empty((), dtype=torch.float32, device=device) for _ in range(2))
    partials = torch.empty(max(work.num_chunks, 1), dtype=torch.float64, device=device)
    with work_table.device_guard(device):
        if work.num_chunks:
            _chunk_sq_sums_kernel[(work.num_chunks,)](
                grad_base, work.table, partials, ALIGNED=work.aligned, BLOCK=config.block,
                num_warps=config.num_warps)
        _finalize_kernel[(work_table.finalize_programs(num_modules, config),)](
            work.table, partials, module_sq_norms, total_norm, clip_coef, found_inf,
            partials if accum is None else accum,
            partials if accum_count is None else accum_count,
            partials if accum_weight is None else accum_weight,
            work_table.float_bits(0.0 if max_norm is None else max_norm),
            HAS_MAX_NORM=max_norm is not None, HAS_ACCUM=accum is not None,
            HAS_COUNT=accum_count is not None, HAS_WEIGHT=accum_weight is not None,
            CLIPPED_NORM_RULE=accum_rule == "clipped_norm", MODULE_BLOCK=config.module_block,
            RUN_BLOCK=config.run_block, TOTAL_BLOCK=work_table.TOTAL_BLOCK, num_warps=config.num_warps)
    return module_sq_norms, total_norm, clip_coef, found_inf
