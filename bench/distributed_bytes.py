"""Gradient traffic and gradient-buffer memory of MISA under data parallelism and FSDP2.

Runs the same short MISA training (a LLaMA-shaped model, 2 ranks, modules switching every
`--interval` steps) under several ways of averaging gradients, and reports per strategy the
gradient bytes each rank hands to collectives per step, the bytes of persistent gradient
buckets, and how far the replicas drifted apart (0 when the averaging is correct):

- ``ddp_all``: DistributedDataParallel built while every module trains, find_unused_parameters=True
  (frozen modules are reduced as zeros);
- ``ddp_all_skip_unused``: the same with skip_all_reduce_unused_params=True;
- ``ddp_initial``: DDP built after MISA, so over the initial active set only (the trap);
- ``ddp_rewrap``: DDP rebuilt over the active modules at every switch (a switch hook);
- ``misa``: MISA's own averaging (misa.distributed.GradientSync), no DDP;
- ``fsdp2``: fully_shard per block and on the root; FSDP2's reduce-scatter input is counted.

    python bench/distributed_bytes.py                       # 2 CPU processes, gloo
    torchrun --nproc-per-node 2 bench/distributed_bytes.py --device cuda --backend nccl
    python bench/distributed_bytes.py --device cuda --backend gloo   # 2 processes on one GPU

`--check` also trains one process on the global batch and reports the largest parameter
difference of each strategy from it (the correctness check of a GPU run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), os.path.join(HERE, "..", "python_api")]

import misa  # noqa: E402
from misa import distributed  # noqa: E402
from misa_examples import models  # noqa: E402

STRATEGIES = ("ddp_all", "ddp_all_skip_unused", "ddp_initial", "ddp_rewrap", "misa", "fsdp2")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--world", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--check", action="store_true", help="compare with a one-process run")
    parser.add_argument("--json", help="also write the results to this file")
    return parser.parse_args(argv)


def config(args):
    return models.LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                              num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4)


def batch(args, step, device):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 1024, (4, 64), generator=g).to(device)


def build(args, device):
    torch.manual_seed(0)
    return models.build(config(args), device)


def misa_options(args, **extra):
    return dict(lr=1e-3, delta=args.delta, interval=args.interval, seed=0, **extra)


class Counter:
    """Bytes handed to gradient collectives, and the gradient bucket bytes of the latest DDP."""

    def __init__(self):
        self.bytes = 0
        self.bucket_bytes = 0

    def ddp_hook(self, state, bucket):
        buffer = bucket.buffer()
        self.bytes += buffer.numel() * buffer.element_size()
        return default_hooks.allreduce_hook(None, bucket)


def wrap_ddp(model, counter, device, **kwargs):
    from torch.nn.parallel import DistributedDataParallel
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  init_sync=False, **kwargs)
    ddp.register_comm_hook(None, counter.ddp_hook)
    # the reducer's buckets hold a copy of every gradient it knows (gradient_as_bucket_view=False)
    counter.bucket_bytes = ddp._get_ddp_logging_data().get("total_parameter_size_bytes", 0)
    return ddp


def count_fsdp_reduce_scatter(counter):
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group
    original = _fsdp_param_group.foreach_reduce

    def counting(fsdp_params, unsharded_grads, *args, **kwargs):
        counter.bytes += sum(g.numel() * g.element_size() for g in unsharded_grads)
        return original(fsdp_params, unsharded_grads, *args, **kwargs)

    _fsdp_param_group.foreach_reduce = counting
    return original


def run(strategy, args, rank, world, device):
    """Trains `args.steps` steps under `strategy`; returns its numbers on this rank."""
    counter = Counter()
    model = build(args, device)
    forward = model
    restore = None
    if strategy.startswith("ddp_all"):
        forward = wrap_ddp(model, counter, device, find_unused_parameters=True,
                           skip_all_reduce_unused_params=strategy.endswith("skip_unused"))
        opt = misa.MISA(model, grad_sync=False, **misa_options(args))
    elif strategy == "ddp_initial":
        opt = misa.MISA(model, grad_sync=False, **misa_options(args))
        forward = wrap_ddp(model, counter, device, find_unused_parameters=True)
    elif strategy == "ddp_rewrap":
        opt = misa.MISA(model, grad_sync=False, **misa_options(args))
        holder = {"ddp": wrap_ddp(model, counter, device)}
        opt.register_switch_hook(lambda _: holder.update(ddp=wrap_ddp(model, counter, device)))
        forward = lambda *a, **k: holder["ddp"](*a, **k)  # noqa: E731
    elif strategy == "misa":
        opt = misa.MISA(model, **misa_options(args))
    elif strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        restore = count_fsdp_reduce_scatter(counter)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = misa.MISA(model, **misa_options(args))
    else:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")

    active_bytes = []
    for step in range(args.steps):
        active_bytes.append(sum(p.numel() * 4 for p in model.parameters() if p.requires_grad))
        x = batch(args, step, device)[rank * 4 // world: (rank + 1) * 4 // world]
        forward(x, labels=x).backward()
        opt.step()
        opt.zero_grad()
    if restore is not None:
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group
        _fsdp_param_group.foreach_reduce = restore
    sent = counter.bytes if opt.grad_sync is None else opt.grad_sync.bytes_sent
    params = {n: (p.full_tensor() if distributed.is_dtensor(p) else p).detach().float()
              for n, p in model.named_parameters()}
    drift = 0.0
    for value in params.values():
        mean = value.clone()
        dist.all_reduce(mean)
        drift = max(drift, (value - mean / world).abs().max().item())
    return {
        "strategy": strategy,
        "bytes_per_step": sent / args.steps,
        "active_grad_bytes_per_step": sum(active_bytes) / args.steps,
        "bucket_bytes": counter.bucket_bytes,
        "replica_drift": drift,
        "params": {n: v.cpu() for n, v in params.items()},
    }


def single_process(args, device):
    model = build(args, device)
    opt = misa.MISA(model, **misa_options(args))
    for step in range(args.steps):
        x = batch(args, step, device)
        model(x, labels=x).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().float().cpu() for n, p in model.named_parameters()}


def worker(rank, world, args, init_method):
    if "RANK" in os.environ:
        dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=300))
    else:
        dist.init_process_group(args.backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    results = [run(s, args, rank, world, device) for s in args.strategies.split(",")]
    dist.destroy_process_group()
    if rank == 0:  # the one-process reference runs without a process group
        report(args, world, device, results)


def report(args, world, device, results):
    reference = single_process(args, device) if args.check else None
    full = sum(p.numel() * 4 for p in build(args, "meta").parameters())
    rows = []
    print(f"model: {full / 4 / 1e6:.2f}M parameters ({full / 2 ** 20:.1f} MiB of fp32 gradients), "
          f"delta={args.delta}, world={world}, device={device}, backend={args.backend}")
    print("| strategy | grad bytes sent / step / rank | active grad bytes / step | DDP gradient buckets | "
          "replica drift | max diff vs 1 process |")
    print("|---|---|---|---|---|---|")
    for r in results:
        diff = None
        if reference is not None:
            diff = max((r["params"][n] - v).abs().max().item() for n, v in reference.items())
        rows.append({k: v for k, v in r.items() if k != "params"} | {"max_diff_vs_one_process": diff})
        print(f"| {r['strategy']} | {r['bytes_per_step'] / 2 ** 20:.3f} MiB | "
              f"{r['active_grad_bytes_per_step'] / 2 ** 20:.3f} MiB | {r['bucket_bytes'] / 2 ** 20:.3f} MiB | "
              f"{r['replica_drift']:.2e} | {'-' if diff is None else f'{diff:.2e}'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": {"torch": torch.__version__}, "device": str(device), "world": world,
                       "backend": args.backend, "full_grad_bytes": full, "results": rows}, f, indent=1)


def main(argv=None):
    args = parse_args(argv)
    if "RANK" in os.environ:  # under torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args.world, args, f"file://{os.path.join(tmp, 'store')}"), nprocs=args.world)


if __name__ == "__main__":
    main()
