"""Checkpoints of a MISA optimizer: what is saved, and everything checked before a load writes.

Layout (torch.optim's, plus a "misa" section)::

    {"state": {slot: {"exp_avg", "exp_avg_sq"[, "master"]}},      # active pieces only
     "param_groups": [{options..., "params": [slots]}],
     "misa": {"version", "param_names", "options", "step_count", "steps", "active",
              "sampler_name", "sampler", "generator", "seed", "active_steps", "active_since"}}

A slot is a piece (a parameter, or one expert's slice of a stacked-experts parameter). A load
checks the whole dict against this optimizer (names, options, groups, every state tensor's
shape and dtype, masters where this optimizer keeps them, the active set against the budget,
the sampler state's sizes) and raises a ValueError naming the first disagreement before
anything changes, so a failed load leaves the optimizer as it was.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Sequence

import torch

from . import distributed
from ._active_set import STATE_KEYS

if TYPE_CHECKING:
    from .optimizer import MISA

STATE_VERSION = 2


def state_dict(opt: "MISA") -> dict:
    for hook in opt._optimizer_state_dict_pre_hooks.values():
        hook(opt)
    active = opt._active
    state = {slot: {k: v.clone() for k, v in active.state_of(slot).items()} for slot in active.stateful_slots()}
    result = {"state": state, **_sections(opt)}
    for hook in opt._optimizer_state_dict_post_hooks.values():
        result = hook(opt, result) or result
    return result


def template(opt: "MISA", entries: Dict[int, Sequence[str]]) -> dict:
    pieces = opt._active.pieces
    bad = [slot for slot in entries if not 0 <= slot < len(pieces)]
    if bad:
        raise ValueError(f"the checkpoint has state for slots {bad[:3]} outside [0, {len(pieces)}): it belongs to "
                         "another model or partition")
    state = {slot: {name: torch.empty_like(pieces[slot].of(pieces[slot].param), dtype=_state_dtype(pieces[slot]),
                                           memory_format=torch.contiguous_format) for name in names}
             for slot, names in entries.items()}
    return {"state": state, **_sections(opt)}


def _sections(opt: "MISA") -> dict:
    """Everything but the per-piece state."""
    slots_of = _group_slots(opt)
    groups = []
    for gi, hyper in enumerate(opt.param_groups):
        saved = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in hyper.items() if k != "params"}
        saved["params"] = slots_of[gi]
        groups.append(saved)
    return {
        "param_groups": groups,
        "misa": {
            "version": STATE_VERSION,
            "param_names": [piece.name for piece in opt._active.pieces],
            "options": dict(opt.options),
            "step_count": opt._step_count,
            "steps": opt._active.steps.clone(),
            "active": opt.active_modules,
            "sampler_name": opt.sampler.name,
            "sampler": opt.sampler.state_dict(),
            "generator": opt.generator.get_state(),
            "seed": opt.seed,
            "active_steps": list(opt._active_steps),
            "active_since": opt._active_since,
        },
    }


def _group_slots(opt: "MISA") -> List[List[int]]:
    slots: List[List[int]] = [[] for _ in opt.param_groups]
    for slot, gi in enumerate(opt._active.hyper_index):
        slots[gi].append(slot)
    return slots


def _state_dtype(piece) -> torch.dtype:
    return torch.float64 if piece.param.dtype == torch.float64 else torch.float32


def load_state_dict(opt: "MISA", state_dict: dict) -> None:
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        state_dict = hook(opt, state_dict) or state_dict
    _check(opt, state_dict)
    saved = state_dict["misa"]
    active = opt._active
    for hyper, group in zip(opt.param_groups, state_dict["param_groups"]):
        hyper.update({k: v for k, v in group.items() if k != "params"})
    for slot in active.stateful_slots():
        active.drop_state(slot)
    for slot, entries in state_dict["state"].items():
        piece = active.pieces[int(slot)]
        target = piece.of(piece.param)
        active.set_state(int(slot), {k: v.to(device=target.device, dtype=_state_dtype(piece)).clone()
                                     for k, v in entries.items()})
    active.steps.copy_(saved["steps"])
    opt._step_count = saved["step_count"]
    opt._active_steps = list(saved["active_steps"])
    opt._active_since = saved["active_since"]
    opt.sampler.load_state_dict(saved["sampler"])
    opt.generator.set_state(saved["generator"].cpu())  # accelerate moves the whole state to the device
    by_name = {m.name: b for b, m in enumerate(opt.partition.modules)}
    active.restore([by_name[n] for n in saved["active"]])
    opt._after_switch()
    for hook in opt._optimizer_load_state_dict_post_hooks.values():
        hook(opt)


def _check(opt: "MISA", state_dict: dict) -> None:
    """Raises a ValueError naming the first way `state_dict` does not fit `opt`."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("misa"), dict):
        raise ValueError("not a MISA optimizer state (no 'misa' section); was it saved by another optimizer?")
    saved = state_dict["misa"]
    if saved.get("version") != STATE_VERSION:
        raise ValueError(f"unsupported MISA state version {saved.get('version')} (this is {STATE_VERSION}); "
                         "it was saved by another release of misa-kernels")
    names = [piece.name for piece in opt._active.pieces]
    if saved["param_names"] != names:
        first = next((i for i, (a, b) in enumerate(zip(saved["param_names"], names)) if a != b),
                     min(len(names), len(saved["param_names"])))
        theirs = saved["param_names"][first] if first < len(saved["param_names"]) else "(none)"
        ours = names[first] if first < len(names) else "(none)"
        raise ValueError(f"the saved state belongs to a different model or partition: trained tensor {first} is "
                         f"{theirs!r} there and {ours!r} here ({len(saved['param_names'])} saved, {len(names)} here)")
    if saved["sampler_name"] != opt.sampler.name:
        raise ValueError(f"the saved state is for sampler {saved['sampler_name']!r}, this optimizer uses "
                         f"{opt.sampler.name!r}")
    differ = [f"{k}={saved['options'].get(k)!r} there, {v!r} here" for k, v in opt.options.items()
              if saved["options"].get(k) != v]
    if differ:
        raise ValueError("the saved state was made with other options: " + "; ".join(differ)
                         + ". Build the optimizer with the saved options to resume")
    groups = state_dict["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"the saved state has {len(groups)} parameter groups, this optimizer {len(opt.param_groups)}")
    for gi, (group, mine) in enumerate(zip(groups, _group_slots(opt))):
        if list(group["params"]) != mine:
            raise ValueError(f"parameter group {gi} holds other parameters in the saved state")
    pieces = opt._active.pieces
    if not isinstance(saved["steps"], torch.Tensor) or tuple(saved["steps"].shape) != (len(pieces),):
        raise ValueError(f"the saved per-piece step counts have shape {tuple(getattr(saved['steps'], 'shape', ()))}, "
                         f"expected ({len(pieces)},)")
    for slot, entries in state_dict["state"].items():
        slot = int(slot)
        if not 0 <= slot < len(pieces):
            raise ValueError(f"the saved state has an entry for slot {slot}, outside [0, {len(pieces)})")
        _check_entries(opt, pieces[slot], entries)
    by_name = {m.name: b for b, m in enumerate(opt.partition.modules)}
    missing = [n for n in saved["active"] if n not in by_name]
    if missing:
        raise ValueError(f"the saved active modules are not in this model: {missing[:3]}")
    used = sum(opt.partition.modules[by_name[n]].numel for n in saved["active"])
    if opt.sampler.uses_budget and used > opt.sampler.budget:
        raise ValueError(f"the saved active set holds {used:,} parameters, more than this optimizer's budget of "
                         f"{opt.sampler.budget:,}")
    _check_same_structure("sampler state", saved["sampler"], opt.sampler.state_dict())
    if len(saved["active_steps"]) != len(opt.partition.modules):
        raise ValueError("the saved coverage counts another number of modules")


def _check_entries(opt: "MISA", piece, entries: dict) -> None:
    keys = set(entries)
    if not keys <= set(STATE_KEYS) or not {"exp_avg", "exp_avg_sq"} <= keys:
        raise ValueError(f"the saved state of {piece.name} has entries {sorted(keys)}; expected exp_avg, exp_avg_sq "
                         "and, for 16-bit weights with master_weights, master")
    has_master = "master" in keys
    if has_master != opt._needs_master(piece.param):
        raise ValueError(f"the saved state of {piece.name} {'has' if has_master else 'has no'} fp32 master copy, but "
                         f"this optimizer {'keeps one' if not has_master else 'keeps none'} for its {piece.param.dtype} "
                         f"weights (master_weights={opt.master_weights!r}): save and load with the same model dtype "
                         "and master_weights")
    for name, value in entries.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"the saved {name} of {piece.name} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(piece.shape):
            raise ValueError(f"the saved {name} of {piece.name} has shape {tuple(value.shape)}, the parameter "
                             f"{tuple(piece.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"the saved {name} of {piece.name} has dtype {value.dtype}")
        if distributed.is_dtensor(piece.param) and not distributed.is_dtensor(value):
            raise ValueError(f"the saved {name} of {piece.name} is a plain tensor but the parameter is an FSDP2 "
                             "shard: load sharded checkpoints with misa.distributed.load_checkpoint")


def _check_same_structure(what: str, saved, mine) -> None:
    """Same keys, list lengths and tensor shapes (values may differ)."""
    if isinstance(mine, dict):
        if not isinstance(saved, dict) or set(saved) != set(mine):
            raise ValueError(f"the saved {what} has entries {sorted(saved) if isinstance(saved, dict) else saved!r}, "
                             f"expected {sorted(mine)}")
        for key in mine:
            _check_same_structure(f"{what} {key!r}", saved[key], mine[key])
    elif isinstance(mine, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or saved.shape != mine.shape:
            raise ValueError(f"the saved {what} has shape {tuple(getattr(saved, 'shape', ()))}, expected "
                             f"{tuple(mine.shape)}")
    elif isinstance(mine, list) and (not isinstance(saved, list) or len(saved) != len(mine)):
        raise ValueError(f"the saved {what} has {len(saved) if isinstance(saved, list) else saved!r} entries, "
                         f"expected {len(mine)}")
