"""jaxnet.optim: parameter roles from structure (not names), airbench's SGD against PyTorch's update rule,
and the learning rate reported from the optimizer's own state."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnet import models, optim, train
from jaxnet.errors import ConfigError


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


def _newton_schulz_reference(g: np.ndarray, steps: int) -> np.ndarray:
    """The quintic iteration as the paper writes it, float64, on the matrix as given (PyTorch's (out, fan-in))."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (np.linalg.norm(g) + 1e-7)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


def _torch_layout_orthogonalized(kernel_hwio: np.ndarray, steps: int) -> np.ndarray:
    """The record's orthogonalisation of a conv filter: PyTorch's OIHW weight as (O, I·H·W), back to HWIO."""
    oihw = kernel_hwio.transpose(3, 2, 0, 1).astype(np.float64)
    out = _newton_schulz_reference(oihw.reshape(len(oihw), -1), steps).reshape(oihw.shape)
    return out.transpose(2, 3, 1, 0)


@pytest.mark.parametrize("shape", [(3, 3, 24, 64), (3, 3, 256, 64), (3, 3, 8, 8), (64, 10)])
def test_orthogonalize_matches_the_newton_schulz_equations_in_the_records_layout(shape):
    kernel = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    if len(shape) == 4:
        want = _torch_layout_orthogonalized(kernel, 3)
    else:  # a dense (in, out) kernel: PyTorch's Linear weight is (out, in)
        want = _newton_schulz_reference(kernel.T.astype(np.float64), 3).T
    got32 = optim.orthogonalize(jnp.asarray(kernel), steps=3, dtype=jnp.float32)
    np.testing.assert_allclose(got32, want, rtol=2e-4, atol=2e-5)
    got16 = optim.orthogonalize(jnp.asarray(kernel), steps=3)  # bf16 iterations, as the record
    assert got16.dtype == jnp.float32
    # bf16 keeps 8 bits of mantissa through three iterations with |a|, |b| > 3: a few percent (the record's own error)
    assert np.linalg.norm(got16 - want) / np.linalg.norm(want) < 0.06
    singular = np.linalg.svd(np.asarray(got32).reshape(-1, shape[-1]), compute_uv=False)
    assert singular.min() > 0.3 and singular.max() < 1.3, singular  # ≈ orthogonal: S' ∈ ~[0.5, 1.5] (3 steps)


def test_airbench_muon_is_the_records_update_written_out():
    """Three steps against airbench94_muon's rules written out (float64, the iteration in float32):
    filters: buf = m·buf + g; u = g + m·buf; p ← p·√O/‖p‖ − lr·s(t)·NS(u); biases and head: PyTorch SGD on
    the summed loss with decay wd/lr_g; the stem's kernel frozen, its bias at lr_b·(1 − t/T_w) until T_w."""
    batch, m_f, m, wd, lr_f, lr_b, lr_h, t_w = 16, 0.6, 0.85, 2e-6, 0.24, 0.053, 0.67, 2
    schedule = optim.piecewise_linear([0, 3], [1.0, 0.0])
    rng = np.random.default_rng(1)
    params = {"stem": {"kernel": rng.normal(size=(2, 2, 3, 4)), "bias": rng.normal(size=(4,))},
              "conv": {"kernel": rng.normal(size=(3, 3, 4, 6))}, "bn": {"bias": rng.normal(size=(6,))},
              "head": {"kernel": rng.normal(size=(6, 10))}}
    params = jax.tree.map(lambda x: x.astype(np.float32), params)
    tx = optim.airbench_muon(schedule, batch_size=batch, ns_dtype=jnp.float32, whiten_bias_steps=t_w)
    ref = jax.tree.map(lambda x: x.astype(np.float64), params)
    buf = jax.tree.map(np.zeros_like, ref)
    state, p = tx.init(params), params
    for t in range(3):
        grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
        s = float(schedule(t))
        np.testing.assert_allclose(train.learning_rate(state), lr_f * s, rtol=1e-6)
        g = grads["conv"]["kernel"].astype(np.float64)
        buf["conv"]["kernel"] = m_f * buf["conv"]["kernel"] + g
        w = ref["conv"]["kernel"]
        w = w * np.sqrt(w.shape[-1]) / np.linalg.norm(w)
        ref["conv"]["kernel"] = w - lr_f * s * _torch_layout_orthogonalized(g + m_f * buf["conv"]["kernel"], 3)
        for (k, n), rate, mult in ((("bn", "bias"), lr_b, s), (("head", "kernel"), lr_h, s),
                                   (("stem", "bias"), lr_b, max(0.0, 1 - t / t_w) if t < t_w else 0.0)):
            d = batch * grads[k][n] + (wd * batch / rate) * ref[k][n]
            buf[k][n] = m * buf[k][n] + d
            ref[k][n] = ref[k][n] - rate * mult * (d + m * buf[k][n])
        for k in ref:
            for n in ref[k]:
                np.testing.assert_allclose(p[k][n], ref[k][n], rtol=2e-4, atol=2e-5, err_msg=f"{k}/{n} step {t}")
    np.testing.assert_array_equal(p["stem"]["kernel"], params["stem"]["kernel"])


def test_renormalize_kernels_only_on_its_period():
    kernel = {"k": jnp.full((3, 3, 2, 4), 5.0)}
    tx = optim.renormalize_kernels(every=2)
    state = tx.init(kernel)
    norms = []
    for _ in range(3):
        updates, state = tx.update(jax.tree.map(jnp.zeros_like, kernel), state, kernel)
        norms.append(float(jnp.linalg.norm(optax.apply_updates(kernel, updates)["k"])))
    np.testing.assert_allclose(norms, [2.0, float(jnp.linalg.norm(kernel["k"])), 2.0], rtol=1e-6)
    with pytest.raises(ValueError, match="needs the params"):
        tx.update(kernel, state)


@pytest.mark.parametrize("make,message", [
    (lambda: optim.sgd(-0.1), r"sgd learning_rate must be > 0 or a schedule \(step → rate\), got -0.1"),
    (lambda: optim.sgd("fast"), "sgd learning_rate must be > 0 or a schedule"),  # was an indexing TypeError at init
    (lambda: optim.sgd(float("nan")), "sgd learning_rate must be a finite number, got nan"),
    (lambda: optim.sgd(float("inf")), "sgd learning_rate must be a finite number, got inf"),
    (lambda: optim.adamw(1e-3, weight_decay=jnp.float32(jnp.inf)), "adamw weight_decay must be a finite number"),
    (lambda: optim.sgd(0.1, momentum=1.0), r"sgd momentum must be in \[0, 1\), got 1.0"),
    (lambda: optim.sgd(0.1, weight_decay=-5e-4), "sgd weight_decay must be >= 0, got -0.0005"),
    (lambda: optim.adamw(jnp.float32(-1.0)), "adamw learning_rate must be > 0 or a schedule"),  # a JAX scalar
    (lambda: optim.adamw(1e-3, b2=1.5), r"adamw b2 must be in \[0, 1\), got 1.5"),
    (lambda: optim.airbench_sgd(11.5, optim.constant(1.0), batch_size=0), "airbench_sgd batch_size must be a positive"),
    (lambda: optim.airbench_sgd(11.5, optim.constant(1.0), batch_size=64, momentum=True), "airbench_sgd momentum"),
    (lambda: optim.airbench_muon(optim.constant(1.0), batch_size=64, renorm_every=0),
     "airbench_muon renorm_every must be a positive integer, got 0"),
    (lambda: optim.airbench_muon(optim.constant(1.0), batch_size=64, head_lr=0.0), "airbench_muon head_lr must be > 0"),
    (lambda: optim.scale_by_muon(0.6, ns_steps=2.5), "scale_by_muon ns_steps must be a positive integer, got 2.5"),
    (lambda: optim.renormalize_kernels(0), "renormalize_kernels every must be a positive integer, got 0"),
    (lambda: optim.warmup_cosine(1.0, 0), "warmup_cosine total_steps must be a positive integer, got 0"),  # optax's
    (lambda: optim.warmup_cosine(1.0, 10, 20), "warmup_cosine warmup_steps 20 leaves none of the 10 steps to decay"),
    (lambda: optim.piecewise_linear([0, float("nan")], [1, 2]), "piecewise_linear needs ≥ 2 points of finite"),
], ids=["sgd_lr", "sgd_lr_str", "sgd_lr_nan", "sgd_lr_inf", "adamw_decay_inf", "sgd_momentum", "sgd_decay",
        "adamw_lr_jax", "adamw_b2", "airbench_batch", "airbench_momentum_bool", "muon_renorm", "muon_head_lr",
        "ns_steps", "renorm_every", "cosine_total_0", "cosine_warmup_all", "piecewise_nan"])
def test_an_optimizer_refuses_a_hyperparameter_out_of_range_in_one_line(make, message):
    """optax takes any of these (a negative rate ascends the loss, momentum 1 never forgets): jaxnet's refuse."""
    with pytest.raises(ConfigError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


def test_an_optimizer_takes_numpy_and_jax_scalars_and_schedules():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
    for tx in (optim.sgd(np.float32(0.1)), optim.sgd(jnp.asarray(0.1)), optim.sgd(optim.constant(0.1)),
               optim.adamw(lambda step: 1e-3, b1=np.float64(0.8))):
        updates, _ = tx.update(params, tx.init(params), params)
        assert all(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))
