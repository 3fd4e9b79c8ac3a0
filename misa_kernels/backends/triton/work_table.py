"""The work table of a multi-tensor launch: one int64 buffer that tells every program which
chunk of which tensor it owns, and tells the finalize program which chunks form each module.

Why offsets and not addresses: Triton's interpreter cannot load a pointer from memory, so each
role (params, grads, exp_avgs, ...) is passed as one base tensor, the one with the lowest
address, and the table holds every tensor's element offset from it (``(data_ptr - base_ptr) /
element_size``, never negative). On a GPU the same table works unchanged.

Layout (int64; float scalars are stored as their float64 bit patterns)::

    header    [HEADER_SLOTS]             num_modules, num_present, present_at, presence_at,
                                         then the op's float64 scalars from SCALARS_AT on
    chunks    [num_chunks, 3]            tensor_at (where the chunk's tensor row is), start, length
    tensors   [num_tensors, 1 + roles]   module, then one element offset per role
    present   [num_present, 3]           module, first chunk, end chunk; modules ascending
    presence  [num_modules]              1 where a tensor (even an empty one) belongs to the module

Chunks are ordered by module, then by tensor, then by position, so every module owns one
contiguous run of chunks and a per-chunk result reduces per module in a fixed order
(deterministic, whatever order the programs ran in). Empty tensors own no chunk but still
make their module present.

The header carries the float scalars because Triton passes a Python float as float32, and lr
and the betas are needed in float64. The table is built on the host at every call and copied
with one non-blocking copy from pinned memory, so the host never waits for the device. Sizes
and offsets are 64-bit; a chunk's length fits in 32 bits. Learned from PyTorch's and apex's ``multi_tensor_apply`` (a per-block
tensor and chunk index), redone with offsets for the interpreter.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

#: header length; also keeps the chunk rows 16-byte aligned.
HEADER_SLOTS = 16
NUM_MODULES_SLOT, NUM_PRESENT_SLOT, PRESENT_AT_SLOT, PRESENCE_AT_SLOT = 0, 1, 2, 3
SCALARS_AT = 4
#: widest vector load the alignment hint promises (16 bytes, as PyTorch's multi_tensor_apply).
VECTOR_BYTES = 16

# the same constants for the kernels (a @triton.jit function reads only constexpr globals)
_HEADER_SLOTS = tl.constexpr(HEADER_SLOTS)
_NUM_MODULES_SLOT = tl.constexpr(NUM_MODULES_SLOT)
_NUM_PRESENT_SLOT = tl.constexpr(NUM_PRESENT_SLOT)
_PRESENT_AT_SLOT = tl.constexpr(PRESENT_AT_SLOT)
_PRESENCE_AT_SLOT = tl.constexpr(PRESENCE_AT_SLOT)
_VECTOR_BITS = tl.constexpr(8 * VECTOR_BYTES)


@dataclass(frozen=True)
class LaunchConfig:
    """Per-device sizes: elements per chunk (one program each), per loop step, warps."""

    chunk_size: int
    block: int
    num_warps: int


#: GPU (not yet tuned on one): 16K-element chunks, so that a step of a few million elements
#: still gives every SM of an H100 several programs.
GPU_CONFIG = LaunchConfig(chunk_size=16384, block=1024, num_warps=4)
#: Interpreter: every program costs milliseconds of Python, so fewer, larger chunks and steps.
INTERPRETER_CONFIG = LaunchConfig(chunk_size=65536, block=8192, num_warps=1)
#: elements per loop step of the one-program finalize kernels.
FINALIZE_BLOCK = 1024


def launch_config(device: torch.device, chunk_size: Optional[int] = None) -> LaunchConfig:
    """The sizes for `device` (the interpreter runs on CPU tensors); `chunk_size` overrides the
    chunk (a multiple of 16 elements, so chunk starts keep 16-byte vector alignment)."""
    config = GPU_CONFIG if device.type == "cuda" else INTERPRETER_CONFIG
    if chunk_size is None:
        return config
    if chunk_size <= 0 or chunk_size % 16:
        raise ValueError(f"chunk_size must be a positive multiple of 16, got {chunk_size}")
    block = min(config.block, 1 << (chunk_size.bit_length() - 1))
    return LaunchConfig(chunk_size, block, config.num_warps)


def device_guard(device: torch.device):
    """Makes `device` current while launching, so Triton picks its stream (a no-op on CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@dataclass(frozen=True)
class WorkTable:
    """A built table on the op's device, with the base tensor of each role (None when the role
    has no element at all) and whether every offset is a whole number of 16-byte vectors."""

    table: torch.Tensor
    bases: Tuple[Optional[torch.Tensor], ...]
    num_chunks: int
    aligned: bool


def _role_offsets(name: str, tensors: Sequence[torch.Tensor]) -> Tuple[Optional[torch.Tensor], List[int], bool]:
    """(base tensor, element offset of each tensor from it, all offsets vector-aligned)."""
    live = [i for i, t in enumerate(tensors) if t.numel() > 0]
    if not live:
        return None, [0] * len(tensors), True
    base_index = min(live, key=lambda i: tensors[i].data_ptr())
    base_ptr = tensors[base_index].data_ptr()
    size = tensors[base_index].element_size()
    offsets = [0] * len(tensors)
    for i in live:
        delta = tensors[i].data_ptr() - base_ptr
        if delta % size:
            raise ValueError(
                f"{name}[{i}] starts {delta} bytes after {name}[{base_index}], not a whole number of "
                f"{size}-byte elements; the triton backend needs tensors aligned to their element size")
        offsets[i] = delta // size
    vector = max(1, VECTOR_BYTES // size)
    return tensors[base_index], offsets, all(o % vector == 0 for o in offsets)


def _float_bits(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float64).view(torch.int64)


def build(
    roles: Dict[str, Sequence[torch.Tensor]],
    module_ids: Sequence[int],
    num_modules: int,
    device: torch.device,
    chunk_size: int,
    scalars: Sequence[float] = (),
) -> WorkTable:
    """Builds the table for tensors given per role (same numel at each index) and copies it to
    `device` without waiting. `scalars` go to the header as float64, from SCALARS_AT on."""
    if SCALARS_AT + len(scalars) > HEADER_SLOTS:
        raise ValueError(f"at most {HEADER_SLOTS - SCALARS_AT} header scalars, got {len(scalars)}")
    bases, offsets, aligned = [], [], True
    for name, tensors in roles.items():
        base, role_offsets, role_aligned = _role_offsets(name, tensors)
        bases.append(base)
        offsets.append(role_offsets)
        aligned = aligned and role_aligned
    first_role = next(iter(roles.values()))
    num_tensors = len(first_role)
    numel = torch.tensor([t.numel() for t in first_role], dtype=torch.int64)
    modules = torch.tensor(list(module_ids), dtype=torch.int64)

    # chunks, sorted by module then tensor (a stable sort keeps the list order within a module)
    order = torch.argsort(modules, stable=True)
    chunks_per_tensor = (numel + chunk_size - 1) // chunk_size
    counts = chunks_per_tensor[order]
    num_chunks = int(counts.sum())
    tensor_of_chunk = torch.repeat_interleave(order, counts)
    first_chunk = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    start = (torch.arange(num_chunks, dtype=torch.int64) - first_chunk) * chunk_size
    length = torch.clamp(numel[tensor_of_chunk] - start, max=chunk_size)

    # each module's run of chunks, for the modules that have a tensor
    present = torch.unique(modules)
    chunks_per_module = torch.zeros(num_modules, dtype=torch.int64).index_add_(0, modules, chunks_per_tensor)
    chunk_end = torch.cumsum(chunks_per_module, 0)
    presence = torch.zeros(num_modules, dtype=torch.int64)
    presence[present] = 1

    row_width = 1 + len(roles)
    chunks_at = HEADER_SLOTS
    tensors_at = chunks_at + 3 * num_chunks
    present_at = tensors_at + row_width * num_tensors
    presence_at = present_at + 3 * len(present)
    host = torch.empty(presence_at + num_modules, dtype=torch.int64, pin_memory=device.type == "cuda")
    header = host[:HEADER_SLOTS]
    header.zero_()
    header[:SCALARS_AT] = torch.tensor([num_modules, len(present), present_at, presence_at])
    header[SCALARS_AT:SCALARS_AT + len(scalars)] = _float_bits(scalars)
    host[chunks_at:tensors_at].view(num_chunks, 3).copy_(
        torch.stack([tensors_at + row_width * tensor_of_chunk, start, length], 1))
    tensor_rows = host[tensors_at:present_at].view(num_tensors, row_width)
    tensor_rows[:, 0] = modules
    if num_tensors:
        tensor_rows[:, 1:] = torch.tensor(offsets, dtype=torch.int64).T
    host[present_at:presence_at].view(-1, 3).copy_(
        torch.stack([present, chunk_end[present] - chunks_per_module[present], chunk_end[present]], 1))
    host[presence_at:] = presence
    table = host if device.type == "cpu" else host.to(device, non_blocking=True)
    return WorkTable(table, tuple(bases), num_chunks, aligned)


# ------------------------------------------------------------------------------- device side


@triton.jit
def program_chunk(table):
    """(tensor_at, start, length) of the chunk this program owns; length as int32."""
    row = _HEADER_SLOTS + 3 * tl.program_id(0).to(tl.int64)
    return tl.load(table + row), tl.load(table + row + 1), tl.load(table + row + 2).to(tl.int32)


@triton.jit
def chunk_pointer(base, table, tensor_at, start, ROLE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to the first element of the chunk in the tensor of role ROLE. With ALIGNED (the
    host checked every offset) it tells the compiler the offset is a whole number of vectors."""
    offset = tl.load(table + tensor_at + 1 + ROLE) + start
    if ALIGNED:
        offset = tl.multiple_of(offset, _VECTOR_BITS // base.dtype.element_ty.primitive_bitwidth)
    return base + offset


@triton.jit
def header_counts(table):
    """(num_modules, num_present)."""
    return tl.load(table + _NUM_MODULES_SLOT), tl.load(table + _NUM_PRESENT_SLOT)


@triton.jit
def header_scalar(table, SLOT: tl.constexpr):
    """The float64 scalar in header slot SLOT (its bit pattern in an int64 slot)."""
    return tl.load(table + SLOT).to(tl.float64, bitcast=True)


@triton.jit
def present_module_sum(table, partials, i, BLOCK: tl.constexpr):
    """(module, sum of its run of chunk partials) for the i-th present module; the sum is
    formed in a fixed order (a [BLOCK] accumulator over the run, then one tree sum)."""
    row = tl.load(table + _PRESENT_AT_SLOT) + 3 * i
    first = tl.load(table + row + 1)
    end = tl.load(table + row + 2)
    acc = tl.zeros([BLOCK], partials.dtype.element_ty)
    for block_start in range(first, end, BLOCK):
        index = block_start + tl.arange(0, BLOCK)
        acc += tl.load(partials + index, mask=index < end, other=0.0)
    return tl.load(table + row), tl.sum(acc, axis=0)


@triton.jit
def presence_block(table, first, num_modules, BLOCK: tl.constexpr):
    """(module indices, in range, present) for modules [first, first + BLOCK)."""
    modules = first + tl.arange(0, BLOCK)
    in_range = modules < num_modules
    flags = tl.load(table + tl.load(table + _PRESENCE_AT_SLOT) + modules, mask=in_range, other=0)
    return modules, in_range, flags != 0
