"""The main job: MISA against full AdamW, LISA, BAdam and LoRA on real text, same seed, data and steps.

Two scenarios, each training a LLaMA-style causal LM (misa_examples.models: q, k, v, o, gate, up, down,
RMSNorm, rotary) on byte-level tokens:

- pretrain: from random weights on the Python standard library's source (held out by file),
  every method for the same steps. MISA in the released code's pre-training setting (delta 25%,
  eta 500, embedding and head trained).
- finetune: the AdamW model of the pretrain scenario (saved as pretrained.pt) fine-tuned on a
  different text, the English help topics of pydoc_data (held out by topic). MISA with the
  paper's fine-tuning setting (delta 3%, embedding and head frozen) and the package's default
  importance rule and temperature.

In both, at equal optimizer memory: "misa~lisa" is MISA with LISA's active set (one block's
worth of modules + embedding, head and norms), "misa~badam" MISA with BAdam's (one block's
worth of modules, the rest frozen). LoRA runs through peft when it is installed.

    python bench/experiment.py                       # --preset cpu: under 10 minutes on 2 cores
    python bench/experiment.py --preset gpu-small    # a CUDA device; --preset gpu: the paper's 350M shape
    python bench/experiment.py --data my.txt --finetune-data other.txt --seeds 3
    python bench/experiment.py --ablation importance --seeds 3   # the headline MISA under each importance rule

Writes into --out (default bench/out/experiment): curves.csv (every step's training loss and
every evaluation's held-out loss), summary.csv and summary.md (one row per run: held-out loss,
its gap to AdamW, tokens/s, the optimizer memory measured at its peak beside misa.memory's
estimate), pretrain.png and finetune.png (loss curves; held-out loss against optimizer memory),
selection_vs_score-<scenario>.png (each MISA-sampled module's final importance score against the
fraction of steps it was active) and pretrained.pt; with --ablation NAME also ablation-NAME.md and
ablation-NAME.csv (final held-out loss per variant, its paired difference to the reference
variant, and the extreme sampling probabilities reached). Prints the summary table at the end.
"""
from __future__ import annotations

import argparse
import ast
import math
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

import misa  # noqa: E402
from misa import memory  # noqa: E402
from misa_examples import data, models  # noqa: E402

SCENARIOS = ("pretrain", "finetune")
BETAS = (0.9, 0.95)
MAX_GRAD_NORM = 1.0
MB = 1e6


@dataclass(frozen=True)
class Preset:
    """Model, data and schedule of one experiment size."""

    model: models.LlamaConfig
    seq_len: int
    batch: int
    pretrain_steps: int
    finetune_steps: int
    interval: int  # T: steps between resamplings / block switches, the same for every method
    eval_every: int
    eval_batches: int
    pretrain_lr: float
    finetune_lr: float
    warmup: int
    lora_rank: int
    lora_lr_scale: float  # LoRA's learning rate over the others' (adapters start at zero)
    dtype: torch.dtype
    device: str
    threads: Optional[int] = None  # torch CPU threads; None: torch's choice


def _llama(hidden, layers, heads, seq_len):
    """A byte-vocabulary LLaMA with LLaMA's proportions: SwiGLU width about 8/3 of hidden."""
    return models.LlamaConfig(vocab_size=data.VOCAB_SIZE, hidden_size=hidden,
                              intermediate_size=8 * hidden // 3 // 8 * 8, num_hidden_layers=layers,
                              num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq_len)


