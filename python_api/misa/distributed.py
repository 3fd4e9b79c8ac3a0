"""MISA on several processes: data parallel, FSDP2, rank agreement and distributed checkpoints.

Data parallel. MISA averages the active gradients itself, after each backward, in a few
bucketed all-reduces (:class:`GradientSync`); do not wrap the model in DistributedDataParallel.
DDP's reducer is built once from the parameters that require grad at wrap time, so it either
misses the modules activated later (they would train apart on every rank) or, built over
every parameter with ``find_unused_parameters=True``, keeps gradient buckets for the whole
model and all-reduces the frozen modules as zeros. Frozen modules here hold no gradient and
send no byte. See docs/distributed.md for the measurements behind this choice.

FSDP2 (``torch.distributed.fsdp.fully_shard``). Parameters, gradients and optimizer state are
DTensors sharded alike; the kernels run on each rank's local shards, and the per-module
squared norms, partial sums over the shards, are all-reduced (one collective of
``num_modules + 1`` floats) before clipping and importance accumulation. FSDP2 reduce-scatters
only the gradients that exist, so frozen modules cost no gradient traffic.

Agreement. Every rank must draw the same active set. Gradients (hence norms and scores) are
identical after the averaging or the norm all-reduce, and the optimizer broadcasts rank 0's
seed at construction; ``debug_sync=True`` (or ``MISA_DEBUG_SYNC=1``) checks after every draw
that all ranks hold the same set, with one all-gather of a fingerprint.

Checkpoints. :func:`save_checkpoint` / :func:`load_checkpoint` write and read model and
optimizer with ``torch.distributed.checkpoint`` (each rank writes its own shards). Loading
sizes the optimizer state from the checkpoint's metadata, since the saved active set is in
general not the one a fresh optimizer starts with.
"""
from __future__ import annotations

import os
import weakref
import zlib
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

#: environment variable that turns on the cross-rank check of every draw.
DEBUG_ENV = "MISA_DEBUG_SYNC"
#: the most bytes of gradients copied into one all-reduce buffer (DDP's default bucket size).
DEFAULT_BUCKET_BYTES = 25 * 2 ** 20


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group: Optional[dist.ProcessGroup] = None) -> int:
    """Size of `group` (default: the world), 1 without an initialised process group."""
    return dist.get_world_size(group) if is_initialized() else 1


def is_dtensor(tensor: Optional[torch.Tensor]) -> bool:
    if tensor is None or not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: writes reach the DTensor), else `tensor` itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def debug_from_env() -> bool:
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0", "false", "False")


def _collective_device(group: Optional[dist.ProcessGroup], device: torch.device) -> torch.device:
    """Where a small tensor must live for a collective on `group`: gloo works on host memory,
    NCCL and the other device backends on the device."""
    if device.type == "cpu" or dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    return device


def check_wrapping(model: nn.Module) -> None:
    """Rejects models wrapped by a data-parallel engine whose view of the trainable
    parameters is fixed at wrap time."""
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, DistributedDataParallel):
        raise TypeError(
            "MISA got a DistributedDataParallel model: DDP's reducer only knows the parameters that "
            "required grad when it was built, so modules activated later would not be averaged. Pass the "
            "bare model: under an initialised process group MISA averages the active gradients itself "
            "(see docs/distributed.md)")
    if isinstance(model, FullyShardedDataParallel):
        raise TypeError("MISA supports FSDP2 (torch.distributed.fsdp.fully_shard), not the FSDP1 wrapper "
                        "FullyShardedDataParallel, whose flat parameters mix active and frozen modules")


