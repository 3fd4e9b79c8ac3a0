"""Training memory of LLaMA-2-7B and LLaMA-3-8B shapes with AdamW, LoRA, LISA, BAdam and MISA.

Counts with misa.memory.estimate on the meta device (nothing is allocated, nothing is
downloaded: the shapes are written down in misa_examples.models.CONFIGS), at several deltas, with the
activations of `--batch` sequences of `--seq-len` tokens (by default BAdam's published setting:
batch 2, 1024 tokens, activation checkpointing). `--measure` also trains a small real model
with every method and sets the estimate beside the measured bytes (CPU: live tensors and the
tensors autograd saves; CUDA: torch.cuda.max_memory_allocated).

    python bench/memory_table.py
    python bench/memory_table.py --configs llama2-7b --deltas 0.01 0.03 --no-checkpointing
    python bench/memory_table.py --measure

Prints Markdown tables, writes bench/out/memory_table.csv (and memory_measured.csv).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

from misa import MISA, memory, partition  # noqa: E402
from misa_examples import models  # noqa: E402

#: published peaks (the same setting: fp16/bf16 weights, batch 2, activation checkpointing).
PUBLISHED = {
    ("llama2-7b", "badam-released"): "21.8 (BAdam README)",
    ("llama3-8b", "badam-released"): "23.5 (BAdam README)",
    ("llama2-7b", "adamw-fp32-grads"): "122.8+ (BAdam README)",
    ("llama3-8b", "adamw-fp32-grads"): "144+ (BAdam README)",
}
COLUMNS = ["method", "setting", "trained", "x one block", "opt B/param", "weights", "gradients", "masters", "moments",
           "optimizer", "activations", "transients", "total", "published"]


def rows_for(config_name: str, deltas: List[float], batch: int, seq_len: int, checkpointing: bool,
             rank: int) -> List[Dict]:
    """One row per method and setting for the config `config_name` (sizes in GB = 1e9 bytes)."""
    config = models.CONFIGS[config_name]
    meta = models.build(config, "meta", torch.bfloat16)
    block = partition(meta, "layer").modules[0].numel
    activation = dict(batch=batch, seq_len=seq_len, checkpointing=checkpointing)
    settings = [
        ("adamw", "adamw-mixed", "bf16 weights + fp32 masters", {}),
        ("adamw", "adamw-bf16", "pure bf16 weights, fp32 moments", dict(master_weights=False)),
        ("adamw", "adamw-fp32-grads", "+ fp32 gradient copy (the published 18M)", dict(fp32_grad_copy=True)),
        ("lora", "lora", f"rank {rank} on q,k,v,o,gate,up,down, fp32 adapters", dict(rank=rank)),
        ("lisa", "lisa", "2 blocks + embedding + head (LMFlow's default, lisa_activated_layers=2)",
         dict(n_layers=2)),
        ("lisa", "lisa-1", "1 block + embedding + head", dict(n_layers=1)),
        ("badam", "badam", "1 block, this package's layout", {}),
        ("badam", "badam-released", "1 block + fp32 gradient copy (BAdam's code)", dict(fp32_grad_copy=True)),
    ]
    for delta in deltas:
        settings.append(("misa", f"misa-{delta:g}", f"delta={delta:g}, this package", dict(delta=delta)))
        settings.append(("misa", f"misa-{delta:g}-released", f"delta={delta:g}, + fp32 gradient copy (released code)",
                         dict(delta=delta, fp32_grad_copy=True)))
    rows = []
    for method, key, setting, options in settings:
        est = memory.estimate(meta, method, **activation, **options)
        rows.append({
            "config": config_name, "method": method, "setting": setting,
            "trained": f"{est.trained_params / 1e6:.1f}M", "x one block": f"{est.trained_params / block:.2f}",
            "opt B/param": f"{est.optimizer / est.trained_params:.1f}",
            **{k: f"{getattr(est, k) / report.GB:.2f}" for k in
               ("weights", "gradients", "masters", "moments", "optimizer", "activations", "transients", "total")},
            "published": PUBLISHED.get((config_name, key), ""),
        })
    return rows


# ---------------------------------------------------------------------------- the measured check

SMALL = models.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
#: label, method, MISA options, estimate options
MEASURED = [
    ("adamw", "adamw", dict(sampler="full"), {}),
    ("lora r=4", "lora", {}, dict(rank=4)),
    ("lisa 1 block", "lisa", dict(sampler="lisa", sampler_options=dict(n_layers=1)), dict(n_layers=1)),
    ("badam", "badam", dict(sampler="badam"), {}),
    ("misa delta=0.05", "misa", dict(delta=0.05), dict(delta=0.05)),
    ("misa delta=0.25, embed+head", "misa", dict(delta=0.25, non_block="embed_head"),
     dict(delta=0.25, non_block="embed_head")),
]


def _optimizer(model, method, options, rank):
    if method != "lora":
        return model, MISA(model, lr=1e-3, interval=2, seed=0, warmup_sweep=False, **options)
    import peft
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                         target_modules=list(memory.LLAMA_LINEARS)), model)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in adapters:
        p.data = p.data.float()  # fp32 adapters, as peft.get_peft_model makes them
    return model, torch.optim.AdamW(adapters, lr=1e-3)


def measured_rows(device: str, dtype: torch.dtype, batch: int = 4, seq_len: int = 64, steps: int = 8) -> List[Dict]:
    """Trains SMALL with every method; the largest weights + optimizer bytes and (CPU) saved
    activations over `steps` steps beside estimate(), or (CUDA) max_memory_allocated beside the total."""
    rows = []
    for label, method, options, est_options in MEASURED:
        if method == "lora" and not _has_peft():
            continue
        torch.manual_seed(0)
        model, optimizer = _optimizer(models.build(SMALL, device, dtype), method, options, est_options.get("rank", 8))
        est = memory.estimate(models.build(SMALL, "meta", dtype), method, batch=batch, seq_len=seq_len, **est_options)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        live = activations = 0
        generator = torch.Generator().manual_seed(0)
        for _ in range(steps):
            x = torch.randint(0, SMALL.vocab_size, (batch, seq_len), generator=generator).to(device)
            holder = {}
            saved = memory.saved_tensor_bytes(model, lambda: holder.setdefault("loss", model(x, labels=x)))
            holder["loss"].backward()
            measured = memory.measure(model, optimizer)
            live = max(live, measured.weights + measured.optimizer)
            activations = max(activations, saved)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        row = {"method": label, "estimate: weights+optimizer": est.weights + est.optimizer,
               "measured: live tensors": live,
               "error": f"{(est.weights + est.optimizer) / live - 1:+.2%}",
               "estimate: activations": est.activations, "measured: saved tensors": activations,
               "activation error": f"{est.activations / activations - 1:+.2%}"}
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated()
            row.update({"estimate: total": est.total, "measured: max_memory_allocated": peak,
                        "total error": f"{est.total / peak - 1:+.2%}"})
        rows.append(row)
        del model, optimizer
    return rows


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["llama2-7b", "llama3-8b"], choices=sorted(models.CONFIGS))
    parser.add_argument("--deltas", nargs="+", type=float, default=[0.01, 0.03, 0.05, 0.1, 0.25])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--no-checkpointing", action="store_true", help="keep every block's activations")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--measure", action="store_true", help="also check the estimate on a small real model")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args(argv)
    for delta in args.deltas:
        if not 0.0 < delta <= 1.0:
            parser.error(f"--deltas: {delta} is not in (0, 1]")

    print(f"# Training memory, GB (1e9 bytes); {report.stamp()}")
    checkpointing = not args.no_checkpointing
    print(f"activations: batch {args.batch} x {args.seq_len} tokens, "
          f"{'with' if checkpointing else 'without'} activation checkpointing; bf16 weights")
    print("trained: parameters with a gradient and optimizer state; x one block: trained / one block's "
          "parameters; opt B/param: (gradients + masters + moments) / trained; transients: the loss's fp32 "
          "buffers beside the saved activations; total: the sum of the categories")
    all_rows = []
    for name in args.configs:
        rows = rows_for(name, args.deltas, args.batch, args.seq_len, checkpointing, args.rank)
        all_rows += rows
        print(f"\n## {name} ({models.count_parameters(models.CONFIGS[name]) / 1e9:.2f}B parameters)\n")
        print(report.markdown_table(rows, COLUMNS))
    path = report.write_csv(args.out / "memory_table.csv", all_rows)
    print(f"\nwrote {path}")

    if args.measure:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16
        print(f"\n## Estimate against measurement: {SMALL.num_hidden_layers}-block LLaMA, hidden {SMALL.hidden_size}, "
              f"{dtype}, {device}, bytes\n")
        rows = measured_rows(device, dtype)
        print(report.markdown_table(rows, list(rows[0])))
        print(f"\nwrote {report.write_csv(args.out / 'memory_measured.csv', rows)}")


if __name__ == "__main__":
    main()
