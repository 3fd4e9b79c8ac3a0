r"""Splitting a model into the units MISA samples: modules of its repeated blocks.

A *block* is an element of an ``nn.ModuleList`` of same-typed, parameter-holding children (the
decoder layers of HF LLaMA / Qwen2 / Mistral / Mixtral at ``model.layers``, GPT-2's
``transformer.h``, any custom stack kept in a ModuleList). Granularities:

- ``"module"`` (MISA): every submodule of a block owning a parameter of 2+ dims (q, k, v, o,
  gate, up, down in a LLaMA block) is one module, with all of its own parameters (weight and
  bias). One-dimensional parameters of a block (norm weights) are not sampled. Two kinds of
  submodule are split or joined differently:

  * **stacked experts**: a parameter of 3+ dims whose leading dimension is the number of
    experts (``num_experts`` / ``num_local_experts`` / ``n_routed_experts`` of the submodule or
    of the model's config; transformers 5 stores every MoE layer's experts this way, as
    ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I]) is split into E
    modules, one per expert, each holding the expert's slice ``weight[e]`` (and the slice of a
    stacked bias named after it, such as ``gate_up_proj_bias[e]``). The router is an ordinary
    module.
  * **adapter layers** (PEFT: a layer wrapping a ``base_layer``, such as LoRA's ``lora_A`` /
    ``lora_B`` / ``lora_magnitude_vector``): every trainable parameter under the wrapped layer
    is one module, so that an adapter's A and B always train together (B starts at zero, so A
    alone would get an exactly zero gradient).

- ``"layer"`` (BAdam / LISA): each block, all of its parameters, is one module.
- ``patterns`` (regular expressions): a parameter whose name matches a pattern belongs to the
  module named by its name up to the end of the match (``model.layers.0.self_attn`` for
  ``r"layers\.\d+\.self_attn"``); each distinct such prefix is one module.

Everything not in a sampled module (embeddings, the LM head, the final norm, norms inside
blocks at module granularity) is *non-block* and is frozen or always trained, by policy.
Only parameters that require grad when the partition is made (or that a MISA optimizer froze
and still manages) are considered, unless the caller names the parameters.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

GRANULARITIES = ("module", "layer")
#: attribute a MISA optimizer sets on the parameters it manages: the ``requires_grad`` value it
#: last gave the parameter. A later partition (a second optimizer, a resumed run) counts a
#: frozen parameter as trainable only while that value still stands, so a parameter the user
#: froze after MISA had made it trainable stays frozen.
FROZEN_BY_MISA = "_misa_requires_grad"
#: what happens to parameters outside sampled modules.
NON_BLOCK_POLICIES = ("frozen", "embed_head", "trained")
#: attributes naming the number of experts, looked up on a submodule and on the model's config.
EXPERT_COUNT_ATTRIBUTES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
#: module kinds
DENSE, EXPERT, ADAPTER = "dense", "expert", "adapter"


@dataclass(frozen=True)
class Piece:
    """One tensor a module trains: a whole parameter, or expert `expert`'s slice ``param[expert]``
    of a parameter stacking the experts on its leading dimension."""

    name: str  # the parameter's name, with "[e]" for an expert slice
    param: nn.Parameter = field(repr=False)
    expert: Optional[int] = None

    @property
    def shape(self) -> torch.Size:
        return self.param.shape if self.expert is None else self.param.shape[1:]

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This piece of `tensor` (the parameter, its gradient): a view for an expert slice."""
        return tensor if self.expert is None else tensor[self.expert]


@dataclass(frozen=True)
class Module:
    """One sampling unit: a name, its pieces (whole parameters or expert slices), their total size."""

    name: str
    pieces: Tuple[Piece, ...] = field(repr=False)
    numel: int
    block: int  # index of its block, -1 for pattern modules outside any block
    kind: str = DENSE  # "dense", "expert" (one expert's slices) or "adapter" (a PEFT layer's adapters)

    @property
    def params(self) -> Tuple[nn.Parameter, ...]:
        """The parameters this module touches, each once (a sliced one is shared with other experts)."""
        unique: Dict[int, nn.Parameter] = {}
        for piece in self.pieces:
            unique.setdefault(id(piece.param), piece.param)
        return tuple(unique.values())

    @property
    def param_names(self) -> Tuple[str, ...]:
        return tuple(piece.name for piece in self.pieces)


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
        """A readable table: blocks, modules and their sizes, experts and adapters, non-block
        parameters, the budget."""
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
            by_kind.setdefault(_kind_label(m, self.granularity), []).append(m.numel)
        lines.append("  per kind: " + ", ".join(f"{k} x{len(v)} ({_fmt(v[0])})" for k, v in by_kind.items()))
        experts = [m for m in self.modules if m.kind == EXPERT]
        if experts:
            stacks = sorted({p.name.rsplit("[", 1)[0] for m in experts for p in m.pieces})
            per_stack = len(experts) // max(len({m.name.rsplit("[", 1)[0] for m in experts}), 1)
            lines.append(f"  experts: {len(experts)} modules, one per expert slice ({per_stack} experts in each of "
                         f"{len(stacks)} stacked tensors, e.g. {stacks[0]}[e]): each expert has its own score, "
                         "gradient norm, fp32 master and moments")
        adapters = [m for m in self.modules if m.kind == ADAPTER]
        if adapters:
            lines.append(f"  adapters: {len(adapters)} modules, one per adapted layer (its adapters train together)")
        if delta is not None:
            budget = self.budget(delta)
            fits = 0
            used = 0
            for s in sizes:
                if used + s <= budget:
                    used += s
                    fits += 1
            too_big = sum(1 for s in sizes if s > budget)
            lines.append(f"  budget at delta={delta:g}: {_fmt(budget)} parameters; "
                         f"up to {fits} of the smallest modules fit"
                         + (f"; {too_big} modules are larger than the budget" if too_big else ""))
        return "\n".join(lines)


