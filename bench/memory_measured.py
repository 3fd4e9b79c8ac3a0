"""Measured training memory of a LLaMA-shaped model, beside misa.memory.estimate.

Builds a Hugging Face ``LlamaForCausalLM`` from a config (random weights, bf16, nothing
downloaded; the HF model rather than misa_examples.models because that is what users fine-tune:
its own activation checkpointing, loss and peft's LoRA path), enables HF activation
checkpointing, and trains a few steps of batch 1 with each method, every method in a fresh
process of its own (so that one method's freed memory cannot hide in another's peak):

- misa-1%, misa-3%: misa.MISA at delta 1% / 3%, fp32 master weights;
- badam: one block (sampler "badam"), fp32 masters;
- lisa: LMFlow's default, 2 blocks (``lisa_activated_layers=2``) + embedding, head and final
  norm at every step, fp32 masters; lisa-1: the same with one block;
- lora: peft rank 8 (alpha 16, no dropout) on q, k, v, o, gate, up, down, fp32 adapters,
  torch AdamW.

`--interval` 2 with the default 3 steps: the sampled methods train one active set for steps 1
and 2 (its state is created in step 1's optimizer.step(), so step 2 is training's steady state:
weights, state, gradients and activations at once) and switch to another for step 3. MISA's
warm-up sweep (a switch at every step until every module has been active) is off, as it would
keep the state out of every forward and backward pass of these few steps.

Measured: the peak of the bytes held by torch's CPU allocator, from torch.profiler's memory
events (``profile_memory=True``: every allocation and free through c10's CPU allocator,
oneDNN's scratch buffers included), summed in time order from before the model is built, so
the peak includes the weights. Beside it, the process's peak RSS above its RSS before the
model was built (VmHWM; the worker runs with MALLOC_MMAP_THRESHOLD_ fixed so that freed
blocks go back to the system): the operating system's view, which adds Python, the libraries'
code and malloc's own overhead. Each worker's data segment (RLIMIT_DATA) is capped at the
memory available when it starts less a margin for the machine's other jobs (and at most
`--memory-cap-gb`), so that a method that does not fit fails with an allocation error, reported
in the table, instead of waking the kernel's OOM killer.

    python bench/memory_measured.py --margin-gb 3                 # LLaMA-2-7B, every method
    python bench/memory_measured.py --shape llama-350m --layers 8 --methods misa-3% --seq-len 128
    python bench/memory_measured.py --from-raw bench/results/memory-measured/llama2-7b-raw.jsonl

Prints per-step progress and a Markdown table; writes <out>/<shape>.csv (one row per method),
<out>/<shape>-steps.csv (one row per step: time, active set, peaks by phase) and appends the
workers' records to <out>/<shape>-raw.jsonl, from which --from-raw rebuilds both tables.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import report  # noqa: E402

from misa import memory  # noqa: E402
from misa_examples import models  # noqa: E402

SHAPES = {
    "llama2-7b": models.CONFIGS["llama2-7b"],
    # a 1B LLaMA with the 7B's layout (multi-head attention, vocabulary 32000)
    "llama-1b": models.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=22,
                                   num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048),
    "llama-350m": models.CONFIGS["llama-350m"],
}
#: published peaks, on GPUs and in their own settings (see bench/RESULTS.md)
PUBLISHED = {"badam": "21.8 (BAdam README)", "lisa": "24 (LISA paper: 7B in 24 GB)"}
RESULT_TAG = "RESULT "
#: malloc returns every block of 64 KiB or more to the system when it is freed, so that peak RSS
#: follows the bytes allocated (glibc's default threshold grows up to 32 MiB and keeps freed blocks).
MMAP_THRESHOLD = "65536"


@dataclass(frozen=True)
class Method:
    """One training setup: what misa.memory.estimate calls it and how the worker builds it."""

    kind: str  # estimate()'s method
    description: str
    misa_options: Dict = field(default_factory=dict)  # misa.MISA keywords; empty for lora
    estimate_options: Dict = field(default_factory=dict)


LORA_RANK = 8
METHODS = {
    "misa-1%": Method("misa", "MISA delta=0.01, fp32 masters", dict(delta=0.01, warmup_sweep=False), dict(delta=0.01)),
    "misa-3%": Method("misa", "MISA delta=0.03, fp32 masters", dict(delta=0.03, warmup_sweep=False), dict(delta=0.03)),
    "badam": Method("badam", "BAdam: 1 block, fp32 masters", dict(sampler="badam")),
    "lisa": Method("lisa", "LISA, LMFlow's default: 2 blocks + embedding + head, fp32 masters",
                   dict(sampler="lisa", sampler_options=dict(n_layers=2)), dict(n_layers=2)),
    "lisa-1": Method("lisa", "LISA: 1 block + embedding + head, fp32 masters",
                     dict(sampler="lisa", sampler_options=dict(n_layers=1)), dict(n_layers=1)),
    "lora": Method("lora", f"LoRA (peft) rank {LORA_RANK} on the 7 linears, fp32 adapters, torch AdamW",
                   estimate_options=dict(rank=LORA_RANK)),
}
DEFAULT_METHODS = ["misa-1%", "misa-3%", "badam", "lisa", "lisa-1", "lora"]
COLUMNS = ["method", "trained", "estimate", "estimate (drawn sets)", "measured peak", "measured / estimate",
           "peak in", "fwd+bwd peak", "fwd+bwd / estimate", "peak RSS", "s/step", "published", "status"]


# ---------------------------------------------------------------------------- the worker


def hf_model(shape: models.LlamaConfig, dtype: torch.dtype):
    """A Hugging Face LlamaForCausalLM of `shape` with random weights, built directly in `dtype`."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=shape.rms_norm_eps, rope_theta=shape.rope_theta, tie_word_embeddings=shape.tie_word_embeddings)
    return transformers.LlamaForCausalLM._from_config(config, dtype=dtype)


