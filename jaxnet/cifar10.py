"""CIFAR-10 end to end: data, on-device augmentation, training, evaluation, checkpoints, export, predict.

    jaxnet-cifar10 --config default [key=value ...] [--workdir W] [--data-dir D] [--resume]
    jaxnet-cifar10 predict --workdir W image.png [image.jpg ...]

The same as `python -m jaxnet.cifar10 ...`, and from a clone of the repository `python -m experiments.cifar10`.

Flags and wiring only: the experiment is `jaxnet.experiment.train_and_evaluate`. Exit codes: 0 done;
1 training diverged or some images could not be classified; 2 bad input (data, config, checkpoint,
arguments), as one line; 130/143 interrupted by Ctrl-C/SIGTERM after saving a checkpoint. Any other
error is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from pathlib import Path

from jaxnet import configs
from jaxnet.cli import Parser, positive


def _train_parser() -> argparse.ArgumentParser:
    from jaxnet.cache import default_cache_dir

    p = Parser(
        prog="jaxnet-cifar10",
        description="Train and evaluate on CIFAR-10. Subcommand: `predict --workdir W IMAGE...` classifies "
                    "images with a run's exported model.",
        epilog="configs:\n" + "".join(f"  {name:9} {line}\n" for name, line in configs.SUMMARIES.items())
               + "\nOverrides: any config field as key=value, e.g. epochs=2 batch_size=256 dtype=bfloat16.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config field overrides")
    p.add_argument("--config", default="default", choices=configs.NAMES, help="recipe (default: %(default)s)")
    p.add_argument("--workdir", help="where checkpoints, logs, plots and the summary go (default: runs/CONFIG)")
    p.add_argument("--data-dir", help="local CIFAR-10 (directory, .tar.gz or tensorflow-datasets folder; default: "
                   "$JAXNET_CIFAR10, else the official archive, downloaded once and verified)")
    p.add_argument("--seed", type=int, default=0, help="the one seed all randomness derives from")
    p.add_argument("--resume", action="store_true", help="continue from the workdir's latest checkpoint")
    p.add_argument("--export", default="", metavar="FORMATS",
                   help="comma-separated: jax (jax.export StableHLO), onnx (needs the onnx extra)")
    p.add_argument("--export-platforms", default="cpu,cuda", metavar="PLATFORMS",
                   help="comma-separated platforms the jax export is lowered for, from this machine "
                        "(default: %(default)s; also rocm, tpu)")
    p.add_argument("--parallel", default="jit", choices=("jit", "pmap"),
                   help="data parallelism: jit over a device mesh (default) or pmap (compatibility path)")
    p.add_argument("--num-devices", type=positive(int), help="devices to train on (default: all)")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process run: the coordinator (process 0)")
    p.add_argument("--num-processes", type=int, help="multi-process run: number of processes")
    p.add_argument("--process-id", type=int, help="multi-process run: this process's index")
    p.add_argument("--dump-hlo", metavar="DIR", help="write StableHLO and HLO (before/after optimisation) of the "
                   "train and eval steps to DIR, with DIR/index.json")
    p.add_argument("--profile", metavar="DIR", help="profiler trace of 5 steps after warm-up into DIR (open with "
                   "xprof, extra 'profile', or summarize: python -m jaxnet.profiling summarize DIR)")
    p.add_argument("--peak-tflops", type=positive(float), help="the device's peak TFLOP/s in the compute dtype, for "
                   "the MFU in the summary (e.g. 989 for an H100/H200 in bf16; default: no MFU)")
    p.add_argument("--compilation-cache", default=str(default_cache_dir() / "xla"), metavar="DIR",
                   help="persistent XLA compilation cache, so a second run starts without compiling "
                   "(default: %(default)s; '' turns it off). Not used by a run of several processes on CPU, whose "
                   "processes could not share it")
    return p


def _predict_parser() -> argparse.ArgumentParser:
    p = Parser(prog="jaxnet-cifar10 predict", description="Top-3 classes of each image, from WORKDIR/model.jaxexport.")
    p.add_argument("--workdir", required=True, help="a run's workdir, trained with --export jax")
    p.add_argument("images", nargs="+", help="image files (any size; resized to 32×32)")
    return p


def predict(workdir: str, paths: list[str]) -> int:
    """Print the top-3 classes of each image; a bad file is one line on stderr. 1 if any failed, else 0."""
    from jaxnet import data, export
    from jaxnet.errors import ConfigError

    model_path = Path(workdir) / "model.jaxexport"
    if not model_path.exists():
        raise ConfigError(f"{model_path} does not exist: train with --export jax first")
    images, names, failed = export.read_images(paths)
    for path, why in failed.items():
        print(f"{path}: cannot read image ({why})", file=sys.stderr)
    if names:
        for name, top in zip(names, export.top_classes(export.load_jax(model_path)(images), data.CLASSES)):
            print(f"{name}: " + ", ".join(f"{cls} {p:.3f}" for cls, p in top))
    return 1 if failed else 0


def train(args, stop: dict) -> dict:
    """Config and JAX set up from the flags (the XLA flag and malloc's settings before JAX starts), then the
    experiment."""
    from jaxnet import compiler, parallel

    config = configs.override(configs.get_config(args.config), args.overrides)
    compiler.set_cpu_conv(config.xla_cpu_conv)
    compiler.set_host_memory(config.host_memory)
    if any(a is not None for a in (args.coordinator, args.num_processes, args.process_id)):
        parallel.init_distributed(args.coordinator, args.num_processes, args.process_id)
        parallel.assert_same_across_processes(
            {"config": config.to_dict(), "seed": args.seed, "processes": args.num_processes, "parallel": args.parallel,
             "devices": args.num_devices}, what="config, --seed, --num-processes, --parallel or --num-devices")
    parallel.start_backend()
    for signum in (signal.SIGINT, signal.SIGTERM):  # after JAX's runtime, whose preemption notifier takes SIGTERM
        signal.signal(signum, lambda signum, _frame: stop.update(signal=signum))
    if args.compilation_cache and compiler.compilation_cache_serves():
        compiler.enable_compilation_cache(args.compilation_cache)
    elif args.compilation_cache and parallel.is_main_process():
        print("note: no compilation cache in a run of several processes on CPU (see --help)", file=sys.stderr)
    from jaxnet import experiment

    with _plain_notes() if parallel.is_main_process() else contextlib.nullcontext():
        return experiment.train_and_evaluate(
            config, args.workdir, data_dir=args.data_dir, seed=args.seed, resume=args.resume,
            export=tuple(f for f in args.export.split(",") if f),
            export_platforms=tuple(p for p in args.export_platforms.split(",") if p),
            should_stop=lambda: stop["signal"] is not None,
            parallel_mode=args.parallel, num_devices=args.num_devices, dump_hlo=args.dump_hlo, profile=args.profile,
            peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None)


@contextlib.contextmanager
def _plain_notes():
    """jaxnet's notes (a time budget's epochs, a data source passed over) as plain lines on stderr, and not
    again through a root handler another library set up; logging as it was afterwards (main may be called
    in a process that goes on)."""
    package_log = logging.getLogger("jaxnet")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = package_log.level, package_log.propagate
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    package_log.propagate = False
    try:
        yield
    finally:
        package_log.removeHandler(handler)
        package_log.setLevel(saved[0])
        package_log.propagate = saved[1]


def main(argv: list[str] | None = None) -> int:
    from jaxnet.errors import JaxnetError, TrainingDiverged

    argv = sys.argv[1:] if argv is None else argv
    stop = {"signal": None}
    try:
        if argv[:1] == ["predict"]:
            args = _predict_parser().parse_args(argv[1:])
            return predict(args.workdir, args.images)
        args = _train_parser().parse_intermixed_args(argv)
        args.workdir = args.workdir or f"runs/{args.config}"
        summary = train(args, stop)
    except JaxnetError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        code = 1 if isinstance(e, TrainingDiverged) else 2
        from jaxnet import parallel

        return parallel.exit_after_error(code)
    if summary.get("interrupted") and summary["step"] is None:
        print("interrupted before training started; nothing to save", file=sys.stderr)
        return 128 + stop["signal"]
    if summary.get("interrupted"):
        print(f"interrupted at step {summary['step']}; checkpoint saved in {args.workdir}/checkpoints; "
              f"continue with --resume", file=sys.stderr)
        return 128 + stop["signal"]
    where = (f"summary in {args.workdir}/summary.json" if summary["process"] == 0 else
             f"process {summary['process']} of {summary['processes']}: process 0 writes the outputs")
    print(f"test accuracy {summary['test_accuracy']:.4f} (TTA level {summary['tta_level']}: "
          f"{summary['test_accuracy_tta']:.4f}); {summary['wall_seconds']:.0f} s; {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
