"""The experiment's data (misa_examples.data) and the main job end to end on its seconds-long preset."""
from __future__ import annotations

import csv
import math
import os
import sys
import zlib

import pytest
import torch

from misa import memory
from misa_examples import data

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import experiment  # noqa: E402


# ------------------------------------------------------------------ corpora


def _fake_stdlib(root):
    files = {"a.py": b"import os\n", "pkg/b.py": b"x = 1\n", "pkg/c.py": b"def f():\n    return 2\n",
             "d.py": b"# d\n", "site-packages/e.py": b"installed\n", "pydoc_data/topics.py": b"topics\n",
             "notes.txt": b"not python\n"}
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return files


def test_stdlib_files_are_sorted_and_leave_out_installed_packages_and_pydoc_data(tmp_path):
    _fake_stdlib(tmp_path)
    assert data.stdlib_files(str(tmp_path)) == ["a.py", "d.py", "pkg/b.py", "pkg/c.py"]


def test_stdlib_split_is_by_file_checksum(tmp_path):
    files = _fake_stdlib(tmp_path)
    fraction = 0.5
    corpus = data.stdlib_corpus(fraction, root=str(tmp_path))
    kept = ["a.py", "d.py", "pkg/b.py", "pkg/c.py"]
    held = [f for f in kept if zlib.crc32(f.encode()) % 10000 < fraction * 10000]
    train = [f for f in kept if f not in held]
    assert bytes(corpus.heldout.tolist()) == data.SEPARATOR.join(files[f] for f in held)
    assert bytes(corpus.train.tolist()) == data.SEPARATOR.join(files[f] for f in train)
    assert corpus.documents == (len(train), len(held))


def test_real_stdlib_corpus_is_large_and_the_same_every_time():
    first, second = data.stdlib_corpus(), data.stdlib_corpus()
    assert first.checksum == second.checksum
    assert first.train.numel() > 5_000_000 and first.heldout.numel() > 100_000
    assert 0.02 < first.heldout.numel() / (first.train.numel() + first.heldout.numel()) < 0.15


def test_pydoc_topics_are_english_text_split_by_topic():
    corpus = data.pydoc_topics_corpus()
    text = data.ByteTokenizer().decode(corpus.train[:20000])
    assert text.count(" the ") > 20
    assert corpus.documents[1] >= 1 and corpus.heldout.numel() > 1000


def test_byte_tokenizer_round_trips_unicode():
    tokenizer = data.ByteTokenizer()
    tokens = tokenizer.encode("naïve → ok")
    assert tokens.dtype == torch.uint8 and tokens.numel() == len("naïve → ok".encode("utf-8"))
    assert tokenizer.decode(tokens) == "naïve → ok"


def test_file_corpus_holds_out_the_tail_from_a_line_start(tmp_path):
    path = tmp_path / "text.txt"
    lines = [f"line {i}\n".encode() for i in range(100)]
    path.write_bytes(b"".join(lines))
    corpus = data.file_corpus(str(path), 0.1)
    held = bytes(corpus.heldout.tolist())
    assert held.startswith(b"line ") and bytes(corpus.train.tolist()).endswith(b"\n")
    assert bytes(corpus.train.tolist()) + held == b"".join(lines)
    assert 0.08 < len(held) / len(b"".join(lines)) < 0.12


def test_batches_are_windows_of_the_split_and_held_out_ones_are_fixed():
    tokens = torch.arange(200, dtype=torch.uint8)
    corpus = data.Corpus("counting", tokens, tokens[:100].clone(), (1, 1), 0)
    batch = corpus.train_batch(torch.Generator().manual_seed(0), 4, 10)
    assert batch.shape == (4, 10) and batch.dtype == torch.int64
    assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(4, 9, dtype=torch.int64))
    first, again = corpus.heldout_batches(3, 2, 10), corpus.heldout_batches(3, 2, 10)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert first[0][0, 0] == 0 and first[-1][-1, -1] == 99  # spans the whole held-out split


def test_corpus_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        data.file_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "one.txt").write_bytes(b"x")
    with pytest.raises(ValueError, match="too little text"):
        data.file_corpus(str(tmp_path / "one.txt"))
    (tmp_path / "short.txt").write_bytes(b"abc\ndef\n" * 3)
    with pytest.raises(ValueError, match="fewer than one window of 65"):
        data.file_corpus(str(tmp_path / "short.txt")).check_fits(64)
    with pytest.raises(ValueError, match=r"heldout_fraction must lie in \(0, 1\)"):
        data.stdlib_corpus(1.5)


