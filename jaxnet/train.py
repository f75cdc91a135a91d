"""The training core: state, loss and metrics, `train_step` / `eval_step`, and airbench's lookahead EMA.

Everything here is a pure function of its arguments, with no jit inside (`jaxnet.parallel` applies jit and
shardings to the steps), except `create_train_state`, which compiles its one-off initialisation. The steps
work with any linen module called as `model.apply(variables, x, train=...)` (or `deterministic=`, or neither:
see `_mode`), with or without BatchNorm (`batch_stats`) or dropout, and with Flax's own
`flax.training.train_state.TrainState` as well as jaxnet's.
They hand the model `batch["image"]` exactly as given: scaling and normalisation belong to the data pipeline
(e.g. `jaxnet.data.normalize`) or to the model.
"""

from __future__ import annotations

import functools
import inspect
import reprlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from jaxnet import compiler, data
from jaxnet.errors import ConfigError, DataError, check_values, is_kind

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
Schedule = Callable[[jax.Array], jax.Array]
# Dropout key of states without an `rng` field (Flax's TrainState): fold_in(key(DEFAULT_DROPOUT_SEED), step).
DEFAULT_DROPOUT_SEED = 0


class TrainState(train_state.TrainState):
    """Flax's TrainState plus `batch_stats` (an empty dict for models without BatchNorm), `rng`, the
    dropout key (step s uses `fold_in(rng, s)`, so no key is ever captured or reused), `ema`, the
    lookahead EMA of {"params", "batch_stats"} (None unless created with `ema=True`; see `lookahead_ema`), and
    `proxy`, the state of a small second model that picks the images each step trains on (None, or a state
    such as `create_train_state` makes; see `select_hardest`)."""

    batch_stats: Any = struct.field(default_factory=dict)
    rng: jax.Array | None = None
    ema: Any = None
    proxy: Any = None

    def with_params(self, params: Any) -> TrainState:
        """This state with new `params` (e.g. a kernel set from data), the optimizer state and the EMA (if
        any) restarted from them: one program (`compiler.run_once`), not an op per leaf."""
        return compiler.run_once(_with_params, self, params)


def _with_params(state: TrainState, params: Any) -> TrainState:
    state = state.replace(params=params, opt_state=state.tx.init(params))
    return state if state.ema is None else _restart_ema(state)


def _model_variables(state: Any) -> dict[str, Any]:
    return {"params": state.params, "batch_stats": _batch_stats(state)}


def _restart_ema(state: TrainState) -> TrainState:
    """`state` with its EMA set to a copy of its params and BN statistics."""
    return state.replace(ema=jax.tree.map(jnp.copy, _model_variables(state)))


