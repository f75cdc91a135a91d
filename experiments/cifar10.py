"""CIFAR-10 end to end: data, on-device augmentation, training, evaluation, checkpoints, export, predict.

    python -m experiments.cifar10 --config default [key=value ...] [--workdir W] [--data-dir D] [--resume]
    python -m experiments.cifar10 predict --workdir W image.png [image.jpg ...]

Exit codes: 0 done; 1 training diverged or some images could not be classified; 2 bad input (data,
config, checkpoint, arguments); 130/143 interrupted by Ctrl-C/SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import signal
import sys
import time
from functools import partial
from pathlib import Path

from experiments import configs


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


def apply_overrides(config, overrides: list[str]):
    """`key=value` pairs onto `config`, each value parsed as a Python literal of the field's type."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or key not in config:
            raise UsageError(f"override {item!r} is not key=value with a known key; keys: {', '.join(config)}")
        old = config[key]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(old, bool) != isinstance(value, bool) or (
                isinstance(old, (int, float)) and not isinstance(value, (int, float))) or (
                isinstance(old, str) and not isinstance(value, str)):
            raise UsageError(f"override {key}={text}: expected a {type(old).__name__}")
        config[key] = type(old)(value) if isinstance(old, (float, tuple)) else value
    return config


# ---- from config to library objects (JAX is imported from here on) ----

def build_model(config, *, bn_axis_name: str | None = None, conv_impl: str | None = None):
    """The model of `config`; `bn_axis_name` makes BatchNorm average its statistics over a pmap axis;
    `conv_impl` replaces the config's (the parameters are the same for every impl)."""
    import jax.numpy as jnp

    from jaxnet import layers, models

    conv = partial(layers.Conv, impl=conv_impl or config.conv_impl)
    norm = partial(layers.BatchNorm, axis_name=bn_axis_name)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.dtype)
    if dtype is None:
        raise UsageError(f"dtype must be float32 or bfloat16, got {config.dtype!r}")
    constructors = {"fastnet": models.FastNet, "fastnet_tiny": models.FastNetTiny, "resnet18": models.ResNet18,
                    "resnet20": models.ResNet20, "resnet56": models.ResNet56, "resnet_tiny": models.ResNetTiny,
                    "plain": models.PlainCNN, "plain_tiny": models.PlainCNNTiny}
    if config.model not in constructors:
        raise UsageError(f"unknown model {config.model!r}; valid: {', '.join(constructors)}")
    return constructors[config.model](num_classes=10, conv=conv, norm=norm, dtype=dtype)


def make_schedule(config, total_steps: int):
    """LR multiplier per step (peak 1): piecewise-linear points, cosine with warmup, or constant."""
    from jaxnet import train

    match config.schedule:
        case "piecewise":
            fractions, values = zip(*config.schedule_points)
            return train.piecewise_linear([f * total_steps for f in fractions], values)
        case "cosine":
            return train.warmup_cosine(1.0, total_steps, int(config.warmup_fraction * total_steps))
        case "constant":
            return train.constant(1.0)
        case other:
            raise UsageError(f"unknown schedule {other!r}; valid: piecewise, cosine, constant")


