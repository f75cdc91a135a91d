"""train_step / eval_step: learning, purity, determinism, one compile, donation, any model and state class
(Flax's own TrainState included), the lookahead EMA, input checks."""

from functools import partial
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fixtures import eight_devices, onednn_platform, require_onednn_bfloat16
from flax.training import train_state as flax_train_state

import jaxnet
from jaxnet import models, optim, parallel, train

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
    s3, m3 = train.train_step(state, data)
    assert float(m3["loss"]) != float(m1["loss"])  # the option reaches the loss
    chex.assert_trees_all_equal(_snapshot((state, dict(data))), before)
    chex.assert_trees_all_equal(_snapshot((s1, m1)), _snapshot((s2, m2)))
    assert int(s1.step) == 1 and int(state.step) == 0
    assert not np.array_equal(s1.batch_stats["norm_init"]["mean"], state.batch_stats["norm_init"]["mean"])


@pytest.mark.parametrize("impl", [None, pytest.param("onednn", marks=onednn_platform)])  # the models' default
# conv, and oneDNN's FFI calls
def test_jitted_step_compiles_once_and_donates(data, impl):
    chex.clear_trace_counter()  # chex counts traces of train.train_step across the parameters
    step = jaxnet.jit_train_step(chex.assert_max_traces(train.train_step, n=1))
    schedule = optim.piecewise_linear([0, 4], [0.01, 0.05])
    model = models.ResNetTiny(num_classes=CLASSES, conv=partial(jaxnet.Conv, impl=impl)) if impl else None
    state = _state(model, optim.sgd(schedule))
    for i in range(3):
        old = state
        state, metrics = step(state, data)
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old.params)), "input state was not donated"
        chex.assert_trees_all_close(metrics["lr"], schedule(i))  # the optimizer's own lr of step i
    assert int(state.step) == 3


def test_lookahead_averages_params_and_bn_stats_and_ends_on_the_ema(data):
    """The jitted step with the lookahead EMA (compiled once) against the same steps without it, synced by hand."""
    tx = optax.sgd(0.05, momentum=0.9)
    model = models.ResNetTiny(num_classes=CLASSES)
    state = train.create_train_state(model, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), tx, ema=True)
    ref = _state(model, tx)
    ema = _snapshot({"params": ref.params, "batch_stats": ref.batch_stats})
    chex.assert_trees_all_equal(_snapshot(state.ema), ema)
    chex.clear_trace_counter()
    step = jaxnet.jit_train_step(chex.assert_max_traces(
        train.lookahead_ema(every=2, decay_fn=lambda step: step / 10, final_step=5), n=1))
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
                                     jnp.zeros((1, SIZE, SIZE, 3)), tx, ema=True)
    params = jax.tree.map(lambda p: p + 1, state.params)
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state)).with_params(params)
    chex.assert_trees_all_equal(state.ema["params"], params)
    chex.assert_trees_all_equal(state.opt_state, tx.init(params))


@pytest.mark.parametrize("kwargs", [{"every": 0}, {"every": 2.5}, {"every": True}, {"every": "4"},
                                    {"every": 5, "final_step": 0}, {"every": 5, "final_step": np.int64(-1)}])
def test_lookahead_rejects_bad_periods(kwargs):
    name = "final_step" if "final_step" in kwargs else "every"
    with pytest.raises(jaxnet.ConfigError, match=f"lookahead_ema {name} must be a positive integer"):
        train.lookahead_ema(decay_fn=lambda step: 0.5, **kwargs)


def test_lookahead_takes_numpy_integers(data):
    """A period computed with NumPy (np.int64) was refused as "not a positive integer" (an isinstance-int test)."""
    step = jax.jit(train.lookahead_ema(every=np.int64(1), decay_fn=lambda step: 0.0, final_step=np.int32(3)))
    state = train.create_train_state(models.ResNetTiny(num_classes=CLASSES), jax.random.key(0),
                                     jnp.zeros((1, SIZE, SIZE, 3)), optax.sgd(0.1), ema=True)
    state, _ = step(state, data)
    chex.assert_trees_all_equal(state.ema["params"], state.params)


def test_lookahead_refuses_a_decay_that_is_not_a_function_of_the_step():
    with pytest.raises(jaxnet.ConfigError, match=r"lookahead decay_fn must be a function of the step .*got 0.9$"):
        train.lookahead_ema(every=2, decay_fn=0.9)  # was "'float' object is not callable" at the first step


@pytest.mark.parametrize("tx", [None, optax.sgd], ids=["none", "a_factory_not_called"])
def test_create_train_state_refuses_a_tx_that_is_not_an_optax_transformation(tx):
    with pytest.raises(jaxnet.ConfigError, match="create_train_state needs an optax GradientTransformation as tx"):
        train.create_train_state(ScalingMlp(), jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3), jnp.uint8), tx)


@pytest.mark.parametrize("make,message", [
    (lambda: (ScalingMlp, jax.random.key(0)),  # was Flax's InvalidInstanceModuleError
     r"needs a linen Module as model, got .*ScalingMlp'> \(the class: make one, ScalingMlp\(...\)\)$"),
    (lambda: (None, jax.random.key(0)), "needs a linen Module as model, got None$"),  # was an AttributeError
    (lambda: (ScalingMlp(), 0), r"needs one PRNG key as rng \(jax.random.key\(seed\)\), got 0$"),  # JAX's TypeError
    (lambda: (ScalingMlp(), jax.random.split(jax.random.key(0))),
     r"needs one PRNG key as rng .*, got an array of shape \(2,\) and dtype key<fry>$"),
], ids=["class", "none", "seed", "two_keys"])
def test_create_train_state_refuses_what_is_not_a_model_or_a_key(make, message):
    model, rng = make()
    with pytest.raises(jaxnet.ConfigError, match="^create_train_state " + message):
        train.create_train_state(model, rng, jnp.zeros((1, SIZE, SIZE, 3), jnp.uint8), optax.sgd(0.1))


