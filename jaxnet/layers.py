"""Flax layers over jaxnet ops, so models take the convolution as a parameter: `conv=partial(Conv, impl=...)`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxnet.errors import ConfigError, check_sizes
from jaxnet.ops import channel as channel_ops
from jaxnet.ops import conv as conv_ops

# A constructor of Flax modules (a class or a partial of one): how models take their conv and norm layers.
ModuleDef = Callable[..., nn.Module]


class Conv(nn.Module):
    """Drop-in for `flax.linen.Conv` (2-D, NHWC) that computes with `jaxnet.ops.conv2d(impl=...)`.

    Parameter names ("kernel" (KH, KW, C // groups, features), "bias" (features,)), shapes and
    initialisers are those of `nn.Conv`, so checkpoints and initial values are interchangeable.
    `dtype` is the compute dtype (inputs and params are cast to it); params are stored in `param_dtype`.
    """

    features: int
    kernel_size: int | Sequence[int]  # an int k: k × k (this conv is 2-D only)
    strides: int | Sequence[int] = 1
    padding: conv_ops.Padding = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_size = self.kernel_size if isinstance(self.kernel_size, Sequence) else (self.kernel_size,) * 2
        check_sizes("Conv", features=self.features, kernel_size=kernel_size)
        if len(kernel_size) != 2:
            raise ConfigError(f"Conv is 2-D: kernel_size must be an int or (KH, KW), got {self.kernel_size!r}")
        kh, kw = kernel_size
        in_features = x.shape[-1]
        if in_features % self.feature_group_count:
            raise ConfigError(
                f"Conv: {in_features} input channels do not divide into {self.feature_group_count} groups")
        kernel = self.param("kernel", self.kernel_init,
                            (kh, kw, in_features // self.feature_group_count, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv_ops.conv2d(x, kernel, strides=self.strides, padding=self.padding, dilation=self.kernel_dilation,
                            groups=self.feature_group_count, impl=self.impl)
        return y if bias is None else channel_ops.bias_add(y, bias)


class BatchNorm(nn.Module):
    """Drop-in for `flax.linen.BatchNorm` over the last axis whose training path is `jaxnet.ops.batch_norm`.

    Same fields (those models use), variable names ("params": scale, bias; "batch_stats": mean, var),
    initialisers, running-average rule and float32 statistics as `nn.BatchNorm`, so checkpoints are
    interchangeable; faster on CPU, where Flax's autodiffed statistics become slow column reductions
    (see `jaxnet.ops.channel`). The output is computed in float32 and returned in `dtype` (default: the
    promoted type of `x` and the parameters). Inference uses the running averages.
    """

    use_running_average: bool | None = None
    axis_name: str | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = nn.initializers.zeros_init()
    scale_init: Any = nn.initializers.ones_init()

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(features, jnp.float32))
        scale = (self.param("scale", self.scale_init, features, self.param_dtype) if self.use_scale
                 else jnp.ones(features, jnp.float32))
        bias = (self.param("bias", self.bias_init, features, self.param_dtype) if self.use_bias
                else jnp.zeros(features, jnp.float32))
        dtype = nn.dtypes.canonicalize_dtype(x, *([scale] if self.use_scale else []),
                                             *([bias] if self.use_bias else []), dtype=self.dtype)
        x = x.astype(jnp.promote_types(x.dtype, dtype))  # y is rounded once, to the wider of the two
        if use_running_average:
            y = channel_ops.normalize(x, ra_mean.value, jax.lax.rsqrt(ra_var.value + self.epsilon) * scale, bias)
            return y.astype(dtype)
        # At init the pmap axis does not exist yet (as in Flax); the running averages keep their initial values.
        axis_name = None if self.is_initializing() else self.axis_name
        y, mean, var = channel_ops.batch_norm(x, scale, bias, self.epsilon, axis_name)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y.astype(dtype)


def _span(size: int, window: int) -> int:
    """Extent along one axis of the strided slice that holds one element of each of the `size // window` windows."""
    return max(window * (size // window - 1) + 1, 0)


def _windows(x: jax.Array, window: int) -> list[jax.Array]:
    """The `window`² strided slices of NHWC `x` whose elementwise max is the pool, offsets in row-major order."""
    n, h, w, c = x.shape
    return [lax.slice(x, (0, i, j, 0), (n, i + _span(h, window), j + _span(w, window), c), (1, window, window, 1))
            for i in range(window) for j in range(window)]


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x: jax.Array, window: int) -> jax.Array:
    """Non-overlapping `window`×`window` max-pool (stride = window, VALID) of NHWC `x`.

    Same values and gradient as `nn.max_pool(x, (w, w), strides=(w, w))` — a tie's gradient goes to the first
    maximum in row-major window order, as there and in PyTorch — but computed as the elementwise max of the
    window's strided slices, and the gradient as one elementwise pass: no select-and-scatter (slow on XLA's
    CPU backend) and no window reduction. Per (fwd + bwd) call on a (512, 15, 15, 256) float32 input: 33 ms
    against 127 ms for a reshape + max with JAX's autodiff, 2026-11-30 (Xeon). Computes in `x`'s dtype;
    in bfloat16 XLA's CPU backend is faster pooling a float32 copy (FastNet does). Reverse mode only (a custom
    VJP, like jaxnet's BatchNorm): a custom JVP, whose transpose JAX derives, made the FastNet b512 bf16 step
    7–19 % slower; for forward mode (`jax.jvp`, `jax.jacfwd`) use `nn.max_pool`. Its ops are named `max_pool` in
    HLO metadata and profiles, forward and backward.
    """
    with jax.named_scope("max_pool"):
        return functools.reduce(jnp.maximum, _windows(x, window))


def _max_pool_fwd(x, window):
    y = max_pool(x, window)
    return y, (x, y)


@jax.named_scope("max_pool")
def _max_pool_bwd(window, residuals, dy):
    x, y = residuals
    h, w = x.shape[1:3]
    zero = jnp.zeros((), dy.dtype)
    taken = jnp.zeros(y.shape, bool)
    shares = []
    for offset, slice_ in enumerate(_windows(x, window)):
        i, j = divmod(offset, window)
        first = (slice_ == y) & ~taken
        taken = taken | first
        # This offset's share, put back with interior padding at positions (i + window·a, j + window·b).
        shares.append(lax.pad(jnp.where(first, dy, zero), zero,
                              ((0, 0, 0), (i, h - i - _span(h, window), window - 1),
                               (j, w - j - _span(w, window), window - 1), (0, 0, 0))))
    return (functools.reduce(jnp.add, shares).astype(x.dtype),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
