"""The training core: state, loss and metrics, `train_step` / `eval_step`, optimizers and LR schedules.

Everything here is a pure function of its arguments, with no jit inside (`jaxnet.parallel` applies jit and
shardings to the steps), except `create_train_state`, which compiles its one-off initialisation. The steps
work with any linen module called as `model.apply(variables, x, train=...)`, with or without BatchNorm
(`batch_stats`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from jaxnet import compiler

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
Schedule = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Lookahead:
    """airbench's lookahead EMA of the whole model state (params and BatchNorm statistics).

    After step s with s % every == 0: ema ← ema + (1 − decay_fn(s))·(model − ema), then model ← ema. After
    `final_step` (if given) the model is set to the EMA without a new average, as airbench does at its last
    step, so the trained net is the EMA. `decay_fn(step)` in [0, 1]; 0 means no smoothing. Raises
    ValueError unless `every` and `final_step` are positive integers.
    """

    every: int
    decay_fn: Schedule
    final_step: int | None = None

    def __post_init__(self):
        for name in ("every", "final_step"):
            value = getattr(self, name)
            if (value is not None or name == "every") and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"Lookahead {name} must be a positive integer, got {value!r}")


class TrainState(train_state.TrainState):
    """Flax's TrainState plus `batch_stats` (an empty dict for models without BatchNorm), `rng`, the
    dropout key (step s uses `fold_in(rng, s)`, so no key is ever captured or reused), and, with a
    `lookahead`, its `ema` of {"params", "batch_stats"}. `lookahead` is static, like `tx`."""

    batch_stats: Any = struct.field(default_factory=dict)
    rng: jax.Array | None = None
    ema: Any = None
    lookahead: Lookahead | None = struct.field(pytree_node=False, default=None)

    def with_params(self, params: Any) -> TrainState:
        """This state with new `params` (e.g. a kernel set from data), the optimizer state and the EMA
        restarted from them."""
        return _restart_ema(self.replace(params=params, opt_state=self.tx.init(params)))


def _restart_ema(state: TrainState) -> TrainState:
    """`state` with its EMA (if it has a lookahead) set to a copy of its params and BN statistics."""
    if state.lookahead is None:
        return state
    return state.replace(ema=jax.tree.map(jnp.copy, {"params": state.params, "batch_stats": state.batch_stats}))


def lookahead_sync(state: TrainState) -> TrainState:
    """`state.lookahead`'s sync after step `state.step` (a no-op between syncs); see `Lookahead`."""
    lookahead = state.lookahead
    periodic = state.step % lookahead.every == 0
    final = state.step == lookahead.final_step if lookahead.final_step is not None else False
    decay = jnp.where(periodic, lookahead.decay_fn(state.step), 1.0)
    model = {"params": state.params, "batch_stats": state.batch_stats}
    ema = jax.tree.map(lambda e, m: jnp.where(periodic, e + (1 - decay) * (m - e), e), state.ema, model)
    model = jax.tree.map(lambda e, m: jnp.where(periodic | final, e, m), ema, model)
    return state.replace(params=model["params"], batch_stats=model["batch_stats"], ema=ema)


def create_train_state(model: nn.Module, rng: jax.Array, sample_input: jax.Array,
                       tx: optax.GradientTransformation, *, lookahead: Lookahead | None = None) -> TrainState:
    """Initialise `model` on `sample_input` (e.g. a (1, H, W, C) batch) and wrap it with the optimizer `tx`
    (and a `lookahead` EMA, starting at the initial model, when given).

    `rng` is split into the init key and the dropout key kept in the state. The initialisation (model and
    optimizer) runs as one program compiled by `compiler.run_once`: op by op, JAX compiles every initializer
    and optimizer-state leaf on its own (154 compilations and ~25 s for the smoke experiment's tiny FastNet).
    """
    def init(rng: jax.Array, sample_input: jax.Array) -> TrainState:
        init_rng, dropout_rng = jax.random.split(rng)
        variables = model.init({"params": init_rng, "dropout": init_rng}, _as_float(sample_input), train=False)
        return _restart_ema(TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                              batch_stats=variables.get("batch_stats", {}), rng=dropout_rng,
                                              lookahead=lookahead))

    return compiler.run_once(init, rng, sample_input)


