"""The work table of a multi-tensor launch: one int64 buffer that tells every program which
chunk of which tensor it owns, and tells the finalize programs which chunks form each module.

Why offsets and not addresses: Triton's interpreter cannot load a pointer from memory, so each
role (params, grads, exp_avgs, ...) is passed as one base tensor, the one with the lowest
address, and the table holds every tensor's element offset from it (``(data_ptr - base_ptr) /
element_size``, never negative). On a GPU the same table works unchanged.

Layout (int64)::

    header        [HEADER_SLOTS]            num_modules, num_chunks, module_begin_at, presence_at
    chunks        [num_chunks, 3]           tensor_at (where the chunk's tensor row is), start, length
    tensors       [num_tensors, 1 + roles]  module, then one element offset per role
    module_begin  [num_modules + 1]         module m owns chunks [module_begin[m], module_begin[m + 1])
    presence      [num_modules]             1 where a tensor (even an empty one) belongs to the module

Chunks are ordered by module, then by tensor, then by position, so every module owns one
contiguous run of chunks and a per-chunk result reduces per module in a fixed order
(deterministic, whatever order the programs ran in). Empty tensors own no chunk but still
make their module present.

Lifetime: a table depends only on the tensors' addresses, sizes and element sizes, the module
ids and the chunk size, so :func:`get` builds it once per distinct such set (a resampling of
MISA makes a new one), copies it to the device once, and keeps it there in a small cache:
repeated calls copy nothing from the host and the kernels never read host memory. A table used
while a CUDA graph is being captured is kept for the life of the process (the graph may be
replayed at any time); one that would have to be built during a capture is refused with an
error saying to run the op once before capturing. Float scalars (lr, betas, max_norm) are not
in the table: they are kernel arguments, passed as the int64 bit patterns of their float64
values (Triton would round a Python float to float32).

Sizes and offsets are 64-bit; a chunk's length fits in 32 bits. Learned from PyTorch's and
apex's ``multi_tensor_apply`` (a per-block tensor and chunk index), redone with offsets for the
interpreter.
"""
from __future__ import annotations

import contextlib
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

#: header length; also keeps the chunk rows 16-byte aligned.
HEADER_SLOTS = 4
NUM_MODULES_SLOT, NUM_CHUNKS_SLOT, MODULE_BEGIN_AT_SLOT, PRESENCE_AT_SLOT = range(HEADER_SLOTS)
#: widest vector load the alignment hint promises (16 bytes, as PyTorch's multi_tensor_apply).
VECTOR_BYTES = 16
#: distinct tables kept on their devices (an active set of MISA needs one per op and dtype group).
CACHE_SIZE = 32

# the same constants for the kernels (a @triton.jit function reads only constexpr globals)
_HEADER_SLOTS = tl.constexpr(HEADER_SLOTS)
_NUM_MODULES_SLOT = tl.constexpr(NUM_MODULES_SLOT)
_NUM_CHUNKS_SLOT = tl.constexpr(NUM_CHUNKS_SLOT)
_MODULE_BEGIN_AT_SLOT = tl.constexpr(MODULE_BEGIN_AT_SLOT)
_PRESENCE_AT_SLOT = tl.constexpr(PRESENCE_AT_SLOT)
_VECTOR_BITS = tl.constexpr(8 * VECTOR_BYTES)


@dataclass(frozen=True)
class LaunchConfig:
    """Per-device sizes: elements per chunk (one program each), per loop step, warps; and the
    finalize programs' modules per program and chunks per loop step."""

    chunk_size: int
    block: int
    num_warps: int
    module_block: int = 64
    run_block: int = 16


#: GPU (not yet tuned on one): 16K-element chunks, so that a step of a few million elements
#: still gives every SM of an H100 several programs.
GPU_CONFIG = LaunchConfig(chunk_size=16384, block=1024, num_warps=4)
#: Interpreter: every program costs milliseconds of Python, so fewer, larger chunks and steps.
INTERPRETER_CONFIG = LaunchConfig(chunk_size=65536, block=8192, num_warps=1)
#: elements per loop step when a finalize program sums all chunk partials (the total norm).
TOTAL_BLOCK = 1024


def launch_config(device: torch.device, chunk_size: Optional[int] = None) -> LaunchConfig:
    """The sizes for `device` (the interpreter runs on CPU tensors); `chunk_size` overrides the
    chunk (a multiple of 16 elements, so chunk starts keep 16-byte vector alignment)."""
    config = GPU_CONFIG if device.type == "cuda" else INTERPRETER_CONFIG
    if chunk_size is None:
        return config
    if chunk_size <= 0 or chunk_size % 16:
        raise ValueError(f"chunk_size must be a positive multiple of 16, got {chunk_size}")
    block = min(config.block, 1 << (chunk_size.bit_length() - 1))
    return LaunchConfig(chunk_size, block, config.num_warps, config.module_block, config.run_block)


