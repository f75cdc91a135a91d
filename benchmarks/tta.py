"""Test-time augmentation of a finished run, variant by variant: test accuracy and evaluation time, interleaved.

Restores the state a run tested (its workdir's best checkpoint if it had a validation split, else its last),
reads the test split it tested on, and evaluates it with each variant LEVEL:FRACTION — the TTA level (0 none,
1 mirror, 2 mirror + translate) and the fraction of least confident images given the views (selective TTA;
1 = all) — in rounds A B C, C B A, ..., compilation excluded. The weights are the same in every variant, so the
accuracies differ by the TTA alone; the time is the whole test split's evaluation, as the experiment runs it.

    python -m benchmarks.tta --workdir runs/quick-... [--data-dir ...] [--variants 0:1,2:1,2:0.25] [--rounds 3]
        [--no-record]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

from jaxnet.errors import ConfigError, JaxnetError


def _variants(text: str) -> list[tuple[int, float]]:
    try:
        variants = [(int(level), float(fraction)) for level, fraction in
                    (item.split(":") for item in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"variants are LEVEL:FRACTION, comma-separated (e.g. 2:0.25), got {text!r}")
    for level, fraction in variants:
        if level not in (0, 1, 2) or not 0 < fraction <= 1 or (level == 0 and fraction != 1):
            raise argparse.ArgumentTypeError(f"variant {level}:{fraction}: the level is 0, 1 or 2 and the fraction "
                                             "in (0, 1] (1 for level 0)")
    if len(set(variants)) < len(variants):
        raise argparse.ArgumentTypeError(f"variants repeat: {text!r}")
    return variants


def run_config(saved: dict):
    """The config a run saved in its summary, laid over jaxnet's defaults, and the fields it lacks (a run of an
    older jaxnet), which keep their defaults. A field this jaxnet does not know, or a value of another type than
    the field's, is a ConfigError."""
    from jaxnet import configs

    config = configs.get_config("default")
    if unknown := sorted(set(saved) - set(config)):
        raise ConfigError(f"its config has fields this jaxnet does not know: {', '.join(unknown)}")
    for key, value in saved.items():
        try:
            config[key] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"its config's {key}={value!r} does not fit the field: {e}") from None
    return config, sorted(set(config) - set(saved))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a finished run of python -m experiments.cifar10")
    p.add_argument("--data-dir", help="local CIFAR-10, as the run's --data-dir")
    p.add_argument("--variants", type=_variants, default=_variants("0:1,2:1,2:0.5,2:0.25"),
                   help="LEVEL:FRACTION, comma-separated (default: 0:1,2:1,2:0.5,2:0.25)")
    p.add_argument("--rounds", type=int, default=3, help="timed evaluations of each variant (default: %(default)s)")
    p.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be ≥ 1, got {args.rounds}")
    summary = Path(args.workdir) / "summary.json"
    if not summary.is_file():
        p.error(f"{summary} not found: --workdir must be a finished run")
    try:
        args.summary = json.loads(summary.read_text())
    except ValueError as e:
        p.error(f"{summary} is not a run's summary (not JSON: {e})")
    if not (isinstance(args.summary, dict) and isinstance(args.summary.get("config"), dict) and "seed" in args.summary):
        p.error(f"{summary} is not a run's summary (no config and seed)")
    try:
        args.config, missing = run_config(args.summary["config"])
    except ConfigError as e:
        p.error(f"{summary}: {e}")
    if missing:
        print(f"note: {summary}'s config has no {', '.join(missing)} (an older jaxnet's run): jaxnet's defaults "
              "taken for them", file=sys.stderr)
    return args


def tested_state(workdir: Path, config, seed: int, train_images):
    """The state the run at `workdir` tested: its best checkpoint with a validation split, else its last."""
    import jax

    from jaxnet import checkpoint, experiment

    state = experiment.initial_state(config, experiment.build_model(config),
                                     experiment.build_optimizer(config, 1, 1), jax.random.key(seed), train_images[:1])
    checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    try:
        return checkpointer.restore(state, "best" if config.val_size else "last")[0]
    finally:
        checkpointer.close()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)

    from jaxnet import compiler

    summary, config = args.summary, args.config
    compiler.set_cpu_conv(config.xla_cpu_conv)  # the run's process settings, before JAX starts
    compiler.set_host_memory(config.host_memory)
    from jaxnet import data as data_lib
    from jaxnet import experiment, loop, parallel, train

    try:
        train_set, _, test_set = experiment.load_splits(config, args.data_dir, summary["seed"])
        state = tested_state(Path(args.workdir), config, summary["seed"], train_set["image"])
    except JaxnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mesh = parallel.make_mesh()
    state = parallel.put_replicated(state, mesh)
    test = data_lib.normalized(test_set, config.mean, config.std)
    steps = {v: parallel.jit_eval_step(partial(train.eval_step, tta=v[0], tta_fraction=v[1]), mesh=mesh,
                                       num_classes=experiment.NUM_CLASSES) for v in args.variants}
    accuracy, times = {}, {v: [] for v in args.variants}

    def batches():
        return data_lib.eval_batches(test, config.eval_batch_size, mesh.size)

    for v in args.variants:  # compiles, and the accuracy (the same every round: same weights, same images)
        accuracy[v] = loop.evaluate(steps[v], state, batches())["accuracy"]
    for r in range(args.rounds):
        for v in args.variants[::-1 if r % 2 else 1]:
            t = time.perf_counter()
            loop.evaluate(steps[v], state, batches())
            times[v].append(time.perf_counter() - t)
    base = statistics.median(times[args.variants[0]])
    rows = ["| TTA level | fraction given the views | test accuracy | eval s (median) | × the first row's time |",
            "| --- | --- | --- | --- | --- |"]
    for v in args.variants:
        t = statistics.median(times[v])
        rows.append(f"| {v[0]} | {v[1]:g} | {accuracy[v]:.2%} | {t:.2f} | {t / base:.2f} |")
    result = "\n".join(rows)
    print(result)
    if not args.no_record:
        from benchmarks.common import append_results

        reported = [f"{v:.2%}" if isinstance(v, float) else "n/a"
                    for v in (summary.get("test_accuracy"), summary.get("test_accuracy_tta"))]
        notes = (f"Run `{args.workdir}`: model {config.model}, conv impl {config.conv_impl}, dtype "
                 f"{summary.get('dtype', config.dtype)}, {len(test_set['label'])} test images in batches of "
                 f"{len(next(batches())['label'])}; its summary: {reported[0]}, {reported[1]} with TTA level "
                 f"{config.tta_level}. {args.rounds} rounds, variants interleaved; compilation excluded.")
        append_results("Test-time augmentation of one trained model, selective or not", result, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
