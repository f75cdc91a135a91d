"""Host memory of a recipe's run: peak RSS, and RSS and live device arrays at the end of every epoch, so that a
leak (host or device) across epochs shows as growth from epoch 2 to the last.

The experiment runs in this process (`jaxnet.experiment.train_and_evaluate`, as the CLI runs it); a thread reads
/proc/self/status and `jax.live_arrays()` each time the run appends a validation record (the end of an epoch) to
its metrics.jsonl.

    python -m benchmarks.memory [--config smoke] [--data-dir D] [--no-record] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _watch(metrics: Path, samples: list, done: threading.Event) -> None:
    import jax

    seen = 0
    while not done.wait(0.05):
        if not metrics.exists():
            continue
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        for row in rows[seen:]:
            if row["kind"] == "val":
                samples.append({"epoch": row["epoch"], "rss_mb": _status_mb("VmRSS"),
                                "live_arrays": len(jax.live_arrays())})
        seen = len(rows)


def drift(samples: list[dict], key: str) -> float:
    """Relative change of `key` from the second epoch's sample to the last (0 with fewer than 3 epochs)."""
    if len(samples) < 3:
        return 0.0
    return samples[-1][key] / samples[1][key] - 1


def table(samples: list[dict], peak_mb: float) -> str:
    rows = ["| epoch | RSS MB | live device arrays |", "| --- | --- | --- |"]
    rows += [f"| {s['epoch']} | {s['rss_mb']:.0f} | {s['live_arrays']} |" for s in samples]
    rows += [f"| peak (VmHWM) | {peak_mb:.0f} | |",
             f"| epoch 2 → last | {drift(samples, 'rss_mb'):+.1%} | {drift(samples, 'live_arrays'):+.1%} |"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--config", default="smoke")
    p.add_argument("--data-dir")
    p.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = p.parse_intermixed_args(argv)

    from experiments import configs
    from jaxnet import compiler

    config = configs.override(configs.get_config(args.config), args.overrides)
    compiler.set_cpu_conv(config.xla_cpu_conv)  # before JAX starts, as the CLI does
    from jaxnet import experiment

    samples, done = [], threading.Event()
    with tempfile.TemporaryDirectory(prefix="jaxnet-memory-") as workdir:
        watcher = threading.Thread(target=_watch, args=(Path(workdir) / "metrics.jsonl", samples, done), daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        summary = experiment.train_and_evaluate(config, workdir, data_dir=args.data_dir, show_progress=False)
        time.sleep(0.2)
        done.set()
        watcher.join()
    result = table(samples, _status_mb("VmHWM"))
    print(result)
    if not args.no_record:
        from benchmarks.common import append_results

        notes = (f"Recipe `{args.config}` {' '.join(args.overrides)}: {summary['steps']} steps, "
                 f"{time.perf_counter() - t0:.0f} s, test accuracy {summary['test_accuracy']:.2%}. RSS and live "
                 "arrays sampled when each epoch's validation record is written (after its evaluation).")
        append_results(f"Memory over a run, `{args.config}` recipe", result, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
