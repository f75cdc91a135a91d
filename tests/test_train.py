"""train_step / eval_step: learning, purity, determinism, one compile, donation, any model, input checks."""

from functools import partial

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet
from jaxnet import models, train

N, SIZE, CLASSES = 64, 16, 10


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return {"image": rng.integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8),
            "label": rng.integers(0, CLASSES, (N,), dtype=np.int32)}


def _state(model=None, tx=None, seed=0):
    model = model or models.ResNetTiny(num_classes=CLASSES)
    return train.create_train_state(model, jax.random.key(seed), jnp.zeros((1, SIZE, SIZE, 3)),
                                    tx or optax.adam(1e-2))


def test_tiny_resnet_overfits_64_images(data):
    step = jaxnet.jit_train_step(num_classes=CLASSES)
    state = _state()
    losses, accs = [], []
    for _ in range(150):
        state, m = step(state, data)
        losses.append(m["loss"])
        accs.append(m["accuracy"])
    losses, accs = np.asarray(losses), np.asarray(accs)
    assert losses[-5:].mean() < 0.5 * losses[:5].mean()
    assert accs[-1] >= 0.9, f"train accuracy {accs[-1]:.2f} after 150 steps"
    ev = jaxnet.jit_eval_step()(state, data)
    assert float(ev["accuracy"]) >= 0.9 and int(ev["count"]) == N


def _snapshot(tree):
    """Host copies of every leaf (typed PRNG keys as their raw data)."""
    def copy(x):
        is_key = hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
        return np.array(jax.random.key_data(x) if is_key else x)
    return jax.tree.map(copy, tree)


def test_train_step_is_pure_and_deterministic(data):
    state = _state()
    before = _snapshot((state, dict(data)))
    s1, m1 = train.train_step(state, data, label_smoothing=0.1)
    s2, m2 = train.train_step(state, data, label_smoothing=0.1)
    chex.assert_trees_all_equal(_snapshot((state, dict(data))), before)
    chex.assert_trees_all_equal(_snapshot((s1, m1)), _snapshot((s2, m2)))
    assert int(s1.step) == 1 and int(state.step) == 0
    assert not np.array_equal(s1.batch_stats["norm_init"]["mean"], state.batch_stats["norm_init"]["mean"])


@pytest.mark.parametrize("impl", [None, "onednn"])  # the models' default conv, and oneDNN's FFI calls
def test_jitted_step_compiles_once_and_donates(data, impl):
    chex.clear_trace_counter()  # chex counts traces of train.train_step across the parameters
    step = jaxnet.jit_train_step(chex.assert_max_traces(train.train_step, n=1), lr_fn=train.constant(1e-2))
    state = _state(models.ResNetTiny(num_classes=CLASSES, conv=partial(jaxnet.Conv, impl=impl)) if impl else None)
    for _ in range(3):
        old = state
        state, metrics = step(state, data)
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old.params)), "input state was not donated"
    assert int(state.step) == 3
    chex.assert_trees_all_close(metrics["lr"], 1e-2)


def test_lookahead_averages_params_and_bn_stats_and_ends_on_the_ema(data):
    """The jitted step with a Lookahead (compiled once) against the same steps without one, synced by hand."""
    lookahead = train.Lookahead(every=2, decay_fn=lambda step: step / 10, final_step=5)
    tx = optax.sgd(0.05, momentum=0.9)
    model = models.ResNetTiny(num_classes=CLASSES)
    state = train.create_train_state(model, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), tx, lookahead=lookahead)
    ref = _state(model, tx)
    ema = _snapshot({"params": ref.params, "batch_stats": ref.batch_stats})
    chex.assert_trees_all_equal(_snapshot(state.ema), ema)
    step = jaxnet.jit_train_step(chex.assert_max_traces(train.train_step, n=1))
    for s in range(1, 6):
        state, _ = step(state, data)
        ref, _ = train.train_step(ref, data)
        model_now = _snapshot({"params": ref.params, "batch_stats": ref.batch_stats})
        if s % 2 == 0:
            ema = jax.tree.map(lambda e, m: e + (1 - s / 10) * (m - e), ema, model_now)
        if s % 2 == 0 or s == 5:
            ref = ref.replace(params=ema["params"], batch_stats=ema["batch_stats"])
        chex.assert_trees_all_close(_snapshot({"params": state.params, "batch_stats": state.batch_stats}),
                                    _snapshot({"params": ref.params, "batch_stats": ref.batch_stats}), rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(_snapshot(state.ema), ema, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(_snapshot({"params": state.params, "batch_stats": state.batch_stats}),
                                _snapshot(state.ema))


def test_with_params_restarts_the_optimizer_and_the_ema():
    tx = optax.sgd(0.1, momentum=0.9)
    state = train.create_train_state(models.ResNetTiny(num_classes=CLASSES), jax.random.key(0),
                                     jnp.zeros((1, SIZE, SIZE, 3)), tx, lookahead=train.Lookahead(5, lambda s: 0.5))
    params = jax.tree.map(lambda p: p + 1, state.params)
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state)).with_params(params)
    chex.assert_trees_all_equal(state.ema["params"], params)
    chex.assert_trees_all_equal(state.opt_state, tx.init(params))