def _rss() -> Tuple[int, int]:
    """(current, peak) resident set of this process in bytes."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux 4.0+)


def _optimizer(model, method: Method, lr: float, interval: int, seed: int):
    """(model, optimizer): misa.MISA for the sampled methods; peft LoRA + torch AdamW for lora."""
    if method.kind == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules=list(memory.LLAMA_LINEARS),
            task_type="CAUSAL_LM"))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    import misa

    return model, misa.MISA(model, lr=lr, interval=interval, master_weights=True, seed=seed, **method.misa_options)


def _memory_events(prof) -> Tuple[List[Tuple[int, int]], Dict[str, List[Tuple[int, int]]]]:
    """(time-ordered (ns, running bytes) after every CPU allocation and free, {annotation: [(start, end)]})."""
    events = prof.profiler.kineto_results.events()
    changes = sorted((e.start_ns(), e.nbytes()) for e in events
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running, total = [], 0
    for ns, nbytes in changes:
        total += nbytes
        running.append((ns, total))
    ranges: Dict[str, List[Tuple[int, int]]] = {}
    for e in events:
        if e.is_user_annotation():
            ranges.setdefault(e.name(), []).append((e.start_ns(), e.end_ns()))
    return running, ranges


def _peak_within(running: List[Tuple[int, int]], start: int, end: int) -> int:
    return max((b for ns, b in running if start <= ns <= end), default=0)


def _train(model, method: Method, shape: models.LlamaConfig, args, steps: List[Dict], rss_before_model: int) -> str:
    """Trains `args.steps` steps, appending one record per step to `steps`; returns "ok" or, when
    an allocation is refused under the data-segment cap, "out of memory at step k"."""
    from torch.profiler import record_function

    generator = torch.Generator().manual_seed(args.seed)
    try:
        with record_function("training"):
            model, optimizer = _optimizer(model, method, args.lr, args.interval, args.seed)
            for step in range(1, args.steps + 1):
                active = list(getattr(optimizer, "active_modules", []))
                ids = torch.randint(0, shape.vocab_size, (1, args.seq_len), generator=generator)
                times = {}
                with record_function(f"step {step}"):
                    for phase in ("forward", "backward", "optimizer"):
                        t = time.perf_counter()
                        with record_function(f"{phase} {step}"):
                            if phase == "forward":
                                loss = model(input_ids=ids, labels=ids).loss
                            elif phase == "backward":
                                loss.backward()
                            else:
                                optimizer.step()
                                optimizer.zero_grad(set_to_none=True)
                        times[phase] = time.perf_counter() - t
                rss, hwm = _rss()
                steps.append({"step": step, "seconds": sum(times.values()),
                              **{f"{k} s": v for k, v in times.items()}, "loss": loss.item(), "active": active,
                              "peak RSS above the start": hwm - rss_before_model})
                print(f"step {step}/{args.steps}: {sum(times.values()):.1f} s (forward {times['forward']:.1f}, "
                      f"backward {times['backward']:.1f}, optimizer {times['optimizer']:.1f}); loss "
                      f"{loss.item():.3f}; {len(active) or '-'} active; RSS {rss / report.GB:.2f} GB, "
                      f"peak {(hwm - rss_before_model) / report.GB:.2f} GB above the start", flush=True)
                del loss
    except (MemoryError, RuntimeError) as error:  # an allocation refused under the data-segment cap
        if not isinstance(error, MemoryError) and "memory" not in str(error):
            raise
        status = f"out of memory at step {len(steps) + 1}"
        print(f"{status}: {str(error).splitlines()[0]}", flush=True)
        return status
    return "ok"


def run_worker(args) -> dict:
    """Builds the model, trains `args.steps` steps with `args.method` under the profiler, and
    returns the measurement (printed as one RESULT line by main)."""
    from torch.profiler import ProfilerActivity, profile

    import peft  # noqa: F401  (imported before the baseline: the libraries' own memory is not the method's)
    import transformers  # noqa: F401

    torch.set_num_threads(args.threads)
    method, shape = METHODS[args.method], _shape(args)
    rss_before_model, _ = _rss()
    steps: List[Dict] = []
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        model = hf_model(shape, torch.bfloat16)
        model.activation_checkpointing_enable()  # non-reentrant torch.utils.checkpoint of every block
        model.train()
        weights = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])
        print(f"built {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
              f"{weights / report.GB:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
        _reset_peak_rss()
        status = _train(model, method, shape, args, steps, rss_before_model)
        _, peak_rss = _rss()  # now: stopping the profiler takes memory of its own
        del model  # a failed run's model and state go before the profiler collects its events
        gc.collect()  # (hooks tie the optimizer and the model in a cycle)
    running, ranges = _memory_events(prof)
    train_start, train_end = ranges["training"][0]
    for row in steps:
        for phase in ("forward", "backward", "optimizer", "step"):
            (start, end), = ranges[f"{phase} {row['step']}"]
            row[f"peak in {phase}"] = _peak_within(running, start, end)
    peak = _peak_within(running, train_start, train_end)
    peak_in = max(("forward", "backward", "optimizer"), key=lambda ph: max((r[f"peak in {ph}"] for r in steps),
                                                                            default=0))
    return {"method": args.method, "status": status, "weights": weights, "peak": peak, "peak_in": peak_in,
            "peak_rss_above_start": peak_rss - rss_before_model, "steps": steps}


# ---------------------------------------------------------------------------- the parent


def _shape(args) -> models.LlamaConfig:
    shape = SHAPES[args.shape]
    return shape.with_(num_hidden_layers=args.layers) if args.layers else shape


def estimates(shape: models.LlamaConfig, method: Method, seq_len: int,
              drawn: Optional[List[List[str]]] = None) -> Tuple[memory.MemoryEstimate, Optional[int]]:
    """(estimate for the method's largest active set, the largest estimate over the `drawn` active sets)."""
    common = dict(batch=1, seq_len=seq_len, checkpointing=True, **method.estimate_options)
    largest = memory.estimate(shape, method.kind, **common)
    if not drawn:
        return largest, None
    options = {k: v for k, v in common.items() if k not in ("delta", "n_layers")}
    return largest, max(memory.estimate(shape, method.kind, active=a, **options).total for a in drawn)


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def run_method(name: str, args) -> dict:
    """Runs one method in a fresh worker process, echoing its progress; returns its result."""
    cap = int(min(args.memory_cap_gb * report.GB, _available_bytes() - args.margin_gb * report.GB))
    print(f"worker data-segment cap {cap / report.GB:.1f} GB", flush=True)
    command = [sys.executable, __file__, "--worker", name, "--shape", args.shape, "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--interval", str(args.interval), "--lr", str(args.lr),
               "--seed", str(args.seed), "--threads", str(args.threads)]
    if args.layers:
        command += ["--layers", str(args.layers)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "OMP_NUM_THREADS": str(args.threads)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (cap, cap)))
    result = None
    for line in process.stdout:
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
        elif "USDT:" not in line:  # kineto's profiler start/stop notices
            print(f"  [{name}] {line}", end="", flush=True)
    code = process.wait()
    if result is None:
        result = {"method": name, "status": f"worker failed (exit code {code})", "steps": []}
    return {**result, "cap": cap}