def make_optimizer(config, total_steps: int, steps_per_epoch: int):
    """(optax transformation, lr_fn for the metrics) for `config.optimizer`.

    "airbench" reproduces airbench94's PyTorch SGD on a *summed* loss with our mean loss: gradients are
    scaled by the batch size, lr and weight decay are per 1024 examples, BN biases get `bias_lr_mult`×
    the lr, the whitening stem's kernel is frozen and its bias trains (at the plain lr, as airbench's
    does: it is not a BatchNorm bias) for `whiten_bias_epochs` (the lookahead EMA is `make_lookahead`'s).
    """
    import jax
    import jax.numpy as jnp
    import optax

    from jaxnet import train

    multiplier = make_schedule(config, total_steps)
    match config.optimizer:
        case "sgd":
            lr_fn = lambda step: config.lr * multiplier(step)  # noqa: E731
            tx = train.sgd(lr_fn, momentum=config.momentum, weight_decay=config.weight_decay)
        case "adam":
            lr_fn = lambda step: config.lr * multiplier(step)  # noqa: E731
            tx = train.adamw(lr_fn, weight_decay=config.weight_decay)
        case "airbench":
            kilostep = 1024 * (1 + 1 / (1 - config.momentum))
            lr, wd = config.lr / kilostep, config.weight_decay * config.batch_size / kilostep
            lr_bias = lr * config.bias_lr_mult
            whiten_steps = config.whiten_bias_epochs * steps_per_epoch

            def group(lr_g, active=lambda step: 1.0):
                # PyTorch SGD: buf = m·buf + (g_sum + (wd/lr_g)·p); p -= lr_g·s(t)·(g + m·buf) (Nesterov).
                return optax.chain(optax.scale(config.batch_size), optax.add_decayed_weights(wd / lr_g),
                                   optax.trace(decay=config.momentum, nesterov=True),
                                   optax.scale_by_schedule(lambda step: -lr_g * multiplier(step) * active(step)))

            def label(params):
                def one(path, _):
                    names = [getattr(k, "key", "") for k in path]
                    if names[0] == "stem":
                        return "frozen" if names[-1] == "kernel" else "whiten_bias"
                    return "bn_bias" if any(n.startswith("BatchNorm") for n in names) else "other"
                return jax.tree_util.tree_map_with_path(one, params)

            tx = optax.multi_transform(
                {"other": group(lr), "bn_bias": group(lr_bias), "frozen": optax.set_to_zero(),
                 "whiten_bias": group(lr, lambda step: jnp.where(step < whiten_steps, 1.0, 0.0))}, label)
            lr_fn = lambda step: lr * config.batch_size * multiplier(step)  # noqa: E731  (per-mean-loss lr)
        case other:
            raise UsageError(f"unknown optimizer {other!r}; valid: airbench, sgd, adam")
    return tx, lr_fn


def make_lookahead(config, total_steps: int):
    """airbench's lookahead EMA (decay 0.95⁵·(step/total)³, synced every `lookahead_every` steps, the net
    set to the EMA after the last step), or None when `lookahead_every` is 0."""
    from jaxnet import train

    if not config.lookahead_every:
        return None
    return train.Lookahead(config.lookahead_every, lambda step: 0.95 ** 5 * (step / total_steps) ** 3, total_steps)


def _flip_schedule(config, key):
    """`(indices, epoch) -> flip` argument of `jaxnet.data.augment` for `config.flip`."""
    from jaxnet import data as data_lib

    match config.flip:
        case "alternate":
            return partial(data_lib.alternating_flip, key)
        case "random" | "none":
            return lambda indices, epoch: config.flip == "random"
        case other:
            raise UsageError(f"unknown flip {other!r}; valid: alternate, random, none")


def _make_batch(key, images, labels, indices, epoch, *, flip, translate, cutout, mean, std):
    from jaxnet import data as data_lib

    images = data_lib.augment(key, images[indices], translate=translate, flip=flip(indices, epoch), cutout=cutout)
    return {"image": data_lib.normalize(images, mean, std), "label": labels[indices]}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")} | {
        "python": platform.python_version()}


