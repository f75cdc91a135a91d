"""The per-channel ops (jaxnet.ops.channel) and jaxnet.layers.BatchNorm equal their references: jnp reductions
differentiated automatically, and Flax's nn.BatchNorm — values, gradients, running statistics, pmap."""

from functools import partial

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet import layers, parallel
from jaxnet.ops import channel

SHAPES = [(4, 6, 5, 3), (7, 8)]
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _x(shape, dtype=jnp.float32, key=0):
    return (3.0 * jax.random.normal(jax.random.key(key), shape) + 1.5).astype(dtype)


def _params(c):
    return jnp.linspace(0.5, 1.5, c), jnp.linspace(-0.2, 0.3, c)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_channel_sum_matches_jnp_sum(shape, dtype):
    x = _x(shape, dtype)
    out = jax.jit(channel.channel_sum)(x)
    chex.assert_type(out, jnp.float32)
    np.testing.assert_allclose(out, jnp.sum(x.astype(jnp.float32), axis=tuple(range(len(shape) - 1))),
                               rtol=1e-5, atol=1e-4)


def test_channel_sum_lowers_to_a_dot_on_cpu():
    hlo = jax.jit(channel.channel_sum).lower(_x((4, 6, 5, 3))).compile().as_text()
    assert " dot(" in hlo and " reduce(" not in hlo


def test_bias_add_matches_autodiff():
    y, b = _x((4, 6, 5, 3)), jnp.array([0.1, -0.2, 0.3])
    probe = _x((4, 6, 5, 3), key=1)
    ref = jax.value_and_grad(lambda y, b: jnp.sum(probe * (y + b.reshape(1, 1, 1, -1))), argnums=(0, 1))(y, b)
    out = jax.jit(jax.value_and_grad(lambda y, b: jnp.sum(probe * channel.bias_add(y, b)), argnums=(0, 1)))(y, b)
    chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-4)


def _vjp(fn, x, scale, bias, probes):
    """Outputs of fn and the gradient of a loss touching all three (y, mean, var) in x, scale and bias."""
    def loss(x, scale, bias):
        y, mean, var = fn(x, scale, bias)
        return jnp.sum(probes[0] * y.astype(jnp.float32)) + jnp.sum(probes[1] * mean) + jnp.sum(probes[2] * var)
    return fn(x, scale, bias), jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batch_norm_matches_reference(shape, dtype):
    x, (scale, bias) = _x(shape, dtype), _params(shape[-1])
    probes = (_x(shape, key=1), _x(shape[-1:], key=2), _x(shape[-1:], key=3))
    ref = _vjp(partial(channel.batch_norm_reference, epsilon=1e-5), x, scale, bias, probes)
    out = jax.jit(partial(_vjp, partial(channel.batch_norm, epsilon=1e-5), probes=probes))(x, scale, bias)
    chex.assert_trees_all_equal_dtypes(out, ref)
    chex.assert_trees_all_close(out, ref, **TOL[dtype])