PRESETS: Dict[str, Preset] = {
    # seconds: an end-to-end check of the whole pipeline (the tests run it). One thread: a second
    # one only spin-waits at this size, and stalls when other jobs share the cores.
    "smoke": Preset(_llama(32, 2, 2, 32), seq_len=32, batch=4, pretrain_steps=12, finetune_steps=8, interval=4,
                    eval_every=6, eval_batches=2, pretrain_lr=3e-3, finetune_lr=1e-3, warmup=2, lora_rank=4,
                    lora_lr_scale=3.0, dtype=torch.float32, device="cpu", threads=1),
    # under 10 minutes for every method and both scenarios on 2 CPU cores. One thread: at these
    # sizes a second one gains little and spin-waits when other jobs share the cores.
    "cpu": Preset(_llama(128, 8, 4, 64), seq_len=64, batch=8, pretrain_steps=300, finetune_steps=150,
                  interval=25, eval_every=25, eval_batches=8, pretrain_lr=1e-3, finetune_lr=1e-3, warmup=20,
                  lora_rank=8, lora_lr_scale=3.0, dtype=torch.float32, device="cpu", threads=1),
    "gpu-small": Preset(_llama(512, 12, 8, 256), seq_len=256, batch=32, pretrain_steps=2000, finetune_steps=500,
                        interval=50, eval_every=100, eval_batches=16, pretrain_lr=1e-3, finetune_lr=3e-4,
                        warmup=100, lora_rank=16, lora_lr_scale=3.0, dtype=torch.bfloat16, device="cuda"),
    # the paper's 350M pre-training shape (24 blocks, hidden 1024) with the byte vocabulary
    "gpu": Preset(_llama(1024, 24, 16, 512), seq_len=512, batch=32, pretrain_steps=5000, finetune_steps=1000,
                  interval=50, eval_every=250, eval_batches=32, pretrain_lr=1e-3, finetune_lr=1e-4,
                  warmup=250, lora_rank=16, lora_lr_scale=3.0, dtype=torch.bfloat16, device="cuda"),
}


@dataclass(frozen=True)
class Method:
    """One optimizer configuration: `family` is adamw, misa, lisa, badam or lora; `options` go
    to misa.MISA (or the LoRA rank); `estimate` to misa.memory.estimate."""

    name: str
    family: str
    note: str
    options: dict = field(default_factory=dict)
    estimate: dict = field(default_factory=dict)


def scenario_methods(scenario: str, preset: Preset) -> List[Method]:
    """The methods of `scenario`; misa~lisa and misa~badam get the delta of one block's modules."""
    meta = models.build(preset.model, "meta", preset.dtype)
    part = misa.partition(meta)
    block = sum(m.numel for m in part.modules if m.block == 0)
    one_block = (block + 0.5) / part.total_params
    if scenario == "pretrain":  # the released code's C4 pre-training setting
        style = dict(eta=500.0, importance="released")
        headline = Method("misa-25%", "misa", "delta 25%, eta 500, embedding + head trained (pre-training setting)",
                          dict(delta=0.25, non_block="embed_head", **style), dict(delta=0.25, non_block="embed_head"))
    else:  # the paper's fine-tuning setting, delta raised where a module of a small model exceeds 3%
        style = {}  # the package's default importance rule and temperature
        delta = max(0.03, float(misa.samplers.smallest_delta(max(m.numel for m in part.modules), part.total_params)))
        raised = "" if delta == 0.03 else f" (3% raised to {delta:.2%}: the largest module must fit)"
        headline = Method("misa-3%", "misa", f"delta 3%{raised}, the package's default importance rule and eta, "
                          "embedding + head frozen",
                          dict(delta=delta, **style), dict(delta=delta))
    return [
        Method("adamw", "adamw", "every parameter", dict(sampler="full")),
        headline,
        Method("lisa", "lisa", "1 random block + embedding, head, final norm",
               dict(sampler="lisa", sampler_options=dict(n_layers=1)), dict(n_layers=1)),
        Method("misa~lisa", "misa", f"delta {one_block:.1%} (one block of modules) + embedding, head, norms",
               dict(delta=one_block, non_block="trained", **style), dict(delta=one_block, non_block="trained")),
        Method("badam", "badam", "1 block, random order", dict(sampler="badam", sampler_options=dict(order="random"))),
        Method("misa~badam", "misa", f"delta {one_block:.1%} (one block of modules), the rest frozen",
               dict(delta=one_block, **style), dict(delta=one_block)),
        Method(f"lora-r{preset.lora_rank}", "lora", f"rank {preset.lora_rank} on q,k,v,o,gate,up,down (peft)",
               dict(rank=preset.lora_rank), dict(rank=preset.lora_rank)),
    ]


def _override(method: Method, options: dict) -> Method:
    """`method` with `options` replacing its MISA options (methods of other families unchanged)."""
    if method.family != "misa":
        return method
    note = method.note + "; " + ", ".join(f"{k}={v}" for k, v in options.items())
    return replace(method, note=note, options={**method.options, **options})


#: The headline MISA method of each scenario: the one an ablation varies.
HEADLINES = {"pretrain": "misa-25%", "finetune": "misa-3%"}