def test_create_train_state_takes_a_raw_prng_key():
    raw, typed = (train.create_train_state(ScalingMlp(), key, jnp.zeros((1, SIZE, SIZE, 3), jnp.uint8),
                                           optax.sgd(0.1)) for key in (jax.random.PRNGKey(0), jax.random.key(0)))
    chex.assert_trees_all_equal(raw.params, typed.params)


def test_select_hardest_score_size_of_an_input_that_is_not_an_image_is_one_line(data):
    flat = {"image": data["image"].reshape(N, -1), "label": data["label"]}
    step = jax.jit(train.select_hardest(fraction=0.5, score_size=8))
    with pytest.raises(jaxnet.DataError, match=r"select_hardest score_size resizes images: it needs \(N, H, W, C\) "
                                               r"input, got shape \(64, 768\)"):
        step(_flax_state(ScalingMlp()), flat)


def test_lookahead_needs_a_state_with_an_ema(data):
    with pytest.raises(jaxnet.ConfigError, match=r"create_train_state\(..., ema=True\)"):
        train.lookahead_ema(every=2, decay_fn=lambda step: 0.5)(_state(), data)


def _hardest_by_hand(state, batch, k, axis=None, score_size=None):
    """The k images of highest cross-entropy under the model in training mode (batch statistics), picked by
    NumPy; with `axis`, k from each of that many equal shares of the batch (pmap's devices); with `score_size`,
    scored on the uint8 images resized to that side."""
    stats = getattr(state, "batch_stats", None)
    variables = {"params": state.params, **({"batch_stats": stats} if stats else {})}
    images = jnp.asarray(batch["image"])
    if score_size:
        small = jax.image.resize(images.astype(jnp.float32), (len(images), score_size, score_size, 3), "linear")
        images = jnp.clip(jnp.round(small), 0, 255).astype(jnp.uint8)
    logits = state.apply_fn(variables, images, train=True, mutable=["batch_stats"])[0]
    log_p = np.asarray(jax.nn.log_softmax(logits))
    losses = -log_p[np.arange(len(log_p)), np.asarray(batch["label"])]
    shares = np.split(np.arange(len(losses)), axis or 1)
    chosen = np.concatenate([share[np.argsort(-losses[share])[:k]] for share in shares])
    return {key: np.asarray(value)[chosen] for key, value in batch.items()}


@pytest.mark.parametrize("fraction,k,devices,score_size", [(0.25, 16, None, None), (0.3, 19, None, None),
                                                            (1.0, 64, None, None),
                                                            pytest.param(0.5, 32, 8, None, marks=eight_devices),
                                                            (0.5, 32, None, 8), (np.float32(0.5), 32, None, np.int64(8))],
                         ids=["quarter", "rounded", "all", "mesh8", "scored_at_8px", "numpy_scalars"])
def test_select_hardest_trains_on_the_highest_loss_images(data, fraction, k, devices, score_size):
    """Compiled once, on one device or a mesh: two steps each equal to `train_step` on the images picked by hand
    (BatchNorm: the scoring pass's statistics are not kept), scored at full size or at `score_size`."""
    from jaxnet import parallel

    mesh = parallel.make_mesh(devices) if devices else None
    state = _state(tx=optax.sgd(0.05, momentum=0.9))  # Adam would magnify rounding into 1e-4 differences
    chex.clear_trace_counter()
    selecting = train.select_hardest(partial(train.train_step, label_smoothing=0.1), fraction=fraction,
                                     score_size=score_size)
    step = parallel.jit_train_step(chex.assert_max_traces(selecting, n=1), mesh=mesh)
    state = parallel.put_replicated(state, mesh) if mesh else state
    for _ in range(2):
        picked = _hardest_by_hand(state, data, k, score_size=score_size)
        ref, ref_metrics = train.train_step(state, picked, label_smoothing=0.1)
        state, metrics = step(state, data)
        assert int(metrics["count"]) == k
        chex.assert_trees_all_close(_snapshot((state.params, state.batch_stats, metrics)),
                                    _snapshot((ref.params, ref.batch_stats, ref_metrics)), rtol=2e-5, atol=2e-6)


@eight_devices
def test_select_hardest_on_pmap_picks_from_each_devices_share_with_flaxs_state(data):
    """A user's model without BatchNorm in Flax's own TrainState: each of 8 devices picks its 2 hardest of 8,
    and the averaged step equals `train_step` on those 16 images."""
    from jaxnet import parallel

    state = _flax_state(ScalingMlp())
    step = parallel.pmap_train_step(train.select_hardest(fraction=0.25), num_devices=8)
    picked = _hardest_by_hand(state, data, 2, axis=8)
    ref, ref_metrics = train.train_step(state, picked)
    state, metrics = step(state, data)
    assert type(state) is flax_train_state.TrainState and int(metrics["count"]) == 16
    # Adam (the Flax state's) magnifies rounding: one weight in 10⁵ moves by 3e-6; a wrong pick moves many by ~3e-3
    chex.assert_trees_all_close(_snapshot((state.params, metrics)), _snapshot((ref.params, ref_metrics)),
                                rtol=1e-4, atol=1e-5)


def test_select_hardest_with_dropout_still_memorises_and_composes_with_the_ema(data):
    model = ScalingMlp(dropout=0.2)
    state = train.create_train_state(model, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3), jnp.uint8),
                                     optax.adam(3e-3), ema=True)
    step = jaxnet.jit_train_step(jaxnet.lookahead_ema(jaxnet.select_hardest(fraction=0.5), every=5,
                                                     decay_fn=lambda s: 0.5))
    for _ in range(150):
        state, metrics = step(state, data)
    assert int(metrics["count"]) == N // 2
    assert float(jaxnet.jit_eval_step()(state, data)["accuracy"]) >= 0.99


