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
