r"""Memory accounting: the bytes that training a model takes with AdamW, LoRA, LISA, BAdam or MISA.

:func:`estimate` counts, from shapes alone (build 7B/8B models on the ``meta`` device: nothing is
allocated), the bytes of six categories:

- **weights**: every parameter in the model's dtype, plus LoRA adapters in theirs.
- **gradients**: one gradient per trained parameter, in the parameter's dtype (this package and
  torch keep no fp32 gradient copy); ``fp32_grad_copy=True`` adds the 4-byte fp32 copy that the
  released MISA code, BAdam and HF mixed precision keep (spec section 3: 18 bytes per trained
  parameter instead of this package's 14).
- **masters**: an fp32 copy of each trained 16-bit parameter (``master_weights=True``).
- **moments**: AdamW's m and v in fp32, 8 bytes per trained parameter.
- **activations** (with ``batch`` and ``seq_len``): the tensors autograd saves in the forward
  pass for the backward, for LLaMA-style blocks (see :func:`_block_activations`).
- **transients** (with ``batch`` and ``seq_len``): the buffers of the loss that live beside the
  saved activations without being saved: in the backward pass, the gradients of the fp32
  log-probabilities and of the fp32 logits, 8 bytes per logit (batch x seq_len x vocabulary);
  the forward pass's bf16 logits and their fp32 copy (6 bytes per logit) are fewer. At 2 x 1024
  tokens this is 0.52 GB for LLaMA-2-7B, 2.1 GB for LLaMA-3-8B (vocabulary 128256).

What is trained, per method (``delta`` is the fraction of all parameters, as in :class:`misa.MISA`):

=========  ===================================================================================
adamw      every parameter. With a 16-bit model and ``master_weights``: 2 + 2 + 4 + 8 = 16 bytes
           per parameter (mixed precision); ``master_weights=False``: 12 (pure 16-bit weights,
           fp32 moments); fp32 model: 4 + 4 + 8 = 16.
lora       adapters of rank r on the ``lora_targets`` linears (A: r x in, B: out x r), in
           ``lora_dtype`` (fp32, as peft's ``get_peft_model`` makes them); the base is frozen.
lisa       ``n_layers`` whole blocks (default: as many as fit ``delta``), plus embedding, head and
           final norm at every step.
badam      one whole block; embedding and head frozen.
misa       the modules (q, k, v, o, gate, up, down) that best fill the budget ``delta * P``;
           embedding, head and norms frozen by default (``non_block`` as in :class:`misa.MISA`).
=========  ===================================================================================

Without ``active``, the sampled methods are counted at their largest active set, taken from
the lowest blocks (so that the backward pass reaches every block: the worst case for
activations); ``active=[module names]`` counts one particular set. The total is the sum of the
categories: an upper bound of the peak (the loss's buffers are gone before the backward pass
recomputes a checkpointed block and before most gradients exist), apart from the allocator's
overhead and the smaller activation gradients inside a block. What the estimate assumes:

- the tensors PyTorch's autograd saves for :mod:`misa_examples.models` and Hugging Face's
  ``LlamaForCausalLM`` (SDPA attention saving q, k, v, its output and the log-sum-exp, as the
  CPU's and CUDA's flash and memory-efficient kernels do; an eager attention would also save
  the batch x heads x seq_len^2 probabilities), and the loss computed on fp32 logits;
- with ``checkpointing``, non-reentrant checkpointing of every block: each block that passes a
  gradient keeps its input, and one block at a time holds its saved tensors in the backward
  (Hugging Face's ``activation_checkpointing_enable`` makes the embedding's output require a
  gradient, so that every block passes one: the default largest set, in the lowest blocks,
  counts that);
- a switch of the active set frees the state of the modules dropped before it creates the
  state of those added: the peak holds one active set's state;
- nothing of the device: no CUDA context, no caching-allocator rounding or
  fragmentation, no cuBLAS workspace.

Measured against it: ``bench/memory_measured.py`` (a 7B-shaped Hugging Face model on the CPU,
torch's allocator bytes at their peak; tests/test_memory_measured.py at a small shape).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from misa_examples import models
from .partition import NON_BLOCK_POLICIES, find_block_lists, partition

METHODS = ("adamw", "lora", "lisa", "badam", "misa")
#: the seven linears of a LLaMA block, each a MISA module and, by default, a LoRA target.
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: what each method trains outside sampled blocks unless told otherwise.
DEFAULT_NON_BLOCK = {"lisa": "trained", "badam": "frozen", "misa": "frozen"}
#: the largest number of module-count combinations searched for the best budget fill.
MAX_FILL_COMBINATIONS = 2_000_000
FP32_BYTES = 4
MOMENT_BYTES = 8  # AdamW's m and v in fp32
INDEX_BYTES = 8  # int64 token ids, saved by the embedding and the loss
#: per logit, the loss's backward buffers beside the saved fp32 log-probabilities: the gradients
#: of the log-probabilities and of the fp32 logits.
LOSS_BUFFER_BYTES = 8

#: names inside a LLaMA block -> the kind used by the activation model.
_BLOCK_KINDS = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
                "self_attn.o_proj": "o", "mlp.gate_proj": "gate", "mlp.up_proj": "up",
                "mlp.down_proj": "down", "input_layernorm": "norm1", "post_attention_layernorm": "norm2"}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by category for one method; `total` is their sum, `optimizer` the part that the
    choice of optimizer changes (gradients + masters + moments)."""

    method: str
    weights: int
    gradients: int
    masters: int
    moments: int
    activations: int
    transients: int
    trained_params: int
    total_params: int
    description: str = ""

    @property
    def optimizer(self) -> int:
        return self.gradients + self.masters + self.moments

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations + self.transients

    def as_dict(self) -> dict:
        return {**asdict(self), "optimizer": self.optimizer, "total": self.total}