def test_batch_norm_over_a_pmap_axis_equals_one_device_on_the_whole_batch():
    """Statistics and every gradient over 8 devices' shards equal those of one device holding all of them."""
    n = jax.device_count()
    x, (scale, bias) = _x((2 * n, 3, 3, 4)), _params(4)
    probes = (_x(x.shape, key=1), _x((4,), key=2), _x((4,), key=3))
    whole = _vjp(partial(channel.batch_norm, epsilon=1e-5), x, scale, bias, probes)

    def shard(x, y_probe):
        # Each device's loss sees the statistics' probes once in n; the gradients are summed over devices.
        return _vjp(partial(channel.batch_norm, epsilon=1e-5, axis_name="d"), x, scale, bias,
                    (y_probe, probes[1] / n, probes[2] / n))

    split = lambda a: a.reshape(n, -1, *a.shape[1:])  # noqa: E731
    (y, mean, var), (dx, dscale, dbias) = jax.pmap(shard, axis_name="d")(split(x), split(probes[0]))
    (y_ref, mean_ref, var_ref), (dx_ref, dscale_ref, dbias_ref) = whole
    chex.assert_trees_all_close((y.reshape(x.shape), mean[0], var[0], dx.reshape(x.shape)),
                                (y_ref, mean_ref, var_ref, dx_ref), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close((dscale.sum(0), dbias.sum(0)), (dscale_ref, dbias_ref), rtol=1e-5, atol=1e-5)


class _Net(nn.Module):
    """A conv then a BatchNorm of the injected kind: exercises both paths and the running statistics. The conv
    has no bias: a bias before BatchNorm has a zero gradient in exact arithmetic, so its computed one is noise."""
    norm: type
    dtype: object = None
    use_scale: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(5, (3, 3), use_bias=False, dtype=self.dtype)(x)
        return self.norm(use_running_average=not train, momentum=0.8, epsilon=1e-3, dtype=self.dtype,
                         use_scale=self.use_scale)(x).astype(jnp.float32)


def _layer_step(model, variables, x):
    """Loss, parameter gradients, updated running statistics and inference output after the update."""
    def loss(params):
        y, updates = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), updates
    (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    return value, grads, updates, model.apply({**variables, **updates}, x, train=False)


def _layer_variables(x, use_scale=True):
    variables = _Net(nn.BatchNorm, use_scale=use_scale).init(jax.random.key(0), x, train=False)
    return {**variables, "params": jax.tree.map(lambda p: p * 1.3 + 0.1, variables["params"])}


@pytest.mark.parametrize("use_scale", [True, False], ids=["scale", "no-scale"])
def test_batch_norm_layer_is_a_drop_in_for_flax(use_scale):
    x = _x((4, 6, 6, 3))
    ours, theirs = (_Net(norm, use_scale=use_scale) for norm in (layers.BatchNorm, nn.BatchNorm))
    chex.assert_trees_all_equal_structs(ours.init(jax.random.key(0), x, train=False),
                                        theirs.init(jax.random.key(0), x, train=False))
    variables = _layer_variables(x, use_scale)
    out, ref = (jax.jit(partial(_layer_step, model))(variables, x) for model in (ours, theirs))
    chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-4)  # gradients sum over a whole conv output


def test_batch_norm_layer_in_bfloat16_is_as_accurate_as_flax():
    """In bf16 both differ from float32 by rounding; ours by no more than Flax's (every leaf)."""
    x = _x((4, 6, 6, 3))
    variables = _layer_variables(x)
    exact = jax.jit(partial(_layer_step, _Net(nn.BatchNorm)))(variables, x)
    errors = [jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), out, exact)
              for out in (jax.jit(partial(_layer_step, _Net(norm, jnp.bfloat16)))(variables, x)
                          for norm in (layers.BatchNorm, nn.BatchNorm))]
    jax.tree.map(lambda ours, theirs: np.testing.assert_array_less(ours, 1.25 * theirs + 1e-6), *errors)
    assert max(jax.tree.leaves(errors[0])) > 0  # the bf16 path really rounds


def test_batch_norm_layer_under_pmap_matches_flax():
    """With `axis_name` the layer's statistics and gradients are global, as Flax's are."""
    x = _x((jax.device_count() * 2, 4, 4, 3))
    ours, theirs = (_Net(partial(norm, axis_name=parallel.AXIS)) for norm in (layers.BatchNorm, nn.BatchNorm))
    variables = theirs.init(jax.random.key(0), x[:2], train=False)

    def step(model, x):
        def loss(params):
            y, updates = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.mean(jnp.sin(y)), updates
        (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        return jax.lax.pmean((value, grads), parallel.AXIS), updates

    shards = x.reshape(jax.device_count(), 2, *x.shape[1:])
    out, ref = (jax.pmap(partial(step, m), axis_name=parallel.AXIS)(shards) for m in (ours, theirs))
    chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-5)
