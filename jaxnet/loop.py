"""`fit`: the reusable training loop — epochs over a device-resident training set, evaluation, early
stopping, checkpoints and exact resume, metric writing. Explicit arguments only; no config objects.

Randomness is a pure function of (key, step, epoch): the epoch order is `fold_in(order_key, epoch)`, the
augmentation of step s `fold_in(aug_key, s)`, dropout `fold_in(state.rng, s)`. A checkpoint therefore
needs only the state and the position (epoch, step in epoch) to resume bit-identically.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import data as data_lib, parallel
from jaxnet.checkpoint import Checkpointer
from jaxnet.errors import ConfigError, TrainingDiverged, check_values
from jaxnet.metrics import MetricWriter, progress
from jaxnet.train import TrainState, merge_metrics


@dataclasses.dataclass(frozen=True)
class TrainData:
    """The training set on device and how a batch is made of it.

    images, labels: the whole set (uint8 images); make_batch: compiled `(key, images, labels, indices, epoch)
    -> batch` (gather + augmentation; `epoch` counts from 0, for augmentations that follow a schedule over
    epochs); key: the data key, split by `fit` into epoch-order and augmentation keys; image_size: step → the
    side of that step's images (progressive resizing), passed to make_batch as keyword `size` (static: one
    compile of it and of the train step per side); None: the images as stored.
    """

    images: jax.Array
    labels: jax.Array
    make_batch: Callable
    batch_size: int
    key: jax.Array
    image_size: Callable[[int], int | None] | None = None

    def __post_init__(self):
        check_values("TrainData", batch_size=("positive integer", self.batch_size))


# Steps dispatched and not yet finished, at most. JAX's async dispatch would let the loop run `log_every` steps
# ahead and then block fetching them all, and a signal's handler runs only when that fetch returns: a SIGTERM to a
# run of 9-s steps took 73 s to be acted on (10 steps in flight), past a scheduler's usual 30-s grace before SIGKILL.
# Two keep the device fed (the next step is queued while one runs) and bound that wait to about two steps.
IN_FLIGHT = 2


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """log_every: steps between metric fetches (the loop's only transfers to the host, with evaluation; besides
    them it only waits, each step, on the step `IN_FLIGHT` behind);
    patience, min_delta: early stopping after `patience` epochs without a gain of more than `min_delta` in
    validation accuracy (None: never); profile_dir: a `jax.profiler` trace (Perfetto included) of
    `profile_steps` steps after two warm-up steps, each marked with a StepTraceAnnotation;
    checkpoint_interval: seconds from one epoch-end checkpoint to the next (0: every epoch) — the last epoch, a
    new best, an early stop and a stop asked for are saved whenever they come."""

    log_every: int = 50
    patience: int | None = None
    min_delta: float = 0.0
    show_progress: bool = True
    profile_dir: str | None = None
    profile_steps: int = 5
    checkpoint_interval: float = 0.0

    def __post_init__(self):
        check_values("FitOptions", log_every=("positive integer", self.log_every),
                     patience=("non-negative integer or None", self.patience),
                     min_delta=("non-negative", self.min_delta),
                     profile_steps=("positive integer", self.profile_steps),
                     checkpoint_interval=("non-negative", self.checkpoint_interval))


@dataclasses.dataclass(frozen=True)
class Plan:
    """A new length for the run in progress, from `fit`'s `replan`: its total steps, and what was built for
    them — the train step and the state (whose optimizer may hold the schedule: e.g. `state.replace(tx=...)`), the
    image size per step (`TrainData.image_size`), and the meta its checkpoints carry from then on."""

    total_steps: int
    train_step: Callable
    state: TrainState
    image_size: Callable[[int], int | None] | None
    meta: dict[str, Any]


@dataclasses.dataclass
class FitResult:
    """first_step_seconds: compilation and the first step; steady_step_seconds: a step's time after
    compilation, over the run's image sizes (`_steady`); compile_seconds: the first minus a steady step of its
    size, 0 where the first was no slower (a step compiled before the run: a time budget's timing, the persistent
    compilation cache); None until a logging window at that size was timed; checkpoint_seconds: the time spent
    saving."""

    state: TrainState
    best_val_accuracy: float | None
    epochs_completed: int
    stopped_early: bool
    interrupted: bool
    first_step_seconds: float | None
    steady_step_seconds: float | None
    train_seconds: float
    compile_seconds: float | None = None
    checkpoint_seconds: float = 0.0


def _steady(window_times: dict[Any, list[float]], steps_at: dict[Any, int]) -> float | None:
    """A step's steady time over the run: each image size's median window, weighted by the steps run at that
    size (with progressive resizing one size's median alone would be that size's rate, not the run's)."""
    timed = {size: float(np.median(times)) for size, times in window_times.items()}
    if not timed:
        return None
    return sum(steps_at[size] * t for size, t in timed.items()) / sum(steps_at[size] for size in timed)


def evaluate(eval_step: Callable, state: TrainState, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    """Exact count-weighted loss and accuracy of `eval_step` over host `batches` (one fetch at the end)."""
    return merge_metrics(parallel.fetch([eval_step(state, b) for b in batches]))


def _done(metrics: Any) -> bool:
    """Whether a step's metrics are computed, asked without waiting (no host sync): the progress bar counts
    finished steps, so its img/s is the true rate rather than that of asynchronous dispatch."""
    return all(leaf.is_ready() for leaf in jax.tree.leaves(metrics) if isinstance(leaf, jax.Array))


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    """Whether every element of every array in `tree` is finite: one program, not an op per leaf and shape."""
    finite = [jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(finite)) if finite else jnp.array(True)


def _check_finite(state: TrainState, step: int) -> None:
    """TrainingDiverged if a parameter is NaN or infinite: such a state is never saved, so the newest
    checkpoint stays the last good one. One scalar fetched per save."""
    if not bool(parallel.fetch(_all_finite(state.params))):
        raise TrainingDiverged(f"parameters are not finite after step {step}")


def _save(checkpointer: Checkpointer, state: TrainState, step: int, meta: dict[str, Any], best: bool = False) -> float:
    """Save `state` if its parameters are finite (else TrainingDiverged); the seconds it took."""
    t = time.perf_counter()
    _check_finite(state, step)
    checkpointer.save(state, meta, best=best)
    return time.perf_counter() - t


def fit(state: TrainState, train_step: Callable, data: TrainData, total_steps: int, *,
        eval_step: Callable | None = None, val_batches: Callable[[], Iterable] | None = None,
        checkpointer: Checkpointer | None = None, writer: MetricWriter | None = None,
        meta: dict[str, Any] | None = None, resume: bool = False, resume_check: dict[str, Any] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        replan: Callable[[TrainState, int, float], Plan | None] | None = None,
        options: FitOptions = FitOptions()) -> FitResult:
    """Train `state` with `train_step` (compiled `(state, batch) -> (state, metrics)`) for `total_steps` steps
    of `data.batch_size` (epochs of `len(data.labels) // data.batch_size`).

    Args:
      eval_step: compiled `(state, batch) -> metrics`; val_batches: zero-argument function giving an
        iterable of host eval batches, evaluated after every epoch (for early stopping, see `FitOptions`).
      checkpointer: saves after each epoch, or after the first epoch to end `options.checkpoint_interval`
        seconds after the last save (the best epoch also as "best"), and when `should_stop()` turns True between
        steps (with several processes: at the next multiple of `log_every` steps, on all of them); with `resume`,
        training continues from its latest checkpoint.
      meta: JSON-able dict saved with each checkpoint (e.g. the config and seed); with `resume`, the checkpoint
        must have been saved with `resume_check` (default: `meta`; see `Checkpointer.restore`).
      replan: called at the end of each epoch before the last (after its validation, before its checkpoint) as
        `replan(state, step, pace)`, `pace` the wall seconds a step has taken since the first of this call
        (evaluation and saves included); a `Plan` it returns replaces the run's length, train step, state, image
        sizes and meta from then on (the next step, which compiles, is left out of the step timings); None keeps
        them. With several processes it must return the same on each.

    Raises:
      TrainingDiverged: the training loss is not finite at a log point.
      CheckpointError: `resume` with no usable checkpoint.
      ConfigError: a batch larger than the training set.
    """
    check_values("fit", total_steps=("non-negative integer", total_steps))
    train_images, train_labels, make_batch, batch_size = data.images, data.labels, data.make_batch, data.batch_size
    log_every, patience, min_delta = options.log_every, options.patience, options.min_delta
    profile_dir, show_progress = options.profile_dir, options.show_progress
    n = int(train_labels.shape[0])
    steps_per_epoch = n // batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"batch_size {batch_size} is larger than the training set ({n} examples)")
    order_key, aug_key = jax.random.split(data.key)
    image_size = data.image_size
    single = jax.process_count() == 1
    meta = dict(meta or {})
    epoch, offset, best, bad = 0, 0, None, 0
    if resume:
        state, saved = checkpointer.restore(state, expect=meta if resume_check is None else resume_check)
        epoch, offset, best, bad = saved["epoch"], saved["step_in_epoch"], saved["best"], saved["bad_epochs"]

    def position(epoch, offset):
        return {**meta, "epoch": epoch, "step_in_epoch": offset, "best": best, "bad_epochs": bad}

    step = int(parallel.fetch(state.step))
    if writer:
        writer.start_at(step)
    trace_window = (step + 2, step + 2 + options.profile_steps) if profile_dir else (-1, -1)
    first_step = first_size = None
    stopped_early = interrupted = recompiling = False
    # Per image size: each logging window's time per step (windows of one size only) and the steps run.
    t_start, window_times, steps_at, start_step = time.perf_counter(), {}, {}, step
    t_saved, saving = t_start, 0.0
    total_epochs = math.ceil(total_steps / steps_per_epoch)
    while step < total_steps and not (stopped_early or interrupted):
        order = data_lib.epoch_indices(jax.random.fold_in(order_key, epoch), n, batch_size)
        last = min(steps_per_epoch, offset + total_steps - step)
        bar = progress((last - offset) * batch_size, f"epoch {epoch + 1}/{total_epochs}", enabled=show_progress)
        pending, shown, t_window, untimed, window_sizes = [], 0, time.perf_counter(), 0, set()
        try:  # the bar ends its line even when a step raises, so an error message starts on its own
            for i in range(offset, last):
                if step == trace_window[0]:
                    jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    size = None if image_size is None else image_size(step)
                    batch = make_batch(jax.random.fold_in(aug_key, step), train_images, train_labels, order[i], epoch,
                                       **({} if image_size is None else {"size": size}))
                    state, metrics = train_step(state, batch)
                step += 1
                steps_at[size] = steps_at.get(size, 0) + 1
                window_sizes.add(size)
                if step == trace_window[1]:
                    jax.block_until_ready(metrics)
                    jax.profiler.stop_trace()
                pending.append(metrics)
                if len(pending) > IN_FLIGHT:  # a wait, not a transfer: the steps queued behind it keep the device busy
                    jax.block_until_ready(pending[-1 - IN_FLIGHT])
                if first_step is None or recompiling:  # compile + one step: kept out of the steady-state timing
                    jax.block_until_ready(metrics)
                    if first_step is None:
                        first_step, first_size = time.perf_counter() - t_window, size
                    t_window, untimed, recompiling = time.perf_counter(), 1, False
                while shown < len(pending) and _done(pending[shown]):  # finished steps, not dispatched ones
                    shown += 1
                    bar.update(batch_size)
                # Several processes stop together: they agree on the flag every `log_every` steps.
                stop = i < last - 1 and (single or step % log_every == 0) and parallel.any_process(should_stop())
                if len(pending) == log_every or i == last - 1 or stop:
                    fetched = parallel.fetch(pending)
                    if len(fetched) > shown:
                        bar.update((len(fetched) - shown) * batch_size)
                    if len(pending) > untimed and len(window_sizes) == 1:  # not the window of a size switch
                        window_times.setdefault(size, []).append(
                            (time.perf_counter() - t_window) / (len(pending) - untimed))
                    untimed = 0
                    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1] if k != "count"}
                    if not math.isfinite(scalars["loss"]):
                        raise TrainingDiverged(f"training loss is {scalars['loss']} at step {step}")
                    if writer:
                        writer.write("train", step, scalars)
                    bar.set_postfix(loss=f"{scalars['loss']:.3f}", acc=f"{scalars['accuracy']:.3f}")
                    pending, shown, t_window, window_sizes = [], 0, time.perf_counter(), set()
                if stop:
                    interrupted = True
                    if checkpointer:
                        saving += _save(checkpointer, state, step, position(epoch, i + 1))
                    break
        finally:
            bar.close()
        if interrupted:
            break
        # A run of fractional epochs ends inside its last epoch: the position stays in that epoch.
        epoch, offset = (epoch + 1, 0) if last == steps_per_epoch else (epoch, last)
        improved = False
        if val_batches is not None:
            val = evaluate(eval_step, state, val_batches())
            if writer:
                writer.write("val", step, {"loss": val["loss"], "accuracy": val["accuracy"], "epoch": epoch})
            improved = best is None or val["accuracy"] > best + min_delta
            best, bad = (val["accuracy"], 0) if improved else (best, bad + 1)
            stopped_early = patience is not None and bad >= patience
        if replan is not None and step < total_steps and not stopped_early and step - start_step > 1:
            plan = replan(state, step, (time.perf_counter() - t_start - first_step) / (step - start_step - 1))
            if plan is not None:
                total_steps, train_step, state, image_size, meta = (
                    plan.total_steps, plan.train_step, plan.state, plan.image_size, dict(plan.meta))
                total_epochs, recompiling = math.ceil(total_steps / steps_per_epoch), True
        interrupted = step < total_steps and parallel.any_process(should_stop())
        # Every process reaches the same decision: all but the clock are the same on each, and they agree on that.
        if checkpointer and (step >= total_steps or improved or stopped_early or interrupted
                             or not options.checkpoint_interval
                             or parallel.any_process(time.perf_counter() - t_saved >= options.checkpoint_interval)):
            saving += _save(checkpointer, state, step, position(epoch, offset), best=improved)
            t_saved = time.perf_counter()
    if trace_window[0] < step < trace_window[1]:  # the run ended inside the traced window
        jax.profiler.stop_trace()
    first_rate = window_times.get(first_size)
    return FitResult(state=state, best_val_accuracy=best, epochs_completed=epoch, stopped_early=stopped_early,
                     interrupted=interrupted, first_step_seconds=first_step,
                     steady_step_seconds=_steady(window_times, steps_at), train_seconds=time.perf_counter() - t_start,
                     compile_seconds=max(0.0, first_step - float(np.median(first_rate))) if first_rate else None,
                     checkpoint_seconds=saving)