@pytest.mark.parametrize("devices", [None, pytest.param(8, marks=eight_devices)], ids=["one", "mesh8"])
def test_select_hardest_with_a_proxy_trains_on_the_proxys_picks_and_the_proxy_every_kth_step(data, devices):
    """airbench96_faster's selection: the state's proxy (another model's own state) scores the batch, the model
    trains on the proxy's 16 hardest of 64, and the proxy trains on them too after steps 0 and 2 of 3
    (`proxy_every=2`), each step equal to `train_step` by hand; compiled once."""
    from jaxnet import parallel

    mesh = parallel.make_mesh(devices) if devices else None
    proxy = train.create_train_state(BnMlp(), jax.random.key(1), jnp.zeros((1, SIZE, SIZE, 3), jnp.uint8),
                                     optax.sgd(0.05, momentum=0.9))
    state = _state(tx=optax.sgd(0.05, momentum=0.9)).replace(proxy=proxy)
    chex.clear_trace_counter()
    selecting = train.select_hardest(partial(train.train_step, label_smoothing=0.1), fraction=0.25,
                                     proxy_step=train.train_step, proxy_every=2)
    step = parallel.jit_train_step(chex.assert_max_traces(selecting, n=1), mesh=mesh)
    state = parallel.put_replicated(state, mesh) if mesh else state
    for i in range(3):
        picked = _hardest_by_hand(state.proxy, data, 16)
        assert not np.array_equal(picked["image"], _hardest_by_hand(state, data, 16)["image"])  # not the model's own
        ref, ref_metrics = train.train_step(state, picked, label_smoothing=0.1)
        ref_proxy = train.train_step(state.proxy, picked)[0] if i % 2 == 0 else state.proxy
        expected = _snapshot((ref.params, ref.batch_stats, ref_metrics, ref_proxy.params, ref_proxy.batch_stats))
        state, metrics = step(state, data)  # donates the state: the references are host copies by now
        assert int(metrics["count"]) == 16 and int(state.proxy.step) == (1, 1, 2)[i]
        chex.assert_trees_all_close(_snapshot((state.params, state.batch_stats, metrics, state.proxy.params,
                                               state.proxy.batch_stats)), expected, rtol=2e-5, atol=2e-6)


class FlaxStateWithProxy(flax_train_state.TrainState):
    proxy: Any = None


@eight_devices
def test_select_hardest_with_a_proxy_on_pmap_in_a_users_own_state_class(data):
    """A user's subclass of Flax's TrainState with a `proxy` field, models without BatchNorm, on 8 devices: each
    device takes the proxy's 2 hardest of its 8, and both averaged steps equal `train_step` on those 16."""
    from jaxnet import parallel

    small = ScalingMlp()
    variables = small.init(jax.random.key(1), jnp.zeros((1, SIZE, SIZE, 3), jnp.uint8), train=False)
    proxy = flax_train_state.TrainState.create(apply_fn=small.apply, params=variables["params"], tx=optax.adam(3e-3))
    state = _flax_state(ScalingMlp(), cls=FlaxStateWithProxy).replace(proxy=proxy)
    step = parallel.pmap_train_step(train.select_hardest(fraction=0.25, proxy_step=train.train_step), num_devices=8)
    picked = _hardest_by_hand(proxy, data, 2, axis=8)
    assert not np.array_equal(picked["image"], _hardest_by_hand(state, data, 2, axis=8)["image"])
    ref, ref_metrics = train.train_step(state, picked)
    ref_proxy = train.train_step(proxy, picked)[0]
    state, metrics = step(state, data)
    assert type(state) is FlaxStateWithProxy and int(metrics["count"]) == 16 and int(state.proxy.step) == 1
    chex.assert_trees_all_close(_snapshot((state.params, metrics, state.proxy.params)),
                                _snapshot((ref.params, ref_metrics, ref_proxy.params)), rtol=1e-4, atol=1e-5)


def test_select_hardest_with_a_proxy_step_needs_a_state_with_a_proxy(data):
    with pytest.raises(jaxnet.ConfigError, match="select_hardest with a proxy_step needs a state with a proxy"):
        train.select_hardest(fraction=0.5, proxy_step=train.train_step)(_state(), data)


@pytest.mark.parametrize("every", [0, -4, 2.0, "4", True, None])
def test_select_hardest_rejects_a_proxy_every_that_is_not_a_positive_integer(every):
    with pytest.raises(jaxnet.ConfigError, match="select_hardest proxy_every must be a positive integer"):
        train.select_hardest(fraction=0.5, proxy_step=train.train_step, proxy_every=every)


@pytest.mark.parametrize("fraction", [0, 1.5, -0.5, "0.5", None, True, np.float32(2)])
def test_select_hardest_rejects_fractions_outside_0_to_1(fraction):
    with pytest.raises(jaxnet.ConfigError, match=r"select_hardest fraction must be in \(0, 1\]"):
        train.select_hardest(fraction=fraction)


@pytest.mark.parametrize("fraction", [float("nan"), np.float32(np.inf)])
def test_select_hardest_names_a_fraction_that_is_not_finite(fraction):
    with pytest.raises(jaxnet.ConfigError, match=r"select_hardest fraction must be a finite number, got (nan|inf)$"):
        train.select_hardest(fraction=fraction)


@pytest.mark.parametrize("score_size", [0, -16, 16.0, "16", True, np.int32(0)])
def test_select_hardest_rejects_a_score_size_that_is_not_a_positive_integer(score_size):
    with pytest.raises(jaxnet.ConfigError, match="select_hardest score_size must be a positive integer"):
        train.select_hardest(fraction=0.5, score_size=score_size)


def test_user_model_without_batchnorm_and_with_dropout(data):
    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1) / 255.0))  # uint8 in, as given
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


