"""Shared by the benchmark scripts: timing by medians after warm-up, and appending to RESULTS.md."""

from __future__ import annotations

import datetime
import importlib.metadata as md
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def median_seconds(fn: Callable[[], object], *, repeats: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` (blocked until its outputs are ready), warm-up calls excluded."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def append_results(title: str, table: str, notes: str = "") -> None:
    """Append a dated section (machine, versions, command, table) to benchmarks/RESULTS.md."""
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("jax", "jaxlib", "flax"))
    devices = ", ".join(sorted({d.platform for d in jax.devices()}))
    section = (f"\n## {title} — {datetime.date.today().isoformat()}\n\n"
               f"- machine: {cpu_name()}, {jax.device_count()} {devices} device(s); Python {platform.python_version()}; {versions}\n"
               f"- command: `python -m benchmarks.{Path(sys.argv[0]).stem} {' '.join(sys.argv[1:])}`\n\n"
               f"{table}\n{notes}\n")
    with open(RESULTS, "a") as f:
        f.write(section)
