"""Optimizers and learning-rate schedules; parameter groups chosen by each parameter's role in its layer.

Every optimizer here is an `optax.inject_hyperparams` transformation, so its state holds the learning rate
of its last update and `jaxnet.train_step` reports it from there (`train.learning_rate`): the schedule has one
source of truth. Roles (`param_roles`) come from the structure of the parameters, not from module names:
"kernel" (weights, ndim > 1), "bias" (the bias of a layer that has a kernel), "norm" (the parameters of a
layer without a kernel: BatchNorm/LayerNorm scales and shifts, whatever the module is called).

Muon (Jordan et al. 2024: momentum orthogonalised by a Newton–Schulz iteration) is here in the form of
the CIFAR-10 speed record (airbench94_muon): `scale_by_muon` for any model's matrix and conv kernels,
`renormalize_kernels`, and `airbench_muon`, the record's parameter groups. optax.contrib.muon keeps an
exponential moving average with bias correction and no renormalisation; the record's variant is PyTorch's
momentum buffer (buf = m·buf + g, Nesterov g + m·buf), bf16 iterations and weight renormalisation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxnet.errors import ConfigError, check_values, is_kind

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
    momentum buffer (Loshchilov & Hutter), and norm parameters and biases are never decayed. Raises ConfigError
    for a rate ≤ 0, a momentum outside [0, 1) or a negative decay.
    """
    check_values("sgd", learning_rate=("positive or schedule", learning_rate), momentum=("in [0, 1)", momentum),
                 weight_decay=("non-negative", weight_decay))
    return _injected(lambda lr: optax.chain(optax.trace(decay=momentum, nesterov=nesterov),
                                            optax.add_decayed_weights(weight_decay, mask=decay_mask),
                                            optax.scale_by_learning_rate(lr)), learning_rate)


def adamw(learning_rate: float | Schedule, *, b1: float = 0.9, b2: float = 0.999,
          weight_decay: float = 0.0) -> optax.GradientTransformation:
    """AdamW with decay on kernels only (weight_decay=0 gives Adam, as in the reference script). Raises ConfigError
    for a rate ≤ 0, b1 or b2 outside [0, 1) or a negative decay."""
    check_values("adamw", learning_rate=("positive or schedule", learning_rate), b1=("in [0, 1)", b1),
                 b2=("in [0, 1)", b2), weight_decay=("non-negative", weight_decay))
    return _injected(lambda lr: optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask),
                     learning_rate)


def _torch_sgd(batch_size: int, momentum: float, decay: float, step: float | jax.Array
               ) -> optax.GradientTransformation:
    """PyTorch's Nesterov SGD with coupled weight decay on the summed loss, for jaxnet's mean loss:
    d = batch_size·g + decay·p; buf = m·buf + d; p -= step·(d + m·buf)."""
    return optax.chain(optax.scale(batch_size), optax.add_decayed_weights(decay),
                       optax.trace(decay=momentum, nesterov=True), optax.scale(-step))


def _whitening_roles(roles: dict, whiten_module: str) -> dict:
    """`roles` with the whitening stem's kernel "frozen" and its bias "whiten_bias"."""
    if whiten_module not in roles:
        return roles
    return {**roles, whiten_module: {k: "frozen" if k == "kernel" else "whiten_bias" for k in roles[whiten_module]}}