def train_and_evaluate(config, workdir, *, data_dir=None, seed: int = 0, resume: bool = False,
                       export: tuple[str, ...] = (), should_stop=lambda: False, show_progress: bool = True,
                       parallel_mode: str = "jit", num_devices: int | None = None, dump_hlo: str | None = None,
                       profile: str | None = None, peak_flops: float | None = None) -> dict:
    """Run the experiment `config` in `workdir`; return (and write to workdir/summary.json) the summary.

    `parallel_mode` "jit" (a Mesh over `num_devices` devices of all processes, default all) or "pmap"
    (the compatibility path, local devices). Only process 0 writes logs, plots, the summary and exports.
    `dump_hlo`: directory for StableHLO/HLO of the train and eval steps; `profile`: directory for a
    profiler trace of 5 steps; `peak_flops`: device peak for the MFU in the summary (default per platform).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxnet
    from jaxnet import checkpoint, data as data_lib, loop, models, parallel, profiling
    from jaxnet.metrics import MetricWriter, plot_curves

    t0 = time.perf_counter()
    workdir = Path(workdir)
    ckpt_dir = workdir / "checkpoints"
    if not resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise UsageError(f"{workdir} already holds checkpoints: pass --resume to continue, or another --workdir")
    if resume and not ckpt_dir.exists():
        raise UsageError(f"--resume: no checkpoints in {ckpt_dir}")
    cifar = data_lib.load_cifar10(data_dir)
    train_set, test_set = cifar["train"], cifar["test"]
    if config.train_subset:
        train_set = data_lib.subset(train_set, config.train_subset, seed)
    if config.test_subset:
        test_set = data_lib.subset(test_set, config.test_subset, seed)
    train_set, val_set = data_lib.split_validation(train_set, config.val_size, seed)

    main_process = parallel.is_main_process()
    match parallel_mode:
        case "jit":
            mesh = parallel.make_mesh(num_devices)
            n_dev = mesh.size
        case "pmap":
            mesh, n_dev = None, len(jax.local_devices()) if num_devices is None else num_devices
        case other:
            raise UsageError(f"--parallel must be jit or pmap, got {other!r}")
    if parallel_mode == "pmap" and (dump_hlo or profile):
        raise UsageError("--dump-hlo and --profile work with --parallel jit only")
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % n_dev:
            raise UsageError(f"{name} {config[name]} does not divide over {n_dev} devices")
    model = build_model(config, bn_axis_name=parallel.AXIS if parallel_mode == "pmap" else None)
    steps_per_epoch = len(train_set["label"]) // config.batch_size
    if steps_per_epoch < 1:
        raise UsageError(f"batch_size {config.batch_size} exceeds the {len(train_set['label'])} training images")
    total_steps = round(config.epochs * steps_per_epoch)
    tx, lr_fn = make_optimizer(config, total_steps, steps_per_epoch)
    init_key, data_key, flip_key = jax.random.split(jax.random.key(seed), 3)
    state = jaxnet.create_train_state(model, init_key, jnp.zeros((1, 32, 32, 3)), tx,
                                      lookahead=make_lookahead(config, total_steps))
    if config.whiten_stem and "stem" in state.params:
        sample = np.asarray(data_lib.normalize(train_set["image"][:5000], config.mean, config.std))
        params = {**state.params, "stem": {**state.params["stem"], "kernel": jnp.asarray(models.whitening_kernel(sample))}}
        state = state.with_params(params)

    def normalized(split):
        return {"image": np.asarray(data_lib.normalize(split["image"], config.mean, config.std)),
                "label": split["label"]}

    val_norm, test_norm = normalized(val_set), normalized(test_set)
    train_arrays = (train_set["image"], train_set["label"])
    make_batch = partial(_make_batch, flip=_flip_schedule(config, flip_key), translate=config.translate,
                         cutout=config.cutout, mean=config.mean, std=config.std)
    if parallel_mode == "jit":
        state, train_arrays = parallel.put_replicated((state, train_arrays), mesh)
        train_step = parallel.jit_train_step(mesh=mesh, label_smoothing=config.label_smoothing, lr_fn=lr_fn,
                                             num_classes=10)

        def eval_step_for(tta):
            return parallel.jit_eval_step(partial(jaxnet.eval_step, tta=tta), mesh=mesh, num_classes=10)
    else:
        train_arrays = jax.device_put(train_arrays)
        train_step = parallel.pmap_train_step(num_devices=n_dev, label_smoothing=config.label_smoothing, lr_fn=lr_fn,
                                              num_classes=10)

        def eval_step_for(tta):
            return parallel.pmap_eval_step(partial(jaxnet.eval_step, tta=tta), num_devices=n_dev, num_classes=10)
    eval_step = eval_step_for(0)
    config_dict = config.to_dict()
    step_flops = None
    if parallel_mode == "jit":
        example = jax.eval_shape(make_batch, jax.random.key(0), *train_arrays, jnp.arange(config.batch_size), 0)
        # XLA counts no FLOPs inside FFI calls: an "onednn" model's step is counted with XLA's convs (same math).
        counted = (state.replace(apply_fn=build_model(config, conv_impl="xla").apply)
                   if config.conv_impl == "onednn" else state)
        step_flops = (train_step.compiled.lower(counted, example).cost_analysis() or {}).get("flops")
        if dump_hlo and main_process:
            eval_example = next(data_lib.eval_batches(val_norm if config.val_size else test_norm,
                                                      config.eval_batch_size))
            profiling.dump_hlo(dump_hlo, {"train_step": (train_step.compiled, (state, example)),
                                          "eval_step": (eval_step.compiled, (state, eval_example))})
    checkpointer = checkpoint.Checkpointer(ckpt_dir, keep=config.keep_checkpoints)
    writer = MetricWriter(workdir, enabled=main_process)
    try:
        result = loop.fit(
            state, train_images=train_arrays[0], train_labels=train_arrays[1],
            make_batch=parallel.jit_batch_fn(make_batch, mesh=mesh), train_step=train_step,
            batch_size=config.batch_size, total_steps=total_steps, key=data_key, eval_step=eval_step,
            val_batches=(lambda: data_lib.eval_batches(val_norm, config.eval_batch_size)) if config.val_size else None,
            checkpointer=checkpointer, writer=writer, meta={"config": config_dict, "seed": seed}, resume=resume,
            patience=config.patience or None, min_delta=config.min_delta, log_every=config.log_every,
            should_stop=should_stop, show_progress=show_progress and main_process,
            profile_dir=profile if main_process else None)
        if result.interrupted:
            return {"interrupted": True, "step": int(result.state.step)}
        final = result.state
        if config.val_size:
            final, _ = checkpointer.restore(result.state, "best")
        test = loop.evaluate(eval_step, final, data_lib.eval_batches(test_norm, config.eval_batch_size))
        test_tta = loop.evaluate(eval_step_for(config.tta_level), final,
                                 data_lib.eval_batches(test_norm, config.eval_batch_size))
    finally:
        checkpointer.close()
        writer.close()
    exported = {}
    if main_process:
        plot_curves(workdir / "metrics.jsonl", workdir / "curves.png")
    if export and main_process:
        exported = export_model(final, config, workdir, export)
    steady = result.steady_step_seconds
    peak = peak_flops or profiling.DEFAULT_PEAK_FLOPS.get(jax.default_backend())
    summary = {
        "test_accuracy": test["accuracy"], "test_accuracy_tta": test_tta["accuracy"], "tta_level": config.tta_level,
        "best_val_accuracy": result.best_val_accuracy, "epochs_completed": result.epochs_completed,
        "steps": int(final.step), "stopped_early": result.stopped_early,
        "wall_seconds": time.perf_counter() - t0, "train_seconds": result.train_seconds,
        "compile_seconds": (result.first_step_seconds - steady) if steady and result.first_step_seconds else None,
        "steady_step_seconds": steady,
        "images_per_second": config.batch_size / steady if steady else None,
        "step_flops": step_flops, "peak_flops": peak,
        "mfu": profiling.mfu(step_flops, steady, peak) if step_flops and steady else None,
        "parallel": parallel_mode, "devices": n_dev, "processes": jax.process_count(),
        "platform": jax.devices()[0].platform, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "exported": exported, "config": config_dict, "seed": seed, "versions": _versions(),
    }
    if main_process:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def export_model(state, config, workdir, formats) -> dict[str, str]:
    """Write the inference function of `state` (a model of `config`) in each of `formats` ("jax", "onnx") to
    `workdir`; returns {format: path}. ONNX has no platform switch, so conv impl "auto" goes out there as
    XLA's conv (the same function and parameters); so does "onednn" in both formats, its FFI calls existing
    only in a process that loaded jaxnet's handlers."""
    from jaxnet import export as export_lib

    def inference(impl):
        return export_lib.inference_fn(state.replace(apply_fn=build_model(config, conv_impl=impl).apply),
                                       mean=config.mean, std=config.std)

    exported = {}
    for fmt in formats:
        match fmt:
            case "jax":
                fn = inference("xla" if config.conv_impl == "onednn" else config.conv_impl)
                exported["jax"] = str(export_lib.export_jax(fn, Path(workdir) / "model.jaxexport"))
            case "onnx":
                exported["onnx"] = str(export_lib.export_onnx(inference("xla"), Path(workdir) / "model.onnx"))
            case other:
                raise UsageError(f"--export takes jax and/or onnx, got {other!r}")
    return exported


