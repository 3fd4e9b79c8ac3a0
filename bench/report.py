"""Tables and CSV files for the memory and convergence benchmarks (rows are dicts).

Tables are Markdown, so that what a command prints can go into bench/RESULTS.md as it is.
"""
from __future__ import annotations

import csv
import datetime
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

GB = 1e9  # published memory figures (BAdam's 2M + 16M/D) use 10^9 bytes


def stamp() -> str:
    """Machine, git revision and time, for the header of every result."""
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return f"{harness.machine()}; git {harness.git_rev()}; {now}"


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """"mean ± sample standard deviation" of `values`; the mean alone for a single value."""
    mean = statistics.fmean(values)
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{mean:.{digits}f}{spread}"


def markdown_table(rows: List[Dict], columns: Sequence[str]) -> str:
    """A Markdown table of `columns` (keys of each row); floats as they were formatted by the caller."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def write_csv(path: Path, rows: List[Dict]) -> Path:
    """Writes `rows` (the union of their keys as columns, first-seen order) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path
