"""The MISA optimizer: AdamW over a sampled subset of a model's modules, drop-in for torch.optim."""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

import misa_kernels

from . import _checkpoint, _compile, _validation, distributed, samplers
from ._active_set import ActiveSet
from .param_groups import check_options, param_groups_of
from .partition import FROZEN_BY_MISA, NON_BLOCK_POLICIES, Partition, Piece, partition

logger = logging.getLogger("misa")


@dataclass(frozen=True)
class Coverage:
    """What has trained so far.

    fraction: parameters ever trained for at least one step over the parameters the user left
        trainable (modules, and non-block parameters whether the policy trains them or not).
    steps: module name -> optimizer steps it was active for.
    never_trained: the modules and non-block parameters not trained so far.
    """

    fraction: float
    steps: Dict[str, int]
    never_trained: List[str]


class MISA(Optimizer):
    r"""AdamW on the modules a sampler activates; every other parameter is frozen and holds no
    gradient and no optimizer state.

    Each :meth:`step` runs, through misa_kernels: the per-module squared gradient norms of the
    active tensors (one pass: importance accumulation, clip coefficient, non-finite flag),
    then AdamW on the active tensors reading the clip coefficient and the skip flag from
    device memory. Nothing is read back to the host except at a resampling, every `interval`
    steps, when the sampler draws the next active set under the parameter budget
    ``delta * (all model parameters)``. Modules switched away from lose their moments and fp32
    master copies (the memory is freed); with ``keep_reselected`` a module drawn again back to
    back keeps them (the released code's behaviour). Moments and masters are created at the
    first step of a module's activation, from the parameters as they are then (like
    torch.optim's lazy state), so the optimizer may be built before the model is moved or cast.

    A stacked-experts parameter (an MoE layer's ``experts.gate_up_proj`` [E, ...]) is E modules,
    one per expert slice: a slice's state is ``optimizer.state[param][e]``. A PEFT-adapted layer
    is one module holding all its adapters. See :mod:`misa.partition`.

    Args:
        model (nn.Module): the model; the parameters requiring grad now are the trainable ones.
        lr (float or Tensor, optional): learning rate (default: 1e-5); a 0-dim tensor is read on
            the device (schedulers may update it there without a synchronisation).
        betas (Tuple[float, float], optional): AdamW moment decay rates (default: (0.9, 0.999)).
        eps (float, optional): AdamW denominator term (default: 1e-8).
        weight_decay (float, optional): decoupled weight decay of every trained parameter, as
            ``torch.optim.AdamW`` (default: 0). For the Trainer's grouping (no decay for biases
            and norms) pass ``param_groups=misa.weight_decay_groups(model, wd)``.
        maximize (bool, optional): ascend instead of descend (default: False).
        param_groups (list of dict, optional): torch.optim-style groups, each with ``params``
            (parameters of `model`) and any of lr, betas, eps, weight_decay, maximize, which
            override the defaults above for that group. Trainable parameters in no group are
            not trained (a warning names them). Default: one group of every trainable parameter.
        delta (float, optional): budget, as a fraction of all model parameters, in (0, 1]
            (default: 0.03).
        interval (int, optional): steps between resamplings, T (default: 50).
        eta (float, optional): importance temperature; default: 0.1 for the "relative" rule
            (dimensionless; chosen by the ablation in bench/RESULTS.md), 1.0 for "paper" and
            "released" (see :func:`misa_kernels.importance_update_`). 0 is uniform sampling.
        score_beta (float, optional): importance EMA factor (default: 0.8).
        granularity (str, optional): "module" or "layer"; default: the sampler's.
        patterns (list of str, optional): regular expressions naming the modules instead.
        sampler (str, optional): "misa", "lisa", "badam" or "full" (default: "misa").
        non_block (str, optional): embeddings, head and norms: "frozen", "embed_head" (those
            two trained) or "trained" (all trained at every step); default: the sampler's
            ("frozen" for misa and badam, "trained" for lisa and full). Construction logs the
            parameters left frozen (a warning when the policy was not chosen explicitly).
        importance (str, optional): "relative" (the paper's rule with scores in units of their
            mean: steers at any gradient scale), "paper" (softmax of eta times the raw scores)
            or "released" (the authors' code) (default: "relative").
        sample_last (int, optional): least recently used modules tried first, within at most
            half the budget (default: 2).
        warmup_sweep (bool, optional): resample every step until every module that fits the
            budget was active once (default: True).
        keep_reselected (bool, optional): keep the state of a module drawn again back to back
            (default: True; False clears all state at every switch, as in the paper).
        oversized (str, optional): a module larger than the budget: "error" refuses the model
            (the message gives the smallest delta that fits), "freeze" leaves such modules
            frozen with a warning (default: "error").
        max_grad_norm (float, optional): clip the total gradient norm of the active
            parameters (default: None).
        master_weights (bool or "auto", optional): fp32 master copies of active parameters;
            "auto" uses them for float16 / bfloat16 parameters (default: "auto").
        skip_nonfinite (bool, optional): skip a step whose gradients hold inf or NaN (default:
            True). A skipped step leaves the weights, masters, moments, each module's Adam step
            count and the importance accumulators untouched; it still counts as an optimizer
            step for the resampling schedule (``interval``), for :meth:`coverage` and for LR
            schedulers stepped beside it. False drops the separate norm pass when there is no
            clipping: the norms are then computed inside the AdamW pass, which saves one read of
            the gradients but, like torch.optim.AdamW, applies a non-finite step (its importance
            values are discarded).
        backend (str, optional): misa_kernels backend, "auto" by default ("auto" updates float64
            parameters with the float64-capable "torch" backend).
        seed (int, optional): seed of the sampler's generator (default: torch.initial_seed()).
        sampler_options (dict, optional): extra options of the sampler (e.g. ``n_layers`` for
            lisa, ``order`` for badam).
        process_group (ProcessGroup, optional): the data-parallel ranks: rank 0's seed is
            broadcast to them, and gradients are averaged over them (default: the world, when
            torch.distributed is initialised).
        grad_sync (bool or "auto", optional): average the active gradients over
            `process_group` after each backward, in place of DistributedDataParallel (see
            :mod:`misa.distributed`); "auto" does so when the group has several ranks and the
            parameters are not FSDP2 shards, which FSDP2 reduces itself (default: "auto").
        debug_sync (bool, optional): after every draw, check with one all-gather that all ranks
            hold the same active set (default: the ``MISA_DEBUG_SYNC`` environment variable).

    Under FSDP2 the parameters are DTensors: the state is sharded like them, the kernels run
    on the local shards, and the per-module squared norms are all-reduced before clipping and
    importance accumulation; module sizes and the budget count global parameters.

    Under torch.compile, the forward of each sampled module runs outside the compiled graphs
    and :meth:`step` is not traced (see :mod:`misa._compile`): compiled graphs then never
    depend on which modules are active, and switches cause no recompilation.
    """

    #: torch.amp.GradScaler hands over its scale and overflow flag instead of unscaling and
    #: reading the flag on the host, which also lets float16 weights train under a scaler.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        lr: Union[float, torch.Tensor] = 1e-5,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        param_groups: Optional[Sequence[dict]] = None,
        delta: float = 0.03,
        interval: int = 50,
        eta: Optional[float] = None,
        score_beta: float = 0.8,
        granularity: Optional[str] = None,
        patterns: Optional[Sequence[str]] = None,
        sampler: str = "misa",
        non_block: Optional[str] = None,
        importance: str = "relative",
        sample_last: int = 2,
        warmup_sweep: bool = True,
        keep_reselected: bool = True,
        oversized: str = "error",
        max_grad_norm: Optional[float] = None,
        master_weights: Union[bool, str] = "auto",
        skip_nonfinite: bool = True,
        backend: str = "auto",
        seed: Optional[int] = None,
        sampler_options: Optional[dict] = None,
        process_group: Optional["torch.distributed.ProcessGroup"] = None,
        grad_sync: Union[bool, str] = "auto",
        debug_sync: Optional[bool] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"MISA takes the model (an nn.Module), got {type(model).__name__}; "
                            "it partitions the model itself (per-parameter options go in param_groups=)")
        distributed.check_wrapping(model)
        defaults = check_options(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize))
        delta = _validation.number("delta", delta, 0.0, 1.0, low_open=True)
        interval = _validation.number("interval", interval, 1, integer=True)
        eta = _validation.optional_number("eta", eta, 0.0)
        score_beta = _validation.number("score_beta", score_beta, 0.0, 1.0, high_open=True)
        max_grad_norm = _validation.optional_number("max_grad_norm", max_grad_norm, 0.0, low_open=True)
        _validation.choice("grad_sync", grad_sync, (True, False, "auto"))
        _validation.choice("master_weights", master_weights, (True, False, "auto"))
        _validation.choice("skip_nonfinite", skip_nonfinite, (True, False))
        _validation.choice("keep_reselected", keep_reselected, (True, False))
        _validation.choice("oversized", oversized, samplers.OVERSIZED_POLICIES)
        sampler_cls = samplers.get(sampler)
        explicit_policy = non_block is not None
        non_block = non_block or sampler_cls.default_non_block
        if non_block not in NON_BLOCK_POLICIES:
            raise ValueError(f"unknown non_block policy {non_block!r}; choose one of {', '.join(NON_BLOCK_POLICIES)}")

        groups, trainable = param_groups_of(model, param_groups, defaults)
        _validation.parameters(trainable, model)
        self.partition: Partition = partition(model, granularity or sampler_cls.default_granularity, patterns,
                                              params=[p for _, p in trainable])
        trained = self.partition.non_block_trained(non_block)
        self._log_frozen_non_block(non_block, trained, explicit_policy)

        always = [Piece(n, p) for n, p in trained]
        pieces = [piece for m in self.partition.modules for piece in m.pieces] + always
        self.sharded = any(distributed.is_dtensor(piece.param) for piece in pieces)
        if self.sharded and any(piece.expert is not None for piece in pieces):
            raise NotImplementedError("expert slices of FSDP2-sharded parameters are not supported: shard the "
                                      "experts yourself or pass patterns=[...] to keep each experts tensor whole")
        devices = {piece.param.device for piece in pieces}
        if len(devices) != 1:
            raise ValueError(f"MISA needs the trained parameters on one device, found {sorted(map(str, devices))}")
        device = devices.pop()
        managed = list({id(piece.param): piece.param for piece in pieces}.values())
        self._shard_groups = distributed.shard_groups(managed) if self.sharded else []
        self.process_group = process_group
        self.world_size = distributed.world_size(process_group)
        if grad_sync is True and self.sharded:
            raise ValueError("grad_sync=True with FSDP2-sharded parameters: FSDP2 reduces the gradients itself")
        if grad_sync is True and self.world_size == 1:
            raise ValueError("grad_sync=True needs an initialised process group of several ranks")
        sync = grad_sync is True or (grad_sync == "auto" and self.world_size > 1 and not self.sharded)
        self.debug_sync = distributed.debug_from_env() if debug_sync is None else bool(debug_sync)

        self._adding_groups = True  # torch.optim.Optimizer.__init__ adds the groups
        super().__init__(groups, defaults)
        self._adding_groups = False
        group_of = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}

        self.max_grad_norm = max_grad_norm
        self.master_weights = master_weights
        self.skip_nonfinite = skip_nonfinite
        self.keep_reselected = keep_reselected
        self.backend = misa_kernels.resolve_backend(backend, device)
        self._explicit_backend = backend != "auto"
        for piece in pieces:
            self._backend_for(piece.param.dtype, piece.name)
        self.seed = torch.initial_seed() if seed is None else int(seed)
        if self.world_size > 1:
            self.seed = distributed.broadcast_seed(self.seed, process_group, device)
        self.generator = torch.Generator().manual_seed(self.seed)
        options = dict(sampler_options or {})
        if sampler == "misa":
            options.update(eta=eta, score_beta=score_beta, importance=importance,
                           sample_last=sample_last, warmup_sweep=warmup_sweep)
        self.sampler = sampler_cls(self.partition, delta=delta, interval=interval, generator=self.generator,
                                   device=device, oversized=oversized, **options)
        if sampler == "misa":
            options["eta"] = self.sampler.eta  # the rule's default, when none was given
        self.options = dict(sampler=sampler, delta=delta, interval=interval, oversized=oversized,
                            master_weights=master_weights, keep_reselected=keep_reselected,
                            sampler_options=options)  # what a checkpoint must agree with

        num_modules = len(self.partition.modules)
        self._active = ActiveSet(self.state, self.partition.modules, always, group_of, self._needs_master,
                                 self._backend_for, device)
        self._active.on_move(self._move_buffers)
        self._num_norm_ids = num_modules + 1
        self._step_count = 0
        self._module_sums: Optional[torch.Tensor] = None
        self._switch_hooks: Dict[int, Callable] = OrderedDict()  # weak-referenceable, for RemovableHandle
        self._before_switch_hooks: Dict[int, Callable] = OrderedDict()
        self.last_stats: Optional[misa_kernels.NormStats] = None
        self._active_since = 0
        self._active_steps = [0] * num_modules
        self._eager_step = None

        if self.sharded:
            distributed.initialize_fsdp(model)
        self._active.start()
        trained_ids = {id(p) for _, p in trained}
        for _, p in self.partition.non_block:
            if id(p) not in trained_ids:
                ActiveSet.set_trainable(p, False)
        self.grad_sync: Optional[distributed.GradientSync] = None
        if sync:
            self.grad_sync = distributed.GradientSync(managed, self._active.params, process_group)
        self._sampled_modules = _compile.run_outside_graphs(self._sampled_nn_modules(model))
        self._switch(self.sampler.select(0))
        self._after_switch()

    # ------------------------------------------------------------------ introspection

    @property
    def device(self) -> torch.device:
        """The device of the trained parameters (followed when the model moves)."""
        return self._active.device

    @property
    def active_modules(self) -> List[str]:
        """Qualified names of the modules training now."""
        return [self.partition.modules[b].name for b in self._active.modules]

    @property
    def active_params(self) -> int:
        """Number of parameters training now (module pieces and non-block parameters)."""
        return sum(self._active.pieces[s].numel for s in self._active.slots)

    def coverage(self) -> Coverage:
        """The fraction of trainable parameters trained so far and each module's active steps."""
        steps = list(self._active_steps)
        for b in self._active.modules:
            steps[b] += self._step_count - self._active_since
        modules = self.partition.modules
        trained = sum(m.numel for b, m in enumerate(modules) if steps[b] > 0)
        always = {id(self._active.pieces[s].param) for s in self._active.always}
        if self._step_count > 0:
            trained += sum(p.numel() for _, p in self.partition.non_block if id(p) in always)
        total = sum(m.numel for m in modules) + sum(p.numel() for _, p in self.partition.non_block)
        never = [m.name for b, m in enumerate(modules) if steps[b] == 0]
        never += [n for n, p in self.partition.non_block if id(p) not in always or self._step_count == 0]
        return Coverage(trained / total if total else 1.0, {m.name: steps[b] for b, m in enumerate(modules)}, never)

    def no_sync(self):
        """Context manager for the micro-batches of a gradient accumulation: their backward
        passes keep the gradients local, and the next step or synchronised backward averages
        them (one all-reduce per accumulation instead of one per micro-batch)."""
        if self.grad_sync is None:
            return contextlib.nullcontext()
        return self.grad_sync.no_sync()

    def register_switch_hook(self, hook: Callable[["MISA"], None], *, before: bool = False) -> RemovableHandle:
        """Registers ``hook(optimizer)``, called after every change of the active set (a
        resampling in :meth:`step`, or :meth:`load_state_dict`), once the new modules require
        grad and the dropped ones do not; with `before`, called just before a resampling in
        :meth:`step` changes it, while the old set still holds its gradients and state (the
        moment of its largest memory, say)."""
        hooks = self._before_switch_hooks if before else self._switch_hooks
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        return handle

    def importance(self) -> Dict[str, float]:
        """Module name -> sampling probability of the last draw (misa sampler; host copy)."""
        probs = getattr(self.sampler, "probs", None)
        if probs is None:
            return {}
        return {m.name: float(p) for m, p in zip(self.partition.modules, probs)}

    def release(self) -> None:
        """Hands the model back: every managed parameter requires grad again and holds no MISA
        state, and the sampled modules get their classes back (see :mod:`misa._compile`).
        The optimizer cannot step afterwards."""
        for p in [piece.param for piece in self._active.pieces] + [p for _, p in self.partition.non_block]:
            p.requires_grad_(True)
            p.__dict__.pop(FROZEN_BY_MISA, None)
        self.state.clear()
        _compile.restore(self._sampled_modules)
        if self.grad_sync is not None:
            self.grad_sync.remove()
        self._released = True

    def add_param_group(self, param_group: dict) -> None:
        """Only during construction: parameters joining later would need a new partition and
        budget. Pass every group as ``param_groups=`` when building the optimizer."""
        if not getattr(self, "_adding_groups", False):
            raise NotImplementedError("MISA partitions the model and sets its budget at construction, so "
                                      "parameters cannot join later: build the optimizer with every group "
                                      "(param_groups=[...])")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ stepping

    def step(self, closure=None):
        """One AdamW step of the active parameters, then a resampling when one is due."""
        if getattr(self, "_released", False):
            raise RuntimeError("this MISA optimizer was released; build a new one to train again")
        if torch.compiler.is_compiling():
            # Traced, the step would guard on the identity of every active parameter and
            # recompile at every switch; its work is fused kernels already. Run it eagerly.
            if self._eager_step is None:
                self._eager_step = torch.compiler.disable(self._step)
            return self._eager_step(closure)
        return self._step(closure)

    @torch.no_grad()
    def _step(self, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.grad_sync is not None:
            self.grad_sync.flush()
        calls = []  # (update group, indices of its pieces with a gradient, their weights, their gradients)
        for group in self._active.update_groups():
            index = [i for i, piece in enumerate(group.pieces) if piece.param.grad is not None]
            if index:
                pieces = [group.pieces[i] for i in index]
                calls.append((group, index, self._local([p.of(p.param) for p in pieces]),
                              self._local([p.of(p.param.grad) for p in pieces])))
        grads = [g for *_, group_grads in calls for g in group_grads]
        names = [group.pieces[i].name for group, index, *_ in calls for i in index]
        ids = [group.norm_ids[i] for group, index, *_ in calls for i in index]
        # every gradient checked before anything is written (the AdamW calls go group by group)
        misa_kernels._validate.check_tensor_list("grads", grads, self.device,
                                                 misa_kernels._validate.FLOAT_DTYPES,
                                                 [w.shape for *_, weights, _ in calls for w in weights], names)
        # set by torch.amp.GradScaler.step (see _step_supports_amp_scaling): gradients still
        # carry the loss scale, and the scaler's overflow flag decides the skip.
        grad_scale = getattr(self, "grad_scale", None)
        scaler_found_inf = getattr(self, "found_inf", None)
        if grad_scale is not None and grads:
            torch._foreach_mul_(grads, torch.reciprocal(grad_scale.float()))
        accumulation = self.sampler.accumulation() or {}
        fused = not self.skip_nonfinite and self.max_grad_norm is None
        stats = None
        if not fused:
            if self.sharded:  # partial sums over the local shards: finished after their all-reduce
                module_sq = misa_kernels.grad_sq_norms(grads, ids, self._num_norm_ids, device=self.device,
                                                       backend=self.backend, names=names).module_sq_norms
                stats = self._finalize_norms(module_sq, ids, self.max_grad_norm, accumulation)
            else:
                stats = misa_kernels.grad_sq_norms(grads, ids, self._num_norm_ids, max_norm=self.max_grad_norm,
                                                   device=self.device, backend=self._norm_backend(grads, names),
                                                   names=names, **accumulation)
        slot_sums = []
        for group, index, weights, group_grads in calls:
            hyper = self.param_groups[group.hyper_index]
            beta1, beta2 = hyper["betas"]
            slot_sq = None
            if fused:
                slot_sq = torch.empty(self._active.steps.shape, dtype=_NORM_DTYPE, device=self.device)
                slot_sums.append(slot_sq)
            misa_kernels.adamw_step_(
                weights, group_grads,
                self._local([group.exp_avgs[i] for i in index]), self._local([group.exp_avg_sqs[i] for i in index]),
                self._active.steps, [group.slots[i] for i in index], lr=hyper["lr"], beta1=beta1,
                beta2=beta2, eps=hyper["eps"], weight_decay=hyper["weight_decay"], maximize=hyper["maximize"],
                master_params=None if group.masters is None else self._local([group.masters[i] for i in index]),
                clip_coef=None if self.max_grad_norm is None else stats.clip_coef,
                found_inf=stats.found_inf if not fused else scaler_found_inf,
                sq_norms_out=slot_sq,
                backend=group.backend, names=[group.pieces[i].name for i in index])
        if fused:
            stats = self._finish_fused_norms(slot_sums, ids, accumulation)
        self.last_stats = stats
        self._step_count += 1
        if self.sampler.should_resample(self._step_count):
            for hook in list(self._before_switch_hooks.values()):
                hook(self)
            self._switch(self.sampler.select(self._step_count))
            self._after_switch()
        return loss

    def _norm_backend(self, grads, names) -> str:
        """The backend of the norm pass: the one that updates the step's float64 pieces, if any
        (see :meth:`_backend_for`), else the chosen one."""
        float64 = next((name for g, name in zip(grads, names) if g.dtype == torch.float64), None)
        return self.backend if float64 is None else self._backend_for(torch.float64, float64)

    def _local(self, tensors):
        """The local shards of FSDP2 DTensors (a tensor or a list), views that the kernels
        update in place; plain tensors unchanged."""
        if not self.sharded:
            return tensors
        if isinstance(tensors, torch.Tensor):
            return distributed.local(tensors)
        return [distributed.local(t) for t in tensors]

    def _finish_fused_norms(self, slot_sums, ids, accumulation) -> misa_kernels.NormStats:
        """Per-module sums from the per-slot sums the AdamW passes wrote, then the reference's
        finalisation (total, flag, importance accumulation): a few tiny device ops."""
        per_slot = torch.stack(slot_sums).sum(0) if slot_sums else torch.zeros(
            self._active.steps.shape, dtype=_NORM_DTYPE, device=self.device)
        if self._module_sums is None:
            self._module_sums = self._slot_to_module_matrix()
        return self._finalize_norms(self._module_sums.to(per_slot.dtype) @ per_slot, ids, None, accumulation)

    def _finalize_norms(self, module_sq, ids, max_norm, accumulation) -> misa_kernels.NormStats:
        """Total norm, clip coefficient, non-finite flag and importance accumulation from
        per-module sums; under FSDP2 the sums of the shards are added first (one all-reduce
        of num_modules + 1 values), so that every rank finishes with the same numbers."""
        if self.sharded:
            distributed.all_reduce_sums(module_sq, self._shard_groups)
        present = sorted(set(ids))
        rest = misa_kernels.torch_ref.finalize_norms(
            module_sq, present, max_norm, accumulation.get("accum"), accumulation.get("accum_count"),
            accumulation.get("accum_weight"), accumulation.get("accum_rule", "sq"))
        return misa_kernels.NormStats(module_sq, *rest)

    def _after_switch(self) -> None:
        """Runs after every change of the active set: the cross-rank check in debug mode,
        then the registered switch hooks."""
        if self.debug_sync and self.world_size > 1:
            distributed.check_same_active_set(self._active.modules, self._step_count, self.process_group,
                                              self.device)
        for hook in list(self._switch_hooks.values()):
            hook(self)

    # ------------------------------------------------------------------ active set

    def _switch(self, new_active: List[int]) -> None:
        """Makes `new_active` the active modules (see :meth:`ActiveSet.switch`) and books the
        steps of the period that ends."""
        for b in self._active.modules:
            self._active_steps[b] += self._step_count - self._active_since
        self._active_since = self._step_count
        self._active.switch(new_active, self.keep_reselected)

    def _needs_master(self, p: nn.Parameter) -> bool:
        if self.master_weights == "auto":
            return p.dtype in (torch.float16, torch.bfloat16)
        return bool(self.master_weights) and p.dtype in (torch.float16, torch.bfloat16)

    def _backend_for(self, dtype: torch.dtype, name: str) -> str:
        """The backend updating the parameter `name` of `dtype`: the chosen one; with "auto", the
        float64-capable reference for a dtype the chosen one cannot take. An explicitly chosen
        backend that cannot take it is refused (at construction, or at the step after a cast)."""
        if misa_kernels.supports_dtype(self.backend, dtype):
            return self.backend
        if self._explicit_backend:
            supported = misa_kernels.backends.get(self.backend).DTYPES
            raise ValueError(f"backend {self.backend!r} does not update {dtype} parameters such as {name}; it takes "
                             f"{', '.join(map(str, supported))}. Use backend='auto' (float64 then runs on the "
                             "'torch' backend) or backend='torch'")
        return "torch"

    def _move_buffers(self, device: torch.device) -> None:
        """The parameters moved after construction: the sampler's and the norms' buffers follow,
        and "auto" picks the backend for the new device (an explicit one must support it)."""
        self.backend = misa_kernels.resolve_backend("auto" if not self._explicit_backend else self.backend, device)
        self.sampler.to(device)
        self._module_sums = None

    def _slot_to_module_matrix(self) -> torch.Tensor:
        """[modules + 1, slots] 0/1 matrix summing per-slot values into their module
        (deterministic on every device, unlike a scatter-add)."""
        matrix = torch.zeros(self._num_norm_ids, len(self._active.pieces), dtype=_NORM_DTYPE)
        for slot, norm_id in enumerate(self._active.norm_ids):
            matrix[norm_id, slot] = 1.0
        return matrix.to(self.device)

    def _sampled_nn_modules(self, model: nn.Module) -> List[nn.Module]:
        """The nn.Modules whose forwards run outside compiled graphs: those owning the sampled
        pieces (an adapted layer as a whole). None at layer granularity, where a block is the
        unit: compiling each block gives a graph per block that only two states of its own
        parameters (trained or not) can change."""
        if self.partition.granularity == "layer":
            return []
        owner = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owner.setdefault(id(p), module)
        sampled = {}
        for m in self.partition.modules:
            if m.kind == "adapter":
                module = model.get_submodule(m.name)
                sampled[id(module)] = module
                continue
            for piece in m.pieces:
                sampled.setdefault(id(owner[id(piece.param)]), owner[id(piece.param)])
        return list(sampled.values())

    def _log_frozen_non_block(self, policy: str, trained, explicit: bool) -> None:
        trained_ids = {id(p) for _, p in trained}
        frozen = [(n, p) for n, p in self.partition.non_block if id(p) not in trained_ids]
        if not frozen:
            return
        by_kind: Dict[str, List[str]] = {}
        for name, _ in frozen:
            by_kind.setdefault(self.partition.non_block_kind[name], []).append(name)
        count = sum(p.numel() for _, p in frozen)
        listed = "; ".join(f"{len(v)} {kind} ({_listed(v, 2)})" for kind, v in sorted(by_kind.items()))
        logger.log(logging.INFO if explicit else logging.WARNING,
                   "MISA: non_block=%r leaves %d non-block parameters frozen (%s parameters, %.1f%% of the model): "
                   "%s; non_block='embed_head' or 'trained' trains them", policy, len(frozen), f"{count:,}",
                   100.0 * count / self.partition.total_params, listed)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Everything needed to resume bitwise: moments, masters, per-piece steps, the active
        set, the sampler's state (scores, accumulators, last use), its RNG and the coverage."""
        return _checkpoint.state_dict(self)

    def state_dict_template(self, entries: Dict[int, Sequence[str]]) -> dict:
        """The structure of :meth:`state_dict`, with uninitialised state tensors for `entries`
        (slot -> names of its saved state tensors) allocated like their pieces, sharded
        under FSDP2: the destination torch.distributed.checkpoint loads a saved state into,
        then passed to :meth:`load_state_dict` (see :func:`misa.distributed.load_checkpoint`)."""
        return _checkpoint.template(self, entries)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores a state saved by :meth:`state_dict` on a model of the same structure, after
        checking all of it (names, options, shapes, masters); nothing changes when it fails."""
        _checkpoint.load_state_dict(self, state_dict)

    def __repr__(self) -> str:
        return (f"MISA(sampler={self.sampler.name}, modules={len(self.partition.modules)}, "
                f"active={len(self._active.modules)}, step={self._step_count}, backend={self.backend})")


#: dtype of per-module squared-norm sums (finite for any finite gradient).
_NORM_DTYPE = torch.float64


def _listed(names: Sequence[str], limit: int) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
