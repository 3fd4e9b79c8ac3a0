"""Kernel microbenchmarks: every misa_kernels backend against the PyTorch peers doing the same work.

Cases:
  block  the active set of one LLaMA-2-7B block at delta=3%: q, k, v, o (4096x4096) and gate,
         up, down (11008x4096), 202M parameters; --scale divides both dimensions (the CPU
         default, 4, gives 12.6M parameters).
  small  224 small tensors: the 7 matrices of 32 blocks of a hidden-256 LLaMA (25M parameters
         at scale 1).
Ops:
  norms  per-module squared norms + total norm + clip coefficient
         peer: torch._foreach_norm, then the norm of the stacked norms
  adamw  the AdamW update
         peers: torch.optim.AdamW(fused=True) and (foreach=True)
  step   norms + clipping + AdamW (what the MISA optimizer does every step)
         peers: _foreach_norm + _foreach_mul_ + AdamW(fused) (the strongest composition),
         clip_grad_norm_ + AdamW(fused), clip_grad_norm_ + AdamW(foreach)
Weights: float32, or bfloat16 with fp32 masters (peers then keep fp32 master copies with fp32
gradients: a cast of the gradients in, the AdamW step, a cast of the weights out).

    python bench/kernels.py                    # CPU defaults
    python bench/kernels.py --device cuda      # full size on a GPU

Prints a table, appends rows to bench/out/kernels.csv (schema: bench/harness.py).
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import misa_kernels  # noqa: E402

MAX_NORM = 1e9  # clip coefficient 1: every implementation still does the full multiply


def shapes(case: str, scale: int) -> List[tuple]:
    if case == "block":
        h, i = 4096 // scale, 11008 // scale
        return [(h, h)] * 4 + [(i, h), (i, h), (h, i)]
    h, i = max(256 // scale, 8), max(688 // scale, 8)
    return ([(h, h)] * 4 + [(i, h), (i, h), (h, i)]) * 32


class Tensors:
    """One independent set of weights, gradients and moments for one implementation."""

    def __init__(self, shape_list, dtype, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.params = [(torch.randn(s, generator=g) * 0.02).to(device, dtype) for s in shape_list]
        self.grads = [(torch.randn(s, generator=g) * 1e-3).to(device, dtype) for s in shape_list]
        self.masters = [p.float() for p in self.params] if dtype != torch.float32 else None
        weights = self.masters if self.masters is not None else self.params
        self.exp_avgs = [torch.zeros_like(w) for w in weights]
        self.exp_avg_sqs = [torch.zeros_like(w) for w in weights]
        self.ids = list(range(len(shape_list)))
        self.steps = torch.zeros(len(shape_list), device=device)


def ours(backend: str, t: Tensors, op: str) -> Callable[[], None]:
    def norms():
        return misa_kernels.grad_sq_norms(t.grads, t.ids, len(t.ids), max_norm=MAX_NORM, backend=backend)

    def adamw(stats=None):
        misa_kernels.adamw_step_(t.params, t.grads, t.exp_avgs, t.exp_avg_sqs, t.steps, t.ids, lr=1e-4,
                                 weight_decay=0.01, master_params=t.masters, backend=backend,
                                 clip_coef=None if stats is None else stats.clip_coef,
                                 found_inf=None if stats is None else stats.found_inf)

    return {"norms": norms, "adamw": adamw, "step": lambda: adamw(norms())}[op]


def peers(t: Tensors, op: str) -> Dict[str, Callable[[], None]]:
    """The PyTorch compositions doing the same work on their own copy `t`."""
    low_precision = t.masters is not None
    weights = [w.requires_grad_() for w in (t.masters if low_precision else t.params)]
    fp32_grads = [torch.empty_like(w) for w in weights] if low_precision else t.grads
    for w, g in zip(weights, fp32_grads):
        w.grad = g
    fused = torch.optim.AdamW(weights, lr=1e-4, weight_decay=0.01, fused=True)
    foreach = torch.optim.AdamW(weights, lr=1e-4, weight_decay=0.01, foreach=True)

    def with_casts(update):
        def run():
            if low_precision:
                torch._foreach_copy_(fp32_grads, t.grads)
            update()
            if low_precision:
                torch._foreach_copy_(t.params, [w.detach() for w in weights])
        return run

    def foreach_norm(grads=fp32_grads):
        norms = torch._foreach_norm(grads)
        total = torch.linalg.vector_norm(torch.stack(norms))
        return (MAX_NORM / (total + 1e-6)).clamp(max=1.0)

    def foreach_norm_mul():
        torch._foreach_mul_(fp32_grads, foreach_norm())

    def clip():
        torch.nn.utils.clip_grad_norm_(weights, MAX_NORM, foreach=True)

    if op == "norms":
        return {"foreach_norm": lambda: foreach_norm(t.grads)}
    if op == "adamw":
        return {"AdamW(fused)": with_casts(fused.step), "AdamW(foreach)": with_casts(foreach.step)}
    return {
        "foreach_norm+mul+fused": with_casts(lambda: (foreach_norm_mul(), fused.step())),
        "clip_grad_norm_+fused": with_casts(lambda: (clip(), fused.step())),
        "clip_grad_norm_+foreach": with_casts(lambda: (clip(), foreach.step())),
    }


def bytes_moved(op: str, t: Tensors) -> int:
    """The fewest bytes the op must move: each input read once, each output written once."""
    n = sum(p.numel() for p in t.params)
    grad = t.grads[0].element_size()
    param = t.params[0].element_size()
    norms = n * grad
    if t.masters is None:
        update = n * (grad + 2 * param + 16)  # g read; p, m, v read and written
    else:
        update = n * (grad + param + 24)  # g read; master, m, v read and written; p written
    return {"norms": norms, "adamw": update, "step": norms + update}[op]


def copy_bandwidth(device: torch.device, numel: int, reps: int) -> harness.Row:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = harness.time_ms(lambda: dst.copy_(src), device, reps)
    p20, p50, p80 = harness.percentiles(times)
    return harness.Row("copy", "buffer", "float32", "torch.copy_", str(device), 1, numel, p20, p50, p80,
                       2 * 4 * numel / p50 / 1e6, 1.0, "", -1)


def ratios(rows: List[harness.Row]) -> str:
    """Speed-up of every misa_kernels row over each peer of the same op, case and dtype."""
    lines = ["speed-up over each peer (peer p50 / ours p50):"]
    for r in rows:
        if not r.impl.startswith("misa_kernels"):
            continue
        same = [p for p in rows if (p.op, p.case, p.dtype) == (r.op, r.case, r.dtype) and ":" not in p.impl]
        lines.append(f"  {r.op:<6} {r.case:<10} {r.dtype:<9} {r.impl:<20} "
                     + ", ".join(f"{p.impl} {p.ms_p50 / r.ms_p50:.2f}x" for p in same))
    return "\n".join(lines)


def main(argv=None) -> List[harness.Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=int, default=None, help="divide matrix dimensions (default: 1 on CUDA, 4 on CPU)")
    parser.add_argument("--cases", default="block,small")
    parser.add_argument("--ops", default="norms,adamw,step")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--backends", default=None, help="comma list (default: all available on the device)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per row (default: 50 on CUDA, 10 on CPU)")
    parser.add_argument("--out", default=None, help="CSV directory (default: bench/out)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    scale = args.scale or (1 if device.type == "cuda" else 4)
    reps = args.reps or (50 if device.type == "cuda" else 10)
    backends = args.backends.split(",") if args.backends else misa_kernels.available_backends(device)
    # AdamW on tiny gradients drifts into subnormals, which a CPU computes at a crawl; flush
    # them for every implementation alike, and restore the process's setting afterwards.
    flush = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        rows = run(args, device, scale, reps, backends)
    finally:
        if flush:
            torch.set_flush_denormal(False)
    harness.stamp(rows)
    print(f"machine: {rows[0].machine}; torch {rows[0].torch}; git {rows[0].git_rev}; reps {reps}")
    print(harness.table(rows))
    print(ratios(rows))
    path = harness.write(rows, "kernels", args.out)
    print(f"rows appended to {path}")
    return rows


def run(args, device, scale, reps, backends) -> List[harness.Row]:
    # the copy ceiling on a buffer as large as the block case's weights (out of every cache)
    rows = [copy_bandwidth(device, sum(math.prod(s) for s in shapes("block", scale)), reps)]
    for case in args.cases.split(","):
        shape_list = shapes(case, scale)
        case_name = f"{case}/{scale}" if scale > 1 else case
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            for op in args.ops.split(","):
                fns, tensors = {}, {}
                for backend in backends:
                    name = f"misa_kernels:{backend}"
                    tensors[name] = Tensors(shape_list, dtype, device)
                    fns[name] = ours(backend, tensors[name], op)
                peer_tensors = Tensors(shape_list, dtype, device)
                for name, fn in peers(peer_tensors, op).items():
                    fns[name], tensors[name] = fn, peer_tensors
                times = harness.time_interleaved(fns, device, reps)
                p50 = {name: harness.percentiles(t)[1] for name, t in times.items()}
                best_peer = min((n for n in fns if ":" not in n), key=p50.get)
                for name, fn in fns.items():
                    p20, median, p80 = harness.percentiles(times[name])
                    is_ours = ":" in name
                    rows.append(harness.Row(
                        op, case_name, dtype_name, name, str(device), len(shape_list),
                        sum(p.numel() for p in tensors[name].params), p20, median, p80,
                        bytes_moved(op, tensors[name]) / median / 1e6,
                        p50[best_peer] / median if is_ours else 1.0, best_peer if is_ours else "",
                        harness.count_launches(fn, device)))
                del fns, tensors, peer_tensors
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
