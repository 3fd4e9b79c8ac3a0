r"""adamw_step_ on Triton: AdamW over many tensors with per-module step counts, a device-side
clip coefficient and skip flag, optional fp32 master weights, in two launches.

Maths (see ``misa_kernels.adamw_step_``), for each tensor of module m with t = steps[m] + 1,
g = clip_coef * grad (negated with maximize) and w the fp32 master, or the weight itself::

    w <- w * (1 - lr * weight_decay)
    m <- lerp(m, g, 1 - beta1)
    v <- beta2 * v + (1 - beta2) * g * g
    w <- w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    param <- w rounded to nearest even (with a master, or for bf16/fp16 weights without one)

then ``steps[m] += 1`` once per present module. Each program forms its module's scalars in
float64 as the reference does, rounds them once to float32 and updates its chunk in float32
with IEEE division and square root; the lerp is PyTorch's (``m + w (g - m)`` for a weight below
1/2, else ``g - (1 - w) (g - m)``, each one fused multiply-add). A float lr, the betas, eps and
the weight decay are kernel arguments carrying their float64 bit patterns (never specialised
on, so a scheduler never triggers a recompilation); a tensor lr, the clip coefficient and the
skip flag are read from memory.

Launches:

1. ``_adamw_chunk_kernel``: one program per chunk of the work table. When ``found_inf`` is
   non-zero it writes nothing but, with ``sq_norms_out``, the chunk's sum of squared raw
   gradients; otherwise it updates the chunk and writes that sum.
2. ``_finalize_kernel``: one program per block of modules sums each module's chunk sums in
   chunk order into ``sq_norms_out`` (zeros for absent modules, written even on a skipped step)
   and advances the steps of present modules unless ``found_inf`` is non-zero.

The squared gradients of a chunk are summed in float32 and, when that sum is not finite, again
in float64 (the gradient is only read); ``sq_norms_out`` is float64. Steps are the
non-negative counts the reference keeps; without any element only the finalize runs.

No autotuning: the kernels update in place, and an autotuner would run them several times.
Learned from PyTorch's fused AdamW (``aten/src/ATen/native/cuda/fused_adam_utils.cuh``: one
launch over chunks of many tensors, a step count per tensor, bias corrections per launch) and
c10's ``BFloat16`` (``round_to_nearest_even``).
"""
from __future__ import annotations

import math
from typing import List, Optional, Union

import torch
import triton
import triton.language as tl

from . import work_table
from .sq_norms import block_sq_sum, overflow_safe
from .work_table import chunk_pointer, module_block, module_sums, program_chunk

# roles, in the order adamw_step_ passes them to work_table.get
_PARAM, _GRAD, _EXP_AVG, _EXP_AVG_SQ, _MASTER = (tl.constexpr(i) for i in range(5))
#: the float64 scalars, passed as bit patterns (see work_table.float_bits)
_SCALAR_ARGS = ["lr_bits", "beta1_bits", "beta2_bits", "eps_bits", "weight_decay_bits", "log2_beta1_bits",
                "log2_beta2_bits"]


@triton.jit
def _module_scalars(table, steps, tensor_at, lr_ptr, lr_bits, beta1_bits, beta2_bits, eps_bits,
                    weight_decay_bits, log2_beta1_bits, log2_beta2_bits, HAS_LR_TENSOR: tl.constexpr):
    """The float32 scalars of the update of the module of the tensor at `tensor_at`, formed in
    float64: beta^t = exp2(t * log2(beta)) with log2(beta) from the host (float32 would lose
    the small 1 - beta2^t of the first steps). The arguments are decoded inline (as
    work_table.arg_float64 does): the interpreter runs every program in Python, where each
    @triton.jit call costs about 0.2 ms."""
    step = tl.load(steps + tl.load(table + tensor_at)).to(tl.float64) + 1.0
    if HAS_LR_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = lr_bits.to(tl.int64).to(tl.float64, bitcast=True)
    beta1 = beta1_bits.to(tl.int64).to(tl.float64, bitcast=True)
    beta2 = beta2_bits.to(tl.int64).to(tl.float64, bitcast=True)
    eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True)
    weight_decay = weight_decay_bits.to(tl.int64).to(tl.float64, bitcast=True)
    log2_beta1 = log2_beta1_bits.to(tl.int64).to(tl.float64, bitcast=True)
    log2_beta2 = log2_beta2_bits.to(tl.int64).to(tl.float64, bitcast=True)

    beta1_power = tl.exp2(step * log2_beta1)
    beta2_power = tl.exp2(step * log2_beta2)
    step_size = (lr / (1.0 - beta1_power)).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(1.0 - beta2_power).to(tl.float32)
    decay = (1.0 - lr * weight_decay).to(tl.float32)
    lerp_weight = (1.0 - beta1).to(tl.float32)
    return (step_size, bias_correction2_sqrt, decay, lerp_weight, beta2.to(tl.float32),
            (1.0 - beta2).to(tl.float32), eps.to(tl.float32))