class _MnistCnn(nn.Module):
    """Flax's examples/mnist CNN: its call takes no mode argument."""

    @nn.compact
    def __call__(self, x):
        x = nn.avg_pool(nn.relu(nn.Conv(8, (3, 3))(x / 255.0)), (2, 2), strides=(2, 2))
        return nn.Dense(CLASSES)(x.reshape((x.shape[0], -1)))


class _Deterministic(nn.Module):
    """Mode set as nn.Dropout's is (`deterministic`), with no default; in training mode every image reads class 0."""

    @nn.compact
    def __call__(self, x, deterministic: bool):
        logits = nn.Dense(CLASSES)(x.reshape((x.shape[0], -1)) / 255.0)
        return logits + jnp.where(deterministic, 0.0, 1e3) * jax.nn.one_hot(0, CLASSES)[None]


@pytest.mark.parametrize("make", [_MnistCnn, lambda: nn.Sequential([lambda x: x.astype(jnp.float32), _MnistCnn()])],
                         ids=["mnist_cnn", "sequential"])
def test_a_model_whose_call_takes_no_mode_trains_under_flax_train_state(data, make):
    """Flax's MNIST CNN (`__call__(self, x)`) was a TypeError ("unexpected keyword argument 'train'") in every
    step: the steps pass no mode to a model that takes none."""
    model = make()
    state = flax_train_state.TrainState.create(apply_fn=model.apply, tx=optax.adam(1e-2), params=model.init(
        jax.random.key(0), data["image"][:1])["params"])
    step, first = jax.jit(jaxnet.train_step), None
    for _ in range(40):
        state, m = step(state, data)
        first = first if first is not None else float(m["loss"])
    assert float(m["loss"]) < 0.5 * first
    assert float(jax.jit(jaxnet.eval_step)(state, data)["accuracy"]) > 0.9
    assert train.predict_logits(state, data["image"], tta=2).shape == (N, CLASSES)
    assert jaxnet.create_train_state(model, jax.random.key(0), data["image"][:1], optax.sgd(0.1)).step == 0


def test_a_model_with_a_deterministic_argument_gets_the_mode_of_each_step(data):
    model = _Deterministic()
    state = jaxnet.create_train_state(model, jax.random.key(0), data["image"][:1], optax.sgd(0.0))
    zeros = {"image": data["image"], "label": np.zeros(N, np.int32)}
    assert float(jax.jit(jaxnet.train_step)(state, zeros)[1]["loss"]) < 1e-3  # training: deterministic=False
    assert float(jax.jit(jaxnet.eval_step)(state, zeros)["loss"]) > 0.5


def test_a_model_that_needs_another_argument_is_one_line():
    class Needs(nn.Module):
        @nn.compact
        def __call__(self, x, training):
            return nn.Dense(CLASSES)(x)

    with pytest.raises(jaxnet.ConfigError, match=r"^jaxnet calls a model as model\(x, train=...\), .*; "
                                                 r"Needs.__call__ also needs training: give it a default") as err:
        jaxnet.create_train_state(Needs(), jax.random.key(0), jnp.zeros((1, 4)), optax.sgd(0.1))
    assert "\n" not in str(err.value)


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


@pytest.mark.parametrize("tta,fraction", [(1, 1.0), (2, 1.0), (2, 0.25)])
def test_a_tta_eval_step_reports_its_plain_view_as_a_plain_step_does(data, tta, fraction):
    """A TTA step's "plain_loss" / "plain_accuracy" are the plain step's loss and accuracy (masked rows left out),
    merged count-weighted over batches like the others (a metric that is not a scalar is left out); a plain step
    has no such keys."""
    state = _state()
    padded = {"image": data["image"], "label": data["label"], "mask": np.arange(N) < 40}
    plain, tta_metrics = train.eval_step(state, padded), train.eval_step(state, padded, tta=tta, tta_fraction=fraction)
    assert set(plain) == {"loss", "accuracy", "count"} and set(tta_metrics) == set(plain) | {"plain_loss",
                                                                                           "plain_accuracy"}
    np.testing.assert_allclose(float(tta_metrics["plain_loss"]), float(plain["loss"]), rtol=1e-6)
    assert float(tta_metrics["plain_accuracy"]) == float(plain["accuracy"])
    assert float(tta_metrics["loss"]) != float(plain["loss"])  # the TTA metrics are TTA's
    halves = [{k: v[rows] for k, v in data.items()} for rows in (slice(0, 40), slice(40, None))]
    merged = train.merge_metrics([train.eval_step(state, h, tta=tta, tta_fraction=fraction) for h in halves])
    np.testing.assert_allclose(merged["plain_accuracy"], float(train.eval_step(state, data)["accuracy"]), rtol=1e-6)
    assert merged["count"] == N and set(merged) == set(tta_metrics)
    assert set(train.merge_metrics([{**tta_metrics, "per_class": np.ones(3)}])) == set(tta_metrics)  # not a scalar


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


class UnpooledNet(nn.Module):
    """A user's net that forgets to pool: (N, H, W, K) "logits"."""

    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Conv(CLASSES, (3, 3))(x.astype(jnp.float32))


@pytest.mark.parametrize("step_fn", [jaxnet.train_step, jaxnet.eval_step,
                                     train.select_hardest(fraction=0.5)], ids=["train", "eval", "select_hardest"])