def _as_float(images: jax.Array) -> jax.Array:
    """uint8 images are scaled to [0, 1] float32; float images pass unchanged."""
    return images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy, (N, K) float logits and (N,) int labels → (N,) float32."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _metrics(losses: jax.Array, logits: jax.Array, labels: jax.Array, mask: jax.Array,
             axis_name: str | None = None) -> Metrics:
    """Masked means over the batch — over all devices of `axis_name` when given (inside pmap)."""
    sums = {"loss": jnp.sum(losses * mask), "correct": jnp.sum((jnp.argmax(logits, -1) == labels) & mask),
            "count": mask.sum()}
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    count = jnp.maximum(sums["count"], 1)
    return {"loss": sums["loss"] / count, "accuracy": sums["correct"] / count, "count": sums["count"]}


def train_step(state: TrainState, batch: Batch, *, label_smoothing: float = 0.0,
               lr_fn: Schedule | None = None, axis_name: str | None = None) -> tuple[TrainState, Metrics]:
    """One SGD step on the mean loss of `batch` = {"image": (N, H, W, C) float or uint8, "label": (N,) int}.

    Returns the new state and {"loss", "accuracy", "count"} (plus "lr" = lr_fn(step) when given), all
    scalars on device. BatchNorm statistics, if the model has them, are updated from this batch; then the
    state's lookahead EMA, if it has one, syncs (`lookahead_sync`).
    `axis_name` (pmap only): gradients and metrics are averaged over that axis; under jit with shardings
    leave it None — the batch is already global.
    """
    images, labels = _as_float(batch["image"]), batch["label"]
    has_bn = bool(state.batch_stats)
    rngs = {"dropout": jax.random.fold_in(state.rng, state.step)} if state.rng is not None else {}

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats} if has_bn else {"params": params}
        logits, updates = state.apply_fn(variables, images, train=True, rngs=rngs,
                                         mutable=["batch_stats"] if has_bn else [])
        losses = cross_entropy(logits, labels, label_smoothing)
        return losses.mean(), (losses, logits, updates)

    grads, (losses, logits, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    new_state = state.apply_gradients(grads=grads)
    if has_bn:
        new_state = new_state.replace(batch_stats=updates["batch_stats"])
    if state.lookahead is not None:
        new_state = lookahead_sync(new_state)
    metrics = _metrics(losses, logits, labels, jnp.ones(labels.shape, bool), axis_name)
    if lr_fn is not None:
        metrics["lr"] = jnp.asarray(lr_fn(state.step), jnp.float32)
    return new_state, metrics


def predict_logits(state: TrainState, images: jax.Array, *, tta: int = 0) -> jax.Array:
    """Inference-mode logits (N, K) float32, averaged over test-time augmentations.

    tta=0: the images as given; 1: mean with the horizontal mirror; 2: (airbench's) half that, half the
    mean of the mirrored pair at ±1 px diagonal translations (reflect padding).
    """
    variables = {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}

    def logits(x):
        return state.apply_fn(variables, x, train=False).astype(jnp.float32)

    def mirrored(x):
        return 0.5 * (logits(x) + logits(x[:, :, ::-1]))

    images = _as_float(images)
    match tta:
        case 0:
            return logits(images)
        case 1:
            return mirrored(images)
        case 2:
            h, w = images.shape[1:3]
            padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
            shifted = 0.5 * (mirrored(padded[:, :h, :w]) + mirrored(padded[:, 2:h + 2, 2:w + 2]))
            return 0.5 * mirrored(images) + 0.5 * shifted
        case _:
            raise ValueError(f"tta must be 0, 1 or 2, got {tta!r}")


def eval_step(state: TrainState, batch: Batch, *, tta: int = 0, axis_name: str | None = None) -> Metrics:
    """Loss and accuracy of the model in inference mode (running BN statistics) on `batch`.

    `batch` may carry "mask": (N,) bool, False for padding rows, so the last, short batch of a split can be
    padded to the common size (no recompile) and still count exactly: "count" is the number of real rows.
    `tta` as in `predict_logits`; `axis_name` (pmap only): metrics over all devices of that axis.
    """
    labels = batch["label"]
    mask = batch.get("mask", jnp.ones(labels.shape, bool))
    logits = predict_logits(state, batch["image"], tta=tta)
    return _metrics(cross_entropy(logits, labels), logits, labels, mask, axis_name)


def merge_metrics(metrics: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Count-weighted means of "loss" and "accuracy" over batches, and the total "count" (host floats)."""
    counts = np.array([float(m["count"]) for m in metrics])
    total = counts.sum()
    merged = {k: float(np.dot(counts, [float(m[k]) for m in metrics]) / max(total, 1)) for k in ("loss", "accuracy")}
    return {**merged, "count": int(total)}


# ---- input checks at the API boundary (outside jit: metadata only, plus values of host arrays) ----

def validate_batch(batch: Batch, *, num_classes: int | None = None,
                   image_shape: Sequence[int] | None = None) -> None:
    """Raise ValueError (one line: expected vs received) if `batch` cannot be a (images, labels) batch.

    Checks: "image" and "label" present; images rank 4 NHWC, float or uint8, non-empty, of `image_shape`
    (H, W, C) when given; labels rank 1 integer with one per image; label values in [0, num_classes) when
    `num_classes` is given and the labels are host (NumPy) arrays — device arrays are not read back, which
    would cost a host sync per step.
    """
    for key in ("image", "label"):
        if key not in batch:
            raise ValueError(f"batch must have keys 'image' and 'label', got {sorted(batch)}")
    images, labels = batch["image"], batch["label"]
    shape, dtype = tuple(np.shape(images)), np.dtype(getattr(images, "dtype", np.asarray(images).dtype))
    if len(shape) != 4:
        raise ValueError(f"batch['image'] must be (N, H, W, C), got shape {shape}")
    if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating) or dtype == jnp.bfloat16):
        raise ValueError(f"batch['image'] must be float or uint8, got dtype {dtype}")
    if shape[0] == 0:
        raise ValueError(f"batch is empty: batch['image'] has shape {shape}")
    if image_shape is not None and shape[1:] != tuple(image_shape):
        raise ValueError(f"batch['image'] must be (N, {', '.join(map(str, image_shape))}), got shape {shape}")
    lshape, ldtype = tuple(np.shape(labels)), np.dtype(getattr(labels, "dtype", np.asarray(labels).dtype))
    if len(lshape) != 1 or not np.issubdtype(ldtype, np.integer):
        raise ValueError(f"batch['label'] must be (N,) integers, got shape {lshape} dtype {ldtype}")
    if lshape[0] != shape[0]:
        raise ValueError(f"batch has {shape[0]} images but {lshape[0]} labels")
    if num_classes is not None and isinstance(labels, np.ndarray):
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must be in [0, {num_classes}), got values in [{lo}, {hi}]")


# ---- optimizers and schedules ----

def decay_mask(params: Any) -> Any:
    """True for weights that get weight decay: kernels (ndim > 1); False for biases and BN scales/offsets."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def sgd(learning_rate: float | Schedule, *, momentum: float = 0.9, nesterov: bool = True,
        weight_decay: float = 0.0) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum and decoupled weight decay on kernels only.

    update = -lr · (momentum_direction(grad) + weight_decay · param): the decay does not enter the
    momentum buffer (Loshchilov & Hutter), and BN parameters and biases are never decayed.
    """
    return optax.chain(optax.trace(decay=momentum, nesterov=nesterov),
                       optax.add_decayed_weights(weight_decay, mask=decay_mask),
                       optax.scale_by_learning_rate(learning_rate))


def adamw(learning_rate: float | Schedule, *, b1: float = 0.9, b2: float = 0.999,
          weight_decay: float = 0.0) -> optax.GradientTransformation:
    """AdamW with decay on kernels only (weight_decay=0 gives Adam, as in the reference script)."""
    return optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)


def piecewise_linear(steps: Sequence[float], values: Sequence[float]) -> Schedule:
    """LR through the points (steps[i], values[i]), linear in between, flat outside (one-cycle, triangular)."""
    if len(steps) != len(values) or len(steps) < 2 or list(steps) != sorted(steps):
        raise ValueError(f"piecewise_linear needs ≥ 2 points with increasing steps, got {steps}, {values}")
    xs, ys = jnp.asarray(steps, jnp.float32), jnp.asarray(values, jnp.float32)
    return lambda step: jnp.interp(jnp.asarray(step, jnp.float32), xs, ys)


def warmup_cosine(peak: float, total_steps: int, warmup_steps: int = 0, end: float = 0.0) -> Schedule:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then cosine decay to `end` at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps, end)


def constant(value: float) -> Schedule:
    """A constant LR, as a schedule so that metrics can report it."""
    return optax.constant_schedule(value)