# ------------------------------------------------------------------ the main job


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """main() sets the preset's thread count; the tests after these keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    factor = experiment.lr_lambda(warmup=10, steps=110)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.55) and factor(110) == pytest.approx(0.1)


def test_equal_memory_methods_get_exactly_one_blocks_worth_of_modules():
    preset = experiment.PRESETS["cpu"]
    meta = experiment.models.build(preset.model, "meta", preset.dtype)
    norms = 2 * preset.model.hidden_size  # a block's two RMSNorm weights: in BAdam's block, not in MISA's modules
    block = memory.estimate(meta, "badam")
    for method in experiment.scenario_methods("finetune", preset):
        if method.name == "misa~badam":
            assert memory.estimate(meta, "misa", **method.estimate).trained_params == block.trained_params - norms
        if method.name == "misa~lisa":  # MISA trains every block's norms, LISA those of its block
            lisa = memory.estimate(meta, "lisa", n_layers=1)
            extra_norms = norms * (preset.model.num_hidden_layers - 1)
            assert memory.estimate(meta, "misa", **method.estimate).trained_params == lisa.trained_params + extra_norms


def test_smoke_preset_runs_every_method_and_writes_its_evidence(tmp_path):
    rows = experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--steps", "10", "--finetune-steps", "6"])
    smoke = experiment.PRESETS["smoke"]
    expected = {m.name for s in experiment.SCENARIOS for m in experiment.scenario_methods(s, smoke)
                if m.family != "lora" or experiment._has_peft()}
    assert {r["method"] for r in rows} == expected
    assert {r["scenario"] for r in rows} == set(experiment.SCENARIOS)
    for row in rows:
        measured, estimated = float(row["optimizer MB"]), float(row["estimate MB"])
        assert measured == pytest.approx(estimated, rel=0.05), row  # the run's own memory against the estimate
        assert math.isfinite(float(row["held-out"])) and float(row["tokens/s"]) > 0
    adamw = next(r for r in rows if r["scenario"] == "pretrain" and r["method"] == "adamw")
    assert float(adamw["held-out"]) < float(adamw["held-out start"]) - 0.2  # it learned something
    finetune_start = {r["held-out start"] for r in rows if r["scenario"] == "finetune"}
    assert len(finetune_start) == 1  # every fine-tuning run starts from the same pretrained model
    for name in ("summary.md", "summary.csv", "curves.csv", "pretrain.png", "finetune.png", "pretrained.pt",
                 "selection_vs_score-pretrain.png", "selection_vs_score-finetune.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    def logged(scenario):
        return sum(1 for c in curves if c["scenario"] == scenario and c["method"] == "adamw" and c["train_loss"])
    assert (logged("pretrain"), logged("finetune")) == (10, 6)
    assert "## goals" in (tmp_path / "summary.md").read_text()


def test_finetune_headline_uses_the_package_defaults_and_the_ablation_keeps_the_papers_rule():
    preset = experiment.PRESETS["smoke"]
    methods = experiment.scenario_methods("finetune", preset)
    headline = next(m for m in methods if m.name == experiment.HEADLINES["finetune"])
    assert "importance" not in headline.options and "eta" not in headline.options
    variants = experiment.ablation_methods("finetune", methods, "importance")
    paper = next(m for m in variants if m.name == "misa-3%/paper-1")
    assert paper.options == {**headline.options, "importance": "paper", "eta": 1.0}


def test_importance_ablation_writes_its_table_with_every_rule_and_the_selection_plot(tmp_path):
    experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--scenario", "finetune", "--ablation", "importance",
                     "--seeds", "2", "--steps", "2", "--finetune-steps", "5", "--misa", "interval=2"])
    with open(tmp_path / "ablation-importance.csv") as f:
        rows = list(csv.DictReader(f))
    variants = experiment.ABLATIONS["importance"]
    assert [r["variant"] for r in rows] == [label for label, _ in variants]
    assert {r["importance"] for r in rows} == {"relative", "paper", "released"}
    for row, (_, options) in zip(rows, variants):
        assert row["seeds"] == "2" and math.isfinite(float(row["heldout_std"])), row
        assert float(row["eta"]) == options["eta"]
        p_max, p_min = float(row["max_p_over_uniform"]), float(row["min_p_over_uniform"])
        assert 0 < p_min <= 1 + 1e-6 and p_max >= 1 - 1e-6, row  # extremes bracket uniform (float32 probs)
    uniform = rows[0]
    assert float(uniform["vs_reference_mean"]) == 0 and float(uniform["max_p_over_uniform"]) == pytest.approx(1)
    assert max(float(r["max_p_over_uniform"]) for r in rows) > 1.5  # the steering rules steer
    table = (tmp_path / "ablation-importance.md").read_text()
    assert all(f"| {label} " in table for label, _ in variants) and "vs uniform (paired)" in table
    assert (tmp_path / "selection_vs_score-finetune.png").stat().st_size > 0


def test_bad_command_lines_fail_with_the_reason(tmp_path):
    with pytest.raises(SystemExit):
        experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--steps", "0"])
    with pytest.raises(SystemExit, match="unknown method"):
        experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--methods", "adamw,sgd"])
    with pytest.raises(FileNotFoundError, match="not found"):
        experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--data", str(tmp_path / "none.txt")])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            experiment.main(["--preset", "gpu", "--out", str(tmp_path)])


def test_misa_overrides_reach_only_misa_methods():
    args = experiment.parse_args(["--misa", "importance=paper", "--misa", "eta=2.5", "--misa", "interval=7"])
    assert args.misa == {"importance": "paper", "eta": 2.5, "interval": 7}
    preset = experiment.PRESETS["smoke"]
    methods = [experiment._override(m, args.misa) for m in experiment.scenario_methods("pretrain", preset)]
    for m in methods:
        if m.family == "misa" and m.options.get("sampler", "misa") == "misa":
            assert m.options["importance"] == "paper" and m.options["eta"] == 2.5 and m.options["interval"] == 7
        else:
            assert "eta" not in m.options
    with pytest.raises(SystemExit):
        experiment.parse_args(["--misa", "eta"])
    with pytest.raises(SystemExit):
        experiment.parse_args(["--ablation", "temperature"])
