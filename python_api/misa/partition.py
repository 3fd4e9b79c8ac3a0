r"""Splitting a model into the units MISA samples: modules of its repeated blocks.

A *block* is an element of an ``nn.ModuleList`` of same-typed, parameter-holding children (the
decoder layers of HF LLaMA / Qwen2 / Mistral at ``model.layers``, GPT-2's ``transformer.h``,
any custom stack kept in a ModuleList). Granularities:

- ``"module"`` (MISA): every submodule of a block owning a parameter of 2+ dims (q, k, v, o,
  gate, up, down in a LLaMA block) is one module, with all of its own parameters (weight and
  bias). One-dimensional parameters of a block (norm weights) are not sampled.
- ``"layer"`` (BAdam / LISA): each block, all of its parameters, is one module.
- ``patterns`` (regular expressions): a parameter whose name matches a pattern belongs to the
  module named by its name up to the end of the match (``model.layers.0.self_attn`` for
  ``r"layers\.\d+\.self_attn"``); each distinct such prefix is one module.

Everything not in a sampled module (embeddings, the LM head, the final norm, norms inside
blocks at module granularity) is *non-block* and is frozen or always trained, by policy.
Only parameters that require grad when the partition is made (or that a MISA optimizer froze)
are considered.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

GRANULARITIES = ("module", "layer")
#: attribute a MISA optimizer sets on the parameters it freezes, so that a later partition of
#: the same model (a second optimizer, a resumed run) still counts them as trainable.
FROZEN_BY_MISA = "_misa_managed"
#: what happens to parameters outside sampled modules.
NON_BLOCK_POLICIES = ("frozen", "embed_head", "trained")


@dataclass(frozen=True)
class Module:
    """One sampling unit: a name, its parameters and their total size."""

    name: str
    param_names: Tuple[str, ...]
    params: Tuple[nn.Parameter, ...] = field(repr=False)
    numel: int
    block: int  # index of its block, -1 for pattern modules outside any block


@dataclass
class Partition:
    """The modules of a model and its non-block parameters, with the numbers a budget needs."""

    modules: List[Module]
    non_block: List[Tuple[str, nn.Parameter]]
    non_block_kind: Dict[str, str]  # parameter name -> "embedding" | "head" | "norm" | "other"
    block_lists: List[str]
    num_blocks: int
    total_params: int  # every parameter of the model, trainable or not (the budget's base)
    granularity: str

    def budget(self, delta: float) -> int:
        """The largest number of parameters active modules may hold at once."""
        return int(delta * self.total_params)

    def non_block_trained(self, policy: str) -> List[Tuple[str, nn.Parameter]]:
        """The non-block parameters trained at every step under `policy`."""
        if policy not in NON_BLOCK_POLICIES:
            raise ValueError(f"unknown non_block policy {policy!r}; choose one of {', '.join(NON_BLOCK_POLICIES)}")
        if policy == "frozen":
            return []
        if policy == "embed_head":
            return [(n, p) for n, p in self.non_block if self.non_block_kind[n] in ("embedding", "head")]
        return list(self.non_block)

    def summary(self, delta: Optional[float] = None) -> str:
        """A readable table: blocks, modules and their sizes, non-block parameters, the budget."""
        sizes = sorted(m.numel for m in self.modules)
        lines = [
            f"MISA partition ({self.granularity}): {len(self.modules)} modules in {self.num_blocks} blocks "
            f"of {', '.join(self.block_lists) or '(patterns)'}",
            f"  model parameters: {_fmt(self.total_params)}; in modules: {_fmt(sum(sizes))}",
        ]
        if sizes:
            lines.append(f"  module size: min {_fmt(sizes[0])}, median {_fmt(sizes[len(sizes) // 2])}, max {_fmt(sizes[-1])}")
        kinds: Dict[str, int] = {}
        for name, p in self.non_block:
            kinds[self.non_block_kind[name]] = kinds.get(self.non_block_kind[name], 0) + p.numel()
        if kinds:
            lines.append("  non-block: " + ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(kinds.items())))
        by_kind: Dict[str, List[int]] = {}
        for m in self.modules:
            by_kind.setdefault(m.name.rsplit(".", 1)[-1] if self.granularity == "module" else "layer", []).append(m.numel)
        lines.append("  per kind: " + ", ".join(f"{k} x{len(v)} ({_fmt(v[0])})" for k, v in by_kind.items()))
        if delta is not None:
            budget = self.budget(delta)
            fits = 0
            used = 0
            for s in sizes:
                if used + s <= budget:
                    used += s
                    fits += 1
            lines.append(f"  budget at delta={delta:g}: {_fmt(budget)} parameters; "
                         f"up to {fits} of the smallest modules fit")
        return "\n".join(lines)


def _fmt(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _unique_named_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """Named parameters, each parameter once (tied weights keep their first name)."""
    return list(model.named_parameters(remove_duplicate=True))


def find_block_lists(model: nn.Module) -> List[str]:
    """Qualified names of the ModuleLists holding the model's repeated blocks: the outermost
    ModuleLists whose children share one type and all own parameters."""
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        types = {type(child) for child in module}
        if len(types) == 1 and all(any(True for _ in child.parameters()) for child in module):
            candidates.append(name)
    outermost = [n for n in candidates if not any(n != o and n.startswith(o + ".") for o in candidates)]
    return outermost


def _non_block_kinds(model: nn.Module, names: Sequence[str], block_prefixes: Sequence[str]) -> Dict[str, str]:
    owner = {}
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            owner[f"{mod_name}.{p_name}" if mod_name else p_name] = mod
    kinds = {}
    for name in names:
        mod = owner.get(name)
        in_block = any(name.startswith(prefix) for prefix in block_prefixes)
        if isinstance(mod, nn.Embedding):
            kinds[name] = "embedding"
        elif isinstance(mod, nn.Linear) and not in_block:
            kinds[name] = "head"
        elif mod is not None and all(p.dim() <= 1 for p in mod.parameters(recurse=False)):
            kinds[name] = "norm"
        else:
            kinds[name] = "other"
    return kinds


def partition(
    model: nn.Module,
    granularity: str = "module",
    patterns: Optional[Sequence[str]] = None,
) -> Partition:
    """Splits `model` into sampling modules (see the module docstring).

    Args:
        model (nn.Module): the model; the meta device works (only shapes are read).
        granularity (str, optional): "module" or "layer" (default: "module"); ignored when
            `patterns` are given.
        patterns (list of str, optional): regular expressions searched in parameter names;
            parameters sharing the name prefix up to the end of the match form one module.

    Raises:
        ValueError: when no blocks are found and no patterns are given, or nothing is sampled.
    """
    named = _unique_named_parameters(model)
    total = sum(p.numel() for _, p in named)
    trainable = [(n, p) for n, p in named if p.requires_grad or getattr(p, FROZEN_BY_MISA, False)]
    block_lists = find_block_lists(model)

    if patterns:
        modules, rest = _by_patterns(trainable, patterns)
        granularity = "pattern"
        num_blocks = len({m.block for m in modules if m.block >= 0})
    else:
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)} "
                             "or pass patterns")
        if not block_lists:
            raise ValueError(
                f"no repeated blocks found in {type(model).__name__}: MISA looks for an nn.ModuleList of "
                "same-typed layers (e.g. model.layers); pass patterns=[...] to name the modules yourself"
            )
        modules, rest, num_blocks = _by_blocks(model, trainable, block_lists, granularity)
    if not modules:
        raise ValueError("the partition holds no trainable module: are the block parameters frozen?")
    prefixes = [b + "." for b in block_lists]
    kinds = _non_block_kinds(model, [n for n, _ in rest], prefixes)
    return Partition(modules, rest, kinds, block_lists, num_blocks, total, granularity)


def _by_blocks(model, trainable, block_lists, granularity):
    trainable_ids = {id(p) for _, p in trainable}
    in_modules = set()
    modules: List[Module] = []
    block_index = 0
    for list_name in block_lists:
        block_list = model.get_submodule(list_name)
        for i, block in enumerate(block_list):
            block_name = f"{list_name}.{i}"
            if granularity == "layer":
                named = [(f"{block_name}.{n}", p) for n, p in block.named_parameters() if id(p) in trainable_ids
                         and id(p) not in in_modules]
                _append(modules, block_name, named, block_index, in_modules)
            else:
                for sub_name, sub in block.named_modules():
                    own = [(n, p) for n, p in sub.named_parameters(recurse=False)
                           if id(p) in trainable_ids and id(p) not in in_modules]
                    if not any(p.dim() >= 2 for _, p in own):
                        continue
                    qualified = f"{block_name}.{sub_name}" if sub_name else block_name
                    _append(modules, qualified, [(f"{qualified}.{n}", p) for n, p in own], block_index, in_modules)
            block_index += 1
    rest = [(n, p) for n, p in trainable if id(p) not in in_modules]
    return modules, rest, block_index


def _append(modules, name, named, block, seen):
    if not named:
        return
    seen.update(id(p) for _, p in named)
    modules.append(Module(name, tuple(n for n, _ in named), tuple(p for _, p in named),
                          sum(p.numel() for _, p in named), block))


def _by_patterns(trainable, patterns):
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ValueError(f"invalid pattern {pattern!r}: {exc}") from exc
    groups: Dict[str, List[Tuple[str, nn.Parameter]]] = {}
    rest = []
    for name, p in trainable:
        match = next((m for m in (c.search(name) for c in compiled) if m), None)
        if match is None:
            rest.append((name, p))
        else:
            groups.setdefault(name[: match.end()].rstrip("."), []).append((name, p))
    modules: List[Module] = []
    seen = set()
    for key, named in groups.items():
        number = re.search(r"\.(\d+)(\.|$)", key)
        _append(modules, key, named, int(number.group(1)) if number else -1, seen)
    return modules, rest
