"""Optimizers and learning-rate schedules; parameter groups chosen by each parameter's role in its layer.

Every optimizer here is an `optax.inject_hyperparams` transformation, so its state holds the learning rate
of its last update and `jaxnet.train_step` reports it from there (`train.learning_rate`): the schedule has one
source of truth. Roles (`param_roles`) come from the structure of the parameters, not from module names:
"kernel" (weights, ndim > 1), "bias" (the bias of a layer that has a kernel), "norm" (the parameters of a
layer without a kernel: BatchNorm/LayerNorm scales and shifts, whatever the module is called).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxnet.errors import ConfigError

Schedule = Callable[[jax.Array], jax.Array]


def param_roles(params: Any) -> Any:
    """A tree like `params` (nested dicts of arrays, as Flax makes them) of role strings: "kernel", "bias",
    "norm" (see the module docstring)."""

    def walk(tree: Mapping) -> dict:
        has_kernel = any(not isinstance(v, Mapping) and jnp.ndim(v) > 1 for v in tree.values())
        return {k: walk(v) if isinstance(v, Mapping) else
                "kernel" if jnp.ndim(v) > 1 else "bias" if has_kernel else "norm" for k, v in tree.items()}

    return walk(params)


def decay_mask(params: Any) -> Any:
    """True for the parameters that get weight decay: kernels only, never biases or norm parameters."""
    return jax.tree.map(lambda role: role == "kernel", param_roles(params))


def _injected(factory: Callable[[jax.Array], optax.GradientTransformation],
              learning_rate: float | Schedule) -> optax.GradientTransformation:
    """`factory(lr)` with the learning rate held (and reported) in an `inject_hyperparams` state."""
    return optax.inject_hyperparams(lambda learning_rate: factory(learning_rate))(learning_rate=learning_rate)


def sgd(learning_rate: float | Schedule, *, momentum: float = 0.9, nesterov: bool = True,
        weight_decay: float = 0.0) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum and decoupled weight decay on kernels only.

    update = -lr · (momentum_direction(grad) + weight_decay · param): the decay does not enter the
    momentum buffer (Loshchilov & Hutter), and norm parameters and biases are never decayed.
    """
    return _injected(lambda lr: optax.chain(optax.trace(decay=momentum, nesterov=nesterov),
                                            optax.add_decayed_weights(weight_decay, mask=decay_mask),
                                            optax.scale_by_learning_rate(lr)), learning_rate)


def adamw(learning_rate: float | Schedule, *, b1: float = 0.9, b2: float = 0.999,
          weight_decay: float = 0.0) -> optax.GradientTransformation:
    """AdamW with decay on kernels only (weight_decay=0 gives Adam, as in the reference script)."""
    return _injected(lambda lr: optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask),
                     learning_rate)


def airbench_sgd(learning_rate: float, schedule: Schedule, *, batch_size: int, momentum: float = 0.85,
                 weight_decay: float = 0.0153, norm_lr_mult: float = 64.0, whiten_module: str = "stem",
                 whiten_bias_steps: float = 0.0) -> optax.GradientTransformation:
    """airbench94's PyTorch SGD (Nesterov, a summed loss) for jaxnet's mean loss.

    `learning_rate` and `weight_decay` are airbench's, per 1024 examples; `schedule(step)` multiplies the
    learning rate. Gradients are scaled by `batch_size` (mean → sum); norm parameters get `norm_lr_mult`×
    the learning rate (not their decay); the kernel of the top-level module `whiten_module` (a whitening
    stem set from data) is frozen and its bias trains at the plain rate for the first `whiten_bias_steps`
    steps. The reported learning rate is per step of the mean loss.
    """
    kilostep = 1024 * (1 + 1 / (1 - momentum))
    lr = learning_rate / kilostep                       # per example of the summed loss
    wd = weight_decay * batch_size / kilostep

    def groups(learning_rate: jax.Array, whiten_bias_on: jax.Array) -> optax.GradientTransformation:
        per_example = learning_rate / batch_size

        def group(mult: float, on: float | jax.Array = 1.0) -> optax.GradientTransformation:
            # PyTorch SGD: buf = m·buf + (g_sum + (wd/lr_g)·p); p -= lr_g·s(t)·(g + m·buf) (Nesterov).
            return optax.chain(optax.scale(batch_size), optax.add_decayed_weights(wd / (lr * mult)),
                               optax.trace(decay=momentum, nesterov=True), optax.scale(-per_example * mult * on))

        def label(params):
            roles = param_roles(params)
            if whiten_module in roles:
                roles = {**roles, whiten_module: {k: "frozen" if k == "kernel" else "whiten_bias"
                                                  for k in roles[whiten_module]}}
            return roles

        return optax.multi_transform({"kernel": group(1), "bias": group(1), "norm": group(norm_lr_mult),
                                      "frozen": optax.set_to_zero(), "whiten_bias": group(1, whiten_bias_on)}, label)

    return optax.inject_hyperparams(groups)(
        learning_rate=lambda step: lr * batch_size * schedule(step),
        whiten_bias_on=lambda step: jnp.where(step < whiten_bias_steps, 1.0, 0.0))


# ---- schedules ----

def piecewise_linear(steps: Sequence[float], values: Sequence[float]) -> Schedule:
    """Through the points (steps[i], values[i]), linear in between, flat outside (one-cycle, triangular).
    Raises ConfigError unless there are ≥ 2 points with increasing steps."""
    if len(steps) != len(values) or len(steps) < 2 or list(steps) != sorted(steps):
        raise ConfigError(f"piecewise_linear needs ≥ 2 points with increasing steps, got {steps}, {values}")
    xs, ys = jnp.asarray(steps, jnp.float32), jnp.asarray(values, jnp.float32)
    return lambda step: jnp.interp(jnp.asarray(step, jnp.float32), xs, ys)


def warmup_cosine(peak: float, total_steps: int, warmup_steps: int = 0, end: float = 0.0) -> Schedule:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then cosine decay to `end` at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps, end)


def constant(value: float) -> Schedule:
    return optax.constant_schedule(value)