@pytest.mark.parametrize("change,message", [
    (lambda b: {"image": b["image"], "label": b["label"][:, None]}, r"batch\['label'\] must be \(N,\) integers, "
                                                                    r"got shape \(64, 1\) dtype int32"),
    (lambda b: {"image": b["image"], "label": jax.nn.one_hot(b["label"], CLASSES)}, r"got shape \(64, 10\) dtype float"),
    (lambda b: {"image": b["image"], "label": b["label"].astype(np.float32)}, r"got shape \(64,\) dtype float32"),
    (lambda b: {"image": b["image"], "label": b["label"][:63]}, "batch has 64 images but 63 labels"),
    (lambda b: (b["image"], b["label"]), "batch must be a mapping with keys 'image' and 'label', got tuple"),
    (lambda b: {"image": b["image"]}, r"batch must have keys 'image' and 'label', got \['image'\]"),
    (lambda b: b, r"the model's output must be \(N, classes\) logits for N = 64 labels, got shape \(64, 16, 16, 10\)"),
    (lambda b: {"image": b["image"][:0], "label": b["label"][:0]}, r"batch is empty: batch\['image'\] has shape \(0, "),
], ids=["labels_n1", "one_hot", "float_labels", "count", "tuple", "no_label", "unpooled_model", "empty"])
def test_a_users_jitted_step_refuses_a_batch_that_would_broadcast_into_a_wrong_loss(data, step_fn, change, message):
    """jax.jit of the bare steps with Flax's own TrainState: a batch whose shapes do not fit is a one-line DataError
    when traced, not a loss over (N, N) broadcast rows (labels of shape (N, 1) gave a finite, wrong loss)."""
    model = UnpooledNet() if "model's output" in message else ScalingMlp()
    with pytest.raises(jaxnet.DataError, match=message) as err:
        jax.jit(step_fn)(_flax_state(model), change(data))
    assert "\n" not in str(err.value)


def test_a_users_jitted_step_takes_labels_given_as_a_list(data):
    """Under jit a list of labels arrives as a list of traced scalars: the steps take it as the array it holds."""
    state = _flax_state(ScalingMlp())
    listed = {"image": data["image"], "label": data["label"].tolist()}
    for step in (jax.jit(jaxnet.train_step), jax.jit(jaxnet.eval_step), jaxnet.train_step, jaxnet.eval_step,
                 jax.jit(train.select_hardest(fraction=0.5))):  # which gathers the labels it trains on
        chex.assert_trees_all_close(step(state, listed), step(state, data), rtol=1e-6)


@pytest.mark.parametrize("step_fn", [jaxnet.train_step, jaxnet.eval_step,
                                     train.select_hardest(fraction=0.5)], ids=["train", "eval", "select_hardest"])
def test_a_batchnorm_model_under_flaxs_own_train_state_says_what_the_state_lacks(data, step_fn):
    """Flax's TrainState has no batch_stats field: Flax's own error spoke of an empty collection."""
    model = BnMlp()
    variables = model.init(jax.random.key(0), data["image"][:1], train=False)
    state = flax_train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.adam(3e-3))
    with pytest.raises(jaxnet.ConfigError, match="the model keeps BatchNorm statistics but the state holds none: "
                                                 "make it with jaxnet.create_train_state") as err:
        jax.jit(step_fn)(state, data)
    assert "\n" not in str(err.value)


def test_tta_of_an_input_that_is_not_an_image_is_one_line(data):
    state = _flax_state(ScalingMlp())
    flat = {"image": data["image"].reshape(N, -1), "label": data["label"]}
    assert float(jax.jit(jaxnet.eval_step)(state, flat)["count"]) == N  # without TTA any (N, ...) input is the model's
    for tta in (1, 2):
        with pytest.raises(jaxnet.DataError, match=rf"tta={tta} mirrors and shifts images: it needs \(N, H, W, C\) "
                                                   rf"input, got shape \(64, {SIZE * SIZE * 3}\)"):
            jax.jit(partial(jaxnet.eval_step, tta=tta))(state, flat)


def test_an_eval_mask_of_another_shape_than_the_labels_is_refused(data):
    batch = {**data, "mask": np.ones((N, 1), bool)}
    with pytest.raises(jaxnet.DataError, match=r"batch\['mask'\] must have the labels' shape \(64,\), got \(64, 1\)"):
        jax.jit(jaxnet.eval_step)(_flax_state(ScalingMlp()), batch)


def test_cross_entropy_refuses_labels_and_logits_that_would_broadcast():
    np.testing.assert_allclose(jaxnet.cross_entropy(np.zeros((2, 3)), [0, 5]), [np.log(3), np.nan], rtol=1e-6)
    logits, labels = jnp.zeros((4, CLASSES)), jnp.zeros((4,), jnp.int32)
    with pytest.raises(jaxnet.DataError, match=r"labels must be \(N,\) integers, got shape \(4, 1\)"):
        jaxnet.cross_entropy(logits, labels[:, None])
    with pytest.raises(jaxnet.DataError, match=r"logits for N = 4 labels, got shape \(4, 1, 10\)"):
        jaxnet.cross_entropy(logits[:, None], labels)
    with pytest.raises(jaxnet.DataError, match=r"logits for N = 4 labels, got a tuple"):  # a model's (logits, aux)
        jax.jit(jaxnet.cross_entropy)((logits, logits), labels)
    with pytest.raises(jaxnet.DataError, match=r"labels must be an array, got \[\[0\], \[1, 2\]\]"):  # ragged
        jaxnet.cross_entropy(logits, [[0], [1, 2]])
    for smoothing in (-0.1, 1.0, 1.5):  # targets below 0 (or none at all on the label)
        with pytest.raises(jaxnet.ConfigError, match=rf"label_smoothing must be in \[0, 1\), got {smoothing}"):
            jaxnet.cross_entropy(logits, labels, label_smoothing=smoothing)