def table_row(name: str, result: dict, shape: models.LlamaConfig, seq_len: int) -> Dict:
    """The table and CSV row of one method (GB = 1e9 bytes)."""
    method = METHODS[name]
    drawn = [s["active"] for s in result["steps"] if s["active"]]
    largest, drawn_total = estimates(shape, method, seq_len, drawn)
    measured = result.get("peak", 0)
    steps = result["steps"]
    forward_backward = max((max(s["peak in forward"], s["peak in backward"]) for s in steps), default=0)
    ok = result["status"] == "ok"
    gb = lambda n: f"{n / report.GB:.2f}" if n else ""  # noqa: E731
    return {
        "method": name, "setting": method.description, "trained": f"{largest.trained_params / 1e6:.1f}M",
        "estimate": gb(largest.total), "estimate (drawn sets)": gb(drawn_total),
        "measured peak": gb(measured),  # of a failed run: what it held before the refused allocation
        "measured / estimate": f"{measured / largest.total:.3f}" if ok else "",
        "peak RSS": gb(result.get("peak_rss_above_start", 0)),
        "peak in": result.get("peak_in", "") if ok else "",
        "fwd+bwd peak": gb(forward_backward),
        "fwd+bwd / estimate": f"{forward_backward / largest.total:.3f}" if ok else "",
        "s/step": f"{sum(s['seconds'] for s in steps) / len(steps):.1f}" if steps else "",
        "published": PUBLISHED.get(name, "") if shape == SHAPES["llama2-7b"] else "",
        "status": result["status"] + (f" (cap {result['cap'] / report.GB:.1f} GB)" if "cap" in result and not ok
                                      else ""),
        "trained params": largest.trained_params,
        "estimate bytes": largest.total, "estimate weights": largest.weights,
        "estimate optimizer": largest.optimizer, "estimate activations": largest.activations,
        "estimate transients": largest.transients,
        "estimate drawn bytes": drawn_total or "", "measured bytes": measured or "",
        "measured fwd+bwd bytes": forward_backward if steps else "",
        "measured weights": result.get("weights", ""), "peak rss bytes": result.get("peak_rss_above_start", ""),
        "steps": len(steps),
    }