#: --ablation NAME: (label, MISA options) of each variant; the first is the reference the others
#: are compared with. Every variant keeps the headline's delta, interval and steps.
ABLATIONS: Dict[str, List[tuple]] = {
    "importance": [
        ("uniform", dict(importance="relative", eta=0.0)),  # eta=0: every rule draws uniformly
        ("paper-1", dict(importance="paper", eta=1.0)),
        ("released-1", dict(importance="released", eta=1.0)),
        ("released-500", dict(importance="released", eta=500.0)),  # the release's pre-training eta
        # the top module's score is 20-50 times the mean on the cpu preset, so eta >= 0.3 already
        # draws it with probability ~1: the temperatures span gentle to saturated steering
        ("relative-0.03", dict(importance="relative", eta=0.03)),
        ("relative-0.1", dict(importance="relative", eta=0.1)),
        ("relative-0.3", dict(importance="relative", eta=0.3)),
        ("relative-1", dict(importance="relative", eta=1.0)),
    ],
}


def ablation_methods(scenario: str, methods: List[Method], ablation: str) -> List[Method]:
    """The headline MISA method of `scenario` (taken from `methods`, overrides included) once per
    variant of `ablation`, named headline/label."""
    headline = next(m for m in methods if m.name == HEADLINES[scenario])
    return [replace(_override(headline, options), name=f"{headline.name}/{label}")
            for label, options in ABLATIONS[ablation]]


@dataclass
class Run:
    """What one training run measured."""

    scenario: str
    method: Method
    seed: int
    train_losses: List[float]
    heldout: List[tuple]  # (step, loss)
    tokens_per_s: float
    optimizer_bytes: int  # gradients + optimizer state at their largest
    trained_params: int  # parameters holding a gradient at that moment
    seconds: float
    backend: str
    # MISA-sampled runs only: module name -> (final importance score over the mean score of the
    # scored modules, fraction of the steps it was active)
    selection: Dict[str, Tuple[float, float]]
    # MISA-sampled runs only: the largest and smallest sampling probability of any module after
    # any resampling, and the number of modules (uniform sampling: 1 / modules)
    probability_range: Optional[Tuple[float, float, int]]


# ---------------------------------------------------------------------------- training


def lr_lambda(warmup: int, steps: int):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))
    return factor


def build_optimizer(model: torch.nn.Module, method: Method, lr: float, preset: Preset, seed: int):
    """(model, optimizer): MISA for every family but LoRA, which gets peft adapters (fp32,
    as peft.get_peft_model makes them) and torch.optim.AdamW over them."""
    if method.family != "lora":
        options = {"interval": preset.interval, "max_grad_norm": MAX_GRAD_NORM, **method.options}
        return model, misa.MISA(model, lr=lr, betas=BETAS, seed=seed, **options)
    import peft
    rank = method.options["rank"]
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(memory.LLAMA_LINEARS))
    model = peft.inject_adapter_in_model(config, model)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in adapters:
        p.data = p.data.float()
    return model, torch.optim.AdamW(adapters, lr=lr * preset.lora_lr_scale, betas=BETAS, weight_decay=0.0)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: List[torch.Tensor], device: str) -> float:
    return statistics.fmean(model(x.to(device), labels=x.to(device)).item() for x in batches)