def test_a_label_outside_the_classes_makes_the_loss_nan_and_adds_no_gradient(data):
    """Label values stay on the device (no host sync): one outside [0, K) shows as a NaN loss, and the step's
    update is that of the other images alone (plain SGD: (N - 1) / N of the update of the batch without it)."""
    state = _flax_state(ScalingMlp()).replace(tx=optax.sgd(0.1))
    state = state.replace(opt_state=state.tx.init(state.params))
    bad = {"image": data["image"], "label": np.concatenate([[CLASSES], data["label"][1:]]).astype(np.int32)}
    rest = {k: v[1:] for k, v in data.items()}
    step = jax.jit(jaxnet.train_step)
    after_bad, metrics = step(state, bad)
    after_rest, _ = step(state, rest)
    assert np.isnan(float(metrics["loss"])) and np.isfinite(float(metrics["accuracy"]))
    chex.assert_trees_all_close(
        jax.tree.map(lambda a, p: a - p, after_bad.params, state.params),
        jax.tree.map(lambda a, p: (N - 1) / N * (a - p), after_rest.params, state.params), rtol=1e-4, atol=1e-7)
    for wrong in (-1, CLASSES):
        labels = np.concatenate([[wrong], data["label"][1:]]).astype(np.int32)
        assert np.isnan(float(jax.jit(jaxnet.eval_step)(state, {"image": data["image"], "label": labels})["loss"]))
    masked = {"image": data["image"], "label": np.concatenate([[-1], data["label"][1:]]).astype(np.int32),
              "mask": np.arange(N) > 0}  # a padding row's label is never counted, whatever it holds
    chex.assert_trees_all_close(jaxnet.eval_step(state, masked), jaxnet.eval_step(state, rest), rtol=1e-6)


def test_sgd_decays_kernels_only():
    params = {"conv": {"kernel": jnp.ones((3, 3, 1, 1)), "bias": jnp.ones((1,))}, "bn": {"scale": jnp.ones((1,))}}
    tx = optim.sgd(0.1, momentum=0.9, weight_decay=0.5)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    chex.assert_trees_all_close(updates["conv"]["kernel"], -0.05 * params["conv"]["kernel"])
    chex.assert_trees_all_equal(updates["conv"]["bias"], jnp.zeros((1,)))
    chex.assert_trees_all_equal(updates["bn"]["scale"], jnp.zeros((1,)))


def test_schedules():
    lr = optim.piecewise_linear([0, 10, 100], [0.2, 1.0, 0.0])
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(55), lr(100), lr(200)], [0.2, 0.6, 1.0, 0.5, 0.0, 0.0],
                               atol=1e-6)
    cos = optim.warmup_cosine(1.0, total_steps=100, warmup_steps=10)
    np.testing.assert_allclose([cos(0), cos(10), cos(55), cos(100)], [0.0, 1.0, 0.5, 0.0], atol=1e-6)
    with pytest.raises(jaxnet.ConfigError, match="increasing steps"):
        optim.piecewise_linear([10, 0], [1.0, 0.0])


# ---- the public contract with a user's own model and Flax's own TrainState ----

class ScalingMlp(nn.Module):
    """A user's MLP that scales its uint8 input itself: the step must hand it the images as given."""

    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.astype(jnp.float32).reshape(x.shape[0], -1) / 255.0
        x = nn.relu(nn.Dense(128)(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(CLASSES)(x)


class BnMlp(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = x.astype(jnp.float32).reshape(x.shape[0], -1) / 255.0
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(128)(x)))
        return nn.Dense(CLASSES)(x)


class FlaxStateWithStats(flax_train_state.TrainState):
    batch_stats: Any = None


def _flax_state(model, cls=flax_train_state.TrainState):
    variables = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3), jnp.uint8), train=False)
    extra = {"batch_stats": variables["batch_stats"]} if "batch_stats" in variables else {}
    return cls.create(apply_fn=model.apply, params=variables["params"], tx=optax.adam(3e-3), **extra)


def _jaxnet_state(model):
    return train.create_train_state(model, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3), jnp.uint8),
                                    optax.adam(3e-3))


@pytest.mark.parametrize("make_state", [_flax_state, _jaxnet_state], ids=["flax_state", "jaxnet_state"])
def test_user_mlp_scaling_its_own_input_memorises_64_examples(data, make_state):
    """The issue's case: 0.44 train accuracy when the step rescaled uint8 images before the model did."""
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(jaxnet.train_step, n=1))
    state = make_state(ScalingMlp())
    for _ in range(150):
        state, metrics = step(state, data)
    assert float(metrics["accuracy"]) >= 0.99 and float(metrics["loss"]) < 0.1, jax.device_get(metrics)
    assert float(jax.jit(jaxnet.eval_step)(state, data)["accuracy"]) >= 0.99


def test_flax_train_state_with_dropout_draws_a_new_mask_each_step(data):
    state = _flax_state(ScalingMlp(dropout=0.5))
    step = jaxnet.jit_train_step()
    losses = []
    for _ in range(3):
        same = {k: v for k, v in data.items()}
        state, metrics = step(state, same)
        losses.append(float(metrics["loss"]))
    assert isinstance(state, flax_train_state.TrainState) and int(state.step) == 3
    # dropout_rng chooses the masks: two different keys give two different losses from one state
    fresh = _flax_state(ScalingMlp(dropout=0.5))
    a = train.train_step(fresh, data, dropout_rng=jax.random.key(1))[1]["loss"]
    b = train.train_step(fresh, data, dropout_rng=jax.random.key(2))[1]["loss"]
    assert float(a) != float(b)
    with pytest.raises(Exception, match="PRNG|rng"):  # dropout without any key is Flax's own error
        fresh.apply_fn({"params": fresh.params}, data["image"], train=True)


def test_flax_train_state_subclass_with_batch_stats_updates_them(data):
    state = _flax_state(BnMlp(), FlaxStateWithStats)
    before = jax.device_get(state.batch_stats)
    step = jaxnet.jit_train_step(chex.assert_max_traces(jaxnet.train_step, n=1))
    for _ in range(100):
        state, metrics = step(state, data)
    assert type(state) is FlaxStateWithStats
    assert not np.allclose(state.batch_stats["BatchNorm_0"]["mean"], before["BatchNorm_0"]["mean"])
    assert float(metrics["accuracy"]) >= 0.99
    assert float(jaxnet.jit_eval_step()(state, data)["accuracy"]) >= 0.9