def step_rows(name: str, result: dict) -> List[Dict]:
    return [{"method": name, **{k: (" ".join(v) if k == "active" else v) for k, v in s.items()}}
            for s in result["steps"]]


def _report(rows: List[Dict], steps: List[Dict], out: Path, name: str) -> None:
    """Writes the CSV files (rewritten whole, so that a long run keeps what it has after each method)."""
    report.write_csv(out / f"{name}.csv", rows)
    if steps:
        report.write_csv(out / f"{name}-steps.csv", steps)


def _print_table(rows: List[Dict], out: Path, name: str) -> None:
    print("\nGB = 1e9 bytes. measured peak: torch's CPU allocator (profiler memory events), weights included; "
          "fwd+bwd peak: the same outside optimizer.step(); peak RSS: the process's peak resident set above its "
          "size before the model was built.\n")
    print(report.markdown_table(rows, COLUMNS))
    print(f"\nwrote {out / f'{name}.csv'} and {out / f'{name}-steps.csv'}")


def from_raw(path: Path, out: Path) -> List[Dict]:
    """The table and CSV files again from a run's raw worker results, with today's estimator."""
    rows, steps, name = [], [], path.name[: -len("-raw.jsonl")]
    with open(path) as f:
        for line in f:
            result = json.loads(line)
            shape = SHAPES[result.get("shape_name", result["shape"])]
            if result.get("layers"):
                shape = shape.with_(num_hidden_layers=result["layers"])
            info = {k: result[k] for k in ("shape", "seq_len", "machine", "torch", "git_rev")}
            rows.append({**table_row(result["method"], result, shape, result["seq_len"]), **info})
            steps += [{**r, **info} for r in step_rows(result["method"], result)]
    _report(rows, steps, out, name)
    _print_table(rows, out, name)
    return rows


