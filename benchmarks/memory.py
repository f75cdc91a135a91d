"""Memory of a recipe's run: peak RSS, and at the end of every epoch the process's RSS, the bytes the C heap
has in use, and the live device arrays (count and bytes), so that a leak (host or device) across epochs shows
as growth from epoch 2 to the last.

The experiment runs in this process (`jaxnet.experiment.train_and_evaluate`, as the CLI runs it). A sample is
taken in the training thread when the run writes an epoch's validation record (after its evaluation, before
the next step), so every sample sees the same point of the loop. RSS alone also counts memory glibc's
allocator has been handed back but keeps (its arenas grow and shrink with XLA's temporaries): the sample is
read after `malloc_trim(0)`, and `mallinfo2()` gives the heap's bytes in use, which is what a leak would grow.

    python -m benchmarks.memory [--config smoke] [--data-dir D] [--no-record] [key=value ...]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _Mallinfo2
    return libc


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def sample() -> dict[str, float]:
    """RSS as found, then (after a GC and malloc_trim) RSS, the C heap's bytes in use, and the live arrays."""
    import jax

    libc = _libc()
    rss = _status_mb("VmRSS")
    gc.collect()
    libc.malloc_trim(0)
    info = libc.mallinfo2()
    arrays = jax.live_arrays()
    return {"rss_mb": rss, "trimmed_rss_mb": _status_mb("VmRSS"), "anon_mb": _status_mb("RssAnon"),
            "file_mb": _status_mb("RssFile"), "heap_mb": (info.uordblks + info.hblkhd) / 2**20,
            "python_blocks": sys.getallocatedblocks(), "live_arrays": len(arrays),
            "array_mb": sum(a.nbytes for a in arrays) / 2**20}


def drift(samples: list[dict], key: str) -> float:
    """Relative change of `key` from the second epoch's sample to the last (0 with fewer than 3 epochs)."""
    if len(samples) < 3:
        return 0.0
    return samples[-1][key] / samples[1][key] - 1


COLUMNS = (("rss_mb", "RSS MB", "{:.0f}"), ("trimmed_rss_mb", "RSS after malloc_trim MB", "{:.0f}"),
           ("anon_mb", "of it anonymous MB", "{:.0f}"), ("file_mb", "of it files MB", "{:.0f}"),
           ("heap_mb", "C heap in use MB", "{:.0f}"), ("python_blocks", "Python blocks", "{}"),
           ("live_arrays", "live device arrays", "{}"), ("array_mb", "device array MB", "{:.1f}"))


def table(samples: list[dict], peak_mb: float) -> str:
    rows = ["| epoch | " + " | ".join(title for _, title, _ in COLUMNS) + " |", "| --- " * (len(COLUMNS) + 1) + "|"]
    rows += [f"| {s['epoch']} | " + " | ".join(fmt.format(s[key]) for key, _, fmt in COLUMNS) + " |"
             for s in samples]
    rows += [f"| peak (VmHWM) | {peak_mb:.0f} |" + " |" * (len(COLUMNS) - 1),
             "| epoch 2 → last | " + " | ".join(f"{drift(samples, key):+.1%}" for key, _, _ in COLUMNS) + " |"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--config", default="smoke")
    p.add_argument("--data-dir")
    p.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = p.parse_intermixed_args(argv)

    from jaxnet import configs
    from jaxnet import compiler

    config = configs.override(configs.get_config(args.config), args.overrides)
    compiler.set_cpu_conv(config.xla_cpu_conv)  # before JAX starts, as the CLI does
    compiler.set_host_memory(config.host_memory)
    from jaxnet import experiment, metrics

    samples = []

    class SamplingWriter(metrics.MetricWriter):
        def write(self, kind, step, scalars):
            super().write(kind, step, scalars)
            if kind == "val":
                samples.append({"epoch": scalars["epoch"], **sample()})

    with tempfile.TemporaryDirectory(prefix="jaxnet-memory-") as workdir, \
            mock.patch.object(experiment, "MetricWriter", SamplingWriter):
        t0 = time.perf_counter()
        summary = experiment.train_and_evaluate(config, workdir, data_dir=args.data_dir, show_progress=False)
    result = table(samples, _status_mb("VmHWM"))
    print(result)
    if not args.no_record:
        from benchmarks.common import append_results

        notes = (f"Recipe `{args.config}` {' '.join(args.overrides)}: {summary['steps']} steps, "
                 f"{time.perf_counter() - t0:.0f} s, test accuracy {summary['test_accuracy']:.2%}. Sampled in the "
                 "training thread as each epoch's validation record is written (after its evaluation).")
        append_results(f"Memory over a run, `{args.config}` recipe", result, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
