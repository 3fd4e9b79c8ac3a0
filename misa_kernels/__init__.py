"""misa-kernels: the per-step tensor work of MISA, one function per op, several backends.

Ops (all run on device with no host synchronisation):

- :func:`grad_sq_norms`: per-module squared gradient norms of many tensors in one pass, the
  total norm, the clip coefficient, a non-finite flag, and optionally the importance
  accumulation.
- :func:`importance_update_`: the importance EMA and the sampling probabilities at a resampling.
- :func:`adamw_step_`: AdamW over many tensors, with per-module step counts, a device-side
  clip coefficient and skip flag, and optional fp32 master weights.

Backends (``backend=`` argument or ``MISA_KERNELS_BACKEND``): ``torch`` (the reference),
``cpu`` (C++), ``triton``, ``cuda``; "auto" picks by device (see :mod:`misa_kernels.backends`;
:func:`misa_kernels.backends.supports_dtype` says which take float64).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Union

import torch

from . import _ops, _validate, backends
from .backends import BackendUnavailable, supports_dtype, torch_ref
from .importance import importance_update_

__all__ = [
    "NormStats",
    "grad_sq_norms",
    "adamw_step_",
    "importance_update_",
    "available_backends",
    "resolve_backend",
    "BackendUnavailable",
    "supports_dtype",
]

ACCUM_RULES = ("sq", "clipped_norm")


class NormStats(NamedTuple):
    """What :func:`grad_sq_norms` returns; every field lives on the gradients' device.

    module_sq_norms: [num_modules] float64 sum of squared gradient entries per module (0 where
        absent); float64 so that any finite gradient has a finite sum.
    total_norm: [] float64 Euclidean norm of all gradients together.
    clip_coef: [] float32 min(1, max_norm / (total_norm + 1e-6)); 1 without max_norm or when
        non-finite.
    found_inf: [] float32, 1.0 exactly when some gradient entry is inf or NaN, else 0.0.
    """

    module_sq_norms: torch.Tensor
    total_norm: torch.Tensor
    clip_coef: torch.Tensor
    found_inf: torch.Tensor


def available_backends(device: Union[str, torch.device, None] = None) -> List[str]:
    """Backends that can run on this machine (on `device`'s type, when given)."""
    device_type = None if device is None else torch.device(device).type
    return backends.available(device_type)


def resolve_backend(backend: Optional[str], device: Union[str, torch.device]) -> str:
    """The backend name that `backend` ("auto", a name, or None) selects for `device`."""
    return backends.resolve(backend, torch.device(device)).NAME


def _uniform_dtype(name: str, tensors: Sequence[torch.Tensor]) -> Optional[torch.dtype]:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        listed = ", ".join(sorted(str(d) for d in dtypes))
        raise TypeError(f"{name} mixes dtypes ({listed}); call the op once per dtype")
    return next(iter(dtypes), None)


def grad_sq_norms(
    grads: Sequence[torch.Tensor],
    module_ids: Sequence[int],
    num_modules: int,
    *,
    max_norm: Optional[float] = None,
    accum: Optional[torch.Tensor] = None,
    accum_count: Optional[torch.Tensor] = None,
    accum_weight: Optional[torch.Tensor] = None,
    accum_rule: str = "sq",
    device: Union[str, torch.device, None] = None,
    backend: Optional[str] = None,
    names: Optional[Sequence[str]] = None,
) -> NormStats:
    r"""Per-module squared gradient norms over many tensors, in one pass.

    For each module m, ``s_m = sum over tensors i with module_ids[i] == m of sum(g_i ** 2)``;
    ``total_norm = sqrt(sum_m s_m)``; ``found_inf = 1`` when some entry is inf or NaN. Sums
    are float64 (backends accumulate short runs in float32 and redo in float64 any run whose
    float32 sum overflows), so a finite gradient never reads as non-finite.
    With ``accum`` given and no non-finite value, for every module m present in `module_ids`:
    ``accum[m] += accum_weight[m] * v_m`` with ``v_m = s_m`` (rule "sq", the paper's per-step
    importance value when accum_weight = 1 / numel) or ``v_m = sqrt(s_m) * clip_coef`` (rule
    "clipped_norm", the released code's), and ``accum_count[m] += 1``. A non-finite step
    accumulates nothing.

    Args:
        grads (list of Tensor): dense contiguous float gradients on one device (several dtypes
            cost one pass per dtype); views with a storage offset are fine.
        module_ids (list of int): module index of each gradient, in [0, num_modules).
        num_modules (int): length of the per-module outputs and buffers.
        max_norm (float, optional): gradient clipping threshold; sets ``clip_coef`` (default: None).
        accum (Tensor, optional): [num_modules] float32 running sum, updated in place.
        accum_count (Tensor, optional): [num_modules] float32 running step count, updated in place.
        accum_weight (Tensor, optional): [num_modules] float32 per-module factor (default: 1).
        accum_rule (str, optional): "sq" or "clipped_norm" (default: "sq").
        device (optional): the device when `grads` is empty (default: that of `accum`, else CPU).
        backend (str, optional): a backend name or "auto" (default: ``$MISA_KERNELS_BACKEND`` or auto).
        names (list of str, optional): a name per gradient, quoted in error messages.

    Returns:
        NormStats: on the gradients' device; module_sq_norms and total_norm float64, clip_coef
        and found_inf float32.
    """
    grads = list(grads)
    module_ids = list(module_ids)
    if isinstance(num_modules, bool) or not isinstance(num_modules, int) or num_modules < 0:
        raise ValueError(f"num_modules must be a non-negative int, got {num_modules!r}")
    if accum_rule not in ACCUM_RULES:
        raise ValueError(f"unknown accum_rule {accum_rule!r}; choose one of {', '.join(ACCUM_RULES)}")
    if max_norm is not None:
        max_norm = _validate.check_host_hyper("max_norm", max_norm, 0.0, low_open=True)
    _validate.check_same_length(grads=grads, module_ids=module_ids)
    names = _validate.check_names(names, len(grads))
    if grads:
        dev = grads[0].device
    elif accum is not None:
        dev = accum.device
    else:
        dev = torch.device("cpu" if device is None else device)
    _validate.check_tensor_list("grads", grads, dev, _validate.FLOAT_DTYPES, names=names)
    _validate.check_module_ids(module_ids, num_modules)
    for name, buf in (("accum", accum), ("accum_count", accum_count), ("accum_weight", accum_weight)):
        _validate.check_vector(name, buf, num_modules, dev)
    by_dtype = {}
    for i, (g, m) in enumerate(zip(grads, module_ids)):
        by_dtype.setdefault(g.dtype, ([], [], []))
        for part, value in zip(by_dtype[g.dtype], (g, m, i)):
            part.append(value)
    if len(by_dtype) > 1:
        return _grad_sq_norms_mixed(by_dtype, num_modules, dev, max_norm, accum, accum_count,
                                    accum_weight, accum_rule, backend, names)
    with torch.no_grad():
        if torch.compiler.is_compiling():
            result = torch.ops.misa_kernels.grad_sq_norms(
                grads, module_ids, num_modules, str(dev), max_norm, accum, accum_count,
                accum_weight, accum_rule, backend)
        else:
            result = _ops.run_grad_sq_norms(grads, module_ids, num_modules, dev, max_norm, accum,
                                            accum_count, accum_weight, accum_rule, backend, names)
    return NormStats(*result)


def _grad_sq_norms_mixed(by_dtype, num_modules, dev, max_norm, accum, accum_count, accum_weight,
                         accum_rule, backend, names) -> NormStats:
    """Gradients of several dtypes: one backend call per dtype for the module sums, then the
    reference's finalisation (a few tiny ops, no host synchronisation) over their sum."""
    sq = None
    for group, ids, positions in by_dtype.values():
        group_names = None if names is None else [names[i] for i in positions]
        part = grad_sq_norms(group, ids, num_modules, backend=backend, names=group_names).module_sq_norms
        sq = part if sq is None else sq + part
    present = sorted({m for _, ids, _ in by_dtype.values() for m in ids})
    with torch.no_grad():
        rest = torch_ref.finalize_norms(sq, present, max_norm, accum, accum_count, accum_weight,
                                        accum_rule)
    return NormStats(sq, *rest)


def adamw_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: torch.Tensor,
    module_ids: Sequence[int],
    *,
    lr: Union[float, torch.Tensor],
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
    master_params: Optional[Sequence[torch.Tensor]] = None,
    clip_coef: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    sq_norms_out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    names: Optional[Sequence[str]] = None,
) -> None:
    r"""AdamW over many tensors in one pass; only the tensors given are touched.

    For each tensor i with module m = module_ids[i] and t = steps[m] + 1, writing w for the
    fp32 master (or the weight itself when no master is given) and g = clip_coef * grad::

        w   <- w * (1 - lr * weight_decay)
        m_i <- beta1 * m_i + (1 - beta1) * g
        v_i <- beta2 * v_i + (1 - beta2) * g^2
        w   <- w - lr / (1 - beta1^t) * m_i / (sqrt(v_i) / sqrt(1 - beta2^t) + eps)
        param <- w rounded to the param's dtype (when a master is given)

    then ``steps[m] += 1`` once for every module present. When ``found_inf`` is non-zero nothing
    is written (weights, masters, moments and steps keep their values). When ``sq_norms_out``
    is given it receives the per-module sum of squared (raw, unclipped) gradient entries read
    in the same pass (float64, overflow-safe as in :func:`grad_sq_norms`), so no separate norm
    pass is needed when there is no clipping; it is written even on a skipped step. This fused
    path cannot skip a step on its own finding: supply ``found_inf`` from elsewhere (an AMP
    scaler) if that is needed.

    Every argument is checked before anything is written: a bad call raises and leaves every
    tensor as it was. Tensors the op writes (weights, masters, moments, steps, sq_norms_out)
    may not overlap in memory any other argument; disjoint views of one tensor (the experts
    ``w[0]``, ``w[1]`` of a 3-D weight) are fine, at any storage offset. (Under torch.compile
    the graph hands the op copies of the tensors it writes, so overlapping arguments act as
    separate tensors there.)

    Args:
        params (list of Tensor): model weights (float32, float16, bfloat16; float64 on the
            'torch' backend), updated in place.
        grads (list of Tensor): gradients, same shapes, one float dtype.
        exp_avgs, exp_avg_sqs (list of Tensor): first and second moments, in place: float32, or
            float64 for float64 weights.
        steps (Tensor): [num_modules] float32 per-module completed-update counts, in place.
        module_ids (list of int): module of each tensor, in [0, steps.numel()).
        lr (float or Tensor): learning rate: a number (Python or numpy), or a 0-dim or
            one-element float32/float64 tensor. A tensor in host memory is read and checked
            like a number; a tensor on the GPU is read by the kernels on the device (no
            recompile, no synchronisation when a scheduler changes it), so its value is not
            checked on the host.
        beta1, beta2 (float, optional): moment decay rates, in [0, 1) (default: 0.9, 0.999).
        eps (float, optional): denominator term, >= 0 (default: 1e-8).
        weight_decay (float, optional): decoupled weight decay, >= 0 (default: 0).
        maximize (bool, optional): ascend instead of descend (default: False).
        master_params (list of Tensor, optional): float32 masters of 16-bit weights, updated
            and written back.
        clip_coef (Tensor, optional): 0-dim float32 factor applied to every gradient.
        found_inf (Tensor, optional): 0-dim float32 flag; non-zero skips the step.
        sq_norms_out (Tensor, optional): [num_modules] float64, overwritten with per-module sums.
            A float32 buffer is accepted too: it receives the float64 sums rounded (inf where a
            sum exceeds float32's range), through a float64 buffer and one extra small copy.
        backend (str, optional): a backend name or "auto".
        names (list of str, optional): a name per parameter, quoted in error messages.
    """
    params, grads, exp_avgs, exp_avg_sqs = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
    module_ids = list(module_ids)
    master_params = None if master_params is None else list(master_params)
    if not isinstance(steps, torch.Tensor):
        raise TypeError(f"steps must be a 1-D float32 tensor, got {type(steps).__name__}")
    dev = steps.device
    lr = _validate.check_lr(lr, dev)
    beta1 = _validate.check_host_hyper("beta1", beta1, 0.0, 1.0, high_open=True)
    beta2 = _validate.check_host_hyper("beta2", beta2, 0.0, 1.0, high_open=True)
    eps = _validate.check_host_hyper("epsilon", eps, 0.0)
    weight_decay = _validate.check_host_hyper("weight_decay", weight_decay, 0.0)
    if not isinstance(maximize, bool):
        raise TypeError(f"maximize must be a bool, got {type(maximize).__name__}")
    _validate.check_same_length(params=params, grads=grads, exp_avgs=exp_avgs,
                                exp_avg_sqs=exp_avg_sqs, module_ids=module_ids,
                                master_params=master_params)
    names = _validate.check_names(names, len(params))
    num_modules = steps.numel()
    _validate.check_vector("steps", steps, num_modules, dev)
    _validate.check_module_ids(module_ids, num_modules, "steps.numel()")
    _validate.check_tensor_list("params", params, dev, _validate.FLOAT_DTYPES, names=names)
    param_dtype = _uniform_dtype("params", params)
    # float64 moments for float64 weights (the reference's exact mode), float32 otherwise
    moment_dtypes = (torch.float64,) if param_dtype == torch.float64 else (torch.float32,)
    shapes = [p.shape for p in params]
    _validate.check_tensor_list("grads", grads, dev, _validate.FLOAT_DTYPES, shapes, names)
    _uniform_dtype("grads", grads)
    _validate.check_tensor_list("exp_avgs", exp_avgs, dev, moment_dtypes, shapes, names)
    _validate.check_tensor_list("exp_avg_sqs", exp_avg_sqs, dev, moment_dtypes, shapes, names)
    if master_params is not None:
        if param_dtype == torch.float64:
            raise TypeError("master_params are float32 copies of low-precision weights; float64 params need none")
        _validate.check_tensor_list("master_params", master_params, dev, (torch.float32,), shapes, names)
    clip_coef = _validate.check_scalar_tensor("clip_coef", clip_coef, dev)
    found_inf = _validate.check_scalar_tensor("found_inf", found_inf, dev)
    _validate.check_vector("sq_norms_out", sq_norms_out, num_modules, dev, (torch.float64, torch.float32))
    float32_out = None
    if sq_norms_out is not None and sq_norms_out.dtype == torch.float32:
        float32_out, sq_norms_out = sq_norms_out, torch.empty_like(sq_norms_out, dtype=torch.float64)
    with torch.no_grad():
        if torch.compiler.is_compiling():
            lr_float, lr_tensor = (0.0, lr) if isinstance(lr, torch.Tensor) else (lr, None)
            torch.ops.misa_kernels.adamw_step_(
                params, grads, exp_avgs, exp_avg_sqs, steps, module_ids, lr_float, lr_tensor,
                beta1, beta2, eps, weight_decay, maximize, master_params, clip_coef, found_inf,
                sq_norms_out, backend)
        else:
            _ops.run_adamw_step_(params, grads, exp_avgs, exp_avg_sqs, steps, module_ids, lr, beta1,
                                 beta2, eps, weight_decay, maximize, master_params, clip_coef,
                                 found_inf, sq_norms_out, backend, names)
        if float32_out is not None:
            float32_out.copy_(sq_norms_out)