def broadcast_seed(seed: int, group: Optional[dist.ProcessGroup], device: torch.device) -> int:
    """Rank 0's `seed`, on every rank of `group`."""
    value = torch.tensor([seed], dtype=torch.int64, device=_collective_device(group, device))
    dist.broadcast(value, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return int(value.item())


def check_same_active_set(active: Sequence[int], step: int, group: Optional[dist.ProcessGroup],
                          device: torch.device) -> None:
    """Raises on every rank when the ranks of `group` hold different active sets (debug mode)."""
    fingerprint = zlib.crc32(",".join(map(str, sorted(active))).encode())
    mine = torch.tensor([step, fingerprint], dtype=torch.int64, device=_collective_device(group, device))
    gathered = [torch.empty_like(mine) for _ in range(world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    values = [tuple(t.tolist()) for t in gathered]
    if len(set(values)) > 1:
        listed = ", ".join(f"rank {r}: step {s} set {f:08x}" for r, (s, f) in enumerate(values))
        raise RuntimeError(f"MISA ranks disagree on the active modules ({listed}); the draws must use the "
                           "same seed and the same gradients on every rank")


class GradientSync:
    """Averages the gradients of the active parameters over a process group at the end of each
    backward pass, as DDP does, but over the parameters active now rather than those known at
    wrap time. Frozen parameters have no gradient and are not sent.

    Gradients are copied into buckets of at most `bucket_bytes` (a larger tensor is reduced in
    place) and summed with one all-reduce per bucket, then divided by the world size. A count
    of the ranks holding each gradient rides in the first bucket: an active parameter without a
    gradient on some rank contributes zeros, and one without a gradient on every rank keeps
    ``grad = None``, as in a single process.

    Inside :meth:`no_sync` (the micro-batches of a gradient accumulation) nothing is sent; the
    optimizer calls :meth:`flush` before its step, which averages what is still local. By
    linearity, averaging after every backward or once at the end gives the same result.
    """

    def __init__(self, params: Sequence[nn.Parameter], active_params: Callable[[], List[nn.Parameter]],
                 group: Optional[dist.ProcessGroup], bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.group = group
        self.world = world_size(group)
        self.bucket_bytes = bucket_bytes
        self.bytes_sent = 0  # gradient bytes handed to all-reduce so far (count included)
        self._active_params = active_params
        self._syncing = True
        self._queued = False
        self._pending = False
        this = weakref.ref(self)

        def on_grad(_param: torch.Tensor) -> None:
            sync = this()
            if sync is not None:
                sync._on_grad()

        self._handles = []
        for p in params:  # hooks stay on a parameter whose requires_grad is switched off and on
            trainable = p.requires_grad
            p.requires_grad_(True)
            self._handles.append(p.register_post_accumulate_grad_hook(on_grad))
            p.requires_grad_(trainable)

    def remove(self) -> None:
        """Removes the backward hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def no_sync(self):
        """Context manager: backward passes inside it keep their gradients local."""
        return _NoSync(self)

    def _on_grad(self) -> None:
        self._pending = True
        if self._syncing and not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._queued = False
        self.all_reduce()

    def flush(self) -> None:
        """Averages gradients accumulated under :meth:`no_sync` (nothing when all are averaged)."""
        if self._pending:
            self.all_reduce()

    @torch.no_grad()
    def all_reduce(self) -> None:
        """Averages the active parameters' gradients over the group.

        When this rank holds every gradient (the usual step) nothing is read or copied from the
        host: its count flags are ones filled on the device. When a gradient is missing here,
        the flags are copied from the host and the summed counts read back once, after the
        all-reduce (one synchronisation, unavoidable: which gradients stay None is decided on
        the host, and only a rank missing a gradient can see a count of 0)."""
        self._pending = False
        params = self._active_params()
        if not params:
            return
        present = [p.grad is not None for p in params]
        all_present = all(present)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        buckets = self._buckets([p.grad for p in params])
        first = buckets[0][0]
        if all_present:
            flags = torch.ones(len(params), dtype=first.dtype, device=first.device)
        else:
            flags = torch.tensor(present, dtype=first.dtype).to(first.device)
        counts = self._reduce_bucket(buckets[0], flags)
        for bucket in buckets[1:]:
            self._reduce_bucket(bucket, None)
        if not all_present:
            for p, count in zip(params, counts.tolist()):
                if count == 0:
                    p.grad = None

    def _buckets(self, grads: List[torch.Tensor]) -> List[List[torch.Tensor]]:
        """Consecutive gradients of one dtype and device, each group at most bucket_bytes."""
        buckets: List[List[torch.Tensor]] = []
        size = 0
        for g in grads:
            nbytes = g.numel() * g.element_size()
            last = buckets[-1] if buckets else None
            if (last is None or last[0].dtype != g.dtype or last[0].device != g.device
                    or size + nbytes > self.bucket_bytes):
                buckets.append([g])
                size = nbytes
            else:
                last.append(g)
                size += nbytes
        return buckets

    def _reduce_bucket(self, bucket: List[torch.Tensor], extra: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Sums `bucket` (and `extra`, returned summed) over the group and divides the gradients
        by the world size."""
        if extra is None and len(bucket) == 1 and bucket[0].is_contiguous():
            flat = bucket[0].view(-1)
        else:
            parts = [g.reshape(-1) for g in bucket] + ([] if extra is None else [extra])
            flat = torch.cat(parts)
        self.bytes_sent += flat.numel() * flat.element_size()
        dist.all_reduce(flat, group=self.group)
        numel = sum(g.numel() for g in bucket)
        flat[:numel].div_(self.world)
        if flat.data_ptr() != bucket[0].data_ptr():
            for g, part in zip(bucket, torch.split(flat[:numel], [g.numel() for g in bucket])):
                g.copy_(part.view_as(g))
        return None if extra is None else flat[numel:]


class _NoSync:
    def __init__(self, sync: GradientSync):
        self.sync = sync

    def __enter__(self):
        self.previous = self.sync._syncing
        self.sync._syncing = False

    def __exit__(self, *exc):
        self.sync._syncing = self.previous


def shard_groups(params: Sequence[torch.Tensor]) -> List[dist.ProcessGroup]:
    """The process groups over which per-module sums of DTensor shards must be added: those of
    the mesh dimensions on which the parameters are sharded (FSDP: the one shard dimension;
    HSDP: not the replicate one). All parameters must be laid out alike."""
    layouts = {}
    for p in params:
        if not is_dtensor(p):
            raise ValueError("MISA found DTensor and plain parameters in one model: shard every trained "
                             "parameter with fully_shard (apply it to the root module too)")
        dims = tuple(i for i, placement in enumerate(p.placements) if placement.is_shard())
        layouts[(id(p.device_mesh), dims)] = (p.device_mesh, dims)
    if len(layouts) != 1:
        raise ValueError(f"MISA needs every parameter sharded on one device mesh in one layout, found "
                         f"{len(layouts)} layouts")
    mesh, dims = next(iter(layouts.values()))
    return [mesh.get_group(d) for d in dims]


def initialize_fsdp(model: nn.Module) -> None:
    """Runs FSDP2's lazy initialisation now, before MISA freezes the inactive modules. FSDP2
    fixes each parameter group's gradient and reduce dtypes from the parameters that require
    grad at its first forward; a group frozen then would, with a MixedPrecisionPolicy, later
    reduce its gradients in the low precision and fail to assign them. Idempotent, and only
    for a root module sharded with fully_shard (it uses FSDP2's private state, as the first
    forward would)."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(model, FSDPModule):
        model._get_fsdp_state()._lazy_init()


def all_reduce_sums(sums: torch.Tensor, groups: Sequence[dist.ProcessGroup]) -> torch.Tensor:
    """Adds the per-module partial sums of all shards (in place, returned)."""
    for group in groups:
        device = _collective_device(group, sums.device)
        buffer = sums.to(device)
        dist.all_reduce(buffer, group=group)
        if buffer is not sums:
            sums.copy_(buffer)
    return sums


# ------------------------------------------------------------------ checkpoints


def save_checkpoint(checkpoint_id, model: nn.Module, optimizer, **dcp_kwargs) -> None:
    """Writes ``{"model": ..., "optim": ...}`` with torch.distributed.checkpoint; under FSDP2 each
    rank writes its shards of the parameters and of the optimizer state."""
    import torch.distributed.checkpoint as dcp
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=checkpoint_id,
             **dcp_kwargs)


def load_checkpoint(checkpoint_id, model: nn.Module, optimizer, **dcp_kwargs) -> None:
    """Reads what :func:`save_checkpoint` wrote into `model` and `optimizer` (a MISA optimizer
    built on `model`, sharded the same way); training then continues exactly."""
    import torch.distributed.checkpoint as dcp
    reader = dcp.FileSystemReader(checkpoint_id)
    model_state = model.state_dict()
    optim_state = optimizer_state_template(optimizer, reader.read_metadata().state_dict_metadata)
    dcp.load({"model": model_state, "optim": optim_state}, storage_reader=reader, **dcp_kwargs)
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)


def optimizer_state_template(optimizer, checkpoint_keys, prefix: str = "optim") -> dict:
    """A state dict of `optimizer`'s structure with empty state tensors for exactly the entries
    saved under `prefix` in a checkpoint (keys of its metadata: ``optim.state.<slot>.<entry>``),
    allocated like the parameters (sharded under FSDP2), for torch.distributed.checkpoint to
    load into."""
    entries: Dict[int, List[str]] = {}
    head = f"{prefix}.state."
    for key in checkpoint_keys:
        if key.startswith(head):
            slot, entry = key[len(head):].split(".", 1)
            entries.setdefault(int(slot), []).append(entry)
    return optimizer.state_dict_template(entries)
