"""jaxnet.optim: parameter roles from structure (not names), airbench's SGD against PyTorch's update rule,
and the learning rate reported from the optimizer's own state."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnet import models, optim, train


def _params(model, size=8):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])


def test_roles_find_every_norm_layer_whatever_its_name():
    roles = optim.param_roles(_params(models.ResNetTiny()))
    assert roles["norm_init"] == {"scale": "norm", "bias": "norm"}  # named norm_init, not BatchNorm_*
    assert roles["BasicBlock_1"]["norm_proj"] == {"scale": "norm", "bias": "norm"}
    assert roles["BasicBlock_1"]["conv_proj"] == {"kernel": "kernel"}
    assert roles["head"] == {"kernel": "kernel", "bias": "bias"}

    class WithLayerNorm(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return nn.Dense(3, name="out")(nn.LayerNorm(name="ln")(nn.Conv(4, (3, 3), name="c")(x)))

    roles = optim.param_roles(_params(WithLayerNorm()))
    assert roles == {"c": {"kernel": "kernel", "bias": "bias"}, "ln": {"scale": "norm", "bias": "norm"},
                     "out": {"kernel": "kernel", "bias": "bias"}}
    assert optim.decay_mask(_params(WithLayerNorm()))["c"] == {"kernel": True, "bias": False}


def test_airbench_norm_group_of_a_resnet_includes_its_stem_and_projection_norms():
    params = _params(models.ResNetTiny())
    tx = optim.airbench_sgd(10.0, optim.constant(1.0), batch_size=64, norm_lr_mult=64.0)
    grads = jax.tree.map(np.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    kernel = np.abs(updates["conv_init"]["kernel"]).max()
    for path in (("norm_init",), ("BasicBlock_1", "norm_proj"), ("BasicBlock_0", "BatchNorm_0")):
        leaf = updates
        for key in path:
            leaf = leaf[key]
        np.testing.assert_allclose(np.abs(leaf["bias"]), 64 * kernel, rtol=1e-6, err_msg=str(path))
    np.testing.assert_allclose(np.abs(updates["head"]["bias"]), kernel, rtol=1e-6)


def test_airbench_sgd_is_pytorchs_nesterov_sgd_on_the_summed_loss():
    """Three steps against PyTorch's SGD rule written out: d = g_sum + wd_g·p; buf = m·buf + d;
    p -= lr_g·s(t)·(d + m·buf), with lr_g, wd_g per group as airbench94 sets them."""
    lr, wd, m, batch, mult = 11.5, 0.0153, 0.85, 32, 64.0
    schedule = optim.piecewise_linear([0, 2], [0.5, 1.0])
    params = {"conv": {"kernel": np.full((3, 3, 2, 2), 0.3, np.float32)},
              "bn": {"bias": np.full((2,), -0.2, np.float32)}}
    tx = optim.airbench_sgd(lr, schedule, batch_size=batch, momentum=m, weight_decay=wd, norm_lr_mult=mult)
    kilostep = 1024 * (1 + 1 / (1 - m))
    lr_example = lr / kilostep
    ref = {k: {n: v.astype(np.float64) for n, v in d.items()} for k, d in params.items()}
    buf = {k: {n: np.zeros_like(v) for n, v in d.items()} for k, d in ref.items()}
    state, p = tx.init(params), params
    rng = np.random.default_rng(0)
    for t in range(3):
        grads = {k: {n: rng.normal(size=v.shape).astype(np.float32) for n, v in d.items()} for k, d in params.items()}
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
        np.testing.assert_allclose(train.learning_rate(state), lr_example * batch * float(schedule(t)), rtol=1e-6)
        for k, group_mult in (("conv", 1.0), ("bn", mult)):
            lr_g = lr_example * group_mult
            for n in ref[k]:
                d = batch * grads[k][n] + (wd * batch / kilostep / lr_g) * ref[k][n]
                buf[k][n] = m * buf[k][n] + d
                ref[k][n] = ref[k][n] - lr_g * float(schedule(t)) * (d + m * buf[k][n])
        for k in ref:
            for n in ref[k]:
                np.testing.assert_allclose(p[k][n], ref[k][n], rtol=1e-5, atol=1e-6, err_msg=f"{k}/{n} step {t}")


@pytest.mark.parametrize("make", [lambda lr: optim.sgd(lr), lambda lr: optim.adamw(lr)], ids=["sgd", "adamw"])
def test_optimizers_report_their_scheduled_learning_rate(make):
    schedule = optim.warmup_cosine(0.5, total_steps=10, warmup_steps=2)
    params = {"w": np.ones((2, 2), np.float32)}
    tx = make(schedule)
    state = tx.init(params)
    for t in range(4):
        _, state = tx.update(params, state, params)
        np.testing.assert_allclose(train.learning_rate(state), schedule(t), rtol=1e-6)
    assert train.learning_rate(optax.adam(1e-3).init(params)) is None  # nothing injected: nothing reported
