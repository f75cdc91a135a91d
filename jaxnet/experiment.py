"""The CIFAR-10 experiment as a library: a recipe config (`jaxnet.configs`) → model, optimizer, data,
the training loop, evaluation with test-time augmentation, summary and exports.

This is the one module that reads a config (flax `examples/imagenet`'s `train.py`); everything it calls takes
explicit arguments. `jaxnet-cifar10` (`jaxnet/cifar10.py`) is its command line. Errors a user can cause are jaxnet's
own types (`jaxnet.errors`): bad config values are ConfigError, raised before any work is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import numbers
import os
import platform
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnet import checkpoint, data as data_lib, export as export_lib, layers, loop, models, optim, parallel, profiling
from jaxnet import train
from jaxnet.cache import check_directory, hold_directory
from jaxnet.configs.default import LOW_RES_FRACTION, PROXY_EVERY
from jaxnet.errors import KINDS, CheckpointError, ConfigError, finite, is_kind
from jaxnet.metrics import MetricWriter, plot_curves
from jaxnet.ops import IMPLS, onednn

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OPTIMIZERS = ("airbench", "muon", "sgd", "adam")
SCHEDULES = ("piecewise", "cosine", "constant")
FLIPS = ("alternate", "random", "none")
NUM_CLASSES = 10
# Config fields a resumed run may change: they do not touch the training math. Every other field, the seed and
# the data (a fingerprint of the splits) must be those of the checkpoint.
RESUME_MAY_CHANGE = ("log_every", "keep_checkpoints", "checkpoint_minutes", "eval_batch_size", "host_memory")
# Config fields only FastNet models take: (the value that leaves the model's own, what the field sets).
FASTNET_FIELDS = {"widths": ((), "FastNet's blocks"), "activation": ("gelu", "FastNet's"),
                  "depth": (2, "FastNet's blocks")}
# Of the time a `time_budget` leaves for the training steps, the share kept in reserve for what the estimate leaves
# out (checkpoint saves, metric fetches, the plots, steps slower than the timed ones): with 5 %, `quick` given 4 min
# on a Zen 4 ended at 4 min 6 s; with 10 %, at 3 min 50 s (benchmarks/RESULTS.md, "ablation of budget3").
BUDGET_MARGIN = 0.1
# The reserve of the time left when a budgeted run is planned again from its own pace (`replan_window`).
REPLAN_MARGIN = 0.05
log = logging.getLogger(__name__)


def _rules() -> dict[str, tuple[Callable[[Any], bool], str]]:
    """Config field → (check, what it must be), for the fields whose type alone does not say enough."""
    positive, non_negative, below_one, up_to_one = (KINDS[k] for k in ("positive", "non-negative", "in [0, 1)",
                                                                       "in (0, 1]"))
    channels = (lambda v: v == () or (len(v) == 3 and all(is_kind("positive integer", x) for x in v)))
    triple = (lambda v: len(v) == 3 and all(isinstance(x, (int, float)) for x in v), "3 numbers (R, G, B)")
    return {
        "model": (lambda v: v in models.NAMES, f"one of {', '.join(models.NAMES)}"),
        "widths": (channels, "() or 3 positive integers (channels of FastNet's three blocks)"),
        "depth": (lambda v: v in (2, 3), "2 or 3 (convs in each of FastNet's blocks)"),
        "dtype": (lambda v: v == "auto" or v in DTYPES, f"one of auto, {', '.join(DTYPES)}"),
        "conv_impl": (lambda v: v in IMPLS, f"one of {', '.join(IMPLS)}"),
        "optimizer": (lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
        "schedule": (lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
        "flip": (lambda v: v in FLIPS, f"one of {', '.join(FLIPS)}"),
        "batch_size": positive, "eval_batch_size": positive, "epochs": positive, "lr": positive,
        "momentum": below_one, "weight_decay": non_negative, "bias_lr_mult": positive, "bias_lr": positive,
        "head_lr": positive, "filter_momentum": below_one, "renorm_every": positive, "ns_steps": positive,
        "whiten_bias_epochs": non_negative, "lookahead_every": non_negative, "warmup_fraction": below_one,
        "label_smoothing": below_one, "mean": triple,
        "std": (lambda v: triple[0](v) and all(x > 0 for x in v), "3 positive numbers (R, G, B)"),
        "translate": (lambda v: 0 <= v < 32, "0 to 31 (pixels; CIFAR-10's images are 32)"),
        "cutout": (lambda v: 0 <= v <= 32, "0 (off) to 32 (pixels; CIFAR-10's images are 32)"),
        "tta_level": (lambda v: v in (0, 1, 2), "0, 1 or 2"),
        "jitter": below_one,
        "low_res": (lambda v: v == 0 or 16 <= v < 32, "0 (off) or 16 to 31 (pixels; CIFAR-10's images are 32)"),
        "low_res_fraction": (lambda v: 0 < v < 1, "in (0, 1)"), "tta_fraction": up_to_one, "hard_fraction": up_to_one,
        "hard_score_size": (lambda v: v == 0 or 8 <= v <= 32, "0 (the images as trained) or 8 to 32 (pixels)"),
        "proxy_widths": (channels, "() (off) or 3 positive integers (channels of the proxy FastNet's three blocks)"),
        "proxy_every": KINDS["positive integer"],
        "activation": (lambda v: v in models.ACTIVATIONS, f"one of {', '.join(models.ACTIVATIONS)}"),
        "val_size": non_negative, "train_subset": non_negative, "test_subset": non_negative,
        "patience": non_negative, "min_delta": non_negative, "keep_checkpoints": positive, "log_every": positive,
        "time_budget": non_negative, "checkpoint_minutes": non_negative,
    }


def validate_config(config) -> None:
    """Raise ConfigError (one line) for the first field of `config` whose value cannot work."""
    for key, value in config.items():
        if not finite(value):
            wanted = "finite numbers" if isinstance(value, tuple) else KINDS["finite"][1]
            raise ConfigError(f"{key} must be {wanted}, got {value!r}")
    for key, (check, wanted) in _rules().items():
        if key in config and not check(config[key]):
            raise ConfigError(f"{key} must be {wanted}, got {config[key]!r}")
    if not config.get("low_res", 0) and config.get("low_res_fraction") not in (None, LOW_RES_FRACTION):
        raise ConfigError(f"low_res_fraction={config.low_res_fraction!r} changes nothing while low_res is 0 (off): "
                          "set low_res too (16 to 31 pixels)")
    if config.get("hard_score_size") and config.get("hard_fraction", 1.0) == 1:
        raise ConfigError(f"hard_score_size={config.hard_score_size!r} changes nothing while hard_fraction is 1 (every "
                          "image trains): set hard_fraction below 1 too")
    if config.get("proxy_widths") and config.get("hard_fraction", 1.0) == 1:
        raise ConfigError(f"proxy_widths={tuple(config.proxy_widths)!r} changes nothing while hard_fraction is 1 "
                          "(every image trains): set hard_fraction below 1 too")
    if config.get("proxy_every", PROXY_EVERY) != PROXY_EVERY and not config.get("proxy_widths"):
        raise ConfigError(f"proxy_every={config.proxy_every!r} changes nothing without a proxy: set proxy_widths too")
    if not config.model.startswith("fastnet"):
        if config.get("proxy_widths"):
            raise ConfigError(f"proxy_widths sets a FastNet proxy; model {config.model} is not a FastNet")
        for key, (default, what) in FASTNET_FIELDS.items():
            if config.get(key, default) != default:
                raise ConfigError(f"{key} sets {what}; model {config.model} has its own")


def compute_dtype(name: str, platform: str | None = None) -> Any:
    """The compute dtype of config value `name` on `platform` (default: JAX's backend): "auto" is bfloat16 on
    GPUs and TPUs (their matrix units' fast type; parameters stay float32) and float32 on CPUs, where only conv
    impl "onednn" on a CPU with AMX or AVX-512 BF16 is faster in bfloat16 — a run asks for it with
    `dtype=bfloat16` (benchmarks/RESULTS.md)."""
    if name == "auto":
        return jnp.bfloat16 if (platform or jax.default_backend()) in ("gpu", "cuda", "rocm", "tpu") else jnp.float32
    return DTYPES[name]


def build_model(config, *, bn_axis_name: str | None = None, conv_impl: str | None = None,
                proxy: bool = False) -> nn.Module:
    """The model of `config`, or with `proxy` its proxy net (the same FastNet at `proxy_widths`, two convs a
    block); `bn_axis_name` makes BatchNorm average its statistics over a pmap axis; `conv_impl` replaces the
    config's (the parameters are the same for every impl)."""
    conv = partial(layers.Conv, impl=conv_impl or config.conv_impl)
    fastnet = {}
    for key, (default, _) in FASTNET_FIELDS.items():
        value = config.get(key, default)
        value = tuple(value) if isinstance(value, list) else value  # a config read back from JSON holds lists
        if value != default:
            fastnet[key] = value
    if proxy:
        fastnet |= {"widths": tuple(config.proxy_widths), "depth": 2}
    if "activation" in fastnet:
        fastnet["activation"] = models.ACTIVATIONS[fastnet["activation"]]
    return models.get(config.model, num_classes=NUM_CLASSES, conv=conv,
                      norm=partial(layers.BatchNorm, axis_name=bn_axis_name), dtype=compute_dtype(config.dtype),
                      **fastnet)


def build_schedule(config, total_steps: int) -> optim.Schedule:
    """Learning-rate multiplier per step (peak 1): piecewise-linear points, cosine with warmup, or constant."""
    match config.schedule:
        case "piecewise":
            fractions, values = zip(*config.schedule_points)
            return optim.piecewise_linear([f * total_steps for f in fractions], values)
        case "cosine":
            return optim.warmup_cosine(1.0, total_steps, int(config.warmup_fraction * total_steps))
        case _:
            return optim.constant(1.0)


def build_optimizer(config, total_steps: int, steps_per_epoch: float) -> optax.GradientTransformation:
    """`config.optimizer` with its schedule: "airbench" (airbench94's groups, lr and decay per 1024 examples),
    "muon" (airbench94_muon's: Muon on conv filters at `lr`, SGD for biases and head; decay per example),
    "sgd" (Nesterov, decoupled decay) or "adam" (AdamW)."""
    multiplier = build_schedule(config, total_steps)
    match config.optimizer:
        case "airbench":
            return optim.airbench_sgd(config.lr, multiplier, batch_size=config.batch_size, momentum=config.momentum,
                                      weight_decay=config.weight_decay, norm_lr_mult=config.bias_lr_mult,
                                      whiten_bias_steps=config.whiten_bias_epochs * steps_per_epoch)
        case "muon":
            return optim.airbench_muon(multiplier, batch_size=config.batch_size, filter_lr=config.lr,
                                       filter_momentum=config.filter_momentum, renorm_every=config.renorm_every,
                                       ns_steps=config.ns_steps, bias_lr=config.bias_lr, head_lr=config.head_lr,
                                       momentum=config.momentum, weight_decay=config.weight_decay,
                                       whiten_bias_steps=config.whiten_bias_epochs * steps_per_epoch)
        case "sgd":
            return optim.sgd(lambda step: config.lr * multiplier(step), momentum=config.momentum,
                             weight_decay=config.weight_decay)
        case _:
            return optim.adamw(lambda step: config.lr * multiplier(step), weight_decay=config.weight_decay)


def build_train_step(config, total_steps: int) -> Callable:
    """The uncompiled step of `config`: `train_step` with its label smoothing — on the `hard_fraction` of each
    batch that the model, or its proxy net (`proxy_widths`, trained every `proxy_every` steps), finds hardest
    when below 1 (`train.select_hardest`) — followed by airbench's lookahead EMA (decay 0.95⁵·(step/total)³,
    every `lookahead_every` steps, the net set to the EMA after the last step) unless `lookahead_every` is 0."""
    step = partial(train.train_step, label_smoothing=config.label_smoothing)
    if config.hard_fraction < 1:
        step = train.select_hardest(step, fraction=config.hard_fraction, score_size=config.hard_score_size or None,
                                    proxy_step=step if config.proxy_widths else None,
                                    proxy_every=config.proxy_every)
    if not config.lookahead_every:
        return step
    return train.lookahead_ema(step, every=config.lookahead_every, final_step=total_steps,
                               decay_fn=lambda s: 0.95 ** 5 * (s / total_steps) ** 3)


def load_splits(config, data_dir, seed: int) -> tuple[data_lib.Split, data_lib.Split, data_lib.Split]:
    """(train, validation, test) host splits of CIFAR-10 as `config` draws them (subsets, held-out images)."""
    cifar = data_lib.load_cifar10(data_dir)
    train_set, test_set = cifar["train"], cifar["test"]
    if config.train_subset:
        train_set = data_lib.subset(train_set, config.train_subset, seed)
    if config.test_subset:
        test_set = data_lib.subset(test_set, config.test_subset, seed)
    train_set, val_set = data_lib.split_validation(train_set, config.val_size, seed)
    return train_set, val_set, test_set


def initial_state(config, model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                  train_images: np.ndarray, *,
                  proxy: tuple[nn.Module, optax.GradientTransformation] | None = None) -> train.TrainState:
    """The state before step 0; with `whiten_stem`, the model's stem set from 5 000 training images. `proxy`:
    the proxy net and its optimizer, whose state (no EMA; its stem whitened alike; initialised from
    `fold_in(key, 1)`) the state holds in `proxy`."""
    sample = data_lib.normalize(train_images[:5000], config.mean, config.std) if config.whiten_stem else None

    def create(model, tx, key, ema):
        state = train.create_train_state(model, key, jnp.zeros((1, 32, 32, 3)), tx, ema=ema)
        if sample is not None and "stem" in state.params:
            state = state.with_params(models.with_whitening_stem(state.params, sample))
        return state

    state = create(model, tx, key, bool(config.lookahead_every))
    return state if proxy is None else state.replace(proxy=create(*proxy, jax.random.fold_in(key, 1), False))


def _devices(parallel_mode: str, num_devices: int | None, config) -> tuple[Any, int]:
    """(mesh or None, device count) of the run; ConfigError if a batch does not divide over the devices."""
    match parallel_mode:
        case "jit":
            mesh = parallel.make_mesh(num_devices)
            n_dev = mesh.size
        case "pmap":
            mesh, n_dev = None, len(parallel.first_devices(jax.local_devices(), num_devices))
        case other:
            raise ConfigError(f"parallel mode must be jit or pmap, got {other!r}")
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % n_dev:
            raise ConfigError(f"{name} {config[name]} does not divide over {n_dev} devices")
    return mesh, n_dev


def _compiled_steps(step_fn: Callable, mesh, n_dev: int,
                    tta_fraction: float = 1.0) -> tuple[Callable, Callable[[int], Callable]]:
    """(compiled train step, tta level → compiled eval step), on the mesh or (mesh None) under pmap; the
    eval steps with TTA give its views to the `tta_fraction` least confident images of each batch."""
    def eval_fn(tta):
        return partial(train.eval_step, tta=tta, tta_fraction=tta_fraction if tta else 1.0)

    if mesh is not None:
        return (parallel.jit_train_step(step_fn, mesh=mesh, num_classes=NUM_CLASSES),
                lambda tta: parallel.jit_eval_step(eval_fn(tta), mesh=mesh, num_classes=NUM_CLASSES))
    return (parallel.pmap_train_step(step_fn, num_devices=n_dev, num_classes=NUM_CLASSES),
            lambda tta: parallel.pmap_eval_step(eval_fn(tta), num_devices=n_dev, num_classes=NUM_CLASSES))


def step_flops(config, train_step: Callable, state: train.TrainState, example: Any) -> float | None:
    """XLA's FLOP count of one compiled train step, counted with XLA's convs (the same math): XLA counts nothing
    inside custom calls — oneDNN's FFI calls (impl "onednn", and "auto" on CPUs), Pallas kernels. A model whose
    convs are XLA's already is counted as it runs: the step's own trace, which its first call reuses."""
    if config.conv_impl in ("xla", "im2col") or (config.conv_impl == "auto" and jax.default_backend() != "cpu"):
        return (train_step.compiled.lower(state, example).cost_analysis() or {}).get("flops")
    counted = state.replace(apply_fn=build_model(config, conv_impl="xla").apply)
    if getattr(state, "proxy", None) is not None:
        counted = counted.replace(proxy=state.proxy.replace(apply_fn=build_model(config, conv_impl="xla",
                                                                                 proxy=True).apply))
    return (train_step.compiled.lower(counted, example).cost_analysis() or {}).get("flops")


def low_res_steps(config, total_steps: int) -> int:
    """Steps, from the first, that train on images resized to `low_res` × `low_res` (progressive resizing:
    fewer pixels early, the last steps at full size); 0 when `low_res` is 0."""
    return round(config.low_res_fraction * total_steps) if config.low_res else 0


def image_sizes(config, total_steps: int) -> Callable[[int], int | None] | None:
    """A run's image side per step (`loop.TrainData.image_size`): `low_res` for its `low_res_steps`, then None
    (full size); None without progressive resizing."""
    if not config.low_res:
        return None
    n_low = low_res_steps(config, total_steps)
    return lambda step: config.low_res if step < n_low else None


def _dump_steps(directory: str, train_step: Callable, eval_step: Callable, state, train_example, eval_example) -> None:
    profiling.dump_hlo(directory, {"train_step": (train_step.compiled, (state, train_example)),
                                   "eval_step": (eval_step.compiled, (state, eval_example))})


def _saved_steps(ckpt_dir: Path) -> list[str]:
    """The complete checkpoints under `ckpt_dir` (orbax renames a checkpoint to its step only once written)."""
    return [p.name for which in ("last", "best") if (ckpt_dir / which).is_dir()
            for p in (ckpt_dir / which).iterdir() if p.name.isdigit()]


def _check_workdir(workdir: Path, resume: bool) -> bool:
    """Whether the run resumes: `resume`, unless the checkpoint folders exist with nothing complete in them
    (a run killed before its first save), which starts afresh. Raises ConfigError or CheckpointError for a
    workdir that cannot be used; decided by process 0 (whose workdir holds the checkpoints) for all."""
    check_directory(workdir, "workdir")
    ckpt_dir = workdir / "checkpoints"
    if not resume and _saved_steps(ckpt_dir):
        raise CheckpointError(f"{workdir} already holds checkpoints: pass --resume to continue, or another --workdir")
    if resume and not ckpt_dir.exists():
        raise CheckpointError(f"--resume: no checkpoints in {ckpt_dir}")
    return resume and bool(_saved_steps(ckpt_dir))


def _check_outputs(workdir: Path, resume: bool, **traces: str | None) -> bool:
    """`_check_workdir`'s answer, after checking that each of `traces` (a directory of --dump-hlo, --profile)
    can be written: on process 0, which writes them, before any data is read."""
    for flag, directory in traces.items():
        if directory:
            check_directory(directory, f"--{flag.replace('_', '-')}")
    return _check_workdir(workdir, resume)


def check_disk_space(workdir: Path, state: train.TrainState, keep: int) -> None:
    """ConfigError before training if the workdir's filesystem cannot hold the checkpoints (`keep` last ones, the
    best, one being written) plus 50 MB of logs and exports."""
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    need = (keep + 2) * nbytes + 50 * 2 ** 20
    existing = next(p for p in (workdir.resolve(), *workdir.resolve().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise ConfigError(f"{existing} has {free / 2 ** 20:.0f} MB free; this run's checkpoints and logs need "
                          f"about {need / 2 ** 20:.0f} MB")


def data_fingerprint(*splits: data_lib.Split) -> str:
    """A short hash of the splits' images and labels, saved with each checkpoint and compared on resume."""
    h = hashlib.sha256()
    for split in splits:
        for key in ("image", "label"):
            h.update(np.ascontiguousarray(split[key]).data)
    return h.hexdigest()[:16]


def _check_options(config, seed: int, export: tuple[str, ...], export_platforms: tuple[str, ...], parallel_mode: str,
                   traced: bool) -> None:
    """ConfigError for a config value or option that cannot work, before any data is read."""
    validate_config(config)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 63:
        raise ConfigError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if unknown := [f for f in export if f not in export_lib.FORMATS]:
        raise ConfigError(f"--export takes {' and/or '.join(export_lib.FORMATS)}, got {', '.join(unknown)}")
    export_lib.check_platforms(export_platforms)
    if "onnx" in export:
        export_lib.onnx_converter()
    if parallel_mode == "pmap" and traced:
        raise ConfigError("--dump-hlo and --profile work with --parallel jit only")
    if config.conv_impl == "onednn" and jax.default_backend() == "cpu":  # installed, built, kernels in this dtype
        onednn.check_dtype(compute_dtype(config.dtype))
    if config.conv_impl == "auto" and jax.default_backend() == "cpu":  # where oneDNN is installed: built
        onednn.available(compute_dtype(config.dtype))


def _steps(config, num_train: int) -> tuple[int, int]:
    """(steps per epoch, total steps) of `config` on `num_train` images; ConfigError if either is 0."""
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"batch_size {config.batch_size} exceeds the {num_train} training images")
    total_steps = round(config.epochs * steps_per_epoch)
    if total_steps < 1:
        raise ConfigError(f"epochs {config.epochs} of {steps_per_epoch} steps make no step")
    return steps_per_epoch, total_steps


def time_run_parts(train_step: Callable, eval_steps: dict[int, Callable], state, train_batches: dict,
                   eval_batch, *, train_repeats: int = 3, eval_repeats: int = 1) -> dict[str, Any]:
    """This machine's seconds for the pieces of a run: {"step": {size: a train step on that size's batch},
    "eval": {tta level: an eval step on `eval_batch`}, "compile": all of these steps' compilations}. Each step
    is compiled (into the run's own cache), then timed `train_repeats` or `eval_repeats` times (the median); the
    train steps run on a copy of `state`, as the compiled step donates its input, so the run's own state is
    untouched. The first calls after a compilation run slow (a 2-core Zen 4, `quick`: 3.1 and 3.5 s, then
    2.5-2.9 s), so a train step, the unit of the budget, is timed three times."""
    def timed(fn: Callable, repeats: int) -> tuple[float, float]:
        """(compile, run) seconds: fn's first call (compilation and a run) less the median of `repeats` more."""
        times = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t)
        run = float(np.median(times[1:]))
        return times[0] - run, run

    def train(batch):
        nonlocal state
        state, metrics = train_step(state, batch)
        return metrics

    state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
    parts = {"step": {size: timed(partial(train, batch), train_repeats) for size, batch in train_batches.items()},
             "eval": {level: timed(partial(step, state, eval_batch), eval_repeats)
                      for level, step in eval_steps.items()}}
    return {"compile": sum(c for times in parts.values() for c, _ in times.values()),
            **{part: {key: run for key, (_, run) in times.items()} for part, times in parts.items()}}


@dataclasses.dataclass(frozen=True)
class RunTimes:
    """This machine's seconds for the parts of a budgeted run (`time_run_parts` on its own steps): a train step
    per image size (None: full size), the validation's share of a step, the test's evaluation, and compiling the
    train and eval steps (what a run of another length compiles again)."""

    step: dict[int | None, float]
    validation: float
    test: float
    compile: float


def plan_seconds(config, times: RunTimes, total_steps: int, start: int, end: int) -> float:
    """Seconds that steps `start` to `end` - 1 of a `total_steps`-step run of `config` take at `times`: those
    before `low_res_steps` at `low_res` × `low_res`, the rest at full size, each with its share of validation."""
    low = min(max(low_res_steps(config, total_steps) - start, 0), end - start)
    return (low * times.step.get(config.low_res, 0.0) + (end - start - low) * times.step[None]
            + (end - start) * times.validation)


def budget_steps(room: float, *, cost: Callable[[int], float], planned: int, most: int, recompile: float,
                 least: int = 1) -> int:
    """A run's length in steps when `room` seconds are left for its steps, `cost(n)` the seconds a run of n
    steps still needs: `planned` if it fits, or more, up to `most`, if they fit beside the `recompile` seconds
    a run of another length costs (its schedule is compiled into its step); if `planned` does not fit, the
    most steps from `least` on that fit beside `recompile`, `least` - 1 if none do. `cost` must grow with n."""
    def most_that_fit(lo: int, hi: int) -> int:  # the largest n in [lo, hi] that fits, lo - 1 if none: bisection
        while lo <= hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if cost(mid) + recompile <= room else (lo, mid - 1)
        return hi

    if cost(planned) <= room:
        return max(planned, most_that_fit(planned + 1, most))
    return most_that_fit(least, planned - 1)


def _with_epochs(config, epochs: float):
    config = config.copy_and_resolve_references()
    config.epochs = epochs
    return config


def _run_times(config, state, train_step, eval_step_for, example: Callable, test_norm: data_lib.Split, *,
               num_train: int, num_val: int, n_dev: int) -> RunTimes:
    """`config`'s run timed on this machine (`time_run_parts`; the train steps on `example(size)`, a batch made
    as the loop makes it; the eval steps on a batch of `test_norm`, the test split, beside which `num_val`
    validation images are evaluated after each epoch)."""
    log.info("time_budget %g min: timing this machine's train and eval steps first (a few of each; minutes where "
             "a step takes many seconds)", config.time_budget)
    steps_per_epoch = num_train // config.batch_size
    n_test, n_val = (-(-n // data_lib.eval_batch_size(n, config.eval_batch_size, n_dev)) if n else 0
                     for n in (len(test_norm["label"]), num_val))
    eval_batch = next(data_lib.eval_batches(test_norm, config.eval_batch_size, n_dev))
    sizes = [None, config.low_res] if config.low_res else [None]
    levels = sorted({config.tta_level} | ({0} if n_val else set()))  # the test's TTA step, the validation's plain
    parts = time_run_parts(train_step, {level: eval_step_for(level) for level in levels}, state,
                           {size: example(size) for size in sizes}, eval_batch)
    # After every epoch the validation split: its share counts as the step's. The test: one pass, its TTA step's
    # (the plain view included).
    return RunTimes(step=parts["step"], validation=n_val * parts["eval"][0] / steps_per_epoch if n_val else 0.0,
                    test=n_test * parts["eval"][config.tta_level], compile=parts["compile"])


def _steps_in_budget(config, t0: float, total_steps: int, times: RunTimes) -> int:
    """The training steps of `config`'s run that fit in its `time_budget` (minutes of wall time since `t0`) at
    `times`; process 0's answer for all. ConfigError if none fit."""
    def decide() -> int:
        budget, spent = 60 * config.time_budget, time.perf_counter() - t0
        steps = budget_steps((budget - spent - times.test) * (1 - BUDGET_MARGIN),
                             cost=lambda n: plan_seconds(config, times, n, 0, n), planned=total_steps,
                             most=total_steps, recompile=times.compile)
        if steps < 1:
            step = plan_seconds(config, times, total_steps, 0, total_steps) / total_steps
            raise ConfigError(f"time_budget {config.time_budget:g} min leaves no time to train: data, compilation "
                              f"and evaluation take {(spent + times.test + times.compile) / 60:.1f} min here, "
                              f"a step {step:.2f} s")
        if steps < total_steps:
            log.info("time_budget %g min: %d of %d steps fit (a step %.2f s; %.0f s spent, %.0f s of evaluation "
                     "to come)", config.time_budget, steps, total_steps,
                     plan_seconds(config, times, steps, 0, steps) / steps, spent, times.test)
        return steps

    return parallel.broadcast_from_main(decide)


def replanned_steps(config, times: RunTimes, *, left: float, step: int, pace: float, total_steps: int,
                    most: int, since: int = 1) -> tuple[int, float]:
    """(new length, scale) of `config`'s budgeted run of `total_steps` steps, planned again at `step` with `left`
    seconds of its budget to go, from its own `pace` (seconds a step over steps `since` to `step` - 1, evaluation
    and saves included): the estimate `times` scaled by how those steps compare with it (the scale), the test
    kept out of what is left and `REPLAN_MARGIN` of the rest in reserve; at most `most` steps (the config's own),
    at least one more (its schedule's end); past its low-resolution steps, at most as many as keep them past (a
    longer run resizes for longer)."""
    scale = pace * (step - since) / plan_seconds(config, times, total_steps, since, step)
    if low_res_steps(config, total_steps) <= step:
        most = next(n for n in range(most, step, -1) if low_res_steps(config, n) <= step)
    steps = budget_steps((left - times.test) * (1 - REPLAN_MARGIN),
                         cost=lambda n: scale * plan_seconds(config, times, n, step, n), planned=total_steps,
                         most=most, recompile=times.compile, least=step + 1)
    return max(step + 1, steps), scale


def replan_window(config, total_steps: int, ends: list[tuple[int, float]], replans: int) -> tuple[int, float] | None:
    """Whether a budgeted run of `config` and `total_steps` plans again at the last of its epochs' `ends` — (steps
    done, seconds since its first step ended) at each — having planned again `replans` times: None, or (since,
    pace) for `replanned_steps`. The first epoch's end does, from the pace of the steps after the first (which
    compiled). With progressive resizing, so does the first end after a whole epoch of full-size steps, from that
    epoch's pace alone: the first plan's full-size steps were costed at an estimate that pace never measured (a
    timed step that faulted its pages in again makes it 10-20 % high), and that epoch ran no compilation (the
    first full-size step, after the switch, compiles when a plan changed the run's length)."""
    if replans == 0:
        step, seconds = ends[-1]
        return 1, seconds / (step - 1)
    if (replans == 1 and config.low_res and len(ends) >= 3
            and ends[-2][0] > low_res_steps(config, total_steps)):
        (since, start), (step, end) = ends[-2:]
        return since, (end - start) / (step - since)
    return None


@parallel.peer_failures()
def train_and_evaluate(config, workdir, *, data_dir=None, seed: int = 0, resume: bool = False,
                       export: tuple[str, ...] = (), export_platforms: tuple[str, ...] = export_lib.DEFAULT_PLATFORMS,
                       should_stop: Callable[[], bool] = lambda: False,
                       show_progress: bool = True, parallel_mode: str = "jit", num_devices: int | None = None,
                       dump_hlo: str | None = None, profile: str | None = None,
                       peak_flops: float | None = None) -> dict:
    """Run the experiment `config` in `workdir`; return (and write to workdir/summary.json) the summary, or
    {"interrupted": True, "step": s} when `should_stop()` turned True (a checkpoint is saved at step s; s is
    None when the stop came before training, while the data was read: nothing to save then).

    `parallel_mode` "jit" (a Mesh over `num_devices` devices of all processes, default all) or "pmap"
    (the compatibility path, local devices). Only process 0 writes logs, plots, the summary and exports.
    `dump_hlo`: directory for StableHLO/HLO of the train and eval steps; `profile`: directory for a
    profiler trace of 5 steps; `peak_flops`: the device's peak FLOP/s, for the MFU in the summary (none without it).
    """
    t0 = time.perf_counter()
    _check_options(config, seed, export, export_platforms, parallel_mode, dump_hlo or profile)
    workdir = Path(workdir)
    resume = parallel.broadcast_from_main(lambda: _check_outputs(workdir, resume, dump_hlo=dump_hlo, profile=profile))
    train_set, val_set, test_set = parallel.on_every_process(lambda: load_splits(config, data_dir, seed))
    t_data = time.perf_counter()
    if parallel.any_process(should_stop()):  # a stop asked for while the data was decoded (cached by now)
        return {"interrupted": True, "step": None}
    mesh, n_dev = _devices(parallel_mode, num_devices, config)
    if config.time_budget and resume:  # a resumed run keeps the epochs its budget gave it when it started
        saved = checkpoint.Checkpointer(workdir / "checkpoints")
        config = _with_epochs(config, saved.meta()["config"]["epochs"])
        saved.close()
    init_key, data_key, flip_key = jax.random.split(jax.random.key(seed), 3)
    make_batch = partial(data_lib.train_batch, flip=data_lib.flip_schedule(config.flip, flip_key),
                         translate=config.translate, cutout=config.cutout, jitter=config.jitter, mean=config.mean,
                         std=config.std)
    train_arrays = (train_set["image"], train_set["label"])
    train_arrays = parallel.put_replicated(train_arrays, mesh) if mesh is not None else jax.device_put(train_arrays)
    val_norm, test_norm = (data_lib.normalized(s, config.mean, config.std) for s in (val_set, test_set))
    eval_batches = partial(data_lib.eval_batches, batch_size=config.eval_batch_size, multiple=n_dev)
    batch_fn = parallel.jit_batch_fn(make_batch, mesh=mesh, static_argnames=("size",))

    def example(size=None):
        """A batch as the loop makes it (`size` passed where it passes it: with progressive resizing), placed
        alike: the steps timed or lowered on it are those the loop then calls, compiled once."""
        return batch_fn(jax.random.key(0), *train_arrays, jnp.arange(config.batch_size), 0,
                        **({"size": size} if config.low_res else {}))

    def optimizers(config) -> tuple[int, optax.GradientTransformation, optax.GradientTransformation | None]:
        """(total steps, the optimizer, the proxy net's or None) of `config`'s run: their schedules span its steps."""
        steps_per_epoch, total_steps = _steps(config, len(train_set["label"]))
        proxy_tx = None
        if config.proxy_widths:  # trained every proxy_every steps: its schedule runs over that many fewer
            proxy_tx = build_optimizer(config, -(-total_steps // config.proxy_every),
                                       steps_per_epoch / config.proxy_every)
        return total_steps, build_optimizer(config, total_steps, steps_per_epoch), proxy_tx

    def compiled_steps(config, total_steps: int) -> tuple[Callable, Callable[[int], Callable]]:
        return _compiled_steps(build_train_step(config, total_steps), mesh, n_dev, config.tta_fraction)

    def build(config):
        """(total steps, the state on the devices, compiled train step, tta level → compiled eval step)."""
        total_steps, tx, proxy_tx = optimizers(config)
        axis = parallel.AXIS if parallel_mode == "pmap" else None
        proxy = (build_model(config, bn_axis_name=axis, proxy=True), proxy_tx) if proxy_tx else None
        state = initial_state(config, build_model(config, bn_axis_name=axis), tx, init_key, train_set["image"],
                              proxy=proxy)
        if mesh is not None:
            state = parallel.put_replicated(state, mesh)
        train_step, eval_step_for = compiled_steps(config, total_steps)
        return total_steps, state, train_step, cache(eval_step_for)

    total_steps, state, train_step, eval_step_for = build(config)
    parallel.broadcast_from_main(lambda: check_disk_space(workdir, state, config.keep_checkpoints))
    configured_steps, times = total_steps, None
    if config.time_budget and not resume:
        times = _run_times(config, state, train_step, eval_step_for, example, test_norm,
                           num_train=len(train_set["label"]), num_val=len(val_set["label"]), n_dev=n_dev)
        steps = _steps_in_budget(config, t0, total_steps, times)
        if steps < total_steps:
            config = _with_epochs(config, steps / (len(train_set["label"]) // config.batch_size))
            total_steps, state, train_step, eval_step_for = build(config)
    n_low = low_res_steps(config, total_steps)
    flops = None
    if mesh is not None:
        flops = step_flops(config, train_step, state, example())
        if flops and n_low:  # the mean over the run's steps
            flops = (n_low * step_flops(config, train_step, state, example(config.low_res))
                     + (total_steps - n_low) * flops) / total_steps
        if dump_hlo and parallel.is_main_process():
            _dump_steps(dump_hlo, train_step, eval_step_for(0), state, example(),
                        next(eval_batches(val_norm if config.val_size else test_norm)))
    data = loop.TrainData(*train_arrays, batch_fn, config.batch_size, data_key,
                          image_size=image_sizes(config, total_steps))
    identity = {"seed": seed, "data": data_fingerprint(train_set, val_set, test_set)}
    replanned = []  # (config, steps) of the run each time its budget planned it again (a new length, or the same)
    ends = []  # (steps done, seconds since the first step ended) at each epoch's end

    def replan(state, step: int, pace: float) -> loop.Plan | None:
        """The run's length from its own pace (`replanned_steps`), where `replan_window` says."""
        current, current_steps = replanned[-1] if replanned else (config, total_steps)
        ends.append((step, pace * (step - 1)))
        window = replan_window(current, current_steps, ends, len(replanned))
        if window is None:
            return None
        since, window_pace = window

        def decide() -> int:  # process 0's answer for all
            steps, scale = replanned_steps(current, times, left=60 * config.time_budget - (time.perf_counter() - t0),
                                           step=step, pace=window_pace, total_steps=current_steps,
                                           most=configured_steps, since=since)
            if steps != current_steps:
                log.info("time_budget %g min: %d steps instead of %d, planned again at step %d from the pace of "
                         "steps %d to %d (%.2f× the estimate)", config.time_budget, steps, current_steps, step,
                         since, step - 1, scale)
            return steps

        steps = parallel.broadcast_from_main(decide)
        new = current if steps == current_steps else _with_epochs(current, steps / (len(train_set["label"]) //
                                                                                    config.batch_size))
        replanned.append((new, steps))
        if new is current:
            return None
        _, tx, proxy_tx = optimizers(new)
        state = state.replace(tx=tx, proxy=state.proxy.replace(tx=proxy_tx) if proxy_tx else state.proxy)
        return loop.Plan(steps, compiled_steps(new, steps)[0], state, image_sizes(new, steps),
                         {"config": new.to_dict(), **identity})

    t_setup = time.perf_counter()
    # From its first write in the workdir to its last, the run holds it: a second run there is refused.
    with hold_directory(workdir, "workdir") if parallel.is_main_process() else contextlib.nullcontext():
        outcome = _fit_and_test(config, workdir, state, train_step, eval_step_for, data, total_steps, val_norm,
                                test_norm, eval_batches, identity=identity, resume=resume, should_stop=should_stop,
                                replan=replan if times else None, show_progress=show_progress, profile=profile)
        if "interrupted" in outcome:
            return outcome
        config = replanned[-1][0] if replanned else config
        outcome["phase_seconds"] = {"data": t_data - t0, "setup": t_setup - t_data, **outcome["phase_seconds"]}
        return _finish(config, workdir, outcome, export=export, export_platforms=export_platforms, t0=t0,
                       flops=flops, peak_flops=peak_flops, parallel_mode=parallel_mode, n_dev=n_dev, seed=seed)


def _fit_and_test(config, workdir: Path, state, train_step, eval_step_for, data, total_steps, val_norm, test_norm,
                  eval_batches, *, identity, resume, should_stop, replan, show_progress, profile) -> dict:
    """Train (with checkpoints, metrics, early stopping), then test the best (or last) state, plain and
    with TTA: {"result", "final", "test", "test_tta"}, or {"interrupted", "step"}. `eval_batches`: a split's
    host batches; `identity` (seed, data fingerprint) is saved with the config and must match on resume."""
    main_process = parallel.is_main_process()
    checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    config_dict = config.to_dict()
    fixed = {k: v for k, v in config_dict.items() if k not in RESUME_MAY_CHANGE}
    writer = MetricWriter(workdir, enabled=main_process)
    eval_step = eval_step_for(0)
    options = loop.FitOptions(log_every=config.log_every, patience=config.patience or None,
                              min_delta=config.min_delta, show_progress=show_progress and main_process,
                              profile_dir=profile if main_process else None,
                              checkpoint_interval=60 * config.checkpoint_minutes)
    try:
        result = loop.fit(
            state, train_step, data, total_steps, eval_step=eval_step,
            val_batches=(lambda: eval_batches(val_norm)) if config.val_size else None,
            checkpointer=checkpointer, writer=writer, meta={"config": config_dict, **identity}, resume=resume,
            resume_check={"config": fixed, **identity}, should_stop=should_stop, replan=replan, options=options)
        if result.interrupted:
            return {"interrupted": True, "step": int(parallel.fetch(result.state.step))}
        t_test = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1) as pool:  # the curves are complete: drawn while the test is run
            curves = pool.submit(plot_curves, workdir / "metrics.jsonl", workdir / "curves.png") if main_process \
                else None
            final = checkpointer.restore(result.state, "best")[0] if config.val_size else result.state
            # One pass over the test split: a TTA step's metrics include those of its plain view.
            test_tta = loop.evaluate(eval_step_for(config.tta_level), final, eval_batches(test_norm))
            test = {k: test_tta[f"plain_{k}"] for k in ("loss", "accuracy")} if config.tta_level else test_tta
            if curves:
                curves.result()
        test_seconds = time.perf_counter() - t_test
    finally:
        checkpointer.close()
        writer.close()
    return {"result": result, "final": final, "test": test, "test_tta": test_tta,
            "phase_seconds": {"train": result.train_seconds, "test": test_seconds}}


def versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""
    return {p: importlib.metadata.version(p) for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")} | {
        "python": platform.python_version()}


def _finish(config, workdir: Path, outcome: dict, *, export, export_platforms, t0, flops, peak_flops, parallel_mode,
            n_dev, seed) -> dict:
    """Exports and summary.json (process 0 writes them); returns the summary."""
    result, final = outcome["result"], outcome["final"]
    t_finish = time.perf_counter()
    exported = {}
    if parallel.is_main_process() and export:
        exported = export_lib.export_model(parallel.local(final), lambda impl: build_model(config, conv_impl=impl),
                                           config.conv_impl, workdir, export, mean=config.mean, std=config.std,
                                           platforms=export_platforms)
    steady = result.steady_step_seconds
    summary = {
        "test_accuracy": outcome["test"]["accuracy"], "test_accuracy_tta": outcome["test_tta"]["accuracy"],
        "tta_level": config.tta_level, "best_val_accuracy": result.best_val_accuracy,
        "epochs_completed": result.epochs_completed, "steps": int(parallel.fetch(final.step)),
        "stopped_early": result.stopped_early,
        "wall_seconds": time.perf_counter() - t0, "train_seconds": result.train_seconds,
        "compile_seconds": result.compile_seconds, "checkpoint_seconds": result.checkpoint_seconds,
        "phase_seconds": {**outcome["phase_seconds"], "finish": time.perf_counter() - t_finish},
        "steady_step_seconds": steady, "images_per_second": config.batch_size / steady if steady else None,
        "step_flops": flops, "flops_per_second": flops / steady if flops and steady else None,
        "peak_flops": peak_flops,
        "mfu": profiling.mfu(flops, steady, peak_flops) if flops and steady and peak_flops else None,
        "dtype": jnp.dtype(compute_dtype(config.dtype)).name,
        "parallel": parallel_mode, "devices": n_dev, "processes": jax.process_count(),
        "process": jax.process_index(),
        "platform": jax.devices()[0].platform, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "exported": exported, "config": config.to_dict(), "seed": seed, "versions": versions(),
    }
    if parallel.is_main_process():
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