# ---- command line ----

def _train_parser() -> argparse.ArgumentParser:
    from jaxnet.data import default_cache_dir

    p = argparse.ArgumentParser(
        prog="python -m experiments.cifar10",
        description="Train and evaluate on CIFAR-10. Subcommand: `predict --workdir W IMAGE...` classifies "
                    "images with a run's exported model.",
        epilog="Overrides: any config field as key=value, e.g. epochs=2 batch_size=256 dtype=bfloat16.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config field overrides")
    p.add_argument("--config", default="default", choices=configs.NAMES, help="recipe (default: %(default)s)")
    p.add_argument("--workdir", help="where checkpoints, logs, plots and the summary go (default: runs/CONFIG)")
    p.add_argument("--data-dir", help="local CIFAR-10 (directory or .tar.gz; default: $JAXNET_CIFAR10, then tfds)")
    p.add_argument("--seed", type=int, default=0, help="the one seed all randomness derives from")
    p.add_argument("--resume", action="store_true", help="continue from the workdir's latest checkpoint")
    p.add_argument("--export", default="", metavar="FORMATS",
                   help="comma-separated: jax (jax.export StableHLO), onnx (needs the onnx extra)")
    p.add_argument("--parallel", default="jit", choices=("jit", "pmap"),
                   help="data parallelism: jit over a device mesh (default) or pmap (compatibility path)")
    p.add_argument("--num-devices", type=int, help="devices to train on (default: all)")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process run: the coordinator (process 0)")
    p.add_argument("--num-processes", type=int, help="multi-process run: number of processes")
    p.add_argument("--process-id", type=int, help="multi-process run: this process's index")
    p.add_argument("--dump-hlo", metavar="DIR", help="write StableHLO and HLO (before/after optimisation) of the "
                   "train and eval steps to DIR, with DIR/index.json")
    p.add_argument("--profile", metavar="DIR", help="profiler trace of 5 steps after warm-up into DIR (open with "
                   "xprof, extra 'profile', or summarize: python -m jaxnet.profiling summarize DIR)")
    p.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s for the MFU in the summary "
                   "(default: 0.166 on CPU, 989 on GPU, 197 on TPU)")
    p.add_argument("--compilation-cache", default=str(default_cache_dir() / "xla"), metavar="DIR",
                   help="persistent XLA compilation cache, so a second run starts without compiling "
                   "(default: %(default)s; '' turns it off)")
    return p