@triton.jit
def _update_block(
    param, grad, exp_avg, exp_avg_sq, weight, index, mask, other,
    step_size, bias_correction2_sqrt, decay, lerp_weight, beta2, one_minus_beta2, eps, clip_coef,
    HAS_MASTER: tl.constexpr, HAS_CLIP: tl.constexpr, MAXIMIZE: tl.constexpr,
):
    """Updates elements `index` of one chunk (`mask` and `other` are None for a whole block:
    unmasked, vectorisable loads); returns their squared raw gradients in float32."""
    raw_grad = tl.load(grad + index, mask=mask, other=other).to(tl.float32)
    g = raw_grad
    if HAS_CLIP:
        g = g * clip_coef
    if MAXIMIZE:
        g = -g
    w = tl.load(weight + index, mask=mask, other=other).to(tl.float32) * decay
    m = tl.load(exp_avg + index, mask=mask, other=other)
    v = tl.load(exp_avg_sq + index, mask=mask, other=other)
    # PyTorch's lerp, one rounding as its vectorised and CUDA kernels: from the start for a
    # weight below 1/2, else from the end
    if lerp_weight < 0.5:
        m = tl.fma(lerp_weight, g - m, m)
    else:
        m = tl.fma(lerp_weight - 1.0, g - m, g)
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    w = w - step_size * tl.div_rn(m, denom)
    tl.store(exp_avg + index, m, mask=mask)
    tl.store(exp_avg_sq + index, v, mask=mask)
    if HAS_MASTER:
        tl.store(weight + index, w, mask=mask)
    if param.dtype.element_ty == tl.bfloat16:
        # round to nearest even with integer arithmetic, as c10's round_to_nearest_even: the
        # interpreter truncates a float32 -> bfloat16 cast; on a GPU this is a few integer ops
        bits = w.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(w != w, 0x7FC0, rounded)
        tl.store(param + index, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(param + index, w.to(param.dtype.element_ty), mask=mask)
    return raw_grad * raw_grad


@triton.jit(do_not_specialize=_SCALAR_ARGS)
def _adamw_chunk_kernel(
    param_base, grad_base, exp_avg_base, exp_avg_sq_base, master_base, steps, table,
    lr_ptr, clip_coef_ptr, found_inf_ptr, partials, lr_bits, beta1_bits, beta2_bits, eps_bits,
    weight_decay_bits, log2_beta1_bits, log2_beta2_bits,
    HAS_MASTER: tl.constexpr, HAS_LR_TENSOR: tl.constexpr, HAS_CLIP: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, HAS_SQ_OUT: tl.constexpr, MAXIMIZE: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    tensor_at, start, length = program_chunk(table)
    grad = chunk_pointer(grad_base, table, tensor_at, start, _GRAD, ALIGNED)
    partial = partials + tl.program_id(0)
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0
    if skip:
        if HAS_SQ_OUT:
            tl.store(partial, overflow_safe(block_sq_sum(grad, length, tl.float32, BLOCK), grad, length, BLOCK))
    else:
        param = chunk_pointer(param_base, table, tensor_at, start, _PARAM, ALIGNED)
        exp_avg = chunk_pointer(exp_avg_base, table, tensor_at, start, _EXP_AVG, ALIGNED)
        exp_avg_sq = chunk_pointer(exp_avg_sq_base, table, tensor_at, start, _EXP_AVG_SQ, ALIGNED)
        if HAS_MASTER:
            weight = chunk_pointer(master_base, table, tensor_at, start, _MASTER, ALIGNED)
        else:
            weight = param
        step_size, bias_correction2_sqrt, decay, lerp_weight, beta2, one_minus_beta2, eps = \
            _module_scalars(table, steps, tensor_at, lr_ptr, lr_bits, beta1_bits, beta2_bits, eps_bits,
                            weight_decay_bits, log2_beta1_bits, log2_beta2_bits, HAS_LR_TENSOR)
        clip_coef = 1.0
        if HAS_CLIP:
            clip_coef = tl.load(clip_coef_ptr).to(tl.float32)

        sq = tl.zeros([BLOCK], tl.float32)
        offsets = tl.arange(0, BLOCK)
        num_full = length // BLOCK
        for b in range(0, num_full):
            sq += _update_block(param, grad, exp_avg, exp_avg_sq, weight, b * BLOCK + offsets, None, None,
                                step_size, bias_correction2_sqrt, decay, lerp_weight, beta2,
                                one_minus_beta2, eps, clip_coef, HAS_MASTER, HAS_CLIP, MAXIMIZE)
        tail = num_full * BLOCK + offsets
        sq += _update_block(param, grad, exp_avg, exp_avg_sq, weight, tail, tail < length, 0.0,
                            step_size, bias_correction2_sqrt, decay, lerp_weight, beta2,
                            one_minus_beta2, eps, clip_coef, HAS_MASTER, HAS_CLIP, MAXIMIZE)
        if HAS_SQ_OUT:
            tl.store(partial, overflow_safe(tl.sum(sq, axis=0), grad, length, BLOCK))


@triton.jit
def _finalize_kernel(
    table, partials, steps, found_inf_ptr, sq_norms_out,
    HAS_FOUND_INF: tl.constexpr, HAS_SQ_OUT: tl.constexpr, MODULE_BLOCK: tl.constexpr, RUN_BLOCK: tl.constexpr,
):
    """This program's block of modules: their sums of squares, and their step counts."""
    modules, in_range, present, first, end = module_block(table, MODULE_BLOCK)
    if HAS_SQ_OUT:
        tl.store(sq_norms_out + modules, module_sums(partials, first, end, MODULE_BLOCK, RUN_BLOCK), mask=in_range)
    advance = present
    if HAS_FOUND_INF:
        advance = tl.where(tl.load(found_inf_ptr) == 0, advance, False)  # (`&` with a scalar fails in the interpreter)
    tl.store(steps + modules, tl.load(steps + modules, mask=advance, other=0.0) + 1.0, mask=advance)


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else -math.inf


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
    *,
    chunk_size: Optional[int] = None,
) -> None:
    """The backend op (arguments validated upstream); `chunk_size` overrides the device's."""
    if not params and sq_norms_out is None:
        return  # no module present, nothing to write
    device = steps.device
    config = work_table.launch_config(device, chunk_size)
    roles = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if master_params is not None:
        roles["master_params"] = master_params
    work = work_table.get(roles, module_ids, steps.numel(), device, config.chunk_size)
    bases = work.bases(list(roles.values()))
    param_base, grad_base, exp_avg_base, exp_avg_sq_base = bases[:4]
    master_base = bases[4] if master_params is not None else param_base
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    scalar_bits = [work_table.float_bits(v) for v in (
        0.0 if lr_tensor is not None else float(lr), beta1, beta2, eps, weight_decay, _log2(beta1), _log2(beta2))]
    partials = torch.empty(max(work.num_chunks, 1), dtype=torch.float64, device=device)
    with work_table.device_guard(device):
        if work.num_chunks:
            _adamw_chunk_kernel[(work.num_chunks,)](
                param_base, grad_base, exp_avg_base, exp_avg_sq_base, master_base, steps, work.table,
                steps if lr_tensor is None else lr_tensor,
                steps if clip_coef is None else clip_coef,
                steps if found_inf is None else found_inf,
                partials, *scalar_bits,
                HAS_MASTER=master_params is not None, HAS_LR_TENSOR=lr_tensor is not None,
                HAS_CLIP=clip_coef is not None, HAS_FOUND_INF=found_inf is not None,
                HAS_SQ_OUT=sq_norms_out is not None, MAXIMIZE=bool(maximize), ALIGNED=work.aligned,
                BLOCK=config.block, num_warps=config.num_warps)
        _finalize_kernel[(work_table.finalize_programs(steps.numel(), config),)](
            work.table, partials, steps,
            steps if found_inf is None else found_inf,
            partials if sq_norms_out is None else sq_norms_out,
            HAS_FOUND_INF=found_inf is not None, HAS_SQ_OUT=sq_norms_out is not None,
            MODULE_BLOCK=config.module_block, RUN_BLOCK=config.run_block, num_warps=config.num_warps)
