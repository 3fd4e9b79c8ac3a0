"""One benchmark harness and one CSV schema for every kernel benchmark in bench/.

Timing: device events on CUDA, perf_counter on the CPU; warm-up first, then `reps` timed
runs, reporting the 20th, 50th and 80th percentiles. Every row carries the machine, the
versions and a timestamp, so CSV files from different runs can be concatenated and plotted.
"""
from __future__ import annotations

import csv
import datetime
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

OUT_DIR = Path(__file__).resolve().parent / "out"


@dataclass
class Row:
    op: str
    case: str
    dtype: str
    impl: str  # "misa_kernels:<backend>" or the peer's name
    device: str
    n_tensors: int
    numel: int
    ms_p20: float
    ms_p50: float
    ms_p80: float
    gbps: float  # bytes the op must move (each input read once, each output written once) / p50
    ratio: float  # peer p50 / this p50 for misa_kernels rows (>1: faster than the peer); 1 for peers
    vs: str  # the peer the ratio is taken against
    launches: int  # kernel launches per call on CUDA (torch.profiler); -1 on the CPU
    machine: str = ""
    torch: str = ""
    git_rev: str = ""
    timestamp: str = ""


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stamp(rows: List[Row]) -> None:
    info = dict(machine=machine(), torch=torch.__version__, git_rev=git_rev(),
                timestamp=datetime.datetime.now().isoformat(timespec="seconds"))
    for row in rows:
        for key, value in info.items():
            setattr(row, key, value)


def time_ms(fn: Callable[[], None], device: torch.device, reps: int, warmup: int = 3) -> List[float]:
    """Milliseconds of each of `reps` calls of `fn`, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_interleaved(fns: Dict[str, Callable[[], None]], device: torch.device, reps: int,
                     warmup: int = 3) -> Dict[str, List[float]]:
    """Milliseconds of `reps` calls of each function, taken in rounds (one call of each per
    round), so that a slow spell of a shared machine hits every implementation alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name] += time_ms(fn, device, 1, warmup=0)
    return times


def percentiles(times: List[float]):
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return q[1], statistics.median(times), q[7]


def count_launches(fn: Callable[[], None], device: torch.device) -> int:
    """CUDA kernels and memsets in one call of `fn` (host-to-device copies not counted); -1 off CUDA."""
    if device.type != "cuda":
        return -1
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("Memcpy"))


def write(rows: List[Row], name: str, out_dir: Optional[Path] = None) -> Path:
    """Appends timing rows to `<out_dir>/<name>.csv` (the one schema: :class:`Row`)."""
    return write_dicts([asdict(row) for row in rows], name, out_dir)


def write_dicts(rows: List[dict], name: str, out_dir: Optional[Path] = None) -> Path:
    """Appends plain records (results that are not timings) to `<out_dir>/<name>.csv`."""
    out_dir = Path(out_dir or OUT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def table(rows: List[Row]) -> str:
    header = f"{'op':<10} {'case':<22} {'dtype':<9} {'impl':<24} {'p50 ms':>9} {'GB/s':>7} {'ratio':>6} {'vs':<22} {'launch':>6}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.op:<10} {r.case:<22} {r.dtype:<9} {r.impl:<24} {r.ms_p50:>9.3f} {r.gbps:>7.1f} "
                     f"{r.ratio:>6.2f} {r.vs:<22} {r.launches:>6}")
    return "\n".join(lines)

