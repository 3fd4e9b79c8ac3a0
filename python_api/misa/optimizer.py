"""The MISA optimizer: AdamW over a sampled subset of a model's modules, drop-in for torch.optim."""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

import misa_kernels

from . import distributed, samplers
from .partition import FROZEN_BY_MISA, NON_BLOCK_POLICIES, Partition, partition

STATE_VERSION = 1


@dataclass
class _UpdateGroup:
    """Active tensors that share one adamw_step_ call: same param group, weight dtype and
    master setting. Rebuilt at every switch of the active set."""

    group_index: int
    params: List[nn.Parameter]
    exp_avgs: List[torch.Tensor]
    exp_avg_sqs: List[torch.Tensor]
    masters: Optional[List[torch.Tensor]]
    slots: List[int]  # index of each tensor's step counter
    norm_ids: List[int]  # module of each tensor for the norms (non-block: one extra id)


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
    back keeps them (the released code's behaviour).

    Args:
        model (nn.Module): the model; only parameters requiring grad now are ever trained.
        lr (float, optional): learning rate (default: 1e-5). Schedulers change
            ``param_groups[i]["lr"]`` as with any torch optimizer.
        betas (Tuple[float, float], optional): AdamW moment decay rates (default: (0.9, 0.999)).
        eps (float, optional): AdamW denominator term (default: 1e-8).
        weight_decay (float, optional): decoupled weight decay of the parameters with 2+ dims;
            biases and norms get none, as in Hugging Face's Trainer (default: 0).
        delta (float, optional): budget, as a fraction of all model parameters, in (0, 1]
            (default: 0.03).
        interval (int, optional): steps between resamplings, T (default: 50).
        eta (float, optional): importance temperature (default: 1.0).
        score_beta (float, optional): importance EMA factor (default: 0.8).
        granularity (str, optional): "module" or "layer"; default: the sampler's.
        patterns (list of str, optional): regular expressions naming the modules instead.
        sampler (str, optional): "misa", "lisa", "badam" or "full" (default: "misa").
        non_block (str, optional): embeddings, head and norms: "frozen", "embed_head" (those
            two trained) or "trained" (all trained at every step); default: the sampler's
            ("frozen" for misa and badam, "trained" for lisa and full).
        importance (str, optional): "paper" or "released" score rule (default: "paper").
        sample_last (int, optional): least recently used modules tried first (default: 2).
        warmup_sweep (bool, optional): resample every step until every module was active once
            (default: True).
        keep_reselected (bool, optional): keep the state of a module drawn again back to back
            (default: True; False clears all state at every switch, as in the paper).
        max_grad_norm (float, optional): clip the total gradient norm of the active
            parameters (default: None).
        master_weights (bool or "auto", optional): fp32 master copies of active parameters;
            "auto" uses them for float16 / bfloat16 parameters (default: "auto").
        skip_nonfinite (bool, optional): skip a step whose gradients hold inf or NaN, leaving
            weights and state untouched (default: True). False drops the separate norm pass
            when there is no clipping: the norms are then computed inside the AdamW pass,
            which saves one read of the gradients but, like torch.optim.AdamW, applies a
            non-finite step (its importance values are discarded).
        backend (str, optional): misa_kernels backend, "auto" by default.
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
    """

    #: torch.amp.GradScaler hands over its scale and overflow flag instead of unscaling and
    #: reading the flag on the host, which also lets float16 weights train under a scaler.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-5,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        delta: float = 0.03,
        interval: int = 50,
        eta: float = 1.0,
        score_beta: float = 0.8,
        granularity: Optional[str] = None,
        patterns: Optional[Sequence[str]] = None,
        sampler: str = "misa",
        non_block: Optional[str] = None,
        importance: str = "paper",
        sample_last: int = 2,
        warmup_sweep: bool = True,
        keep_reselected: bool = True,
        max_grad_norm: Optional[float] = None,
        master_weights="auto",
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
                            "it partitions the model itself")
        distributed.check_wrapping(model)
        if grad_sync not in (True, False, "auto"):
            raise ValueError(f"grad_sync must be True, False or 'auto', got {grad_sync!r}")
        _check_range("learning rate", lr, 0.0)
        _check_range("epsilon", eps, 0.0)
        _check_range("weight_decay", weight_decay, 0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair of floats, got {betas!r}")
        for i, b in enumerate(betas):
            _check_range(f"beta parameter at index {i}", b, 0.0, 1.0, high_open=True)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta <= 1.0:
            raise ValueError(f"delta must lie in (0, 1] (a fraction of all model parameters), got {delta!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an int >= 1, got {interval!r}")
        _check_range("eta", eta, 0.0)
        _check_range("score_beta", score_beta, 0.0, 1.0, high_open=True)
        if max_grad_norm is not None:
            _check_range("max_grad_norm", max_grad_norm, 0.0, low_open=True)
        if master_weights not in (True, False, "auto"):
            raise ValueError(f"master_weights must be True, False or 'auto', got {master_weights!r}")
        sampler_cls = samplers.get(sampler)
        non_block = non_block or sampler_cls.default_non_block
        if non_block not in NON_BLOCK_POLICIES:
            raise ValueError(f"unknown non_block policy {non_block!r}; choose one of {', '.join(NON_BLOCK_POLICIES)}")

        self.partition: Partition = partition(model, granularity or sampler_cls.default_granularity, patterns)
        trained = self.partition.non_block_trained(non_block)
        devices = {p.device for m in self.partition.modules for p in m.params} | {p.device for _, p in trained}
        if len(devices) != 1:
            raise ValueError(f"MISA needs the trained parameters on one device, found {sorted(map(str, devices))}")
        self.device = devices.pop()
        managed = [p for m in self.partition.modules for p in m.params] + [p for _, p in trained]
        self.sharded = any(distributed.is_dtensor(p) for p in managed)
        self._shard_groups = distributed.shard_groups(managed) if self.sharded else []
        self.process_group = process_group
        self.world_size = distributed.world_size(process_group)
        if grad_sync is True and self.sharded:
            raise ValueError("grad_sync=True with FSDP2-sharded parameters: FSDP2 reduces the gradients itself")
        if grad_sync is True and self.world_size == 1:
            raise ValueError("grad_sync=True needs an initialised process group of several ranks")
        sync = grad_sync is True or (grad_sync == "auto" and self.world_size > 1 and not self.sharded)
        self.debug_sync = distributed.debug_from_env() if debug_sync is None else bool(debug_sync)

        # every parameter the optimizer may ever train, each with a slot for its step count
        self._module_of: Dict[int, int] = {}
        named: List[Tuple[str, nn.Parameter]] = []
        for index, module in enumerate(self.partition.modules):
            for name, p in zip(module.param_names, module.params):
                self._module_of[id(p)] = index
                named.append((name, p))
        self._non_block = [p for _, p in trained]
        named += trained
        self._param_names = [n for n, _ in named]
        self._slot = {id(p): i for i, (_, p) in enumerate(named)}
        decay = [p for _, p in named if p.dim() >= 2]
        no_decay = [p for _, p in named if p.dim() < 2]
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        super().__init__([g for g in groups if g["params"]], defaults)

        self.max_grad_norm = max_grad_norm
        self.master_weights = master_weights
        self.skip_nonfinite = skip_nonfinite
        self.keep_reselected = keep_reselected
        self.backend = misa_kernels.resolve_backend(backend, self.device)
        self.seed = torch.initial_seed() if seed is None else int(seed)
        if self.world_size > 1:
            self.seed = distributed.broadcast_seed(self.seed, process_group, self.device)
        self.generator = torch.Generator().manual_seed(self.seed)
        options = dict(sampler_options or {})
        if sampler == "misa":
            options.update(eta=eta, score_beta=score_beta, importance=importance,
                           sample_last=sample_last, warmup_sweep=warmup_sweep)
        self.sampler = sampler_cls(self.partition, delta=delta, interval=interval,
                                   generator=self.generator, device=self.device, **options)
        self._steps = torch.zeros(len(named), dtype=torch.float32, device=self.device)
        self._step_count = 0
        self._num_norm_ids = len(self.partition.modules) + 1
        self._active: List[int] = []
        self._groups: List[_UpdateGroup] = []
        self._module_sums: Optional[torch.Tensor] = None
        self._switch_hooks: Dict[int, Callable] = OrderedDict()
        self.last_stats: Optional[misa_kernels.NormStats] = None

        if self.sharded:
            distributed.initialize_fsdp(model)
        for _, p in named + self.partition.non_block:  # frozen until activated, or for good
            p.requires_grad_(False)
            p.grad = None
            setattr(p, FROZEN_BY_MISA, True)
        self.grad_sync: Optional[distributed.GradientSync] = None
        if sync:
            self.grad_sync = distributed.GradientSync(
                [p for _, p in named], lambda: [p for g in self._groups for p in g.params], process_group)
        for p in self._non_block:
            self._init_state(p)
        self._switch(self.sampler.select(0))
        self._after_switch()

    # ------------------------------------------------------------------ introspection

    @property
    def active_modules(self) -> List[str]:
        """Qualified names of the modules training now."""
        return [self.partition.modules[b].name for b in self._active]

    @property
    def active_params(self) -> int:
        """Number of parameters training now (modules and non-block)."""
        return sum(p.numel() for g in self._groups for p in g.params)

    def no_sync(self):
        """Context manager for the micro-batches of a gradient accumulation: their backward
        passes keep the gradients local, and the next step or synchronised backward averages
        them (one all-reduce per accumulation instead of one per micro-batch)."""
        if self.grad_sync is None:
            return contextlib.nullcontext()
        return self.grad_sync.no_sync()

    def register_switch_hook(self, hook: Callable[["MISA"], None]) -> RemovableHandle:
        """Registers ``hook(optimizer)``, called after every change of the active set (a
        resampling in :meth:`step`, or :meth:`load_state_dict`), once the new modules require
        grad and the dropped ones do not."""
        handle = RemovableHandle(self._switch_hooks)
        self._switch_hooks[handle.id] = hook
        return handle

    def importance(self) -> Dict[str, float]:
        """Module name -> sampling probability of the last draw (misa sampler; host copy)."""
        probs = getattr(self.sampler, "probs", None)
        if probs is None:
            return {}
        return {m.name: float(p) for m, p in zip(self.partition.modules, probs)}

    # ------------------------------------------------------------------ stepping

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step of the active parameters, then a resampling when one is due."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.grad_sync is not None:
            self.grad_sync.flush()
        calls = []
        for group in self._groups:
            present = [(i, self._local(p.grad)) for i, p in enumerate(group.params) if p.grad is not None]
            if present:
                calls.append((group, present))
        # set by torch.amp.GradScaler.step (see _step_supports_amp_scaling): gradients still
        # carry the loss scale, and the scaler's overflow flag decides the skip.
        grad_scale = getattr(self, "grad_scale", None)
        scaler_found_inf = getattr(self, "found_inf", None)
        if grad_scale is not None:
            torch._foreach_mul_([g for _, present in calls for _, g in present],
                                torch.reciprocal(grad_scale.float()))
        accumulation = self.sampler.accumulation() or {}
        fused = not self.skip_nonfinite and self.max_grad_norm is None
        stats = None
        if not fused:
            grads = [g for _, present in calls for _, g in present]
            ids = [group.norm_ids[i] for group, present in calls for i, _ in present]
            if self.sharded:  # partial sums over the local shards: finished after their all-reduce
                module_sq = misa_kernels.grad_sq_norms(grads, ids, self._num_norm_ids, device=self.device,
                                                       backend=self.backend).module_sq_norms
                stats = self._finalize_norms(module_sq, calls, self.max_grad_norm, accumulation)
            else:
                stats = misa_kernels.grad_sq_norms(grads, ids, self._num_norm_ids, max_norm=self.max_grad_norm,
                                                   device=self.device, backend=self.backend, **accumulation)
        slot_sums = []
        for group, present in calls:
            hyper = self.param_groups[group.group_index]
            index = [i for i, _ in present]
            beta1, beta2 = hyper["betas"]
            slot_sq = torch.empty_like(self._steps) if fused else None
            if fused:
                slot_sums.append(slot_sq)
            misa_kernels.adamw_step_(
                self._local([group.params[i] for i in index]), [g for _, g in present],
                self._local([group.exp_avgs[i] for i in index]), self._local([group.exp_avg_sqs[i] for i in index]),
                self._steps, [group.slots[i] for i in index], lr=hyper["lr"], beta1=beta1,
                beta2=beta2, eps=hyper["eps"], weight_decay=hyper["weight_decay"],
                master_params=None if group.masters is None else self._local([group.masters[i] for i in index]),
                clip_coef=None if self.max_grad_norm is None else stats.clip_coef,
                found_inf=stats.found_inf if not fused else scaler_found_inf,
                sq_norms_out=slot_sq,
                backend=self.backend)
        if fused:
            stats = self._finish_fused_norms(slot_sums, calls, accumulation)
        self.last_stats = stats
        self._step_count += 1
        if self.sampler.should_resample(self._step_count):
            self._switch(self.sampler.select(self._step_count))
            self._after_switch()
        return loss

    def _local(self, tensors):
        """The local shards of FSDP2 DTensors (a tensor or a list), views that the kernels
        update in place; plain tensors unchanged."""
        if not self.sharded:
            return tensors
        if isinstance(tensors, torch.Tensor):
            return distributed.local(tensors)
        return [distributed.local(t) for t in tensors]

    def _finish_fused_norms(self, slot_sums, calls, accumulation) -> misa_kernels.NormStats:
        """Per-module sums from the per-slot sums the AdamW passes wrote, then the reference's
        finalisation (total, flag, importance accumulation): a few tiny device ops."""
        per_slot = torch.stack(slot_sums).sum(0) if slot_sums else torch.zeros_like(self._steps)
        return self._finalize_norms(self._module_sums @ per_slot, calls, None, accumulation)

    def _finalize_norms(self, module_sq, calls, max_norm, accumulation) -> misa_kernels.NormStats:
        """Total norm, clip coefficient, non-finite flag and importance accumulation from
        per-module sums; under FSDP2 the sums of the shards are added first (one all-reduce
        of num_modules + 1 values), so that every rank finishes with the same numbers."""
        if self.sharded:
            distributed.all_reduce_sums(module_sq, self._shard_groups)
        present = sorted({group.norm_ids[i] for group, present in calls for i, _ in present})
        rest = misa_kernels.torch_ref.finalize_norms(
            module_sq, present, max_norm, accumulation.get("accum"), accumulation.get("accum_count"),
            accumulation.get("accum_weight"), accumulation.get("accum_rule", "sq"))
        return misa_kernels.NormStats(module_sq, *rest)

    def _after_switch(self) -> None:
        """Runs after every change of the active set: the cross-rank check in debug mode,
        then the registered switch hooks."""
        if self.debug_sync and self.world_size > 1:
            distributed.check_same_active_set(self._active, self._step_count, self.process_group, self.device)
        for hook in list(self._switch_hooks.values()):
            hook(self)

    # ------------------------------------------------------------------ active set

    def _needs_master(self, p: nn.Parameter) -> bool:
        if self.master_weights == "auto":
            return p.dtype in (torch.float16, torch.bfloat16)
        return bool(self.master_weights) and p.dtype != torch.float32

    def _init_state(self, p: nn.Parameter) -> None:
        state = {
            "exp_avg": torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format),
            "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format),
        }
        if self._needs_master(p):
            state["master"] = p.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        self.state[p] = state
        p.requires_grad_(True)

    def _drop(self, p: nn.Parameter) -> None:
        self.state.pop(p, None)
        p.requires_grad_(False)
        p.grad = None

    def _switch(self, new_active: List[int]) -> None:
        """Makes `new_active` the active modules: frees the state of those dropped, creates
        zero state (and masters) for those added, and rebuilds the update groups."""
        kept = set(self._active) & set(new_active) if self.keep_reselected else set()
        modules = self.partition.modules
        for b in self._active:
            if b not in kept:
                for p in modules[b].params:
                    self._drop(p)
        fresh_slots = []
        for b in new_active:
            if b not in kept:
                for p in modules[b].params:
                    self._init_state(p)
                    fresh_slots.append(self._slot[id(p)])
        if fresh_slots:
            self._steps[torch.tensor(fresh_slots, device=self.device)] = 0.0
        self._active = list(new_active)
        self._rebuild_groups()

    def _rebuild_groups(self) -> None:
        active = [p for b in self._active for p in self.partition.modules[b].params] + self._non_block
        position = {id(p): i for i, p in enumerate(active)}
        non_block_id = len(self.partition.modules)
        groups: Dict[tuple, _UpdateGroup] = {}
        for gi, hyper in enumerate(self.param_groups):
            for p in sorted((p for p in hyper["params"] if id(p) in position), key=lambda p: position[id(p)]):
                state = self.state[p]
                key = (gi, p.dtype, "master" in state)
                if key not in groups:
                    groups[key] = _UpdateGroup(gi, [], [], [], [] if "master" in state else None, [], [])
                group = groups[key]
                group.params.append(p)
                group.exp_avgs.append(state["exp_avg"])
                group.exp_avg_sqs.append(state["exp_avg_sq"])
                if group.masters is not None:
                    group.masters.append(state["master"])
                group.slots.append(self._slot[id(p)])
                group.norm_ids.append(self._module_of.get(id(p), non_block_id))
        self._groups = list(groups.values())
        if not self.skip_nonfinite and self.max_grad_norm is None and self._module_sums is None:
            self._module_sums = self._slot_to_module_matrix()

    def _slot_to_module_matrix(self) -> torch.Tensor:
        """[modules + 1, slots] 0/1 matrix summing per-slot values into their module
        (deterministic on every device, unlike a scatter-add)."""
        matrix = torch.zeros(self._num_norm_ids, len(self._param_names), dtype=torch.float32)
        non_block_id = len(self.partition.modules)
        for p_id, slot in self._slot.items():
            matrix[self._module_of.get(p_id, non_block_id), slot] = 1.0
        return matrix.to(self.device)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Everything needed to resume bitwise: moments, masters, per-parameter steps, the
        active set, the sampler's state (scores, accumulators, last use) and its RNG."""
        state = {}
        for p, s in self.state.items():
            state[self._slot[id(p)]] = {k: v.clone() for k, v in s.items()}
        return {"state": state, **self._state_sections()}

    def state_dict_template(self, entries: Dict[int, Sequence[str]]) -> dict:
        """The structure of :meth:`state_dict`, with uninitialised state tensors for `entries`
        (slot -> names of its saved state tensors) allocated like their parameters, sharded
        under FSDP2: the destination torch.distributed.checkpoint loads a saved state into,
        then passed to :meth:`load_state_dict` (see :func:`misa.distributed.load_checkpoint`)."""
        params = self._params_by_slot()
        if any(not 0 <= slot < len(params) for slot in entries):
            raise ValueError(f"the checkpoint has state for parameter slots outside [0, {len(params)}): "
                             "it belongs to another model or partition")
        state = {slot: {name: torch.empty_like(params[slot], dtype=torch.float32,
                                               memory_format=torch.contiguous_format) for name in names}
                 for slot, names in entries.items()}
        return {"state": state, **self._state_sections()}

    def _params_by_slot(self) -> List[nn.Parameter]:
        params = [None] * len(self._param_names)
        for hyper in self.param_groups:
            for p in hyper["params"]:
                params[self._slot[id(p)]] = p
        return params

    def _state_sections(self) -> dict:
        """The state dict's hyperparameters and MISA section (everything but the per-parameter state)."""
        groups = []
        for hyper in self.param_groups:
            saved = {k: v for k, v in hyper.items() if k != "params"}
            saved["params"] = [self._slot[id(p)] for p in hyper["params"]]
            groups.append(saved)
        return {
            "param_groups": groups,
            "misa": {
                "version": STATE_VERSION,
                "param_names": list(self._param_names),
                "step_count": self._step_count,
                "steps": self._steps.clone(),
                "active": self.active_modules,
                "sampler_name": self.sampler.name,
                "sampler": self.sampler.state_dict(),
                "generator": self.generator.get_state(),
                "seed": self.seed,
            },
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores a state saved by :meth:`state_dict` on a model of the same structure."""
        saved = state_dict.get("misa")
        if saved is None:
            raise ValueError("not a MISA optimizer state (no 'misa' section); was it saved by another optimizer?")
        if saved["version"] != STATE_VERSION:
            raise ValueError(f"unsupported MISA state version {saved['version']} (this is {STATE_VERSION})")
        if saved["param_names"] != self._param_names:
            raise ValueError("the saved state belongs to a different model or partition: parameter names differ "
                             f"({len(saved['param_names'])} saved, {len(self._param_names)} here)")
        if saved["sampler_name"] != self.sampler.name:
            raise ValueError(f"the saved state is for sampler {saved['sampler_name']!r}, this optimizer uses "
                             f"{self.sampler.name!r}")
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError("the saved state has a different number of parameter groups")
        by_name = {m.name: b for b, m in enumerate(self.partition.modules)}
        missing = [n for n in saved["active"] if n not in by_name]
        if missing:
            raise ValueError(f"the saved active modules are not in this model: {missing[:3]}")
        params = self._params_by_slot()
        for slot, entries in state_dict["state"].items():
            p = params[int(slot)]
            for name, value in entries.items():
                if distributed.is_dtensor(p) and not distributed.is_dtensor(value):
                    raise ValueError(f"state {name!r} of {self._param_names[int(slot)]} is a plain tensor but the "
                                     "parameter is an FSDP2 shard: load sharded checkpoints with "
                                     "misa.distributed.load_checkpoint")
        for hyper, group in zip(self.param_groups, state_dict["param_groups"]):
            hyper.update({k: v for k, v in group.items() if k != "params"})
        for p in list(self.state):
            self._drop(p)
        for slot, entries in state_dict["state"].items():
            p = params[int(slot)]
            self.state[p] = {k: v.to(device=p.device, dtype=torch.float32).clone() for k, v in entries.items()}
            p.requires_grad_(True)
        self._steps.copy_(saved["steps"])
        self._step_count = saved["step_count"]
        self.sampler.load_state_dict(saved["sampler"])
        self.generator.set_state(saved["generator"].cpu())  # accelerate moves the whole state to the device
        self._active = [by_name[n] for n in saved["active"]]
        self._rebuild_groups()
        self._after_switch()

    def __repr__(self) -> str:
        return (f"MISA(sampler={self.sampler.name}, modules={len(self.partition.modules)}, "
                f"active={len(self._active)}, step={self._step_count}, backend={self.backend})")


def _check_range(name: str, value, low: float, high: float = math.inf, *, low_open: bool = False,
                 high_open: bool = False) -> None:
    misa_kernels._validate.check_hyper(name, value, low, high, low_open=low_open, high_open=high_open)

