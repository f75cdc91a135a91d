"""Shared by the benchmark scripts: timing by medians after warm-up, and appending to RESULTS.md."""

from __future__ import annotations

import datetime
import importlib.metadata as md
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# The packages whose versions each recorded section names when installed (torch: the peer of the comparisons).
VERSIONED = ("jax", "jaxlib", "flax", "onednn-cpu-gomp", "torch")
# Read when the process starts and able to change every number: XLA's flags, the allocator and its settings.
ENVIRONMENT = ("XLA_FLAGS", "LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES", "OMP_NUM_THREADS")


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


def _cpuinfo(field: str) -> str | None:
    """The first `field : value` of the Linux kernel's CPU description (/proc/cpuinfo), or None elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The CPU's vector and matrix extensions (AVX2, FMA, AVX-512*, AMX*): what decides which kernels XLA and
    PyTorch can use, so every recorded number names them."""
    flags = (_cpuinfo("flags") or "").split()
    return " ".join(sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))) or "unknown"


# Published dense peak FLOP/s by device kind (a substring of jax's `device_kind`, the first match wins) and compute
# dtype; "float32" is TF32 on the tensor cores, which JAX's default matmul precision uses on these GPUs. Sources:
# NVIDIA H100 Tensor Core GPU datasheet (SXM5: 989.4 TFLOPS BF16, 494.7 TF32; PCIe: 756 / 378; dense, i.e. half the
# "with sparsity" figures); NVIDIA H200 datasheet (SXM: the same tensor-core figures as H100 SXM); NVIDIA A100
# datasheet (312 BF16, 156 TF32). CPUs have no row: their benchmarks measure the GEMM peak in the same run.
PEAK_FLOPS = {
    ("H100 PCIe", "bfloat16"): 756e12, ("H100 PCIe", "float32"): 378e12,
    ("H100", "bfloat16"): 989.4e12, ("H100", "float32"): 494.7e12,
    ("H200", "bfloat16"): 989.4e12, ("H200", "float32"): 494.7e12,
    ("A100", "bfloat16"): 312e12, ("A100", "float32"): 156e12,
}


def published_peak(device_kind: str, dtype: str) -> float | None:
    """The datasheet's dense peak FLOP/s of `device_kind` (e.g. jax.devices()[0].device_kind) computing in `dtype`
    ("bfloat16" or "float32"), or None for a device without a row (CPUs: measure the GEMM peak instead)."""
    return next((peak for (kind, dt), peak in PEAK_FLOPS.items() if kind in device_kind and dt == dtype), None)


def append_results(title: str, table: str, notes: str = "") -> None:
    """Append a dated section (machine, versions, command, table) to benchmarks/RESULTS.md."""
    installed = {d.metadata["Name"] for d in md.distributions()}
    versions = ", ".join(f"{p} {md.version(p)}" for p in VERSIONED if p in installed)
    devices = ", ".join(sorted({d.device_kind if d.platform == "gpu" else d.platform for d in jax.devices()}))
    environment = "; ".join(f"{k}={os.environ[k]}" for k in ENVIRONMENT if os.environ.get(k))
    header = [f"- machine: {cpu_name()} ({cpu_flags()}), {jax.device_count()} {devices} device(s); "
              f"{os.cpu_count()} CPU threads; Python {platform.python_version()}; "
              f"{versions}",
              f"- command: `python -m benchmarks.{Path(sys.argv[0]).stem} {' '.join(sys.argv[1:])}`"]
    if environment:
        header.append(f"- environment: `{environment}`")
    section = (f"\n## {title} — {datetime.date.today().isoformat()}\n\n" + "\n".join(header)
               + f"\n\n{table}\n\n{notes}\n")
    with open(RESULTS, "a") as f:
        f.write(section)
