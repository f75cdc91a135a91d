"""Where jit is applied: the compiled train and eval steps, with their input checks outside jit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import jax

from jaxnet import train
from jaxnet.train import Batch, Metrics, Schedule, TrainState


def _checked(compiled: Callable, num_classes: int | None, image_shape: Sequence[int] | None) -> Callable:
    """`compiled(state, batch)` behind `train.validate_batch`: a user mistake is a one-line ValueError."""

    def step(state: TrainState, batch: Batch):
        train.validate_batch(batch, num_classes=num_classes, image_shape=image_shape)
        return compiled(state, batch)

    step.compiled = compiled  # the jitted function, for lower()/cost analysis
    return step


def jit_train_step(step_fn: Callable = train.train_step, *, label_smoothing: float = 0.0,
                   lr_fn: Schedule | None = None, num_classes: int | None = None,
                   image_shape: Sequence[int] | None = None) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Compile `step_fn(state, batch, label_smoothing=..., lr_fn=...)` once, donating the input state.

    The returned `step(state, batch)` validates the batch first. The state passed in is donated: its
    buffers are reused for the new state and must not be used again.
    """
    compiled = jax.jit(partial(step_fn, label_smoothing=label_smoothing, lr_fn=lr_fn), donate_argnums=(0,))
    return _checked(compiled, num_classes, image_shape)


def jit_eval_step(step_fn: Callable = train.eval_step, *, num_classes: int | None = None,
                  image_shape: Sequence[int] | None = None) -> Callable[[TrainState, Batch], Metrics]:
    """Compile `step_fn(state, batch)` once (no donation: the state lives on); the batch is validated first."""
    return _checked(jax.jit(step_fn), num_classes, image_shape)


def jit_batch_fn(fn: Callable) -> Callable:
    """Compile a device-side data function (gather + augmentation of a batch). Kept here so that the
    batch's sharding is decided where the step's is."""
    return jax.jit(fn)
