"""bench/memory_measured.py at a small shape: the bytes torch really holds while MISA (delta 3%)
trains a Hugging Face LLaMA with activation checkpointing, against misa.memory.estimate.

One real run (a worker process: 8 blocks of the paper's 350M pre-training shape, 0.17B
parameters, bf16, batch 1 x 128 tokens, 3 steps: one active set for steps 1 and 2, a switch, another
set for step 3), shared by the tests.
"""
from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "memory_measured.py"
GB = 1e9


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """(the method's CSV row, its per-step rows) of one measured run."""
    spec = importlib.util.spec_from_file_location("bench_memory_measured", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("memory-measured")
    rows = module.main(["--shape", "llama-350m", "--layers", "8", "--seq-len", "128", "--steps", "3",
                        "--methods", "misa-3%", "--out", str(out)])
    assert [r["status"] for r in rows] == ["ok"], rows
    with open(out / "llama-350m-8blocks.csv") as f:
        row, = csv.DictReader(f)
    with open(out / "llama-350m-8blocks-steps.csv") as f:
        steps = list(csv.DictReader(f))
    return row, steps


def test_misa_peak_is_within_10_percent_of_the_estimate(measured):
    row, steps = measured
    assert len(steps) == 3 and steps[0]["active"] == steps[1]["active"] != steps[2]["active"], \
        "steps 1 and 2 must train one set (the steady state), step 3 another (after a switch)"
    peak, estimate = int(row["measured bytes"]), int(row["estimate bytes"])
    assert peak > int(row["measured weights"])
    assert abs(peak / estimate - 1) <= 0.10, f"measured {peak / GB:.3f} GB, estimated {estimate / GB:.3f} GB"


def test_allocator_bytes_and_resident_memory_agree(measured):
    """The profiler's allocation sum misses nothing big: the OS's peak RSS above the process's size
    before the model was built is the same plus Python's and the libraries' own memory."""
    row, _ = measured
    extra = int(row["peak rss bytes"]) - int(row["measured bytes"])
    assert 0 <= extra < 0.25 * GB, f"peak RSS exceeds torch's peak by {extra / GB:.3f} GB"


def test_a_switch_holds_one_active_sets_state(measured):
    """optimizer.step() (the second one switches the active set) holds the weights, one set's
    gradients and one set's masters and moments: at most a quarter of one set's masters and
    moments (12 bytes per trained parameter) more than the estimate's weights + optimizer. A switch
    that created the new set's state before freeing the old set's would hold a whole set more."""
    row, steps = measured
    step_peak = max(int(s["peak in optimizer"]) for s in steps)
    excess = step_peak - int(row["estimate weights"]) - int(row["estimate optimizer"])
    state = 12 * int(row["trained params"])
    assert excess < 0.25 * state, f"the step holds {excess / GB:.3f} GB more, one set's state is {state / GB:.3f} GB"