def device_guard(device: torch.device):
    """Makes `device` current while launching, so Triton picks its stream (a no-op on CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def float_bits(value: float) -> int:
    """The bit pattern of `value` as a float64, as a signed int64: a kernel argument that
    carries a float64 exactly (the kernel reads it back with :func:`arg_float64`)."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


def finalize_programs(num_modules: int, config: LaunchConfig) -> int:
    """Programs of a finalize launch: one per `module_block` modules, at least one (it also
    writes the outputs that do not depend on any module)."""
    return max(1, triton.cdiv(num_modules, config.module_block))


@dataclass(frozen=True)
class WorkTable:
    """A built table on the op's device; for each role the index of its base tensor (the
    lowest address; None when the role has no element at all), and whether every offset is a
    whole number of 16-byte vectors."""

    table: torch.Tensor
    base_index: Tuple[Optional[int], ...]
    num_chunks: int
    aligned: bool

    def bases(self, roles: Sequence[Sequence[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
        """The base tensor of each role, taken from the call's own lists."""
        return [None if i is None else tensors[i] for i, tensors in zip(self.base_index, roles)]


def _role_offsets(name: str, tensors: Sequence[torch.Tensor]) -> Tuple[Optional[int], List[int], bool]:
    """(index of the base tensor, element offset of each tensor from it, all offsets vector-aligned)."""
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
    return base_index, offsets, all(o % vector == 0 for o in offsets)


def build(
    roles: Dict[str, Sequence[torch.Tensor]],
    module_ids: Sequence[int],
    num_modules: int,
    device: torch.device,
    chunk_size: int,
) -> WorkTable:
    """Builds the table for tensors given per role (same numel at each index) on the host, with
    numpy (nothing here touches the device), and hands it to `device` with one copy that does
    not wait (from pinned memory on CUDA). Uncached: see :func:`get`."""
    base_index, offsets, aligned = [], [], True
    for name, tensors in roles.items():
        base, role_offsets, role_aligned = _role_offsets(name, tensors)
        base_index.append(base)
        offsets.append(role_offsets)
        aligned = aligned and role_aligned
    first_role = next(iter(roles.values()))
    num_tensors = len(first_role)
    numel = np.fromiter((t.numel() for t in first_role), dtype=np.int64, count=num_tensors)
    modules = np.asarray(module_ids, dtype=np.int64).reshape(num_tensors)

    # chunks, sorted by module then tensor (a stable sort keeps the list order within a module)
    order = np.argsort(modules, kind="stable")
    chunks_per_tensor = (numel + chunk_size - 1) // chunk_size
    counts = chunks_per_tensor[order]
    num_chunks = int(counts.sum())
    tensor_of_chunk = np.repeat(order, counts)
    first_chunk = np.repeat(np.cumsum(counts) - counts, counts)
    start = (np.arange(num_chunks, dtype=np.int64) - first_chunk) * chunk_size
    length = np.minimum(numel[tensor_of_chunk] - start, chunk_size)

    # each module's run of chunks (empty for a module without a tensor or without elements)
    chunks_per_module = np.bincount(modules, weights=chunks_per_tensor, minlength=num_modules).astype(np.int64)
    presence = np.zeros(num_modules, dtype=np.int64)
    presence[modules] = 1

    row_width = 1 + len(roles)
    chunks_at = HEADER_SLOTS
    tensors_at = chunks_at + 3 * num_chunks
    module_begin_at = tensors_at + row_width * num_tensors
    presence_at = module_begin_at + num_modules + 1
    host = torch.empty(presence_at + num_modules, dtype=torch.int64, pin_memory=device.type == "cuda")
    rows = host.numpy()
    rows[:HEADER_SLOTS] = (num_modules, num_chunks, module_begin_at, presence_at)
    rows[chunks_at:tensors_at].reshape(num_chunks, 3)[:] = np.stack(
        [tensors_at + row_width * tensor_of_chunk, start, length], 1)
    tensor_rows = rows[tensors_at:module_begin_at].reshape(num_tensors, row_width)
    tensor_rows[:, 0] = modules
    if num_tensors:
        tensor_rows[:, 1:] = np.asarray(offsets, dtype=np.int64).T
    rows[module_begin_at] = 0
    rows[module_begin_at + 1:presence_at] = np.cumsum(chunks_per_module)
    rows[presence_at:] = presence
    table = host if device.type == "cpu" else host.to(device, non_blocking=True)
    return WorkTable(table, tuple(base_index), num_chunks, aligned)


_cache: "OrderedDict[tuple, WorkTable]" = OrderedDict()
#: tables used during a CUDA graph capture: a replay reads them, so they are never freed.
_captured: Dict[tuple, WorkTable] = {}


def _key(roles, module_ids, num_modules, device, chunk_size) -> tuple:
    tensors = next(iter(roles.values()))
    return (device, chunk_size, num_modules, tuple(module_ids), tuple(map(torch.Tensor.numel, tensors)),
            tuple((tuple(map(torch.Tensor.data_ptr, ts)), ts[0].element_size() if ts else 0)
                  for ts in roles.values()))


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def get(
    roles: Dict[str, Sequence[torch.Tensor]],
    module_ids: Sequence[int],
    num_modules: int,
    device: torch.device,
    chunk_size: int,
) -> WorkTable:
    """The table of :func:`build`, built and copied once per distinct set of tensors (addresses,
    sizes, dtypes), module ids and chunk size, then served from the device (see the module
    docstring for its lifetime under CUDA graphs)."""
    key = _key(roles, module_ids, num_modules, device, chunk_size)
    work = _captured.get(key) or _cache.get(key)
    capturing = _capturing(device)
    if work is None:
        if capturing:
            raise RuntimeError(
                "misa_kernels (triton): this set of tensors has no work table yet, and one cannot be "
                "copied to the device during a CUDA graph capture (a replay would read freed host "
                "memory). Run the op once with the same tensors before capturing (a warm-up call).")
        work = build(roles, module_ids, num_modules, device, chunk_size)
        _cache[key] = work
        if len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    elif key in _cache:
        _cache.move_to_end(key)
    if capturing:
        _captured[key] = work
    return work


def cached_tables() -> int:
    """How many tables the cache holds (for tests)."""
    return len(_cache)


# ------------------------------------------------------------------------------- device side


@triton.jit
def arg_float64(bits):
    """The float64 whose bit pattern an int argument carries (see :func:`float_bits`); the
    argument is int32 when the pattern fits, hence the widening first."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


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
def module_block(table, MODULE_BLOCK: tl.constexpr):
    """The modules of this finalize program: (indices, in range, present, first chunk, end chunk)."""
    num_modules = tl.load(table + _NUM_MODULES_SLOT)
    modules = tl.program_id(0).to(tl.int64) * MODULE_BLOCK + tl.arange(0, MODULE_BLOCK)
    in_range = modules < num_modules
    begin_at = tl.load(table + _MODULE_BEGIN_AT_SLOT)
    first = tl.load(table + begin_at + modules, mask=in_range, other=0)
    end = tl.load(table + begin_at + modules + 1, mask=in_range, other=0)
    present = tl.load(table + tl.load(table + _PRESENCE_AT_SLOT) + modules, mask=in_range, other=0) != 0
    return modules, in_range, present, first, end


@triton.jit
def module_sums(partials, first, end, MODULE_BLOCK: tl.constexpr, RUN_BLOCK: tl.constexpr):
    """[MODULE_BLOCK] sums of the chunk partials of each module's run [first, end), each in a
    fixed order (a [RUN_BLOCK] accumulator per module stepping along its run, then a tree sum);
    0 for an empty run."""
    acc = tl.zeros([MODULE_BLOCK, RUN_BLOCK], partials.dtype.element_ty)
    steps = tl.arange(0, RUN_BLOCK)
    longest = tl.max(end - first, axis=0)
    for k in range(0, longest, RUN_BLOCK):
        index = first[:, None] + k + steps[None, :]
        acc += tl.load(partials + index, mask=index < end[:, None], other=0.0)
    return tl.sum(acc, axis=1)


@triton.jit
def all_chunks_sum(table, partials, BLOCK: tl.constexpr):
    """Sum of every chunk partial, in a fixed order (the same in every program that runs it)."""
    num_chunks = tl.load(table + _NUM_CHUNKS_SLOT)
    acc = tl.zeros([BLOCK], partials.dtype.element_ty)
    for start in range(0, num_chunks, BLOCK):
        index = start + tl.arange(0, BLOCK)
        acc += tl.load(partials + index, mask=index < num_chunks, other=0.0)
    return tl.sum(acc, axis=0)
