"""kill -9 at random moments, then --resume: a recipe's run ends bit-identical to an uninterrupted one, and no
checkpoint is ever unreadable.

One uninterrupted run of `python -m experiments.cifar10` first (its wall time sets the window); then the same
command is started in a second workdir and killed with SIGKILL after a random delay, `--resume`d (or started
again, if it died before its checkpoint folders existed), killed again, … `--kills` times, and then left to
finish. After every kill each complete checkpoint must restore; at the end the final checkpoint's arrays
(params, BN statistics, optimizer state, EMA, step, rng) must equal the uninterrupted run's bit for bit (CPU),
and its metrics.jsonl the uninterrupted run's row for row (each step logged once, with the same values).
What each kill interrupted is read from the killed process's output: before training, a training step, the
epoch-end evaluation and checkpoint, or the final test/exports.

    python -m benchmarks.kill_resume [--kills 10] [--config smoke] [--data-dir D] [--seed 0] [--no-record]
        [--max-delay 0.5] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides of the runs")
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs before the run may finish (default: %(default)s)")
    p.add_argument("--config", default="smoke")
    p.add_argument("--data-dir")
    p.add_argument("--seed", type=int, default=0, help="of the kill delays (the runs use seed 0)")
    p.add_argument("--max-delay", type=float, default=0.5,
                   help="kill delays are uniform in [0.3 s, this × the uninterrupted run's wall time]")
    p.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    return p.parse_intermixed_args(argv)


def _command(args: argparse.Namespace, workdir: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "experiments.cifar10", "--config", args.config, "--workdir", str(workdir),
            "--compilation-cache", "", *(["--data-dir", args.data_dir] if args.data_dir else []),
            *(["--resume"] if resume else []), *args.overrides]


def _phase(output: str) -> str:
    """What the killed run was doing, from the end of its output (progress bars and messages)."""
    tail = output.replace("\r", "\n").rstrip().splitlines()[-1:] or [""]
    last = tail[0]
    if "epoch" not in output:
        return "before training (data, compile)"
    if "100%" in last:
        return "epoch end (evaluation, checkpoint)"
    return "training step"


def checkpoints_readable(workdir: Path) -> int:
    """How many complete checkpoints `workdir` holds; an exception if one of them cannot be read."""
    from jaxnet import checkpoint

    steps = [p for which in ("last", "best") for p in (workdir / "checkpoints" / which).glob("*") if p.name.isdigit()]
    for step in steps:
        checkpoint.read_arrays(step)
    return len(steps)


def final_arrays(workdir: Path):
    from jaxnet import checkpoint

    directory = workdir / "checkpoints" / "last"
    step = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    return step, checkpoint.read_arrays(directory / str(step))


def kill_and_resume(args: argparse.Namespace, root: Path, env: dict) -> dict:
    """The whole experiment: reference run, `args.kills` kills with resumes, final comparison. Returns the tally."""
    import jax
    import numpy as np

    from jaxnet.metrics import read_jsonl

    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    reference = subprocess.run(_command(args, root / "reference", False), cwd=ROOT, env=env, capture_output=True,
                               text=True)
    if reference.returncode:
        raise SystemExit(f"error: the uninterrupted run failed (exit {reference.returncode}): "
                         f"{reference.stderr.strip().splitlines()[-1:]}")
    window = time.perf_counter() - t0
    workdir, phases, starts = root / "killed", Counter(), 0
    while True:  # start (or resume), kill after a random delay; once `kills` kills are done, let it finish
        resume = (workdir / "checkpoints").exists()
        proc = subprocess.Popen(_command(args, workdir, resume), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        starts += 1
        killing = sum(phases.values()) < args.kills
        try:
            output, _ = proc.communicate(timeout=rng.uniform(0.3, window * args.max_delay) if killing else None)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            phases[_phase(output)] += 1
            checkpoints_readable(workdir)
            continue
        if proc.returncode:
            raise SystemExit(f"error: a resumed run failed (exit {proc.returncode}): "
                             f"{output.strip().splitlines()[-1:]}")
        if not killing:
            break
        raise SystemExit(f"error: the run finished after {sum(phases.values())} of {args.kills} kills: give it more "
                         "steps (e.g. epochs=40.0) or lower --max-delay")
    (step_a, a), (step_b, b) = final_arrays(root / "reference"), final_arrays(workdir)
    same = step_a == step_b and all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    rows_a, rows_b = (read_jsonl(run / "metrics.jsonl") for run in (root / "reference", workdir))
    return {"kills": sum(phases.values()), "phases": dict(phases), "starts": starts, "final_step": step_b,
            "bit_identical": same, "same_metrics": rows_a == rows_b, "metric_rows": (len(rows_a), len(rows_b)),
            "window_s": window, "checkpoints_read": checkpoints_readable(workdir)}


def table(tally: dict) -> str:
    rows = ["| what | count |", "| --- | --- |"]
    rows += [f"| killed during: {phase} | {n} |" for phase, n in sorted(tally["phases"].items())]
    rows += [f"| SIGKILLs in all | {tally['kills']} |",
             f"| runs started after the uninterrupted one | {tally['starts']} |",
             f"| final step | {tally['final_step']} |",
             f"| every checkpoint readable after every kill | yes ({tally['checkpoints_read']} at the end) |",
             f"| final state bit-identical to the uninterrupted run | {'yes' if tally['bit_identical'] else 'NO'} |",
             f"| metrics.jsonl the uninterrupted run's, row for row | {'yes' if tally['same_metrics'] else 'NO'} "
             f"({tally['metric_rows'][1]} rows; {tally['metric_rows'][0]} uninterrupted) |"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="jaxnet-kill-") as scratch:
        tally = kill_and_resume(args, Path(scratch), env)
    result = table(tally)
    print(result)
    if not args.no_record:
        from benchmarks.common import append_results

        notes = (f"Recipe `{args.config}` {' '.join(args.overrides)}: kill delays uniform in [0.3 s, "
                 f"{args.max_delay * tally['window_s']:.1f} s] ({args.max_delay} × the uninterrupted run's "
                 f"{tally['window_s']:.1f} s), seed {args.seed}; every run a new process (`--compilation-cache ''`).")
        append_results(f"kill -9 and --resume, {tally['kills']} kills", result, notes)
    return 0 if tally["bit_identical"] and tally["same_metrics"] else 1


if __name__ == "__main__":
    sys.exit(main())