class UserConvNet(nn.Module):
    """A user's conv net with Flax's own layers (nn.Conv, nn.BatchNorm, nn.Dense): not a jaxnet model."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.astype(jnp.float32) / 255.0
        x = nn.Conv(16, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=2, use_bias=False)(x))
        return nn.Dense(CLASSES)(x.mean(axis=(1, 2)))


def test_muon_trains_a_users_flax_conv_net_with_flaxs_own_state(data):
    """jaxnet.optim's Muon (the record's groups) on a model jaxnet does not ship, through Flax's TrainState and
    jaxnet.train_step: its filters keep the renormalised norm √(out channels), and it memorises the batch."""
    model = UserConvNet()
    variables = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3), jnp.uint8), train=False)
    # SGD rates are per example of the summed loss (×64 here); this head has no 1/256 scale, so far below the record's
    tx = optim.airbench_muon(optim.constant(1.0), batch_size=N, filter_lr=0.1, head_lr=0.005, bias_lr=0.002)
    state = FlaxStateWithStats.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                      batch_stats=variables["batch_stats"])
    step = jaxnet.jit_train_step(chex.assert_max_traces(jaxnet.train_step, n=1))
    for _ in range(150):
        state, metrics = step(state, data)
    assert type(state) is FlaxStateWithStats and float(metrics["lr"]) == pytest.approx(0.1)
    assert float(metrics["accuracy"]) >= 0.95, jax.device_get(metrics)
    for name, width in (("Conv_0", 16), ("Conv_1", 32)):  # renormalised before each step, then one step of 0.1
        norm = float(jnp.linalg.norm(state.params[name]["kernel"]))
        assert abs(norm - width ** 0.5) < 0.1 * width ** 0.5, (name, norm)


class UserBf16ConvNet(nn.Module):
    """A user's net computing in bfloat16 with jaxnet's Conv (impl chosen by the user) among Flax's own layers."""

    impl: str

    @nn.compact
    def __call__(self, x, train: bool):
        conv = partial(jaxnet.Conv, use_bias=False, dtype=jnp.bfloat16, impl=self.impl)
        x = x.astype(jnp.float32) / 255.0
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(conv(16, (3, 3))(x)))
        x = nn.relu(conv(32, (3, 3), strides=2)(x))
        return nn.Dense(CLASSES)(x.mean(axis=(1, 2)).astype(jnp.float32))


def test_users_bf16_net_with_onednn_convs_trains_like_xlas(data):
    """The onednn impl in bfloat16 (all three convs oneDNN's FFI calls) in a user's module with Flax's TrainState,
    through jaxnet.jit_train_step: compiled once, and 3 SGD steps make the updates XLA's bf16 convs make, within bf16
    rounding."""
    require_onednn_bfloat16()
    runs = {}
    for impl in ("xla", "onednn"):
        model = UserBf16ConvNet(impl)
        variables = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3), jnp.uint8), train=False)
        initial = jax.device_get(variables["params"])  # the step donates the state's buffers
        state = FlaxStateWithStats.create(apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.05),
                                          batch_stats=variables["batch_stats"])
        chex.clear_trace_counter()
        step = jaxnet.jit_train_step(chex.assert_max_traces(jaxnet.train_step, n=1))
        losses = []
        for _ in range(3):
            state, metrics = step(state, data)
            losses.append(float(metrics["loss"]))
        assert type(state) is FlaxStateWithStats
        runs[impl] = (losses, jax.tree.map(lambda new, old: np.asarray(new) - old, state.params, initial))
    np.testing.assert_allclose(runs["onednn"][0], runs["xla"][0], rtol=2e-2)
    for got, want in zip(jax.tree.leaves(runs["onednn"][1]), jax.tree.leaves(runs["xla"][1])):  # the updates
        np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2 * np.abs(want).max())


def test_the_model_sees_the_batch_exactly_as_given(data):
    seen = {}

    class Spy(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            seen[train] = (x.dtype, x.shape)
            return nn.Dense(CLASSES)(x.reshape(x.shape[0], -1).astype(jnp.float32))

    state = _jaxnet_state(Spy())
    np.testing.assert_array_equal(  # logits of the raw uint8 values, not of a rescaled copy
        train.predict_logits(state, data["image"]),
        state.apply_fn({"params": state.params}, jnp.asarray(data["image"]), train=False))
    train.train_step(state, data)
    assert seen == {False: (jnp.uint8, (N, SIZE, SIZE, 3)), True: (jnp.uint8, (N, SIZE, SIZE, 3))}


@eight_devices
def test_flax_train_state_checkpoints_and_runs_on_a_mesh(data, tmp_path):
    """Flax's own state through jaxnet's other seams: a jit step over an 8-device mesh, and a checkpoint
    round trip (the fields jaxnet's state adds are absent, not required)."""
    from jaxnet import checkpoint, parallel

    mesh = parallel.make_mesh(8)
    state = parallel.put_replicated(_flax_state(ScalingMlp(dropout=0.1)), mesh)
    step = parallel.jit_train_step(mesh=mesh, num_classes=CLASSES)
    for _ in range(2):
        state, _ = step(state, data)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(state, {"epoch": 0})
    restored, meta = ckpt.restore(_flax_state(ScalingMlp(dropout=0.1)))
    ckpt.close()
    assert type(restored) is flax_train_state.TrainState and int(restored.step) == 2 and meta["epoch"] == 0
    chex.assert_trees_all_equal(jax.device_get(restored.params), jax.device_get(state.params))
    chex.assert_trees_all_equal(jax.device_get(restored.opt_state), jax.device_get(state.opt_state))


def test_a_checkpointer_refuses_meta_it_cannot_save_and_a_keep_of_zero(tmp_path):
    """Meta that JSON cannot hold failed inside orbax's save, leaving its temporary directory and a thread error
    at exit; keep=0 was taken."""
    from jaxnet import checkpoint

    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
    state = _flax_state(ScalingMlp())
    with pytest.raises(jaxnet.ConfigError, match="^checkpoint meta must be JSON-able: Object of type ndarray"):
        ckpt.save(state, {"accuracy": np.zeros(2)})
    ckpt.save(state, {"epoch": 0})
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "ckpt" / "last").iterdir()) == ["0"]
    with pytest.raises(jaxnet.ConfigError, match="^Checkpointer keep must be a positive integer, got 0$"):
        checkpoint.Checkpointer(tmp_path / "other", keep=0)


