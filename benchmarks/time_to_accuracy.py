"""Time to accuracy, airbench-style: one recipe of `experiments.cifar10` end to end for several seeds.

Each seed runs as its own process, `python -m experiments.cifar10 --config C --seed S ...`, started as a user
would start it (the persistent compilation cache is warm after the first). The table gives each run's test
accuracy (plain and with the recipe's TTA), best validation accuracy, steps, train and wall seconds and steady
img/s from its `summary.json`, the seconds its whole process took (start-up and imports too, timed here), then
the mean ± sample std over seeds, and with --target how many runs reached it (with TTA, as airbench counts); last,
where each jaxnet run's seconds went (its `phase_seconds`).

With --peer torch_record, the PyTorch record script (`benchmarks/torch_record.py`, airbench94_muon in eager
PyTorch; extra `bench`) runs too, on the same images (the recipe's train/test subsets, the same seed), seeds
interleaved (jaxnet, peer, peer, jaxnet, ...), and the table ends with the ratios of their mean times: their
processes' (what a user waits for), their wall times as each timed itself, their training loops'. The peer
follows the overrides `epochs=` and `batch_size=` when given; otherwise it keeps the record's 8 epochs of 2000.
It computes in float32 unless `--peer-dtype bfloat16` (PyTorch's autocast, its fast mode on CPUs with AMX), on
the CPU unless `--peer-device cuda` (where jaxnet's runs have the GPU too).

With --warmup, one run of each (jaxnet, the peer, each variant) on the first seed goes first and is left out of the
tables: the record times after a warm-up run too, and on a GPU the first jaxnet run fills JAX's compilation cache
with XLA's autotuning (95 s of the `muon` recipe's first run on an H200, 2 s once cached).

With --ablate NAME:key=value[,key=value...] (repeatable), each such variant of the recipe runs too, in the same
rotation, and an ablation table gives each variant's mean accuracy and time against the recipe's: what each
ingredient buys, measured side by side.

    python -m benchmarks.time_to_accuracy [--config default] [--seeds 0,1,2] [--data-dir D] [--target 0.94]
        [--peer torch_record [--peer-dtype bfloat16] [--peer-device cuda]] [--ablate NAME:key=value,...]
        [--warmup] [--workdir DIR] [--no-record] [key=value ...]

A seed whose run fails stops the benchmark with that run's exit code; nothing is recorded then.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from jaxnet import configs
from jaxnet.errors import ConfigError

COLUMNS = (("test acc", "test_accuracy", "{:.2%}"), ("test acc, TTA", "test_accuracy_tta", "{:.2%}"),
           ("best val acc", "best_val_accuracy", "{:.2%}"), ("steps", "steps", "{:d}"),
           ("train s", "train_seconds", "{:.1f}"), ("wall s", "wall_seconds", "{:.1f}"),
           ("process s", "process_seconds", "{:.1f}"),
           ("img/s", "images_per_second", "{:.1f}"))


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds repeat: {text!r}")
    return seeds


def _variant(text: str) -> tuple[str, list[str]]:
    name, sep, items = text.partition(":")
    overrides = [item for item in re.split(r",(?![^()\[\]]*[)\]])", items) if item]  # not inside a tuple's brackets
    if not sep or not name or not overrides or not all("=" in item for item in overrides):
        raise argparse.ArgumentTypeError(f"expected NAME:key=value[,key=value...], got {text!r}")
    return name, overrides


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.time_to_accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, passed to every run")
    p.add_argument("--config", default="default", choices=configs.NAMES,
                   help="the experiment's recipe (default: %(default)s)")
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated (default: 0,1,2)")
    p.add_argument("--data-dir", help="local CIFAR-10, as the experiment's --data-dir")
    p.add_argument("--target", type=float, help="test accuracy with TTA to count runs against, e.g. 0.94")
    p.add_argument("--peer", choices=("torch_record",), help="run the PyTorch record script too, interleaved")
    p.add_argument("--peer-dtype", choices=("float32", "bfloat16"),
                   help="the peer's compute dtype (default float32; bfloat16: under torch.autocast)")
    p.add_argument("--peer-device", choices=("cpu", "cuda"), help="where the peer runs (default cpu)")
    p.add_argument("--ablate", type=_variant, action="append", default=[], metavar="NAME:key=value,...",
                   help="a variant of the recipe to run beside it (repeatable)")
    p.add_argument("--warmup", action="store_true",
                   help="first one run of each (jaxnet, peer, variants) on the first seed, left out of the tables")
    p.add_argument("--workdir", help="keep each run in DIR/seed<S> (default: a temporary directory, removed)")
    p.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = p.parse_args(argv)
    if args.target is not None and not 0 < args.target <= 1:
        p.error(f"--target is an accuracy in (0, 1], got {args.target}")
    for flag, value in (("--peer-dtype", args.peer_dtype), ("--peer-device", args.peer_device)):
        if value and not args.peer:
            p.error(f"{flag} is the peer's: give --peer too")
    args.peer_dtype = args.peer_dtype or "float32"
    args.peer_device = args.peer_device or "cpu"
    if args.peer:  # the peer's PyTorch and device are checked now, not after the first run
        from benchmarks.torch_record import unavailable

        problem = unavailable(args.peer_device)
        if problem:
            p.error(problem)
    names = [name for name, _ in args.ablate]
    if len(set(names)) != len(names) or {"jaxnet", "peer"} & set(names):
        p.error(f"--ablate names must differ from each other and from jaxnet and peer, got {', '.join(names)}")
    for name, overrides in args.ablate:  # a bad key or value fails now, not after hours of runs
        from jaxnet.experiment import validate_config

        try:
            validate_config(configs.override(configs.get_config(args.config), [*args.overrides, *overrides]))
        except ConfigError as e:
            p.error(f"--ablate {name}: {e}")
    return args


def _cell(fmt: str, value) -> str:
    return "—" if value is None else fmt.format(value)


def table(summaries: dict[int, dict], target: float | None) -> str:
    """The per-seed rows and a mean ± std row (std over seeds; "—" for one seed) as a Markdown table."""
    rows = ["| seed | " + " | ".join(name for name, _, _ in COLUMNS) + " |",
            "| --- " * (len(COLUMNS) + 1) + "|"]
    for seed, s in summaries.items():
        rows.append(f"| {seed} | " + " | ".join(_cell(fmt, s.get(key)) for _, key, fmt in COLUMNS) + " |")
    cells = []
    for _, key, fmt in COLUMNS:
        values = [s[key] for s in summaries.values() if s.get(key) is not None]
        if not values:
            cells.append("—")
            continue
        fmt = fmt.replace(":d", ":.0f")
        spread = fmt.format(statistics.stdev(values)) if len(values) > 1 else "—"
        cells.append(f"{fmt.format(statistics.mean(values))} ± {spread}")
    rows.append("| mean ± std | " + " | ".join(cells) + " |")
    if target is not None:
        reached = sum(s["test_accuracy_tta"] >= target for s in summaries.values())
        rows.append(f"\nRuns at ≥ {target:.2%} test accuracy with TTA: {reached} of {len(summaries)}.")
    return "\n".join(rows)


def _run(command: list[str], summary_path: Path) -> tuple[int, dict]:
    """`command` in its own process: (exit code, the summary it wrote with the process's seconds added as
    "process_seconds", or {} if it failed).

    SIGINT and SIGTERM are passed on to the run, which saves a checkpoint and exits (130/143); this process
    waits for it.
    """
    start = time.perf_counter()
    with subprocess.Popen(command) as child:
        handlers = {s: signal.signal(s, lambda signum, _: child.send_signal(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = child.wait()
            seconds = time.perf_counter() - start
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
    if code or not summary_path.exists():
        return code or 1, {}
    return 0, json.loads(summary_path.read_text()) | {"process_seconds": seconds}


def run_seed(config: str, seed: int, workdir: Path, data_dir: str | None, overrides: list[str]) -> tuple[int, dict]:
    """One run of the experiment, `python -m experiments.cifar10`: (exit code, its summary or {})."""
    return _run([sys.executable, "-m", "experiments.cifar10", "--config", config, "--seed", str(seed),
                 "--workdir", str(workdir), *(["--data-dir", data_dir] if data_dir else []), *overrides],
                workdir / "summary.json")


def run_peer(config: str, seed: int, workdir: Path, data_dir: str | None, overrides: list[str],
             dtype: str = "float32", device: str = "cpu") -> tuple[int, dict]:
    """One run of the PyTorch record script, computing in `dtype` on `device`, on the images `config` (with
    `overrides`) draws for `seed`."""
    recipe = configs.override(configs.get_config(config), overrides)
    given = {item.partition("=")[0] for item in overrides}
    shape = [f"--{key.replace('_', '-')}={recipe[key]}" for key in ("epochs", "batch_size") if key in given]
    workdir.mkdir(parents=True, exist_ok=True)
    return _run([sys.executable, "-m", "benchmarks.torch_record", "--seed", str(seed), "--summary",
                 str(workdir / "summary.json"), f"--train-subset={recipe.train_subset}",
                 f"--test-subset={recipe.test_subset}", f"--dtype={dtype}", f"--device={device}", *shape,
                 *(["--data-dir", data_dir] if data_dir else [])],
                workdir / "summary.json")


def ratios(ours: dict[int, dict], peer: dict[int, dict]) -> str:
    """Mean process, wall and training time of jaxnet's runs over the peer's, and their mean accuracies with
    TTA."""
    def mean(runs, key):
        return statistics.mean(s[key] for s in runs.values())

    process, wall = (mean(ours, key) / mean(peer, key) for key in ("process_seconds", "wall_seconds"))
    return (f"\njaxnet / peer, mean over seeds: process time {process:.2f}×, wall time {wall:.2f}×, "
            f"training time {mean(ours, 'train_seconds') / mean(peer, 'train_seconds'):.2f}×; test accuracy with TTA "
            f"{mean(ours, 'test_accuracy_tta'):.2%} (jaxnet) vs {mean(peer, 'test_accuracy_tta'):.2%} (peer).")


def ablation(base: dict[int, dict], variants: dict[str, tuple[list[str], dict[int, dict]]]) -> str:
    """Each variant's mean accuracy (with TTA) and time against the recipe's, over the same seeds."""
    def mean(runs, key):
        return statistics.mean(s[key] for s in runs.values())

    rows = ["| variant | overrides | test acc, TTA | Δ points | wall s | wall / recipe's | train s |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| recipe | — | {mean(base, 'test_accuracy_tta'):.2%} | — | {mean(base, 'wall_seconds'):.1f} | 1.00× | "
            f"{mean(base, 'train_seconds'):.1f} |"]
    for name, (overrides, runs) in variants.items():
        delta = 100 * (mean(runs, "test_accuracy_tta") - mean(base, "test_accuracy_tta"))
        rows.append(f"| {name} | `{' '.join(overrides)}` | {mean(runs, 'test_accuracy_tta'):.2%} | {delta:+.2f} | "
                    f"{mean(runs, 'wall_seconds'):.1f} | {mean(runs, 'wall_seconds') / mean(base, 'wall_seconds'):.2f}× "
                    f"| {mean(runs, 'train_seconds'):.1f} |")
    return "\n".join(rows)


PHASES = ("data", "setup", "train", "test", "finish")


def phases(runs: dict[str, dict[int, dict]]) -> str:
    """Where each jaxnet runner's time went, means over its seeds in seconds: the whole process, the run's own
    wall time and its phases (`phase_seconds`), the checkpoint saves among the training loop's."""
    def mean(summaries, get):
        return f"{statistics.mean(get(s) for s in summaries.values()):.2f}"

    rows = ["| run | process | wall | " + " | ".join(PHASES) + " | of train: checkpoints |",
            "| --- " * (len(PHASES) + 4) + "|"]
    for name, summaries in runs.items():
        rows.append(f"| {name} | {mean(summaries, lambda s: s['process_seconds'])} | "
                    f"{mean(summaries, lambda s: s['wall_seconds'])} | "
                    + " | ".join(mean(summaries, lambda s, p=p: s["phase_seconds"][p]) for p in PHASES)
                    + f" | {mean(summaries, lambda s: s['checkpoint_seconds'])} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    runners = {"jaxnet": run_seed} | (
        {"peer": partial(run_peer, dtype=args.peer_dtype, device=args.peer_device)} if args.peer else {})
    variants = dict(args.ablate)
    for name, extra in variants.items():
        runners[name] = partial(lambda extra, config, seed, workdir, data_dir, overrides:
                                run_seed(config, seed, workdir, data_dir, [*overrides, *extra]), extra)
    summaries: dict[str, dict[int, dict]] = {name: {} for name in runners}
    # (seed or None for the warm-up, runner), seeds in the order A, B, B, A, ...: drift hits both alike
    schedule = [(None, name) for name in runners] if args.warmup else []
    schedule += [(seed, name) for i, seed in enumerate(args.seeds) for name in list(runners)[::-1 if i % 2 else 1]]
    with tempfile.TemporaryDirectory(prefix="jaxnet-tta-") as scratch:
        root = Path(args.workdir or scratch)
        for seed, name in schedule:
            what = args.peer if name == "peer" else " ".join([args.config, *variants.get(name, [])])
            run = "warm-up" if seed is None else f"seed {seed}"
            print(f"{run}: {name} ({what})", flush=True)
            try:
                code, summary = runners[name](args.config, args.seeds[0] if seed is None else seed,
                                              root / f"{name}-{'warmup' if seed is None else f'seed{seed}'}",
                                              args.data_dir, args.overrides)
            except KeyboardInterrupt:  # Ctrl-C before the run had started: nothing of it to save
                code = 130
            if code:
                what = "was interrupted" if code in (130, 143) else "failed"
                print(f"error: the {name} {'warm-up run' if seed is None else f'run of seed {seed}'} {what} "
                      f"(exit code {code}); nothing recorded", file=sys.stderr)
                return code
            if seed is not None:
                summaries[name][seed] = summary
    result = table(summaries["jaxnet"], args.target)
    peer = f"{args.peer} ({args.peer_dtype}{', ' + args.peer_device if args.peer_device != 'cpu' else ''})"
    if args.peer:
        result = (f"jaxnet, `{args.config}`:\n\n{result}\n\nPeer, {peer}:\n\n"
                  f"{table(summaries['peer'], args.target)}\n{ratios(summaries['jaxnet'], summaries['peer'])}")
    for name, overrides in variants.items():
        result += f"\n\nVariant {name} (`{' '.join(overrides)}`):\n\n{table(summaries[name], args.target)}"
    if variants:
        result += "\n\nAblation (means over the seeds):\n\n" + ablation(
            summaries["jaxnet"], {name: (overrides, summaries[name]) for name, overrides in variants.items()})
    result += "\n\nWhere jaxnet's time went (means over the seeds, seconds):\n\n" + phases(
        {name: runs for name, runs in summaries.items() if name != "peer"})
    print(result)
    if not args.no_record:
        from benchmarks.common import append_results

        first = next(iter(summaries["jaxnet"].values()))
        config = first["config"]
        notes = (f"Recipe `{args.config}`{' with ' + ' '.join(args.overrides) if args.overrides else ''}: model "
                 f"{config['model']}, batch {config['batch_size']}, conv impl {config['conv_impl']}, TTA level "
                 f"{first['tta_level']}; {first['devices']} {first['platform']} device(s); XLA_FLAGS of the runs: "
                 f"`{first['xla_flags']}`. Each run in its own process"
                 f"{', interleaved with the peer' if args.peer else ''}; "
                 "wall s = the whole run (data, compilation, training, evaluation) as it timed itself, process s = "
                 "its process as timed from outside (start-up and imports too), train s = its training loop"
                 f"{'; after one warm-up run of each, not counted' if args.warmup else ''}.")
        seeds = f"{len(args.seeds)} seed{'s' if len(args.seeds) > 1 else ''}"
        peer = f" vs {peer}" if args.peer else ""
        peer += f", ablation of {', '.join(variants)}" if variants else ""
        append_results(f"Time to accuracy, `{args.config}` recipe{peer}, {seeds}", result, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
