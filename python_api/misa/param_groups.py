"""Parameter groups, as torch.optim takes them: a list of dicts with ``params`` and any of the
AdamW options, each group's options overriding the optimizer's defaults.

Without groups the optimizer has one group holding every trained parameter, and weight decay
applies to all of them, as in ``torch.optim.AdamW(model.parameters(), weight_decay=...)``.
:func:`weight_decay_groups` gives the Hugging Face Trainer's grouping instead (no decay for
biases and normalisation weights).
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import _validation
from .partition import is_trainable

#: the options a group may set; every one is honoured per group by the kernels.
GROUP_OPTIONS = ("lr", "betas", "eps", "weight_decay", "maximize")
#: torch.optim.AdamW options MISA does not implement: refused rather than ignored.
UNSUPPORTED_OPTIONS = ("amsgrad", "foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay")


def weight_decay_groups(model: nn.Module, weight_decay: float,
                        params: Optional[Iterable[nn.Parameter]] = None) -> List[dict]:
    """Two groups, as Hugging Face's Trainer makes them: `weight_decay` for every trainable
    parameter but biases and normalisation weights (parameters named ``*bias`` and those of
    modules whose class name contains "Norm"), 0 for those.

    Args:
        model (nn.Module): the model.
        weight_decay (float): the decay of the first group.
        params (iterable of Parameter, optional): restrict the groups to these (default: every
            trainable parameter of the model).

    Example::

        opt = misa.MISA(model, param_groups=misa.weight_decay_groups(model, 0.1), lr=5e-5)
    """
    wanted = None if params is None else {id(p) for p in params}
    norm_params = {id(p) for module in model.modules() if "norm" in type(module).__name__.lower()
                   for p in module.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if (wanted is not None and id(p) not in wanted) or (wanted is None and not is_trainable(p)):
            continue
        (no_decay if name.endswith("bias") or id(p) in norm_params else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def param_groups_of(model: nn.Module, param_groups: Optional[Sequence[dict]],
                    defaults: dict) -> Tuple[List[dict], List[Tuple[str, nn.Parameter]]]:
    """(the optimizer's groups, the named parameters it trains): without `param_groups`, one
    group of every trainable parameter; with them, the checked groups, whose parameters must
    be trainable (trainable ones in no group are left out, with a warning naming them)."""
    named = list(model.named_parameters(remove_duplicate=True))
    trainable = [(n, p) for n, p in named if is_trainable(p)]
    if param_groups is None:
        return [{**defaults, "params": [p for _, p in trainable]}], trainable
    names = {id(p): n for n, p in named}
    groups = normalize(param_groups, defaults, names)
    in_groups = {id(p) for g in groups for p in g["params"]}
    trainable_ids = {id(p) for _, p in trainable}
    frozen = [names[i] for i in in_groups if i not in trainable_ids]
    if frozen:
        raise ValueError(f"param_groups lists parameters that do not require grad: {', '.join(frozen[:5])}"
                         f"{' and more' if len(frozen) > 5 else ''}; unfreeze them or leave them out")
    left_out = [n for n, p in trainable if id(p) not in in_groups]
    if left_out:
        logging.getLogger("misa").warning(
            "MISA: %d trainable parameters are in no param group and will not be trained: %s%s", len(left_out),
            ", ".join(left_out[:5]), " and more" if len(left_out) > 5 else "")
    return groups, [(n, p) for n, p in trainable if id(p) in in_groups]


def normalize(param_groups: Sequence[dict], defaults: dict, names: Dict[int, str]) -> List[dict]:
    """Checked copies of the user's `param_groups`: each ``params`` entry a parameter of the
    model (`names`: id -> name), listed once in all groups; each option valid; unset options
    taken from `defaults`. Keys that are not AdamW options (a group's name, say) are kept."""
    if isinstance(param_groups, dict) or not isinstance(param_groups, (list, tuple)):
        raise TypeError(f"param_groups must be a list of dicts, got {type(param_groups).__name__}")
    if not param_groups:
        raise ValueError("param_groups is empty")
    seen: Dict[int, str] = {}
    result = []
    for gi, group in enumerate(param_groups):
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"param_groups[{gi}] must be a dict with a 'params' entry, got {group!r}")
        unsupported = sorted(set(group) & set(UNSUPPORTED_OPTIONS))
        if unsupported:
            raise ValueError(f"param_groups[{gi}] sets {', '.join(unsupported)}, which MISA does not implement")
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for pi, p in enumerate(params):
            where = f"param_groups[{gi}]['params'][{pi}]"
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{where} must be a parameter of the model, got {type(p).__name__}")
            if id(p) not in names:
                raise ValueError(f"{where} (shape {tuple(p.shape)}) is not a parameter of the model")
            if id(p) in seen:
                raise ValueError(f"parameter {names[id(p)]} appears in more than one parameter group "
                                 f"({seen[id(p)]} and param_groups[{gi}])")
            seen[id(p)] = f"param_groups[{gi}]"
        checked = {**defaults, **{k: v for k, v in group.items() if k != "params"}}
        checked.update(check_options(checked, f" of param_groups[{gi}]"))
        checked["params"] = params
        result.append(checked)
    return result


def check_options(options: dict, where: str = "") -> dict:
    """The AdamW options of `options`, validated (a tensor lr kept as a 0-dim tensor); `where`
    (" of param_groups[i]") completes the names in error messages."""
    if not isinstance(options["maximize"], bool):
        raise ValueError(f"maximize{where} must be a bool, got {options['maximize']!r}")
    return {
        "lr": _validation.learning_rate(f"learning rate{where}", options["lr"]),
        "betas": _validation.betas(f"betas{where}", options["betas"]),
        "eps": _validation.number(f"epsilon{where}", options["eps"], 0.0),
        "weight_decay": _validation.number(f"weight_decay{where}", options["weight_decay"], 0.0),
        "maximize": options["maximize"],
    }