@pytest.mark.parametrize("wrong", ["variables", "params", "model", "none"])
def test_what_is_not_a_train_state_is_one_line_in_the_steps_and_the_checkpointer(data, tmp_path, wrong):
    """The variables dict, the params, the module or None in place of the state failed at an attribute deep
    inside the step (AttributeError: 'dict' object has no attribute 'step') or inside orbax."""
    from jaxnet import checkpoint

    model = ScalingMlp()
    variables = model.init(jax.random.key(0), data["image"][:1], train=False)
    state = {"variables": variables, "params": variables["params"], "model": model, "none": None}[wrong]
    ckpt = checkpoint.Checkpointer(tmp_path)
    calls = [("train_step", lambda: jaxnet.train_step(state, data)),
             ("eval_step", lambda: jaxnet.eval_step(state, data)),
             ("predict_logits", lambda: train.predict_logits(state, data["image"])),
             ("Checkpointer.save", lambda: ckpt.save(state, {})),
             ("Checkpointer.restore", lambda: ckpt.restore(state))]
    if wrong != "model":  # jit and pmap take pytrees of arrays: a module is refused by JAX before any step runs
        calls += [("train_step", lambda: jax.jit(jaxnet.train_step)(state, data)),
                  ("eval_step", lambda: jaxnet.jit_eval_step()(state, data)),
                  ("train_step", lambda: parallel.pmap_train_step(num_devices=1)(state, data))]
    for where, call in calls:
        with pytest.raises(jaxnet.ConfigError) as err:
            call()
        assert str(err.value).startswith(f"{where}: state must be a TrainState (jaxnet.create_train_state, or "
                                         f"Flax's TrainState.create); got {type(state).__name__}, without "), err.value
        assert "\n" not in str(err.value)
    ckpt.close()


def test_a_users_own_step_may_take_any_state_through_jit_train_step(data):
    """The state check is train_step's own: jit_train_step compiles any step, whatever its state is."""
    model = ScalingMlp()
    params = model.init(jax.random.key(0), data["image"][:1], train=False)["params"]
    tx = optax.sgd(0.1)

    def my_step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(lambda p: train.cross_entropy(
            model.apply({"params": p}, batch["image"], train=True), batch["label"]).mean())(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

    state = (params, tx.init(params))
    step = jaxnet.jit_train_step(my_step)
    losses = []
    for _ in range(3):
        state, metrics = step(state, data)
        losses.append(float(metrics["loss"]))
    assert losses[2] < losses[0]


def test_merge_metrics_of_no_batches_is_one_line_and_of_no_images_is_nan():
    """An empty list gave loss and accuracy 0 (a perfect loss for nothing evaluated)."""
    with pytest.raises(jaxnet.DataError, match="^merge_metrics: no metrics to merge") as err:
        jaxnet.merge_metrics([])
    assert "\n" not in str(err.value)
    merged = jaxnet.merge_metrics([{"loss": 2.0, "accuracy": 0.5, "count": 0}, {"loss": 1.0, "accuracy": 1.0,
                                                                              "count": 0}])
    assert merged["count"] == 0 and np.isnan(merged["loss"]) and np.isnan(merged["accuracy"])


@pytest.mark.parametrize("kwargs,message", [
    ({"num_classes": 0}, "^validate_batch num_classes must be a positive integer or None, got 0"),
    ({"num_classes": True}, "^validate_batch num_classes must be a positive integer or None, got True"),
    ({"image_shape": (16, 16)}, r"^validate_batch image_shape must be \(H, W, C\), 3 positive integers"),
])
def test_validate_batch_refuses_a_spec_no_batch_can_meet(data, kwargs, message):
    """validate_batch(num_classes=0) refused every label as out of [0, 0) rather than the 0 itself."""
    with pytest.raises(jaxnet.ConfigError, match=message):
        jaxnet.validate_batch(data, **kwargs)


@pytest.mark.parametrize("tta", [1, 2])
def test_selective_tta_augments_exactly_the_least_confident_images(data, tta):
    state = _state()
    images = jnp.asarray(data["image"], jnp.float32) / 255
    plain = train.predict_logits(state, images)
    full = train.predict_logits(state, images, tta=tta)
    chex.assert_trees_all_close(train.predict_logits(state, images, tta=tta, tta_fraction=1.0), full)
    chosen = train.predict_logits(state, images, tta=tta, tta_fraction=0.25)
    confidence = np.asarray(jax.nn.softmax(plain).max(axis=-1))
    least = np.argsort(confidence)[:16]  # 0.25 of 64
    rest = np.setdiff1d(np.arange(N), least)
    chex.assert_trees_all_close(chosen[least], full[least], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(chosen[rest], plain[rest])
    assert not np.allclose(full[rest], plain[rest])  # the augmentation does change the others' logits
    for fraction in (0.0, "0.5"):  # a string was a TypeError of the comparison
        with pytest.raises(ValueError, match=r"predict_logits tta_fraction must be in \(0, 1\]"):
            train.predict_logits(state, images, tta=tta, tta_fraction=fraction)