def train(scenario: str, method: Method, model: torch.nn.Module, corpus: data.Corpus, steps: int, lr: float,
          preset: Preset, seed: int) -> tuple:
    """Trains `model` with `method` for `steps` steps; returns (Run, trained model)."""
    model, optimizer = build_optimizer(model, method, lr, preset, seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(preset.warmup, steps))
    generator = torch.Generator().manual_seed(1000 + seed)
    heldout_batches = corpus.heldout_batches(preset.eval_batches, preset.batch, preset.seq_len)
    heldout = [(0, evaluate(model, heldout_batches, preset.device))]
    losses, train_seconds, peak = [], 0.0, None

    def measure_peak(_optimizer=None):
        nonlocal peak
        live = memory.measure(model, optimizer)
        if peak is None or live.optimizer > peak.optimizer:
            peak = live

    if isinstance(optimizer, misa.MISA):  # state lives from the first step of an activation to the switch
        optimizer.register_switch_hook(measure_peak, before=True)
    sampled = isinstance(optimizer, misa.MISA) and optimizer.partition.granularity == "module" \
        and optimizer.sampler.uses_budget
    extremes: List[tuple] = []  # (max, min) sampling probability after each resampling
    if sampled:
        optimizer.register_switch_hook(lambda opt: extremes.append(_max_min(opt.importance().values())))
    start = time.perf_counter()
    progress = tqdm(range(1, steps + 1), desc=f"{scenario} {method.name} seed {seed}", leave=False, dynamic_ncols=True,
                    disable=None)  # bars on a terminal only
    for step in progress:
        x = corpus.train_batch(generator, preset.batch, preset.seq_len).to(preset.device)
        _sync(preset.device)
        t0 = time.perf_counter()
        loss = model(x, labels=x)
        loss.backward()
        if method.family == "lora":
            torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        _sync(preset.device)
        train_seconds += time.perf_counter() - t0
        measure_peak()  # gradients and state alive (a switch inside the step measured before it)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        _sync(preset.device)
        train_seconds += time.perf_counter() - t0
        losses.append(loss.item())
        if step % preset.eval_every == 0 or step == steps:
            heldout.append((step, evaluate(model, heldout_batches, preset.device)))
            progress.set_postfix(train=f"{losses[-1]:.3f}", heldout=f"{heldout[-1][1]:.3f}")
    tokens = steps * preset.batch * preset.seq_len
    selection, probability_range = {}, None
    if sampled:
        selection = _selection(optimizer, steps)
        if extremes:
            probability_range = (max(e[0] for e in extremes), min(e[1] for e in extremes), len(selection))
    run = Run(scenario, method, seed, losses, heldout, tokens / train_seconds, peak.optimizer, peak.trained_params,
              time.perf_counter() - start, getattr(optimizer, "backend", "torch.optim.AdamW"), selection,
              probability_range)
    return run, model


def _max_min(values) -> tuple:
    values = list(values)
    return max(values), min(values)