def _predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.cifar10 predict",
                                description="Top-3 classes of each image, from WORKDIR/model.jaxexport.")
    p.add_argument("--workdir", required=True, help="a run's workdir, trained with --export jax")
    p.add_argument("images", nargs="+", help="image files (any size; resized to 32×32)")
    return p


def predict(workdir: str, paths: list[str]) -> int:
    """Print the top-3 classes of each image; a bad file is one line on stderr. 1 if any failed, else 0."""
    import numpy as np
    from PIL import Image

    from jaxnet import data as data_lib, export as export_lib

    model_path = Path(workdir) / "model.jaxexport"
    if not model_path.exists():
        raise UsageError(f"{model_path} does not exist: train with --export jax first")
    fn = export_lib.load_jax(model_path)
    images, names, failed = [], [], 0
    for path in paths:
        try:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR), np.uint8))
                names.append(path)
        except Exception as e:  # unreadable, missing or not an image: report and go on
            print(f"{path}: cannot read image ({type(e).__name__})", file=sys.stderr)
            failed += 1
    if images:
        probs = np.asarray(fn(np.stack(images)))
        for name, p in zip(names, probs):
            top = np.argsort(-p)[:3]
            print(f"{name}: " + ", ".join(f"{data_lib.CLASSES[i]} {p[i]:.3f}" for i in top))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["predict"]:
            args = _predict_parser().parse_args(argv[1:])
            return predict(args.workdir, args.images)
        args = _train_parser().parse_args(argv)
        config = apply_overrides(configs.get_config(args.config), args.overrides)
        from jaxnet import compiler, parallel

        compiler.set_cpu_conv(config.xla_cpu_conv)  # before anything starts JAX's backends

        if args.coordinator or args.num_processes or args.process_id is not None:
            parallel.init_distributed(args.coordinator, args.num_processes, args.process_id)
            parallel.assert_same_across_processes({"config": config.to_dict(), "seed": args.seed})
        if args.compilation_cache:
            compiler.enable_compilation_cache(args.compilation_cache)
        export = tuple(f for f in args.export.split(",") if f)
        if set(export) - {"jax", "onnx"}:
            raise UsageError(f"--export takes jax and/or onnx, got {args.export!r}")
        stop = {"signal": None}

        def on_signal(signum, _frame):
            stop["signal"] = signum

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        workdir = args.workdir or f"runs/{args.config}"
        summary = train_and_evaluate(config, workdir, data_dir=args.data_dir, seed=args.seed, resume=args.resume,
                                     export=export, should_stop=lambda: stop["signal"] is not None,
                                     parallel_mode=args.parallel, num_devices=args.num_devices,
                                     dump_hlo=args.dump_hlo, profile=args.profile,
                                     peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # DataError, CheckpointError, bad config values from the library
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # TrainingDiverged, a missing optional extra
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    if summary.get("interrupted"):
        print(f"interrupted at step {summary['step']}; checkpoint saved in {workdir}/checkpoints; "
              f"continue with --resume", file=sys.stderr)
        return 128 + stop["signal"]
    print(f"test accuracy {summary['test_accuracy']:.4f} (TTA level {summary['tta_level']}: "
          f"{summary['test_accuracy_tta']:.4f}); {summary['wall_seconds']:.0f} s; summary in {workdir}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