def _kind_label(module: Module, granularity: str) -> str:
    if granularity != "module":
        return granularity
    last = module.name.rsplit(".", 1)[-1]
    return re.sub(r"\[\d+\]$", "[e]", last)


def _fmt(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _unique_named_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """Named parameters, each parameter once (tied weights keep their first name)."""
    return list(model.named_parameters(remove_duplicate=True))


def is_trainable(p: nn.Parameter) -> bool:
    """Whether `p` requires grad, or a MISA optimizer froze it and nobody changed that since."""
    return p.requires_grad or getattr(p, FROZEN_BY_MISA, None) is False


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
    *,
    params: Optional[Iterable[nn.Parameter]] = None,
) -> Partition:
    """Splits `model` into sampling modules (see the module docstring).

    Args:
        model (nn.Module): the model; the meta device works (only shapes are read).
        granularity (str, optional): "module" or "layer" (default: "module"); ignored when
            `patterns` are given.
        patterns (list of str, optional): regular expressions searched in parameter names;
            parameters sharing the name prefix up to the end of the match form one module.
        params (iterable of Parameter, optional): the parameters to partition (default: those
            that require grad, or that a MISA optimizer froze and still manages).

    Raises:
        ValueError: when no blocks are found and no patterns are given, or nothing is sampled.
    """
    named = _unique_named_parameters(model)
    total = sum(p.numel() for _, p in named)
    if params is None:
        trainable = [(n, p) for n, p in named if is_trainable(p)]
    else:
        wanted = {id(p) for p in params}
        trainable = [(n, p) for n, p in named if id(p) in wanted]
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
    for block_index, (block_name, block) in enumerate(
            (f"{list_name}.{i}", block) for list_name in block_lists
            for i, block in enumerate(model.get_submodule(list_name))):
        if granularity == "layer":
            named = [(f"{block_name}.{n}", p) for n, p in block.named_parameters() if id(p) in trainable_ids
                     and id(p) not in in_modules]
            _append(modules, block_name, named, block_index, in_modules)
            continue
        adapted = [sub_name for sub_name, sub in block.named_modules() if _is_adapter_layer(sub)]
        for sub_name, sub in block.named_modules():
            qualified = f"{block_name}.{sub_name}" if sub_name else block_name
            if any(sub_name != a and sub_name.startswith(a + ".") for a in adapted):
                continue  # inside an adapter layer: taken whole with it
            if sub_name in adapted:
                named = [(f"{qualified}.{n}", p) for n, p in sub.named_parameters()
                         if id(p) in trainable_ids and id(p) not in in_modules]
                _append(modules, qualified, named, block_index, in_modules, ADAPTER)
                continue
            own = [(n, p) for n, p in sub.named_parameters(recurse=False)
                   if id(p) in trainable_ids and id(p) not in in_modules]
            stacks = _expert_stacks(model, sub, own)
            for stem, (count, members) in stacks.items():
                for e in range(count):
                    pieces = [Piece(f"{qualified}.{n}[{e}]", p, e) for n, p in members]
                    modules.append(Module(f"{qualified}.{stem}[{e}]", tuple(pieces),
                                          sum(piece.numel for piece in pieces), block_index, EXPERT))
                in_modules.update(id(p) for _, p in members)
            own = [(n, p) for n, p in own if id(p) not in in_modules]
            if any(p.dim() >= 2 for _, p in own):
                _append(modules, qualified, [(f"{qualified}.{n}", p) for n, p in own], block_index, in_modules)
    rest = [(n, p) for n, p in trainable if id(p) not in in_modules]
    return modules, rest, sum(len(model.get_submodule(name)) for name in block_lists)


def _is_adapter_layer(module: nn.Module) -> bool:
    """A PEFT tuner layer: it wraps the original layer as ``base_layer`` and adds adapters."""
    return isinstance(getattr(module, "base_layer", None), nn.Module)


def _expert_count(model: nn.Module, sub: nn.Module) -> Optional[int]:
    for holder in (sub, getattr(model, "config", None)):
        for attribute in EXPERT_COUNT_ATTRIBUTES:
            value = getattr(holder, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                return value
    return None


def _expert_stacks(model, sub, own) -> Dict[str, Tuple[int, List[Tuple[str, nn.Parameter]]]]:
    """The parameters of `sub` that stack its experts on their leading dimension, by stem:
    each 3+-dim parameter with E leading entries, joined by the E-leading parameters named
    after it (a stacked bias ``<stem>_bias`` or ``<stem>.bias``)."""
    if isinstance(sub, nn.modules.conv._ConvNd):
        return {}
    count = _expert_count(model, sub)
    if count is None:
        return {}
    stacked = [(n, p) for n, p in own if p.dim() >= 2 and p.shape[0] == count]
    stems = [n for n, p in stacked if p.dim() >= 3]
    stacks: Dict[str, Tuple[int, List[Tuple[str, nn.Parameter]]]] = {stem: (count, []) for stem in stems}
    for n, p in stacked:
        stem = n if n in stacks else next((s for s in stems if n.startswith(s + "_") or n.startswith(s + ".")), None)
        if stem is not None:
            stacks[stem][1].append((n, p))
    return stacks


def _append(modules, name, named, block, seen, kind=DENSE):
    if not named:
        return
    seen.update(id(p) for _, p in named)
    pieces = tuple(Piece(n, p) for n, p in named)
    modules.append(Module(name, pieces, sum(p.numel() for _, p in named), block, kind))


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