def airbench_sgd(learning_rate: float, schedule: Schedule, *, batch_size: int, momentum: float = 0.85,
                 weight_decay: float = 0.0153, norm_lr_mult: float = 64.0, whiten_module: str = "stem",
                 whiten_bias_steps: float = 0.0) -> optax.GradientTransformation:
    """airbench94's PyTorch SGD (Nesterov, a summed loss) for jaxnet's mean loss.

    `learning_rate` and `weight_decay` are airbench's, per 1024 examples; `schedule(step)` multiplies the
    learning rate. Gradients are scaled by `batch_size` (mean → sum); norm parameters get `norm_lr_mult`×
    the learning rate (not their decay); the kernel of the top-level module `whiten_module` (a whitening
    stem set from data) is frozen and its bias trains at the plain rate for the first `whiten_bias_steps`
    steps. The reported learning rate is per step of the mean loss. Raises ConfigError for a hyperparameter out
    of its range.
    """
    check_values("airbench_sgd", learning_rate=("positive", learning_rate),
                 batch_size=("positive integer", batch_size), momentum=("in [0, 1)", momentum),
                 weight_decay=("non-negative", weight_decay), norm_lr_mult=("positive", norm_lr_mult),
                 whiten_bias_steps=("non-negative", whiten_bias_steps))
    kilostep = 1024 * (1 + 1 / (1 - momentum))
    lr = learning_rate / kilostep                       # per example of the summed loss
    wd = weight_decay * batch_size / kilostep

    def groups(learning_rate: jax.Array, whiten_bias_on: jax.Array) -> optax.GradientTransformation:
        per_example = learning_rate / batch_size

        def group(mult: float, on: float | jax.Array = 1.0) -> optax.GradientTransformation:
            return _torch_sgd(batch_size, momentum, wd / (lr * mult), per_example * mult * on)

        return optax.multi_transform({"kernel": group(1), "bias": group(1), "norm": group(norm_lr_mult),
                                      "frozen": optax.set_to_zero(), "whiten_bias": group(1, whiten_bias_on)},
                                     lambda params: _whitening_roles(param_roles(params), whiten_module))

    return optax.inject_hyperparams(groups)(
        learning_rate=lambda step: lr * batch_size * schedule(step),
        whiten_bias_on=lambda step: jnp.where(step < whiten_bias_steps, 1.0, 0.0))


# ---- Muon ----

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic's (a, b, c): steepest slope at zero (Jordan 2024)


def newton_schulz(g: jax.Array, *, steps: int = 3, dtype: Any = jnp.bfloat16, eps: float = 1e-7) -> jax.Array:
    """≈ U·S'·Vᵀ for g = U·S·Vᵀ (2-D), S' ∈ ~[0.5, 1.5]: g/‖g‖_F, then `steps` times
    X ← aX + (bA + cA²)X with A = XXᵀ, on the wide orientation of g, computed in `dtype`. Returned in `dtype`."""
    x = g.astype(dtype)
    x = x / (jnp.linalg.norm(x) + eps)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


def orthogonalize(kernel: jax.Array, *, steps: int = 3, dtype: Any = jnp.bfloat16) -> jax.Array:
    """`newton_schulz` of a kernel seen as a matrix (fan-in, output features): HWIO conv and (in, out) dense
    kernels alike (the last axis is the output). Returned in the kernel's dtype."""
    matrix = kernel.reshape(-1, kernel.shape[-1])
    return newton_schulz(matrix, steps=steps, dtype=dtype).reshape(kernel.shape).astype(kernel.dtype)


def scale_by_muon(momentum: float, *, nesterov: bool = True, ns_steps: int = 3,
                  ns_dtype: Any = jnp.bfloat16) -> optax.GradientTransformation:
    """PyTorch's momentum buffer (buf = m·buf + g; Nesterov: g + m·buf), then each leaf `orthogonalize`d.
    For kernels (ndim ≥ 2): give it only those (e.g. through `optax.multi_transform`)."""
    check_values("scale_by_muon", momentum=("in [0, 1)", momentum), ns_steps=("positive integer", ns_steps))
    return optax.chain(optax.trace(decay=momentum, nesterov=nesterov),
                       optax.GradientTransformation(
                           lambda params: optax.EmptyState(),
                           lambda updates, state, params=None: (jax.tree.map(
                               partial(orthogonalize, steps=ns_steps, dtype=ns_dtype), updates), state)))


class RenormalizeState(NamedTuple):
    count: jax.Array  # updates so far


def renormalize_kernels(every: int) -> optax.GradientTransformation:
    """Adds to the update, on steps 0, every, 2·every, …, what scales each kernel to a Frobenius norm of
    √(output features) (the record's `p *= √len(p)/‖p‖` before its step): p + u = s·p + u'. Needs params."""
    check_values("renormalize_kernels", every=("positive integer", every))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("renormalize_kernels needs the params (optax `update(updates, state, params)`)")
        on = (state.count % every == 0).astype(jnp.float32)

        def add(u, p):
            scale = jnp.sqrt(jnp.float32(p.shape[-1])) / jnp.linalg.norm(p.astype(jnp.float32))
            return u + (on * (scale - 1) * p).astype(u.dtype)

        return jax.tree.map(add, updates, params), RenormalizeState(count=state.count + 1)

    return optax.GradientTransformation(lambda params: RenormalizeState(count=jnp.zeros([], jnp.int32)), update)