@dataclass(frozen=True)
class _Arch:
    """The shapes the activation model needs, from a LLaMA-style config."""

    hidden: int
    intermediate: int
    heads: int
    vocab: int
    layers: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def estimate(
    model_or_config: Union[nn.Module, models.LlamaConfig, str],
    method: str,
    *,
    delta: float = 0.03,
    dtype: Optional[torch.dtype] = None,
    master_weights: bool = True,
    fp32_grad_copy: bool = False,
    non_block: Optional[str] = None,
    active: Optional[Sequence[str]] = None,
    n_layers: Optional[int] = None,
    rank: int = 8,
    lora_targets: Sequence[str] = LLAMA_LINEARS,
    lora_dtype: torch.dtype = torch.float32,
    batch: Optional[int] = None,
    seq_len: Optional[int] = None,
    checkpointing: bool = False,
) -> MemoryEstimate:
    """Bytes by category for training `model_or_config` with `method` (see the module docstring).

    Args:
        model_or_config (nn.Module, LlamaConfig or str): a model (any device, ``meta`` included),
            a :class:`misa_examples.models.LlamaConfig`, or a name in :data:`misa_examples.models.CONFIGS`.
        method (str): "adamw", "lora", "lisa", "badam" or "misa".
        delta (float, optional): budget of misa (and of lisa without `n_layers`), a fraction of
            all parameters in (0, 1] (default: 0.03).
        dtype (torch.dtype, optional): the weights' dtype; default: the model's, bfloat16 for a
            config.
        master_weights (bool, optional): fp32 masters for trained 16-bit weights (default: True).
        fp32_grad_copy (bool, optional): add an fp32 gradient copy per trained parameter, as the
            released MISA code and BAdam keep (default: False, this package keeps none).
        non_block (str, optional): "frozen", "embed_head" or "trained" for lisa, badam and misa;
            default: the method's own (lisa trains embedding, head and final norm).
        active (list of str, optional): names of the active modules (as in
            ``MISA.active_modules``) instead of the largest set.
        n_layers (int, optional): lisa's number of active blocks.
        rank (int, optional): LoRA rank (default: 8).
        lora_targets (list of str, optional): names of the linears LoRA adapts (default: the
            seven of a LLaMA block).
        lora_dtype (torch.dtype, optional): the adapters' dtype (default: float32).
        batch, seq_len (int, optional): give both for the activation and transient estimates
            (LLaMA-style models only); without them both count 0.
        checkpointing (bool, optional): activation checkpointing of every block (default: False).

    Raises:
        ValueError: unknown method or config, bad budget or rank, unknown active modules, or an
            activation estimate asked for a model that is not LLaMA-style.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta <= 1.0:
        raise ValueError(f"delta must lie in (0, 1] (a fraction of all model parameters), got {delta!r}")
    if (batch is None) != (seq_len is None):
        raise ValueError("give both batch and seq_len for the activation estimate, or neither")
    for label, value in (("batch", batch), ("seq_len", seq_len)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    if method == "lora" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
    if active is not None and method in ("adamw", "lora"):
        raise ValueError(f"active modules only apply to lisa, badam and misa, not {method!r}")
    if n_layers is not None and method != "lisa":
        raise ValueError(f"n_layers only applies to lisa, not {method!r}")
    if non_block is not None and method not in DEFAULT_NON_BLOCK:
        raise ValueError(f"non_block only applies to lisa, badam and misa, not {method!r}")
    if non_block is not None and non_block not in NON_BLOCK_POLICIES:
        raise ValueError(f"unknown non_block policy {non_block!r}; choose one of {', '.join(NON_BLOCK_POLICIES)}")

    model, config = _model_and_config(model_or_config, dtype)
    named = list(model.named_parameters(remove_duplicate=True))
    total_params = sum(p.numel() for _, p in named)

    def weight_bytes(p: torch.Tensor) -> int:
        return p.numel() * (dtype.itemsize if dtype is not None and p.is_floating_point() else p.element_size())

    trained, adapters, description = _trained_parameters(model, method, delta, non_block, active, n_layers,
                                                         rank, lora_targets)
    trained_numel = sum(p.numel() for _, p in trained)
    lora_numel = sum(r * (fan_in + fan_out) for _, fan_in, fan_out, r in adapters)
    lora_bytes = lora_dtype.itemsize
    weights = sum(weight_bytes(p) for _, p in named) + lora_numel * lora_bytes
    gradients = sum(weight_bytes(p) for _, p in trained) + lora_numel * lora_bytes
    if fp32_grad_copy:
        gradients += FP32_BYTES * trained_numel
    masters = 0
    if master_weights:
        masters = FP32_BYTES * sum(p.numel() for _, p in trained if weight_bytes(p) < FP32_BYTES * p.numel())
    moments = MOMENT_BYTES * (trained_numel + lora_numel)

    activations = transients = 0
    if batch is not None:
        arch = _arch(config, model)
        floating = next(p for _, p in named if p.is_floating_point())
        element = dtype.itemsize if dtype is not None else floating.element_size()
        activations = _activations(arch, find_block_lists(model), [n for n, _ in trained],
                                   [n for n, *_ in adapters], rank, element, lora_bytes, batch, seq_len,
                                   checkpointing)
        transients = LOSS_BUFFER_BYTES * batch * seq_len * arch.vocab
    return MemoryEstimate(method, weights, gradients, masters, moments, activations, transients,
                          trained_numel + lora_numel, total_params, description)


# ---------------------------------------------------------------------------- what is trained


def _model_and_config(model_or_config, dtype) -> Tuple[nn.Module, Optional[object]]:
    if isinstance(model_or_config, str):
        if model_or_config not in models.CONFIGS:
            raise ValueError(f"unknown config {model_or_config!r}; choose one of {', '.join(models.CONFIGS)} "
                             "or pass a LlamaConfig or a model")
        model_or_config = models.CONFIGS[model_or_config]
    if isinstance(model_or_config, models.LlamaConfig):
        return _meta_model(model_or_config, dtype or torch.bfloat16), model_or_config
    if isinstance(model_or_config, nn.Module):
        return model_or_config, getattr(model_or_config, "config", None)
    raise TypeError(f"expected a model, a LlamaConfig or a config name, got {type(model_or_config).__name__}")


@functools.lru_cache(maxsize=8)
def _meta_model(config: models.LlamaConfig, dtype: torch.dtype) -> nn.Module:
    """The model of `config` on the meta device (shapes only), built once per config and dtype."""
    return models.build(config, "meta", dtype)


def _trained_parameters(model, method, delta, non_block, active, n_layers, rank, lora_targets):
    """(trained (name, parameter) pairs, LoRA adapters as (name, in, out, rank), description)."""
    if method == "adamw":
        return list(model.named_parameters(remove_duplicate=True)), [], "every parameter"
    if method == "lora":
        adapters = [(name, m.in_features, m.out_features, rank) for name, m in model.named_modules()
                    if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in lora_targets]
        if not adapters:
            raise ValueError(f"no nn.Linear named {', '.join(lora_targets)} in {type(model).__name__}: "
                             "nothing for LoRA to adapt; pass lora_targets")
        return [], adapters, f"rank {rank} on {len(adapters)} linears"

    part = partition(model, "module" if method == "misa" else "layer")
    policy = non_block or DEFAULT_NON_BLOCK[method]
    budget = part.budget(delta)
    sizes = [m.numel for m in part.modules]
    if active is not None:
        by_name = {m.name: i for i, m in enumerate(part.modules)}
        unknown = [n for n in active if n not in by_name]
        if unknown:
            raise ValueError(f"active modules not in the {part.granularity} partition: {unknown[:3]}")
        chosen = [by_name[n] for n in active]
    elif method == "badam":
        chosen = [0]
    elif method == "lisa" and n_layers is not None:
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= len(sizes):
            raise ValueError(f"n_layers must be an int in [1, {len(sizes)}], got {n_layers!r}")
        chosen = list(range(n_layers))
    else:
        if budget < min(sizes):
            raise ValueError(f"delta={delta:g} allows {budget} parameters, fewer than the smallest "
                             f"{'module' if method == 'misa' else 'block'} ({min(sizes)} parameters)")
        chosen = _largest_fill(sizes, budget)
    trained = [(n, p) for i in chosen for n, p in zip(part.modules[i].param_names, part.modules[i].params)]
    trained += part.non_block_trained(policy)
    unit = "modules" if method == "misa" else "blocks"
    description = f"{len(chosen)} {unit} ({_fmt(sum(sizes[i] for i in chosen))}), non-block {policy}"
    return trained, [], description


def _largest_fill(sizes: Sequence[int], budget: int) -> List[int]:
    """Indices of modules whose sizes sum to the most that fits `budget`, the first modules of
    each size (lowest blocks first). Exact by enumeration over module counts per size (few
    distinct sizes in transformer blocks); beyond MAX_FILL_COMBINATIONS, largest-first greedy."""
    by_size: Dict[int, List[int]] = {}
    for index, size in enumerate(sizes):
        by_size.setdefault(size, []).append(index)
    distinct = sorted(by_size, reverse=True)
    others, smallest = distinct[:-1], distinct[-1]
    if math.prod(len(by_size[s]) + 1 for s in others) > MAX_FILL_COMBINATIONS:
        counts, used = [], 0
        for s in distinct:
            take = min(len(by_size[s]), (budget - used) // s)
            counts.append(take)
            used += take * s
    else:
        best, counts = -1, []
        for combo in itertools.product(*(range(len(by_size[s]) + 1) for s in others)):
            used = sum(c * s for c, s in zip(combo, others))
            if used > budget:
                continue
            take = min(len(by_size[smallest]), (budget - used) // smallest)
            if used + take * smallest > best:
                best, counts = used + take * smallest, [*combo, take]
    return sorted(i for s, c in zip(distinct, counts) for i in by_size[s][:c])


# ---------------------------------------------------------------------------- activations


def _arch(config, model) -> _Arch:
    fields = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size", "num_hidden_layers")
    if config is None or not all(hasattr(config, f) for f in fields):
        raise ValueError(f"the activation estimate needs a LLaMA-style config ({', '.join(fields)}) on "
                         f"{type(model).__name__}.config; leave batch and seq_len out to skip it")
    return _Arch(config.hidden_size, config.intermediate_size, config.num_attention_heads, config.vocab_size,
                 config.num_hidden_layers)


def _locate(name: str, block_lists: Sequence[str]) -> Tuple[int, str]:
    """(block index, kind) of a parameter or linear name; block -1 for the embedding ("embedding"),
    the final norm ("norm") and the LM head ("head")."""
    for prefix in block_lists:
        if name.startswith(prefix + "."):
            index, _, rest = name[len(prefix) + 1:].partition(".")
            for key, kind in _BLOCK_KINDS.items():
                if rest == key or rest.startswith(key + "."):
                    return int(index), kind
            raise ValueError(f"the activation estimate knows LLaMA blocks ({', '.join(_BLOCK_KINDS)}); "
                             f"{name!r} is none of them")
    if "embed" in name:
        return -1, "embedding"
    if "lm_head" in name:
        return -1, "head"
    if "norm" in name:
        return -1, "norm"
    raise ValueError(f"the activation estimate cannot place {name!r} (not in a block, not the embedding, "
                     "final norm or LM head)")


def _activations(arch: _Arch, block_lists, trained_names, lora_names, rank, element, lora_element, batch,
                 seq_len, checkpointing) -> int:
    trained: Dict[int, Set[str]] = {}
    for name in trained_names:
        block, kind = _locate(name, block_lists)
        trained.setdefault(block, set()).add(kind)
    lora: Dict[int, Set[str]] = {}
    for name in lora_names:
        block, kind = _locate(name, block_lists)
        lora.setdefault(block, set()).add(kind)
    outside = trained.get(-1, set())
    tokens, predicted = batch * seq_len, batch * (seq_len - 1)
    grad = "embedding" in outside
    per_block, needs_rotary, reached = [], False, []
    for b in range(arch.layers):
        saved, grad_out, rotary = _block_activations(arch, element, trained.get(b, set()), lora.get(b, set()),
                                                     lora_element, rank, grad)
        per_block.append(saved)
        needs_rotary |= rotary
        reached.append(grad or bool(trained.get(b)) or bool(lora.get(b)))
        grad = grad_out
    h = arch.hidden
    head = 0
    if grad:
        head += FP32_BYTES * h + FP32_BYTES  # the final RMSNorm's fp32 input and 1/rms
    if "norm" in outside:
        head += element * h
    if "head" in outside:
        head += element * h  # the head's input
    total = head * tokens + (FP32_BYTES * arch.vocab + INDEX_BYTES) * predicted  # fp32 log-softmax, targets
    if "embedding" in outside:
        total += INDEX_BYTES * tokens
    if needs_rotary:
        total += 2 * seq_len * arch.head_dim * element  # cos and sin, shared by every block
    if checkpointing:
        total += sum(element * h * tokens for r in reached if r) + max(per_block) * tokens
    else:
        total += sum(per_block) * tokens
    return total


def _block_activations(arch: _Arch, e: int, trained: Set[str], lora: Set[str], lora_e: int, rank: int,
                       grad_in: bool) -> Tuple[int, bool, bool]:
    """Bytes per token that one LLaMA block saves for the backward pass, whether its output needs
    a gradient, and whether its rotary embedding saved cos and sin.

    Counted as PyTorch autograd saves them for :mod:`misa_examples.models` (and HF LLaMA), `e` bytes per
    activation element: each RMSNorm passing a gradient saves its fp32 input and 1/rms
    (4h + 4), and its normalised input when its weight trains (e*h); attention saves q, k and v
    (repeated to every head), its output and the fp32 log-sum-exp (4*e*h + 4*heads); SwiGLU saves
    the gate's input to silu and up's output (2*e*i) when the gate path needs a gradient, and
    silu's output (e*i) when the up path does. A linear saves its input only when its weight
    trains (o_proj reads the attention output, already saved, unless nothing before it needs a
    gradient); frozen linears save nothing. LoRA's A saves the linear's input (a private copy
    when peft casts it to the adapters' dtype) and B saves A's output (r values).
    """
    h, i = arch.hidden, arch.intermediate
    saved = 0

    def needs_grad(kind: str) -> bool:
        return kind in trained or kind in lora

    def linear_inputs(kinds: Tuple[str, ...], width: int, already_saved: bool = False) -> None:
        nonlocal saved
        if not already_saved and any(k in trained or (k in lora and lora_e == e) for k in kinds):
            saved += e * width
        saved += sum(lora_e * width for k in kinds if k in lora and lora_e != e)
        saved += sum(lora_e * rank for k in kinds if k in lora)

    if grad_in:
        saved += FP32_BYTES * h + FP32_BYTES
    if "norm1" in trained:
        saved += e * h
    normed = grad_in or "norm1" in trained
    linear_inputs(("q", "k", "v"), h)
    attention = normed or any(needs_grad(k) for k in ("q", "k", "v"))
    rotary = normed or needs_grad("q") or needs_grad("k")
    if attention:
        saved += 4 * e * h + FP32_BYTES * arch.heads
    linear_inputs(("o",), h, already_saved=attention)
    residual = grad_in or attention or needs_grad("o")
    if residual:
        saved += FP32_BYTES * h + FP32_BYTES
    if "norm2" in trained:
        saved += e * h
    normed2 = residual or "norm2" in trained
    linear_inputs(("gate", "up"), h)
    gate = normed2 or needs_grad("gate")
    up = normed2 or needs_grad("up")
    if gate:
        saved += 2 * e * i
    if up:
        saved += e * i
    linear_inputs(("down",), i)
    return saved, residual or gate or up or needs_grad("down"), rotary


# ---------------------------------------------------------------------------- measurement


def measure(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> MemoryEstimate:
    """Bytes of the live tensors of `model` and `optimizer` by category, to set beside
    :func:`estimate`: weights (parameter storages, each once), gradients (``.grad`` of every
    parameter), masters (optimizer state entries named "master") and moments (every other state
    tensor). Activations are not live at rest: see :func:`saved_tensor_bytes`."""
    storages: Dict[int, int] = {}
    gradients = trained = 0
    for p in model.parameters():
        storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
        if p.grad is not None:
            gradients += p.grad.numel() * p.grad.element_size()
            trained += p.numel()
    masters = moments = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):
                    size = value.numel() * value.element_size()
                    if key == "master":
                        masters += size
                    else:
                        moments += size
    total = sum(p.numel() for p in model.parameters())
    return MemoryEstimate("measured", sum(storages.values()), gradients, masters, moments, 0, 0, trained, total)


def saved_tensor_bytes(model: nn.Module, run: Callable[[], object]) -> int:
    """Bytes of the tensors autograd saves for the backward pass while `run()` executes
    (typically the forward pass and loss), each storage once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def _fmt(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