def create_train_state(model: nn.Module, rng: jax.Array, sample_input: jax.Array,
                       tx: optax.GradientTransformation, *, ema: bool = False) -> TrainState:
    """Initialise `model` on `sample_input` (e.g. a (1, H, W, C) batch, passed to the model as given) and wrap
    it with the optimizer `tx`; with `ema`, the state also holds an EMA of the model starting at its initial
    value (for `lookahead_ema`).

    `rng` is split into the init key and the dropout key kept in the state. The initialisation (model and
    optimizer) runs as one program compiled by `compiler.run_once`: op by op, JAX compiles every initializer
    and optimizer-state leaf on its own (154 compilations and ~25 s for the smoke experiment's tiny FastNet).

    Raises:
      ConfigError: `model` is not a linen Module instance, `rng` not one PRNG key (typed, or the raw (2,) uint32
        of `jax.random.PRNGKey`), or `tx` not an optax GradientTransformation.
    """
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise ConfigError(f"create_train_state needs an optax GradientTransformation as tx, got {tx!r}")
    if not isinstance(model, nn.Module):
        made = f" (the class: make one, {model.__name__}(...))" if isinstance(model, type) else ""
        raise ConfigError(f"create_train_state needs a linen Module as model, got {reprlib.repr(model)}{made}")
    dtype = getattr(rng, "dtype", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
    if not (jnp.shape(rng) == () if typed else jnp.shape(rng) == (2,) and dtype == np.uint32):  # raw: PRNGKey's
        got = reprlib.repr(rng) if dtype is None else f"an array of shape {jnp.shape(rng)} and dtype {dtype}"
        raise ConfigError(f"create_train_state needs one PRNG key as rng (jax.random.key(seed)), got {got}")

    def init(rng: jax.Array, sample_input: jax.Array) -> TrainState:
        init_rng, dropout_rng = jax.random.split(rng)
        variables = model.init({"params": init_rng, "dropout": init_rng}, sample_input, **_mode(model, False))
        state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                  batch_stats=variables.get("batch_stats", {}), rng=dropout_rng)
        return _restart_ema(state) if ema else state

    return compiler.run_once(init, rng, sample_input)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy, (N, K) float logits and (N,) int labels → (N,) float32; NaN where a
    label is outside [0, K) (label values live on the device: reading them here would cost a host sync).

    Raises:
      DataError: shapes or dtypes other than those (checked from metadata, so at trace time under jit): labels
        of shape (N, 1), one-hot or float labels, a model whose output is not (N, K), would otherwise broadcast
        into a wrong loss without an error.
      ConfigError: a `label_smoothing` given as a number outside [0, 1) (negative targets).
    """
    n = _check_labels(labels, name="labels")
    check_values("cross_entropy", label_smoothing=("in [0, 1)", label_smoothing))
    shape = getattr(logits, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != n:
        raise DataError(f"the model's output must be (N, classes) logits for N = {n} labels, got "
                        + (f"shape {tuple(shape)}" if shape is not None else f"a {type(logits).__name__}"))
    labels, num_classes = jnp.asarray(labels), shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    return jnp.where((labels >= 0) & (labels < num_classes), losses, jnp.nan)


def _metrics(losses: jax.Array, logits: jax.Array, labels: jax.Array, mask: jax.Array,
             axis_name: str | None = None) -> Metrics:
    """Masked means over the batch — over all devices of `axis_name` when given (inside pmap). A masked row's loss
    is left out with a select, not multiplied by 0: a padding row's label may be outside the classes (a NaN loss),
    and NaN × 0 is NaN; that XLA's simplifier turns a product with a converted mask into a select is an
    optimisation, not a contract."""
    sums = {"loss": jnp.sum(jnp.where(mask, losses, 0.0)), "correct": jnp.sum((jnp.argmax(logits, -1) == labels) & mask),
            "count": mask.sum()}
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    count = jnp.maximum(sums["count"], 1)
    return {"loss": sums["loss"] / count, "accuracy": sums["correct"] / count, "count": sums["count"]}


STEP_FIELDS = ("apply_fn", "params", "step", "opt_state", "apply_gradients")


def check_state(where: str, state: Any, fields: Sequence[str] = STEP_FIELDS) -> None:
    """ConfigError (one line) unless `state` has the TrainState `fields` that `where` uses (by default those of
    `train_step`): jaxnet's TrainState, Flax's, a subclass, or any object with them. A dict of variables, the
    model itself or None fails here instead of at an attribute deep inside the step."""
    if missing := [name for name in fields if not hasattr(state, name)]:
        raise ConfigError(f"{where}: state must be a TrainState (jaxnet.create_train_state, or Flax's "
                          f"TrainState.create); got {type(state).__name__}, without {', '.join(missing)}")


def _batch_stats(state: Any) -> Any:
    """The state's BatchNorm statistics, or {} for a state without the field (Flax's TrainState)."""
    return getattr(state, "batch_stats", None) or {}


def _mode(model: Any, train: bool, *, layer: bool = False) -> dict[str, bool]:
    """The keyword that sets the mode of `model` (a linen module, or an `apply_fn` bound to one): `train=train`
    (jaxnet's convention and Flax's ImageNet example's), else `deterministic=not train` (nn.Dropout's), else
    none for a module whose call takes neither (Flax's MNIST CNN, `__call__(self, x)`: it has no mode). An
    nn.Sequential passes it to its first layer (`layer`: a function there is read the same way); an apply
    function not bound to a module gets `train`. ConfigError for a call that needs another argument."""
    while isinstance(model, functools.partial):
        model = model.func
    model = model.__self__ if isinstance(getattr(model, "__self__", None), nn.Module) else model
    if isinstance(model, nn.Sequential) and model.layers:
        return _mode(model.layers[0], train, layer=True)
    if not (isinstance(model, nn.Module) or (layer and callable(model))):
        return {"train": train}
    params = inspect.signature(model).parameters
    if "train" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        mode = {"train": train}
    else:
        mode = {"deterministic": not train} if "deterministic" in params else {}
    needed = [name for name, p in list(params.items())[1:] if p.default is inspect.Parameter.empty
              and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) and name not in mode]
    if needed:
        name = f"{type(model).__name__}.__call__" if isinstance(model, nn.Module) else getattr(model, "__name__", model)
        defaults = "it a default" if len(needed) == 1 else "them defaults"
        raise ConfigError(f"jaxnet calls a model as model(x, train=...), model(x, deterministic=...) or model(x); "
                          f"{name} also needs {', '.join(needed)}: give {defaults}")
    return mode


def _apply(state: Any, variables: dict[str, Any], x: Any, *, train: bool, **kwargs) -> Any:
    """`state.apply_fn(variables, x, **kwargs)` in training or inference mode (`_mode`). A model with BatchNorm
    statistics under a state that holds none (Flax's own TrainState has no `batch_stats` field) is a one-line
    ConfigError saying what to use instead of Flax's error about an empty collection."""
    try:
        return state.apply_fn(variables, x, **_mode(state.apply_fn, train), **kwargs)
    except flax.errors.ScopeCollectionNotFound as e:
        if "batch_stats" in variables or 'from collection "batch_stats"' not in str(e):
            raise
        raise ConfigError("the model keeps BatchNorm statistics but the state holds none: make it with "
                          "jaxnet.create_train_state, or give your TrainState a batch_stats field set to "
                          "model.init(...)['batch_stats']") from e


def _variables(state: Any) -> dict[str, Any]:
    """What `apply_fn` takes: params, and batch_stats where the model has them."""
    stats = _batch_stats(state)
    return {"params": state.params, "batch_stats": stats} if stats else {"params": state.params}


def learning_rate(opt_state: Any) -> jax.Array | None:
    """The learning rate the optimizer used for its last update: the one `learning_rate` hyperparameter of an
    `optax.inject_hyperparams` state inside `opt_state` (as jaxnet.optim's optimizers keep it), else None."""
    def in_hyperparams(path, _value) -> bool:  # the value, not the schedule's own state of the same name
        return len(path) > 1 and getattr(path[-2], "name", "") == "hyperparams"

    found = optax.tree.get_all_with_path(opt_state, "learning_rate", filtering=in_hyperparams)
    return jnp.asarray(found[0][1], jnp.float32) if len(found) == 1 else None


def _dropout_rngs(state: Any, dropout_rng: jax.Array | None) -> dict[str, jax.Array]:
    """The model's dropout key at `state.step` (see `train_step`)."""
    base = dropout_rng if dropout_rng is not None else getattr(state, "rng", None)
    base = jax.random.key(DEFAULT_DROPOUT_SEED) if base is None else base
    return {"dropout": jax.random.fold_in(base, state.step)}


def train_step(state: Any, batch: Batch, *, label_smoothing: float = 0.0, dropout_rng: jax.Array | None = None,
               axis_name: str | None = None) -> tuple[Any, Metrics]:
    """One optimizer step on the mean loss of `batch` = {"image": (N, ...) model input, "label": (N,) int}.

    `state`: jaxnet's `TrainState` or Flax's (or a subclass with `batch_stats`). Returns the new state and
    {"loss", "accuracy", "count"} — plus "lr" when the optimizer reports one (see `learning_rate`) — all
    scalars on device. BatchNorm statistics, if the model has them, are updated from this batch. The model's
    dropout key is `fold_in(k, state.step)` with k = `dropout_rng`, else the state's `rng`, else
    `key(DEFAULT_DROPOUT_SEED)`. `axis_name` (pmap only): gradients and metrics are averaged over that axis;
    under jit with shardings leave it None — the batch is already global.

    A label outside [0, K) makes its loss, so the reported "loss", NaN (values are not read back to check;
    `validate_batch` checks host arrays); its gradient is that of the other images.

    Raises:
      DataError: `batch` is not a mapping with "image" and "label", the labels are not (N,) integers (one per
        input), or the model's output is not (N, K) logits — at trace time, from shapes and dtypes alone.
      ConfigError: `state` is not a TrainState (`check_state`).
    """
    check_state("train_step", state)
    images, labels = _step_batch(batch)
    stats = _batch_stats(state)
    rngs = _dropout_rngs(state, dropout_rng)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": stats} if stats else {"params": params}
        logits, updates = _apply(state, variables, images, train=True, rngs=rngs,
                                 mutable=["batch_stats"] if stats else [])
        losses = cross_entropy(logits, labels, label_smoothing)
        return losses.mean(), (losses, logits, updates)

    grads, (losses, logits, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    new_state = state.apply_gradients(grads=grads)
    if stats:
        new_state = new_state.replace(batch_stats=updates["batch_stats"])
    metrics = _metrics(losses, logits, labels, jnp.ones(labels.shape, bool), axis_name)
    lr = learning_rate(new_state.opt_state)
    if lr is not None:
        metrics["lr"] = lr
    return new_state, metrics


def lookahead_ema(step_fn: Callable = train_step, *, every: int, decay_fn: Schedule,
                  final_step: int | None = None) -> Callable[..., tuple[TrainState, Metrics]]:
    """`step_fn` followed by airbench's lookahead sync of the whole model state (params and BN statistics).

    After step s with s % every == 0: ema ← ema + (1 − decay_fn(s))·(model − ema), then model ← ema. After
    `final_step` (if given) the model is set to the EMA without a new average, as airbench does at its last
    step, so the trained net is the EMA. `decay_fn(step)` in [0, 1]; 0 means no smoothing. The state must
    hold an EMA (`create_train_state(..., ema=True)`); the policy lives here, in the step, not in the state.

    Raises:
      ConfigError: `every` or `final_step` is not a positive integer, or `decay_fn` is not a function of the step.
    """
    check_values("lookahead_ema", every=("positive integer", every),
                 final_step=("positive integer or None", final_step))
    if not callable(decay_fn):
        raise ConfigError(f"lookahead decay_fn must be a function of the step (e.g. lambda step: 0.95), "
                          f"got {decay_fn!r}")

    def step(state: TrainState, batch: Batch, **kwargs) -> tuple[TrainState, Metrics]:
        if getattr(state, "ema", None) is None:
            raise ConfigError("lookahead_ema needs a state with an EMA: create_train_state(..., ema=True)")
        state, metrics = step_fn(state, batch, **kwargs)
        periodic = state.step % every == 0
        final = state.step == final_step if final_step is not None else False
        decay = jnp.where(periodic, decay_fn(state.step), 1.0)
        model = _model_variables(state)
        ema = jax.tree.map(lambda e, m: jnp.where(periodic, e + (1 - decay) * (m - e), e), state.ema, model)
        model = jax.tree.map(lambda e, m: jnp.where(periodic | final, e, m), ema, model)
        return state.replace(params=model["params"], batch_stats=model["batch_stats"], ema=ema), metrics

    return step


def select_hardest(step_fn: Callable = train_step, *, fraction: float, score_size: int | None = None,
                   proxy_step: Callable | None = None, proxy_every: int = 1) -> Callable[..., tuple[Any, Metrics]]:
    """`step_fn` on the `fraction` of each batch that a scoring model finds hardest (online batch selection,
    Loshchilov & Hutter 2015): the model itself, or a small proxy net as airbench96_faster's.

    A forward pass in training mode (BatchNorm on the whole batch's statistics, which are not kept; the
    scorer's dropout key) gives each image's cross-entropy; `step_fn` then trains on the max(1, round(fraction ·
    N)) images of highest loss, every key of the batch gathered alike. Its metrics are those of the trained
    images. Under pmap (`axis_name`) each device picks from its own share. The optimizer, schedule and step
    count are those of the whole batch: an epoch is the same number of steps, each training on fewer images.
    `score_size`: the scoring pass sees the images resized to at most that side (`jaxnet.data.resize`; integer
    images rounded back to their dtype), for a model that takes any size (global pooling): at 16 of 32 pixels
    it costs about a quarter of the FLOPs.

    `proxy_step` (e.g. `partial(train_step, label_smoothing=0.2)`): the state's `proxy` (jaxnet's TrainState
    field: a small model's own state, optimizer included) scores the batch instead of the model, and after
    every `proxy_every`-th step (steps 0, k, 2k, … of the state) `proxy_step(proxy, chosen images, **kwargs)`
    trains it on the images it chose, as airbench96_faster trains its proxy on its hardest half every 4th step.
    The proxy's own step count (its schedule's) advances only when it trains.

    Raises:
      ConfigError: `fraction` is not in (0, 1], `score_size` or `proxy_every` is not a positive integer, or
        (when called) `proxy_step` is given and the state holds no proxy.
    """
    check_values("select_hardest", fraction=("in (0, 1]", fraction),
                 score_size=("positive integer or None", score_size), proxy_every=("positive integer", proxy_every))

    def scored(images: jax.Array) -> jax.Array:
        if score_size is not None:
            _check_images(images, "select_hardest score_size resizes images")
        if score_size is None or score_size >= min(images.shape[1:3]):
            return images
        small = data.resize(images.astype(jnp.float32), score_size)
        if jnp.issubdtype(images.dtype, jnp.integer):
            small = jnp.clip(jnp.round(small), jnp.iinfo(images.dtype).min, jnp.iinfo(images.dtype).max)
        return small.astype(images.dtype)

    def step(state: Any, batch: Batch, **kwargs) -> tuple[Any, Metrics]:
        scorer = state
        if proxy_step is not None:
            scorer = getattr(state, "proxy", None)
            if scorer is None:
                raise ConfigError("select_hardest with a proxy_step needs a state with a proxy: "
                                  "state.replace(proxy=create_train_state(small_model, ...))")
        images, labels = _step_batch(batch)
        stats = _batch_stats(scorer)
        logits = _apply(scorer, _variables(scorer), scored(images), train=True,
                        rngs=_dropout_rngs(scorer, kwargs.get("dropout_rng")),
                        mutable=["batch_stats"] if stats else [])[0]
        k = max(1, round(fraction * labels.shape[0]))
        _, chosen = jax.lax.top_k(cross_entropy(logits, labels), k)
        chosen = {key: value[chosen] for key, value in {**batch, "label": labels}.items()}  # labels: an array
        new_state, metrics = step_fn(state, chosen, **kwargs)
        if proxy_step is None:
            return new_state, metrics
        proxy = jax.lax.cond(state.step % proxy_every == 0, lambda p: proxy_step(p, chosen, **kwargs)[0],
                             lambda p: p, scorer)
        return new_state.replace(proxy=proxy), metrics

    return step


def predict_logits(state: Any, images: jax.Array, *, tta: int = 0, tta_fraction: float = 1.0) -> jax.Array:
    """Inference-mode logits (N, K) float32 of `images` (passed to the model as given), averaged over
    test-time augmentations.

    tta=0: the images as given; 1: mean with the horizontal mirror; 2: (airbench's) half that, half the
    mean of the mirrored pair at ±1 px diagonal translations (reflect padding). Raises ConfigError otherwise.
    `tta_fraction` < 1 (selective TTA, as hiverge's speedrun): only the round(fraction · N) images (at least one)
    of least confident plain prediction (lowest top softmax probability) get the augmented views; the others
    keep their plain logits. At 0.25 with tta=2, 2.25 forward passes per image instead of 6.
    """
    check_state("predict_logits", state, ("apply_fn", "params"))
    return _plain_and_tta_logits(state, images, tta, tta_fraction)[1]


def _plain_and_tta_logits(state: Any, images: jax.Array, tta: int, tta_fraction: float) -> tuple[jax.Array, jax.Array]:
    """(plain logits, `predict_logits`'): the plain ones are computed once, as one of TTA's views."""
    variables = _variables(state)

    def logits(x):
        return _apply(state, variables, x, train=False).astype(jnp.float32)

    def mirrored(x, plain=None):  # plain: x's logits, where already computed
        return 0.5 * ((logits(x) if plain is None else plain) + logits(x[:, :, ::-1]))

    def augmented(x, plain):
        match tta:
            case 1:
                return mirrored(x, plain)
            case 2:
                h, w = x.shape[1:3]
                padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
                shifted = 0.5 * (mirrored(padded[:, :h, :w]) + mirrored(padded[:, 2:h + 2, 2:w + 2]))
                return 0.5 * mirrored(x, plain) + 0.5 * shifted
            case _:
                raise ConfigError(f"tta must be 0, 1 or 2, got {tta!r}")

    if tta:
        _check_images(images, f"tta={tta!r} mirrors and shifts images")
    plain = logits(images)
    if tta == 0:
        return plain, plain
    check_values("predict_logits", tta_fraction=("in (0, 1]", tta_fraction))
    if tta_fraction == 1:
        return plain, augmented(images, plain)
    k = max(1, round(tta_fraction * images.shape[0]))
    _, least_confident = jax.lax.top_k(-jax.nn.softmax(plain).max(axis=-1), k)
    return plain, plain.at[least_confident].set(augmented(images[least_confident], plain[least_confident]))


def eval_step(state: Any, batch: Batch, *, tta: int = 0, tta_fraction: float = 1.0,
              axis_name: str | None = None) -> Metrics:
    """Loss and accuracy of the model in inference mode (running BN statistics) on `batch`; with `tta` > 0 also
    "plain_loss" and "plain_accuracy", those of the images without TTA (one of its views: no extra pass).

    `batch` may carry "mask": (N,) bool, False for padding rows, so the last, short batch of a split can be
    padded to the common size (no recompile) and still count exactly: "count" is the number of real rows.
    `tta` and `tta_fraction` as in `predict_logits` (the fraction is of the batch, padding rows included);
    `axis_name` (pmap only): metrics over all devices of that axis. Bad input as for `train_step` (and a "mask" of
    another shape than the labels') raises DataError.
    """
    check_state("eval_step", state, ("apply_fn", "params"))
    images, labels = _step_batch(batch)
    mask = batch.get("mask", jnp.ones(jnp.shape(labels), bool))
    if jnp.shape(mask) != jnp.shape(labels):
        raise DataError(f"batch['mask'] must have the labels' shape {jnp.shape(labels)}, got {jnp.shape(mask)}")
    plain, logits = _plain_and_tta_logits(state, images, tta, tta_fraction)
    metrics = _metrics(cross_entropy(logits, labels), logits, labels, mask, axis_name)
    if tta:
        plain_metrics = _metrics(cross_entropy(plain, labels), plain, labels, mask, axis_name)
        metrics |= {"plain_loss": plain_metrics["loss"], "plain_accuracy": plain_metrics["accuracy"]}
    return metrics


def merge_metrics(metrics: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Count-weighted means over batches of each scalar metric ("loss", "accuracy", ...; others are left out),
    and the total "count" (host floats). Batches that hold no image (a count of 0 in all: every row masked) have
    no mean: NaN. DataError for no batches at all (an empty split, or an iterator used up already)."""
    if not metrics:
        raise DataError("merge_metrics: no metrics to merge (no batches were evaluated)")
    counts = np.array([float(m["count"]) for m in metrics])
    total = counts.sum()
    keys = [k for k, v in metrics[0].items() if k != "count" and np.ndim(v) == 0]
    merged = {k: float(np.dot(counts, [float(m[k]) for m in metrics]) / total) if total else float("nan")
              for k in keys}
    return {**merged, "count": int(total)}


# ---- input checks at the API boundary (outside jit: metadata only, plus values of host arrays) ----

def _shape_dtype(x: Any, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from metadata: an array is never read (that would be a host sync per step). A list or
    scalar (maybe of traced values, under jit) is what jnp.asarray makes of it; DataError if it makes nothing."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        try:
            x = jax.eval_shape(jnp.asarray, x)
        except (TypeError, ValueError):
            raise DataError(f"{name} must be an array, got {reprlib.repr(x)}") from None
    return tuple(x.shape), np.dtype(x.dtype)


def _images_and_labels(batch: Batch) -> tuple[Any, Any]:
    """batch["image"], batch["label"]; DataError (one line) if `batch` is not a mapping holding both."""
    if not isinstance(batch, Mapping):
        raise DataError(f"batch must be a mapping with keys 'image' and 'label', got {type(batch).__name__}")
    for key in ("image", "label"):
        if key not in batch:
            raise DataError(f"batch must have keys 'image' and 'label', got {sorted(batch)}")
    return batch["image"], batch["label"]


def _check_labels(labels: Any, num_images: int | None = None, name: str = "batch['label']") -> int:
    """The number of labels; DataError (one line) unless they are (N,) integers, N = `num_images` when given."""
    lshape, ldtype = _shape_dtype(labels, name)
    if len(lshape) != 1 or not np.issubdtype(ldtype, np.integer):
        raise DataError(f"{name} must be (N,) integers, got shape {lshape} dtype {ldtype}")
    if num_images is not None and lshape[0] != num_images:
        raise DataError(f"batch has {num_images} images but {lshape[0]} labels")
    return lshape[0]


def _check_images(images: Any, what: str) -> None:
    """DataError unless `images` is an (N, H, W, C) array: `what` works on images, not on any model input."""
    if len(getattr(images, "shape", ())) != 4:
        got = f"shape {tuple(images.shape)}" if hasattr(images, "shape") else f"a {type(images).__name__}"
        raise DataError(f"{what}: it needs (N, H, W, C) input, got {got}")


def _check_not_empty(shape: tuple[int, ...]) -> None:
    if shape[0] == 0:
        raise DataError(f"batch is empty: batch['image'] has shape {shape}")


def _step_batch(batch: Batch) -> tuple[Any, jax.Array]:
    """A step's images and labels: (N, ...) model input (an array; any other pytree is the model's business) and
    (N,) integer labels (as an array), N > 0, else DataError (one line)."""
    images, labels = _images_and_labels(batch)
    shape = getattr(images, "shape", None)
    if shape is not None:
        if not shape:
            raise DataError("batch['image'] must be (N, ...), one model input per label, got a scalar")
        _check_not_empty(tuple(shape))
    _check_labels(labels, None if shape is None else shape[0])
    return images, jnp.asarray(labels)


def check_batch_spec(where: str, num_classes: Any, image_shape: Any) -> None:
    """ConfigError unless `num_classes` is None or a positive integer and `image_shape` None or (H, W, C)."""
    check_values(where, num_classes=("positive integer or None", num_classes))
    if image_shape is not None and not (isinstance(image_shape, Sequence) and len(image_shape) == 3
                                        and all(is_kind("positive integer", d) for d in image_shape)):
        raise ConfigError(f"{where} image_shape must be (H, W, C), 3 positive integers, got {image_shape!r}")


def validate_batch(batch: Batch, *, num_classes: int | None = None,
                   image_shape: Sequence[int] | None = None) -> None:
    """Raise DataError (a ValueError; one line: expected vs received) if `batch` cannot be an (images,
    labels) batch.

    Checks: "image" and "label" present; images rank 4 NHWC, float or uint8, non-empty, of `image_shape`
    (H, W, C) when given; labels rank 1 integer with one per image; label values in [0, num_classes) when
    `num_classes` is given and the labels are host (NumPy) arrays — device arrays are not read back, which
    would cost a host sync per step. ConfigError for a `num_classes` or `image_shape` it cannot check against.
    """
    check_batch_spec("validate_batch", num_classes, image_shape)
    check_batch(batch, num_classes, image_shape)


def check_batch(batch: Batch, num_classes: int | None, image_shape: Sequence[int] | None) -> None:
    """`validate_batch` against a spec checked already (`check_batch_spec`): the compiled steps check theirs once
    when built, not on every step."""
    images, labels = _images_and_labels(batch)
    shape, dtype = _shape_dtype(images, "batch['image']")
    if len(shape) != 4:
        raise DataError(f"batch['image'] must be (N, H, W, C), got shape {shape}")
    if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating) or dtype == jnp.bfloat16):
        raise DataError(f"batch['image'] must be float or uint8, got dtype {dtype}")
    _check_not_empty(shape)
    if image_shape is not None and shape[1:] != tuple(image_shape):
        raise DataError(f"batch['image'] must be (N, {', '.join(map(str, image_shape))}), got shape {shape}")
    _check_labels(labels, shape[0])
    if num_classes is not None and isinstance(labels, np.ndarray):
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(f"labels must be in [0, {num_classes}), got values in [{lo}, {hi}]")
