"""The MISA optimizer's step against torch.optim.AdamW(fused=True) over the same active
parameters, and its optimizer memory per active parameter.

The model is LLaMA-shaped (--config, scaled by --scale); MISA draws its active set once and
keeps it (no resampling in the timed steps), and a fused AdamW is built over exactly those
parameters. Both see the same gradients every step. Rows, in bench/out/optimizer_step.csv:
MISA.step() (importance norms + AdamW, the default) and with skip_nonfinite=False
(norms computed inside the AdamW pass), against AdamW(fused=True).step(); with
max_grad_norm, against clip_grad_norm_ + AdamW(fused=True);
and, in bench/out/optimizer_memory.csv, the bytes of gradients + optimizer state per active
parameter of a bf16 model (2 gradient + 4 master + 8 moments = 14; the spec's 18 adds an fp32
gradient copy this package does not keep) at every one of 1000 switches: flat means no leak.

    python bench/optimizer_step.py                 # CPU defaults
    python bench/optimizer_step.py --device cuda   # full LLaMA-2-7B block shapes
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import misa  # noqa: E402
from misa_examples import models  # noqa: E402


def _model(args, dtype, device):
    config = models.CONFIGS[args.config]
    config = config.with_(hidden_size=config.hidden_size // args.scale,
                          intermediate_size=config.intermediate_size // args.scale,
                          num_attention_heads=max(config.num_attention_heads // args.scale, 1),
                          num_key_value_heads=max(config.num_key_value_heads // args.scale, 1),
                          num_hidden_layers=args.layers, vocab_size=config.vocab_size // args.scale)
    torch.manual_seed(0)
    return models.build(config, device, dtype)


def _fill_grads(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(p.device, p.dtype)


def step_rows(args, device, dtype_name) -> List[harness.Row]:
    dtype = getattr(torch, dtype_name)
    fns, sizes = {}, {}
    variants = [("MISA", {}), ("MISA(skip_nonfinite=False)", {"skip_nonfinite": False})]
    if dtype != torch.float32:  # like for like with the peer, which keeps no fp32 masters
        variants.append(("MISA(master_weights=False)", {"master_weights": False}))
    for label, options in variants:
        for clip in (None, 1.0):
            model = _model(args, dtype, device)
            opt = misa.MISA(model, lr=1e-4, weight_decay=0.01, delta=args.delta, interval=10**9,
                            warmup_sweep=False, max_grad_norm=clip, seed=0, **options)
            if clip is not None and options:
                continue  # with clipping the norm pass is needed anyway: same as the default
            active = [p for p in model.parameters() if p.requires_grad]
            _fill_grads(active)
            name = label + ("+clip" if clip else "")
            fns[name], sizes[name] = opt.step, sum(p.numel() for p in active)
    # the peer: AdamW over the same active parameters (fp32 masters for a 16-bit model would be
    # a different algorithm, so the peer updates the weights in their own dtype)
    for clip in (None, 1.0):
        model = _model(args, dtype, device)
        probe = misa.MISA(model, lr=1e-4, delta=args.delta, interval=10**9, warmup_sweep=False, seed=0)
        active = [p for p in model.parameters() if p.requires_grad]
        del probe
        _fill_grads(active)
        adamw = torch.optim.AdamW(active, lr=1e-4, weight_decay=0.01, fused=True)

        def peer(adamw=adamw, active=active, clip=clip):
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(active, clip, foreach=True)
            adamw.step()

        name = "AdamW(fused)" + ("+clip_grad_norm_" if clip else "")
        fns[name], sizes[name] = peer, sum(p.numel() for p in active)
    times = harness.time_interleaved(fns, device, args.reps)
    p50 = {name: harness.percentiles(t)[1] for name, t in times.items()}
    rows = []
    for name, fn in fns.items():
        clipped = "clip" in name
        peer_name = "AdamW(fused)+clip_grad_norm_" if clipped else "AdamW(fused)"
        p20, median, p80 = harness.percentiles(times[name])
        is_ours = name.startswith("MISA")
        rows.append(harness.Row("step", f"{args.config}/{args.scale}x{args.layers}", dtype_name, name,
                                str(device), -1, sizes[name], p20, median, p80, 0.0,
                                p50[peer_name] / median if is_ours else 1.0, peer_name if is_ours else "",
                                harness.count_launches(fn, device)))
    return rows


def state_bytes(opt: misa.MISA) -> int:
    """Bytes of the active set's gradients, moments and masters."""
    active = opt._active
    tensors = [t for slot in active.stateful_slots() for t in active.state_of(slot).values()]
    tensors += [p.grad for p in active.params() if p.grad is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_check(args, device) -> dict:
    """Bytes of gradients + optimizer state per active parameter of a bf16 model, at every one
    of `args.switches` steps (each switches the active set)."""
    model = _model(args, torch.bfloat16, device)
    opt = misa.MISA(model, lr=1e-4, delta=args.delta, interval=1, warmup_sweep=False, seed=0)
    per_param = []
    # state is created at the first step of an activation and freed at the switch that ends it
    opt.register_switch_hook(lambda o: per_param.append(state_bytes(o) / o.active_params), before=True)
    for switch in range(args.switches):
        _fill_grads([p for p in model.parameters() if p.requires_grad], seed=switch)
        opt.step()  # interval=1: every step draws a new active set
        opt.zero_grad()
    return {"config": f"{args.config}/{args.scale}x{args.layers}", "device": str(device),
            "switches": args.switches, "bytes_per_active_param_first": per_param[0],
            "bytes_per_active_param_min": min(per_param), "bytes_per_active_param_max": max(per_param),
            "spec_bytes_per_param": 18.0, "machine": harness.machine(), "git_rev": harness.git_rev()}


def main(argv=None) -> List[harness.Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="llama2-7b", choices=list(models.CONFIGS))
    parser.add_argument("--scale", type=int, default=None, help="divide widths (default: 1 on CUDA, 4 on CPU)")
    parser.add_argument("--layers", type=int, default=None, help="blocks (default: 8 on CUDA, 4 on CPU)")
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--switches", type=int, default=1000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.scale = args.scale or (1 if device.type == "cuda" else 4)
    args.layers = args.layers or (8 if device.type == "cuda" else 4)
    args.reps = args.reps or (50 if device.type == "cuda" else 15)
    rows = [row for name in args.dtypes.split(",") for row in step_rows(args, device, name)]
    harness.stamp(rows)
    print(f"machine: {rows[0].machine}; torch {rows[0].torch}; git {rows[0].git_rev}; reps {args.reps}")
    print(harness.table(rows))
    print("ratio: the peer's p50 over MISA's; >= 0.91 meets the goal 'at most 1.1x AdamW(fused)'")
    print(f"rows appended to {harness.write(rows, 'optimizer_step', args.out)}")
    memory = memory_check(args, device)
    print(f"memory (bf16 model): {memory['bytes_per_active_param_first']:.3f} bytes per active parameter "
          f"(the spec's layout: 18); over {args.switches} switches between "
          f"{memory['bytes_per_active_param_min']:.3f} and {memory['bytes_per_active_param_max']:.3f}")
    print(f"written to {harness.write_dicts([memory], 'optimizer_memory', args.out)}")
    return rows


if __name__ == "__main__":
    main()
