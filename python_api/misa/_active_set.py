"""The active set's state: which pieces train now, their moments and masters, made and freed.

A *piece* is what one kernel call sees as one tensor: a whole parameter, or one expert's slice
of a parameter stacking its experts (:class:`misa.partition.Piece`). Every piece the optimizer
may ever train has a *slot*: its index in the per-piece step counters and in checkpoints.

Lifecycle, as torch.optim does it: a switch only decides which pieces train (requires_grad,
gradients freed, state of dropped pieces freed, step counters of new ones reset); moments and
fp32 masters are created at the first step after the switch, from the parameters as they are
then. So an optimizer built before ``model.to(torch.bfloat16)`` or ``model.to("cuda")``
trains exactly like one built after, and optimizer buffers follow the model's device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .partition import FROZEN_BY_MISA, Module, Piece

#: the state tensors of a piece: AdamW's moments and, for 16-bit weights, the fp32 master.
STATE_KEYS = ("exp_avg", "exp_avg_sq", "master")


@dataclass
class UpdateGroup:
    """Active pieces sharing one adamw_step_ call: same param group, weight dtype, master
    setting and backend."""

    hyper_index: int
    backend: str
    pieces: List[Piece]
    slots: List[int]
    norm_ids: List[int]  # module of each piece for the norms (non-block: one extra id)
    exp_avgs: List[torch.Tensor]
    exp_avg_sqs: List[torch.Tensor]
    masters: Optional[List[torch.Tensor]]


class ActiveSet:
    """Slots, step counters and per-piece state of a MISA optimizer.

    Slots: the pieces of every module, in module order, then the non-block pieces trained at
    every step (`always`). Each slot has a norm id (its module; the non-block ones share one
    more) and the index of its parameter's param group.

    Args:
        state: the optimizer's ``state`` (torch.optim's per-parameter dict): a whole
            parameter's entry holds its tensors, a sliced parameter's entry maps the expert
            index to that slice's tensors.
        modules: the partition's modules.
        always: the non-block pieces trained at every step under the policy.
        group_of: id(parameter) -> index of its param group.
        needs_master: whether a parameter gets an fp32 master (decided at state creation).
        backend_for: the backend that updates a piece, from its dtype and name.
    """

    def __init__(self, state: dict, modules: Sequence[Module], always: Sequence[Piece], group_of: Dict[int, int],
                 needs_master: Callable[[nn.Parameter], bool],
                 backend_for: Callable[[torch.dtype, str], str], device: torch.device):
        self.state = state
        self.pieces = [piece for m in modules for piece in m.pieces] + list(always)
        self.module_slots: List[List[int]] = []
        first = 0
        for module in modules:
            self.module_slots.append(list(range(first, first + len(module.pieces))))
            first += len(module.pieces)
        self.always = list(range(len(self.pieces) - len(always), len(self.pieces)))
        self.norm_ids = [b for b, slots in enumerate(self.module_slots) for _ in slots] + [len(modules)] * len(always)
        self.hyper_index = [group_of[id(piece.param)] for piece in self.pieces]
        self.needs_master = needs_master
        self.backend_for = backend_for
        self.device = device
        self.steps = torch.zeros(len(self.pieces), dtype=torch.float32, device=device)
        self.modules: List[int] = []
        self._groups: Optional[List[UpdateGroup]] = None
        self._layout: Tuple = ()
        self._on_move: List[Callable[[torch.device], None]] = []

    # ------------------------------------------------------------------ which pieces train

    @property
    def slots(self) -> List[int]:
        """The slots training now: the active modules' pieces, then the always-trained ones."""
        return [s for b in self.modules for s in self.module_slots[b]] + self.always

    def params(self) -> List[nn.Parameter]:
        """The parameters training now, each once."""
        unique: Dict[int, nn.Parameter] = {}
        for slot in self.slots:
            unique.setdefault(id(self.pieces[slot].param), self.pieces[slot].param)
        return list(unique.values())

    def start(self) -> None:
        """Freezes every piece but the always-trained ones (the optimizer's construction)."""
        for piece in self.pieces:
            self.set_trainable(piece.param, False)
        for slot in self.always:
            self.set_trainable(self.pieces[slot].param, True)

    def switch(self, new_modules: Sequence[int], keep: bool) -> None:
        """Makes `new_modules` the active ones: pieces dropped lose their state and stop
        requiring grad (unless another slice of their parameter stays active); pieces added
        get step 0 and no state until the next step; with `keep`, pieces active before and
        after keep their state and steps."""
        kept = set(self.modules) & set(new_modules) if keep else set()
        old_slots = {s for b in self.modules for s in self.module_slots[b]}
        new_slots = {s for b in new_modules for s in self.module_slots[b]}
        kept_slots = {s for b in kept for s in self.module_slots[b]}
        for slot in old_slots - kept_slots:
            self.drop_state(slot)
        fresh = sorted(new_slots - kept_slots)
        if fresh:
            self.steps[torch.tensor(fresh, device=self.steps.device)] = 0.0
        trained_params = {id(self.pieces[s].param) for s in new_slots} | {id(self.pieces[s].param) for s in self.always}
        for slot in old_slots | new_slots:
            param = self.pieces[slot].param
            self.set_trainable(param, id(param) in trained_params)
        self.modules = list(new_modules)
        self._groups = None

    def restore(self, modules: Sequence[int]) -> None:
        """Marks `modules` active with the state already loaded (a checkpoint)."""
        active = {id(self.pieces[s].param) for b in modules for s in self.module_slots[b]}
        active |= {id(self.pieces[s].param) for s in self.always}
        for piece in self.pieces:
            self.set_trainable(piece.param, id(piece.param) in active)
        self.modules = list(modules)
        self._groups = None

    @staticmethod
    def set_trainable(param: nn.Parameter, trainable: bool) -> None:
        param.requires_grad_(trainable)
        if not trainable:
            param.grad = None
        setattr(param, FROZEN_BY_MISA, trainable)

    # ------------------------------------------------------------------ state

    def state_of(self, slot: int) -> Optional[Dict[str, torch.Tensor]]:
        piece = self.pieces[slot]
        entry = self.state.get(piece.param)
        if entry is None or piece.expert is None:
            return entry
        return entry.get(piece.expert)

    def set_state(self, slot: int, tensors: Dict[str, torch.Tensor]) -> None:
        piece = self.pieces[slot]
        if piece.expert is None:
            self.state[piece.param] = tensors
        else:
            self.state.setdefault(piece.param, {})[piece.expert] = tensors

    def drop_state(self, slot: int) -> None:
        piece = self.pieces[slot]
        if piece.expert is None:
            self.state.pop(piece.param, None)
            return
        entry = self.state.get(piece.param)
        if entry is not None:
            entry.pop(piece.expert, None)
            if not entry:
                del self.state[piece.param]

    def stateful_slots(self) -> List[int]:
        return [slot for slot in range(len(self.pieces)) if self.state_of(slot) is not None]

    def _create_state(self, slot: int) -> None:
        """Zero moments (float64 for float64 weights, else float32) and, when the parameter
        needs one, an fp32 master copied from the weights as they are now."""
        piece = self.pieces[slot]
        weight = piece.of(piece.param.detach())
        moment_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        tensors = {
            "exp_avg": torch.zeros_like(weight, dtype=moment_dtype, memory_format=torch.contiguous_format),
            "exp_avg_sq": torch.zeros_like(weight, dtype=moment_dtype, memory_format=torch.contiguous_format),
        }
        if self.needs_master(piece.param):
            tensors["master"] = weight.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        self.set_state(slot, tensors)

    def _reconcile_state(self, slot: int) -> None:
        """A piece whose parameter changed dtype since its state was made: add the master it now
        needs (from the weights), or write back and drop the one it no longer needs."""
        tensors = self.state_of(slot)
        piece = self.pieces[slot]
        needs = self.needs_master(piece.param)
        if needs and "master" not in tensors:
            tensors["master"] = piece.of(piece.param.detach()).to(torch.float32, copy=True)
        elif not needs and "master" in tensors:
            with torch.no_grad():
                piece.of(piece.param).copy_(tensors.pop("master"))

    # ------------------------------------------------------------------ the step's plan

    def on_move(self, callback: Callable[[torch.device], None]) -> None:
        """Registers `callback(device)`, run when the parameters have moved to another device."""
        self._on_move.append(callback)

    def update_groups(self) -> List[UpdateGroup]:
        """The update groups of the active pieces, creating the state of pieces that have none
        (the first step after their activation) and following the parameters to another
        device or dtype. Rebuilt only after a switch, a load or such a move; checking for a
        move costs one pass over the active parameters' dtype and device."""
        active = self.slots
        layout = tuple((self.pieces[s].param.dtype, self.pieces[s].param.device) for s in active)
        if self._groups is not None and layout == self._layout:
            return self._groups
        devices = {device for _, device in layout}
        if len(devices) > 1:
            raise ValueError(f"the trained parameters are on several devices ({', '.join(sorted(map(str, devices)))}); "
                             "MISA needs them on one")
        if devices and devices != {self.device}:
            self._move(devices.pop())
        groups: Dict[tuple, UpdateGroup] = {}
        for slot in active:
            if self.state_of(slot) is None:
                self._create_state(slot)
            else:
                self._reconcile_state(slot)
            piece = self.pieces[slot]
            tensors = self.state_of(slot)
            has_master = "master" in tensors
            backend = self.backend_for(piece.param.dtype, piece.name)
            key = (self.hyper_index[slot], piece.param.dtype, has_master, backend)
            group = groups.get(key)
            if group is None:
                group = groups[key] = UpdateGroup(self.hyper_index[slot], backend, [], [], [], [], [],
                                                  [] if has_master else None)
            group.pieces.append(piece)
            group.slots.append(slot)
            group.norm_ids.append(self.norm_ids[slot])
            group.exp_avgs.append(tensors["exp_avg"])
            group.exp_avg_sqs.append(tensors["exp_avg_sq"])
            if has_master:
                group.masters.append(tensors["master"])
        self._groups = sorted(groups.values(), key=lambda g: g.hyper_index)
        self._layout = layout
        return self._groups

    def invalidate(self) -> None:
        """Forces the next :meth:`update_groups` to rebuild (state replaced from outside)."""
        self._groups = None

    def _move(self, device: torch.device) -> None:
        """Moves the step counters, every piece's state and the registered buffers to `device`."""
        self.steps = self.steps.to(device)
        for slot in self.stateful_slots():
            self.set_state(slot, {k: v.to(device) for k, v in self.state_of(slot).items()})
        self.device = device
        for callback in self._on_move:
            callback(device)