@pytest.mark.parametrize("kwargs", [{"every": 0}, {"every": 2.5}, {"every": 5, "final_step": 0}])
def test_lookahead_rejects_bad_periods(kwargs):
    with pytest.raises(ValueError, match="must be a positive integer"):
        train.Lookahead(decay_fn=lambda step: 0.5, **kwargs)


def test_user_model_without_batchnorm_and_with_dropout(data):
    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
            x = nn.Dropout(0.1, deterministic=not train)(x)
            return nn.Dense(CLASSES)(x)

    state = _state(Mlp())
    assert state.batch_stats == {}
    step = jaxnet.jit_train_step()
    first = None
    for _ in range(60):
        state, m = step(state, data)
        first = first if first is not None else float(m["loss"])
    assert float(m["loss"]) < 0.5 * first
    assert float(jaxnet.jit_eval_step()(state, data)["accuracy"]) > 0.9


def test_eval_mask_counts_only_real_rows(data):
    state = _state()
    full = train.eval_step(state, data)
    half = {k: v[:40] for k, v in data.items()}
    padded = {"image": data["image"], "label": data["label"], "mask": np.arange(N) < 40}
    chex.assert_trees_all_close(train.eval_step(state, padded), train.eval_step(state, half), rtol=1e-6)
    merged = train.merge_metrics([train.eval_step(state, half), train.eval_step(state, {k: v[40:] for k, v in data.items()})])
    assert merged["count"] == N
    np.testing.assert_allclose(merged["accuracy"], float(full["accuracy"]), rtol=1e-6)
    np.testing.assert_allclose(merged["loss"], float(full["loss"]), rtol=1e-5)


@pytest.mark.parametrize("change,message", [
    (lambda b: {"image": b["image"][0], "label": b["label"]}, r"must be \(N, H, W, C\), got shape \(16, 16, 3\)"),
    (lambda b: {"image": b["image"].astype(np.int32), "label": b["label"]}, "float or uint8, got dtype int32"),
    (lambda b: {"image": b["image"][:0], "label": b["label"][:0]}, "batch is empty"),
    (lambda b: {"image": b["image"], "label": b["label"][:10]}, "64 images but 10 labels"),
    (lambda b: {"image": b["image"], "label": b["label"] + 5}, r"labels must be in \[0, 10\), got values in \[5, 14\]"),
    (lambda b: {"image": b["image"], "label": b["label"] - 1}, r"labels must be in \[0, 10\), got values in \[-1"),
    (lambda b: {"image": b["image"], "label": b["label"].astype(np.float32)}, r"\(N,\) integers"),
    (lambda b: {"image": b["image"][:, :8], "label": b["label"]}, r"must be \(N, 16, 16, 3\), got shape \(64, 8, 16, 3\)"),
    (lambda b: {"images": b["image"], "label": b["label"]}, "keys 'image' and 'label'"),
], ids=["rank", "dtype", "empty", "count", "label_high", "label_negative", "label_dtype", "image_shape", "keys"])
def test_bad_input_is_a_one_line_value_error(data, change, message):
    step = jaxnet.jit_train_step(num_classes=CLASSES, image_shape=(SIZE, SIZE, 3))
    with pytest.raises(ValueError, match=message) as err:
        step(_state(), change(data))
    assert "\n" not in str(err.value)


def test_sgd_decays_kernels_only():
    params = {"conv": {"kernel": jnp.ones((3, 3, 1, 1)), "bias": jnp.ones((1,))}, "bn": {"scale": jnp.ones((1,))}}
    tx = train.sgd(0.1, momentum=0.9, weight_decay=0.5)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    chex.assert_trees_all_close(updates["conv"]["kernel"], -0.05 * params["conv"]["kernel"])
    chex.assert_trees_all_equal(updates["conv"]["bias"], jnp.zeros((1,)))
    chex.assert_trees_all_equal(updates["bn"]["scale"], jnp.zeros((1,)))


def test_schedules():
    lr = train.piecewise_linear([0, 10, 100], [0.2, 1.0, 0.0])
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(55), lr(100), lr(200)], [0.2, 0.6, 1.0, 0.5, 0.0, 0.0],
                               atol=1e-6)
    cos = train.warmup_cosine(1.0, total_steps=100, warmup_steps=10)
    np.testing.assert_allclose([cos(0), cos(10), cos(55), cos(100)], [0.0, 1.0, 0.5, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="increasing steps"):
        train.piecewise_linear([10, 0], [1.0, 0.0])