def airbench_muon(schedule: Schedule, *, batch_size: int, filter_lr: float = 0.24, filter_momentum: float = 0.6,
                  renorm_every: int = 1, ns_steps: int = 3, ns_dtype: Any = jnp.bfloat16, bias_lr: float = 0.053,
                  head_lr: float = 0.67, momentum: float = 0.85, weight_decay: float = 2e-6,
                  whiten_module: str = "stem", whiten_bias_steps: float = 0.0) -> optax.GradientTransformation:
    """airbench94_muon's optimizer for jaxnet's mean loss. Conv filters (4-D kernels): Muon at `filter_lr`,
    renormalised every `renorm_every` steps; biases and norm parameters at `bias_lr`, the head (2-D kernels)
    at `head_lr`: PyTorch's Nesterov SGD on the summed loss with decay `weight_decay`·`batch_size` (per example,
    coupled: divided by each group's rate). All rates × `schedule(step)`; the whitening stem's kernel is frozen
    and its bias trains at `bias_lr`·(1 − step/`whiten_bias_steps`) until then. Reported lr: the filters'.
    Raises ConfigError for a hyperparameter out of its range.
    """
    check_values("airbench_muon", batch_size=("positive integer", batch_size), filter_lr=("positive", filter_lr),
                 filter_momentum=("in [0, 1)", filter_momentum), renorm_every=("positive integer", renorm_every),
                 ns_steps=("positive integer", ns_steps), bias_lr=("positive", bias_lr),
                 head_lr=("positive", head_lr), momentum=("in [0, 1)", momentum),
                 weight_decay=("non-negative", weight_decay), whiten_bias_steps=("non-negative", whiten_bias_steps))
    decay = weight_decay * batch_size

    def groups(learning_rate: jax.Array, whiten_bias_rate: jax.Array) -> optax.GradientTransformation:
        multiplier = learning_rate / filter_lr

        def sgd_group(rate: float, multiplier: jax.Array) -> optax.GradientTransformation:
            return _torch_sgd(batch_size, momentum, decay / rate, rate * multiplier)

        def label(params):
            def group(role: str, p: jax.Array) -> str:
                return ("filter" if jnp.ndim(p) == 4 else "head") if role == "kernel" else "bias"

            return _whitening_roles(jax.tree.map(group, param_roles(params), params), whiten_module)

        filters = optax.chain(scale_by_muon(filter_momentum, ns_steps=ns_steps, ns_dtype=ns_dtype),
                              optax.scale(-learning_rate), renormalize_kernels(renorm_every))
        return optax.multi_transform({"filter": filters, "head": sgd_group(head_lr, multiplier),
                                      "bias": sgd_group(bias_lr, multiplier), "frozen": optax.set_to_zero(),
                                      "whiten_bias": sgd_group(bias_lr, whiten_bias_rate)}, label)

    return optax.inject_hyperparams(groups)(
        learning_rate=lambda step: filter_lr * schedule(step),
        whiten_bias_rate=lambda step: jnp.where(step < whiten_bias_steps, 1 - step / max(whiten_bias_steps, 1), 0.0))


# ---- schedules ----

def piecewise_linear(steps: Sequence[float], values: Sequence[float]) -> Schedule:
    """Through the points (steps[i], values[i]), linear in between, flat outside (one-cycle, triangular).
    Raises ConfigError unless there are ≥ 2 points, their steps and values finite numbers, the steps increasing."""
    finite = all(is_kind("finite", v) for v in (*steps, *values))
    if not finite or len(steps) != len(values) or len(steps) < 2 or list(steps) != sorted(steps):
        raise ConfigError(f"piecewise_linear needs ≥ 2 points of finite numbers with increasing steps, got {steps}, "
                          f"{values}")
    xs, ys = jnp.asarray(steps, jnp.float32), jnp.asarray(values, jnp.float32)
    return lambda step: jnp.interp(jnp.asarray(step, jnp.float32), xs, ys)


def warmup_cosine(peak: float, total_steps: int, warmup_steps: int = 0, end: float = 0.0) -> Schedule:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then cosine decay to `end` at `total_steps`.
    Raises ConfigError unless 0 <= warmup_steps < total_steps, both integers."""
    check_values("warmup_cosine", total_steps=("positive integer", total_steps),
                 warmup_steps=("non-negative integer", warmup_steps))
    if warmup_steps >= total_steps:
        raise ConfigError(f"warmup_cosine warmup_steps {warmup_steps} leaves none of the {total_steps} steps to decay")
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps, end)


def constant(value: float) -> Schedule:
    return optax.constant_schedule(value)
