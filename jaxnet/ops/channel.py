"""Per-channel ops over channels-last arrays (the last axis): sums, bias add and training-mode BatchNorm.

Why they exist: XLA's CPU backend emits a reduction over every axis but the last (a "column" reduction, e.g.
the sum of (N, H, W, C) over N, H, W) as a loop per output channel that walks the input with stride C, one
thread: 8.1 ms for a (32, 32, 32, 64) float32 sum against 0.9 ms for the same sum as a matrix-vector product
with a ones vector (Eigen, vectorised, threaded), on the 2-core Zen 3 of 2026-11-26. BatchNorm (statistics
forward, two sums backward) and every bias gradient are such reductions, so on CPU `channel_sum` is that
product, and BatchNorm and the bias add carry custom VJPs whose backward sums go through it. Other
platforms keep XLA's reduction (its GPU emitter handles column reductions). `batch_norm_reference` is the
autodiff-through-`jnp` reference the tests compare against.

Measured with XLA's own CPU reductions, as under `xla_cpu_conv=eigen` (jaxnet's default). Handing reductions
to YNNPACK instead makes the lone sum fast too, but whole train steps slower: `jaxnet.compiler` says more.
`python -m benchmarks.batch_norm` compares this BatchNorm with Flax's.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax


def _sum_as_dot(x: jax.Array) -> jax.Array:
    rows = x.reshape(-1, x.shape[-1])
    return lax.dot_general(jnp.ones((rows.shape[0],), rows.dtype), rows, (((0,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)


def _sum_as_reduce(x: jax.Array) -> jax.Array:
    return jnp.sum(x, axis=tuple(range(x.ndim - 1)), dtype=jnp.float32)


def _bcast(v: jax.Array, ndim: int) -> jax.Array:
    """(C,) → (1, …, 1, C) of rank `ndim`, for explicit broadcasting against channels-last arrays."""
    return v.reshape((1,) * (ndim - 1) + (-1,))


def channel_sum(x: jax.Array) -> jax.Array:
    """Sum over every axis but the last, accumulated in float32: (..., C) → (C,) float32."""
    return lax.platform_dependent(x, cpu=_sum_as_dot, default=_sum_as_reduce)


@jax.custom_vjp
def bias_add(y: jax.Array, bias: jax.Array) -> jax.Array:
    """`y + bias` over the last axis, whose bias gradient is a `channel_sum`."""
    return y + _bcast(bias.astype(y.dtype), y.ndim)


def _bias_add_fwd(y, bias):
    return bias_add(y, bias), bias


def _bias_add_bwd(bias, g):
    return g, channel_sum(g).astype(bias.dtype)


bias_add.defvjp(_bias_add_fwd, _bias_add_bwd)


def normalize(x: jax.Array, mean: jax.Array, multiplier: jax.Array, bias: jax.Array) -> jax.Array:
    """(x - mean) * multiplier + bias per channel, in float32, returned in x's dtype."""
    n = x.ndim
    return ((x.astype(jnp.float32) - _bcast(mean, n)) * _bcast(multiplier, n) + _bcast(bias, n)).astype(x.dtype)


def _stats(x: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
    """(mean, E[x²]) over all but the last axis — and over the devices of `axis_name` when given."""
    x32 = x.astype(jnp.float32)
    sums = jnp.stack([channel_sum(x32), channel_sum(x32 * x32)])
    count = x.size // x.shape[-1]
    if axis_name is not None:
        sums = lax.psum(sums, axis_name)
        count = count * lax.psum(1, axis_name)
    return sums[0] / count, sums[1] / count


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
               axis_name: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode BatchNorm over the last axis: `(y, mean, var)` with the batch's float32 statistics.

    `y = (x - mean) / sqrt(var + epsilon) * scale + bias` in float32, returned in `x.dtype`; `var` is
    E[x²] - mean² clipped at 0 (Flax's `use_fast_variance`). With `axis_name` (inside pmap) the statistics
    are over the whole batch of that axis, and so are the backward sums. Gradients flow through all three
    outputs; the backward pass makes two `channel_sum`s, like the forward.
    """
    return _batch_norm_fwd(x, scale, bias, epsilon, axis_name)[0]


def _batch_norm_fwd(x, scale, bias, epsilon, axis_name):
    mean, mean_sq = _stats(x, axis_name)
    var = jnp.maximum(mean_sq - mean * mean, 0.0)
    inv = lax.rsqrt(var + epsilon)
    y = normalize(x, mean, inv * scale, bias)
    return (y, mean, var), (x, scale, bias, mean, inv)


def _batch_norm_bwd(epsilon, axis_name, residuals, cotangents):
    x, scale, bias, mean, inv = residuals
    dy, dmean, dvar = cotangents
    n = x.ndim
    centred = x.astype(jnp.float32) - _bcast(mean, n)
    xhat = centred * _bcast(inv, n)
    dy32 = dy.astype(jnp.float32)
    dbias = channel_sum(dy32)
    dscale = channel_sum(dy32 * xhat)
    # The statistics' gradients need the sums over every device that shares them; the parameters' stay local
    # (the train step averages parameter gradients over devices itself).
    sums, count = jnp.stack([dbias, dscale, dmean, dvar]), x.size // x.shape[-1]
    if axis_name is not None:
        sums, count = lax.psum(sums, axis_name), count * lax.psum(1, axis_name)
    g_bias, g_scale, g_mean, g_var = sums / count
    dx = (_bcast(scale * inv, n) * (dy32 - _bcast(g_bias, n) - xhat * _bcast(g_scale, n))
          + _bcast(g_mean, n) + 2.0 * _bcast(g_var, n) * centred)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def batch_norm_reference(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                         axis_name: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`batch_norm` written with `jnp` reductions and differentiated automatically (the reference)."""
    axes = tuple(range(x.ndim - 1))
    x32 = x.astype(jnp.float32)
    mean, mean_sq = jnp.mean(x32, axes), jnp.mean(x32 * x32, axes)
    if axis_name is not None:
        mean, mean_sq = lax.pmean(mean, axis_name), lax.pmean(mean_sq, axis_name)
    var = jnp.maximum(mean_sq - mean * mean, 0.0)
    return normalize(x, mean, lax.rsqrt(var + epsilon) * scale, bias), mean, var