def main(argv=None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, help="override the shape's number of blocks")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(METHODS))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--interval", type=int, default=2, help="steps between switches of the active set")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-cap-gb", type=float, default=float("inf"),
                        help="data-segment limit of each worker (default: none beyond --margin-gb)")
    parser.add_argument("--margin-gb", type=float, default=1.5,
                        help="memory left to the machine's other jobs when a worker starts (default: 1.5)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "memory-measured")
    parser.add_argument("--from-raw", type=Path, metavar="RAW_JSONL",
                        help="rebuild the table and CSV files from a run's <shape>-raw.jsonl, with today's estimator")
    parser.add_argument("--worker", choices=sorted(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.seq_len < 2 or (args.layers is not None and args.layers < 1):
        parser.error("--steps and --layers must be at least 1, --seq-len at least 2")
    if args.worker:
        args.method = args.worker
        print(RESULT_TAG + json.dumps(run_worker(args)), flush=True)
        return []
    if args.from_raw:
        return from_raw(args.from_raw, args.out)

    shape = _shape(args)
    name = args.shape + (f"-{args.layers}blocks" if args.layers else "")
    print(f"# Measured training memory: {name}, bf16, batch 1 x {args.seq_len} tokens, HF activation checkpointing, "
          f"{args.steps} steps, interval {args.interval}; {report.stamp()}; torch {torch.__version__}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, steps = [], []
    info = dict(shape=name, seq_len=args.seq_len, machine=harness.machine(), torch=torch.__version__,
                git_rev=harness.git_rev())
    for method in args.methods:
        print(f"\n{method}: {METHODS[method].description}", flush=True)
        t = time.perf_counter()
        result = run_method(method, args)
        with open(args.out / f"{name}-raw.jsonl", "a") as f:  # the measurement as the worker reported it
            f.write(json.dumps({**result, **info, "shape_name": args.shape, "layers": args.layers}) + "\n")
        rows.append({**table_row(method, result, shape, args.seq_len), **info})
        steps += [{**r, **info} for r in step_rows(method, result)]
        print(f"{method}: {result['status']} in {time.perf_counter() - t:.0f} s; measured "
              f"{rows[-1]['measured peak']} GB, estimate {rows[-1]['estimate']} GB", flush=True)
        _report(rows, steps, args.out, name)
    _print_table(rows, args.out, name)
    return rows


if __name__ == "__main__":
    main()
