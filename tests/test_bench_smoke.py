"""The kernel benchmark runs end to end at a tiny size and writes sane rows (so it cannot rot)."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import misa_kernels

BENCH = Path(__file__).resolve().parents[1] / "bench" / "kernels.py"


def test_kernel_benchmark_writes_a_row_per_implementation(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    backends = [b for b in ("torch", "cpu") if b in misa_kernels.available_backends("cpu")]
    rows = module.main(["--device", "cpu", "--scale", "64", "--reps", "2", "--cases", "block",
                        "--backends", ",".join(backends), "--out", str(tmp_path)])
    with open(tmp_path / "kernels.csv") as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) == 1 + 2 * (len(backends) * 3 + 1 + 2 + 3)
    ours = [r for r in written if r["impl"].startswith("misa_kernels")]
    assert all(float(r["ms_p50"]) > 0 and float(r["ratio"]) > 0 and r["vs"] for r in ours)
    assert {r["op"] for r in written} == {"copy", "norms", "adamw", "step"}


def test_optimizer_benchmark_times_misa_and_its_peer_and_checks_memory(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_optimizer_step", BENCH.parent / "optimizer_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--device", "cpu", "--scale", "64", "--layers", "2", "--reps", "2", "--switches", "5",
                        "--dtypes", "float32", "--delta", "0.2", "--out", str(tmp_path)])
    assert {r.impl for r in rows} == {"MISA", "MISA+clip", "MISA(skip_nonfinite=False)", "AdamW(fused)",
                                      "AdamW(fused)+clip_grad_norm_"}
    assert all(r.ms_p50 > 0 and r.numel > 0 for r in rows)
    with open(tmp_path / "optimizer_memory.csv") as f:
        memory = next(csv.DictReader(f))
    # bf16 model: bf16 gradient + fp32 master + fp32 m and v, exactly, at every switch
    assert float(memory["bytes_per_active_param_min"]) == float(memory["bytes_per_active_param_max"]) == 14.0