def _selection(optimizer: "misa.MISA", steps: int) -> Dict[str, Tuple[float, float]]:
    """Module name -> (final importance score over the mean of the positive scores, fraction of
    the `steps` it was active)."""
    scores = optimizer.sampler.scores.detach().to("cpu", torch.float64)
    scored = scores[scores > 0]
    relative = scores / scored.mean() if scored.numel() else scores
    active_steps = optimizer.coverage().steps
    return {m.name: (float(r), active_steps[m.name] / steps) for m, r in zip(optimizer.partition.modules, relative)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fresh_model(preset: Preset, seed: int, state: Optional[dict] = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.build(preset.model, preset.device, preset.dtype)
    if state is not None:
        model.load_state_dict(state)
    return model


# ---------------------------------------------------------------------------- reporting


def summary_rows(runs: List[Run], preset: Preset) -> List[Dict]:
    """One row per (scenario, method): means over seeds (and the spread when several)."""
    rows = []
    meta = models.build(preset.model, "meta", preset.dtype)
    groups: Dict[tuple, List[Run]] = {}
    for run in runs:
        groups.setdefault((run.scenario, run.method.name), []).append(run)
    adamw = {s: statistics.fmean(r.heldout[-1][1] for r in rs) for (s, name), rs in groups.items() if name == "adamw"}
    tail = lambda r: statistics.fmean(r.train_losses[-max(1, len(r.train_losses) // 10):])  # noqa: E731
    for (scenario, name), rs in groups.items():
        method = rs[0].method
        final = [r.heldout[-1][1] for r in rs]
        mean = statistics.fmean(final)
        est = memory.estimate(meta, method.family, **method.estimate)
        rows.append({
            "scenario": scenario, "method": name, "setting": method.note, "seeds": len(rs),
            "trained params": f"{statistics.fmean(r.trained_params for r in rs) / 1e6:.3f}M",
            "optimizer MB": f"{max(r.optimizer_bytes for r in rs) / MB:.2f}",
            "estimate MB": f"{est.optimizer / MB:.2f}",
            "held-out start": f"{rs[0].heldout[0][1]:.3f}",
            "held-out": report.mean_std(final),
            "vs adamw": f"{mean / adamw[scenario] - 1:+.1%}" if scenario in adamw else "",
            "train (last 10%)": f"{statistics.fmean(tail(r) for r in rs):.3f}",
            "tokens/s": f"{statistics.fmean(r.tokens_per_s for r in rs):.0f}",
            "seconds": f"{sum(r.seconds for r in rs):.0f}",
            "backend": rs[0].backend,
        })
    return rows


SUMMARY_COLUMNS = ["method", "trained params", "optimizer MB", "estimate MB", "held-out start", "held-out",
                   "vs adamw", "train (last 10%)", "tokens/s", "seconds"]


def goal_lines(rows: List[Dict]) -> List[str]:
    """The issue's goals, checked on these numbers; with several seeds, a difference smaller than
    the seeds' combined standard deviation is called a tie."""
    value = {(r["scenario"], r["method"]): float(r["held-out"].split()[0]) for r in rows}
    spread = {(r["scenario"], r["method"]): float(r["held-out"].split()[2]) if "±" in r["held-out"] else 0.0
              for r in rows}
    lines = []
    for scenario in SCENARIOS:
        for ours, peer in (("misa~lisa", "lisa"), ("misa~badam", "badam")):
            if (scenario, ours) in value and (scenario, peer) in value:
                a, b = value[scenario, ours], value[scenario, peer]
                noise = math.hypot(spread[scenario, ours], spread[scenario, peer])
                verdict = "no worse" if a <= b else "WORSE"
                if noise and abs(a - b) <= noise:
                    verdict += f", a tie within the seeds' spread ({noise:.3f})"
                lines.append(f"{scenario}: {ours} held-out {a:.3f} vs {peer} {b:.3f} at equal optimizer memory: "
                             f"{verdict} ({a / b - 1:+.1%})")
    if ("pretrain", "misa-25%") in value and ("pretrain", "adamw") in value:
        a, b = value["pretrain", "misa-25%"], value["pretrain", "adamw"]
        lines.append(f"pretrain: misa-25% held-out {a:.3f} vs adamw {b:.3f}: {a / b - 1:+.1%} "
                     f"({'within' if a / b - 1 <= 0.05 else 'NOT within'} 5%)")
    return lines


def ablation_rows(runs: List[Run], ablation: str) -> List[Dict]:
    """One row per (scenario, variant) of `ablation`: the final held-out loss over seeds; its
    difference to the reference variant's (the first), paired by seed (same initial model and
    data order); the largest and smallest sampling probability any module reached in any seed, in
    units of uniform (1 / modules); the largest and smallest fraction of steps a module was
    active (means over seeds)."""
    labels = [label for label, _ in ABLATIONS[ablation]]
    groups: Dict[tuple, List[Run]] = {}
    for run in runs:
        label = run.method.name.partition("/")[2]
        if label in labels:
            groups.setdefault((run.scenario, label), []).append(run)
    rows = []
    for (scenario, label), rs in groups.items():
        final = {r.seed: r.heldout[-1][1] for r in rs}
        reference = {r.seed: r.heldout[-1][1] for r in groups.get((scenario, labels[0]), [])}
        paired = [final[seed] - reference[seed] for seed in final if seed in reference]
        ranges = [r.probability_range for r in rs if r.probability_range]
        modules = list(rs[0].selection)
        shares = [statistics.fmean(r.selection[m][1] for r in rs) for m in modules]
        rows.append({
            "scenario": scenario, "variant": label, "importance": rs[0].method.options.get("importance", ""),
            "eta": rs[0].method.options.get("eta", ""), "seeds": len(rs),
            "heldout_mean": statistics.fmean(final.values()),
            "heldout_std": statistics.stdev(final.values()) if len(final) > 1 else "",
            "vs_reference_mean": statistics.fmean(paired) if paired else "",
            "vs_reference_std": statistics.stdev(paired) if len(paired) > 1 else "",
            "max_p_over_uniform": max(r[0] * r[2] for r in ranges) if ranges else "",
            "min_p_over_uniform": min(r[1] * r[2] for r in ranges) if ranges else "",
            "max_active_share": max(shares) if shares else "",
            "min_active_share": min(shares) if shares else "",
            "modules": len(modules),
        })
    return rows


def ablation_table(rows: List[Dict], reference: str) -> str:
    """`ablation_rows` as a Markdown table."""
    def pm(mean, std, digits=3, sign=""):
        return "" if mean == "" else f"{mean:{sign}.{digits}f}" + ("" if std == "" else f" ± {std:.{digits}f}")

    def number(value, spec):
        return "" if value == "" else format(value, spec)

    cells = [{"scenario": r["scenario"], "variant": r["variant"], "rule": r["importance"], "eta": r["eta"],
              "seeds": r["seeds"], "held-out": pm(r["heldout_mean"], r["heldout_std"]),
              f"vs {reference} (paired)": pm(r["vs_reference_mean"], r["vs_reference_std"], sign="+"),
              "max p / uniform": number(r["max_p_over_uniform"], ".3g"),
              "min p / uniform": number(r["min_p_over_uniform"], ".3g"),
              "active share max / min": f"{number(r['max_active_share'], '.2f')} / "
                                        f"{number(r['min_active_share'], '.2f')}"} for r in rows]
    return report.markdown_table(cells, list(cells[0]) if cells else [])


def curve_rows(runs: List[Run], preset: Preset) -> List[Dict]:
    rows = []
    for run in runs:
        heldout = dict(run.heldout)
        for step in range(0, len(run.train_losses) + 1):
            if step == 0 and step not in heldout:
                continue
            rows.append({"scenario": run.scenario, "method": run.method.name, "seed": run.seed, "step": step,
                         "tokens": step * preset.batch * preset.seq_len,
                         "train_loss": f"{run.train_losses[step - 1]:.5f}" if step else "",
                         "heldout_loss": f"{heldout[step]:.5f}" if step in heldout else ""})
    return rows


def plot(runs: List[Run], rows: List[Dict], scenario: str, path: Path, title: str) -> None:
    """Three panels: training loss (moving average), held-out loss, final held-out loss against
    optimizer memory. Curves are means over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    names = list(dict.fromkeys(r.method.name for r in runs if r.scenario == scenario))
    for index, name in enumerate(names):
        rs = [r for r in runs if r.scenario == scenario and r.method.name == name]
        color = f"C{index}"
        train = [statistics.fmean(values) for values in zip(*(r.train_losses for r in rs))]
        window = max(1, len(train) // 30)
        smooth = [statistics.fmean(train[max(0, i - window + 1):i + 1]) for i in range(len(train))]
        axes[0].plot(range(1, len(train) + 1), smooth, color=color, label=name)
        steps = [s for s, _ in rs[0].heldout]
        held = [statistics.fmean(values) for values in zip(*([v for _, v in r.heldout] for r in rs))]
        axes[1].plot(steps, held, "o-", color=color, markersize=3, label=name)
        row = next(r for r in rows if r["scenario"] == scenario and r["method"] == name)
        axes[2].scatter(float(row["optimizer MB"]), held[-1], color=color, s=40)
        axes[2].annotate(name, (float(row["optimizer MB"]), held[-1]), textcoords="offset points", xytext=(5, 4),
                         fontsize=8)
    axes[0].set(title="training loss (moving average)", xlabel="step", ylabel="nats per byte")
    axes[1].set(title="held-out loss", xlabel="step", ylabel="nats per byte")
    axes[2].set(title="final held-out loss vs optimizer memory", xlabel="gradients + optimizer state at peak (MB)",
                ylabel="nats per byte", xscale="log")
    finals = [r.heldout[-1][1] for r in runs if r.scenario == scenario]
    for ax in axes[:2]:  # from the best final loss to above the worst: the first steps' fall is cut
        ax.set_ylim(min(finals) - 0.1, max(finals) + 0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[2].grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_selection(runs: List[Run], scenario: str, path: Path, title: str) -> bool:
    """One panel per MISA-sampled method of `scenario`, one point per module: its final importance
    score over the mean score (x) against the fraction of steps it was active (y), both means over
    seeds, coloured by module kind. Uniform sampling puts every module near the dotted mean.
    False (and no file) when no run of the scenario was MISA-sampled."""
    names = list(dict.fromkeys(r.method.name for r in runs if r.scenario == scenario and r.selection))
    if not names:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        rs = [r for r in runs if r.scenario == scenario and r.method.name == name]
        modules = list(rs[0].selection)
        kinds = list(dict.fromkeys(m.rsplit(".", 1)[-1] for m in modules))
        for index, kind in enumerate(kinds):
            of_kind = [m for m in modules if m.rsplit(".", 1)[-1] == kind]
            x = [statistics.fmean(r.selection[m][0] for r in rs) for m in of_kind]
            y = [statistics.fmean(r.selection[m][1] for r in rs) for m in of_kind]
            ax.scatter(x, y, s=14, color=f"C{index}", label=kind.removesuffix("_proj"))
        ax.axhline(statistics.fmean(statistics.fmean(r.selection[m][1] for r in rs) for m in modules),
                   color="gray", linestyle=":", linewidth=1)
        ax.set(title=f"{name} ({len(rs)} seed{'s' if len(rs) > 1 else ''})", xlabel="final score / mean score",
               ylabel="fraction of steps active")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- main


def _parse_override(parser: argparse.ArgumentParser, item: str):
    key, sep, text = item.partition("=")
    if not sep or not key:
        parser.error(f"--misa takes KEY=VALUE, got {item!r}")
    try:
        return key, ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return key, text  # a bare word: a string option such as importance=paper


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "experiment")
    parser.add_argument("--scenario", choices=["both", *SCENARIOS], default="both")
    parser.add_argument("--methods", help="comma-separated subset of the methods to run (default: all)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per method, seeds 0..N-1 (default: 1)")
    parser.add_argument("--steps", type=int, help="pre-training steps (default: the preset's)")
    parser.add_argument("--finetune-steps", type=int, help="fine-tuning steps (default: the preset's)")
    parser.add_argument("--data", help="a text file to pre-train on instead of the standard library")
    parser.add_argument("--finetune-data", help="a text file to fine-tune on instead of the pydoc topics")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the preset's, else torch's)")
    parser.add_argument("--misa", action="append", default=[], metavar="KEY=VALUE",
                        help="override an option of every MISA-sampled method, e.g. --misa importance=paper "
                             "--misa eta=1 --misa interval=10 (repeatable; values are Python literals)")
    parser.add_argument("--ablation", choices=list(ABLATIONS),
                        help="instead of the methods, run each scenario's headline MISA method (with the --misa "
                             "overrides) once per variant: 'importance': uniform, the paper's and the released "
                             "rule, the relative rule at several temperatures; writes ablation-NAME.md/.csv")
    args = parser.parse_args(argv)
    args.misa = dict(_parse_override(parser, item) for item in args.misa)
    for flag in ("seeds", "steps", "finetune_steps", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    return args


def main(argv=None) -> List[Dict]:
    begun = time.perf_counter()
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    threads = args.threads or preset.threads
    if threads:
        torch.set_num_threads(threads)
    if args.steps:
        preset = replace(preset, pretrain_steps=args.steps)
    if args.finetune_steps:
        preset = replace(preset, finetune_steps=args.finetune_steps)
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"preset {args.preset!r} needs a CUDA device and none is available; use --preset cpu")
    scenarios = list(SCENARIOS) if args.scenario == "both" else [args.scenario]
    plans = {s: scenario_methods(s, preset) for s in scenarios}
    if args.misa:
        plans = {s: [_override(m, args.misa) for m in ms] for s, ms in plans.items()}
    if args.ablation:
        plans = {s: ablation_methods(s, ms, args.ablation) for s, ms in plans.items()}
    if any(m.family == "lora" for ms in plans.values() for m in ms) and not _has_peft():
        print("peft is not installed: the LoRA runs are left out (pip install peft)")
        plans = {s: [m for m in ms if m.family != "lora"] for s, ms in plans.items()}
    if args.methods:
        wanted = [w.strip() for w in args.methods.split(",") if w.strip()]
        known = {m.name for ms in plans.values() for m in ms}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
        plans = {s: [m for m in ms if m.name in wanted] for s, ms in plans.items()}

    corpora = {"pretrain": data.file_corpus(args.data) if args.data else data.stdlib_corpus()}
    if "finetune" in scenarios:
        corpora["finetune"] = data.file_corpus(args.finetune_data) if args.finetune_data else data.pydoc_topics_corpus()
    for corpus in corpora.values():
        corpus.check_fits(preset.seq_len)
    args.out.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    header = [f"machine: {report.stamp()}; torch {torch.__version__}, {torch.get_num_threads()} threads",
              f"command: python bench/experiment.py {' '.join(argv if argv is not None else sys.argv[1:])}",
              f"preset {args.preset}: {preset.model}, seq_len {preset.seq_len}, batch {preset.batch}, "
              f"{preset.dtype}, T={preset.interval}, {preset.pretrain_steps} pre-training / "
              f"{preset.finetune_steps} fine-tuning steps at lr {preset.pretrain_lr:g} / {preset.finetune_lr:g}, "
              f"{models.count_parameters(preset.model) / 1e6:.2f}M parameters"]
    header += [f"{s} data: {c.describe()}" for s, c in corpora.items()]
    print("\n".join(header))

    runs: List[Run] = []
    pretrained_path = args.out / "pretrained.pt"
    pretrained = None
    for scenario in scenarios:
        steps = preset.pretrain_steps if scenario == "pretrain" else preset.finetune_steps
        lr = preset.pretrain_lr if scenario == "pretrain" else preset.finetune_lr
        if scenario == "finetune" and pretrained is None:
            pretrained = _pretrain_base(preset, corpora["pretrain"], pretrained_path)
        for method in plans[scenario]:
            for seed in range(args.seeds):
                start = pretrained if scenario == "finetune" else None
                run, model = train(scenario, method, fresh_model(preset, seed, start), corpora[scenario], steps, lr,
                                   preset, seed)
                runs.append(run)
                tqdm.write(f"{scenario:8s} {method.name:12s} seed {seed}: held-out {run.heldout[-1][1]:.3f}, "
                           f"optimizer {run.optimizer_bytes / MB:.2f} MB, {run.tokens_per_s:.0f} tokens/s")
                if scenario == "pretrain" and method.name == "adamw" and seed == 0:
                    pretrained = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    torch.save({"preset": args.preset, "model": pretrained}, pretrained_path)

    rows = summary_rows(runs, preset)
    report.write_csv(args.out / "curves.csv", curve_rows(runs, preset))
    report.write_csv(args.out / "summary.csv", rows)
    lines = header + [f"training and evaluation, all runs: {time.perf_counter() - started:.0f} s wall, "
                      f"{time.process_time() - cpu_started:.0f} s CPU (this process)", ""]
    written = ["summary.md", "summary.csv", "curves.csv"]
    for scenario in scenarios:
        picked = [r for r in rows if r["scenario"] == scenario]
        if not picked:
            continue
        title = f"{scenario}: {corpora[scenario].name}, preset {args.preset}"
        png, selection_png = args.out / f"{scenario}.png", args.out / f"selection_vs_score-{scenario}.png"
        plot(runs, rows, scenario, png, title)
        plots = [png.name]
        if plot_selection(runs, scenario, selection_png, f"{title}: module selection against importance"):
            plots.append(selection_png.name)
        written += plots
        lines += [f"## {scenario} ({corpora[scenario].name}; held-out loss in nats per byte)", "",
                  report.markdown_table(picked, SUMMARY_COLUMNS), "", f"plots: {', '.join(plots)}", ""]
        lines += [f"- {r['method']}: {r['setting']}" + _share_note(runs, scenario, r["method"]) for r in picked] + [""]
    goals = goal_lines(rows)
    if goals:
        lines += ["## goals", ""] + [f"- {line}" for line in goals]
    if args.ablation:
        reference = ABLATIONS[args.ablation][0][0]
        table = ablation_rows(runs, args.ablation)
        section = [f"## ablation: {args.ablation} (final held-out loss, mean ± std over seeds)", "",
                   ablation_table(table, reference), "",
                   f"vs {reference}: the difference to the {reference} variant's loss, seed by seed; p: the sampling "
                   "probability of a module after a resampling, over 1 / modules; active share: the fraction of "
                   "steps a module was active.", ""]
        lines += [""] + section
        report.write_csv(args.out / f"ablation-{args.ablation}.csv", table)
        (args.out / f"ablation-{args.ablation}.md").write_text("\n".join(header + [""] + section))
        written += [f"ablation-{args.ablation}.md", f"ablation-{args.ablation}.csv"]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[len(header):]))
    print(f"\nwrote {args.out}/: {', '.join(written)}; {time.perf_counter() - begun:.0f} s in all")
    return rows


def _share_note(runs: List[Run], scenario: str, name: str) -> str:
    """For MISA runs: how often each module kind was active, averaged over its modules and seeds
    (uniform sampling would give every kind about the same share)."""
    selections = [r.selection for r in runs if r.scenario == scenario and r.method.name == name and r.selection]
    if not selections:
        return ""
    by_kind: Dict[str, List[float]] = {}
    for selection in selections:
        for module, (_, share) in selection.items():
            by_kind.setdefault(module.rsplit(".", 1)[-1], []).append(share)
    return "; active share by kind: " + ", ".join(
        f"{kind.removesuffix('_proj')} {statistics.fmean(shares):.2f}" for kind, shares in by_kind.items())


def _pretrain_base(preset: Preset, corpus: data.Corpus, path: Path) -> dict:
    """AdamW-pretrained weights for the fine-tuning scenario, when the pretrain scenario did not
    make them in this run."""
    adamw = Method("adamw", "adamw", "every parameter", dict(sampler="full"))
    _, model = train("base", adamw, fresh_model(preset, 0), corpus, preset.pretrain_steps, preset.pretrain_lr,
                     preset, 0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"preset": "base", "model": state}, path)
    return state


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
