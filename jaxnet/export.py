"""Export of the inference function: `jax.export` (serialized StableHLO, runs without the model's Python
code) and ONNX (optional extra `onnx`, via jax2onnx). Both take uint8 (B, H, W, C) images, any B, and
return (B, K) class probabilities; normalisation and the trained variables are baked in."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import data as data_lib
from jaxnet.train import TrainState, predict_logits


def inference_fn(state: TrainState, *, mean: Sequence[float], std: Sequence[float], tta: int = 0) -> Callable:
    """uint8 (B, H, W, C) → (B, K) softmax probabilities of the trained model, variables closed over."""

    def predict(images: jax.Array) -> jax.Array:
        x = data_lib.normalize(images, mean, std)
        return jax.nn.softmax(predict_logits(state, x, tta=tta), axis=-1)

    return predict


def export_jax(fn: Callable, path: str | os.PathLike, image_shape: Sequence[int] = (32, 32, 3)) -> Path:
    """Serialize `fn` with a symbolic batch size to `path` (written atomically); returns the path."""
    batch = jax.export.symbolic_shape("b")[0]
    exported = jax.export.export(jax.jit(fn))(jax.ShapeDtypeStruct((batch, *image_shape), jnp.uint8))
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(exported.serialize())
    os.replace(tmp, path)
    return path


def load_jax(path: str | os.PathLike) -> Callable[[np.ndarray], jax.Array]:
    """The function saved by `export_jax`, callable on uint8 (B, H, W, C) arrays of any B."""
    return jax.export.deserialize(bytearray(Path(path).read_bytes())).call


def export_onnx(fn: Callable, path: str | os.PathLike, image_shape: Sequence[int] = (32, 32, 3)) -> Path:
    """Convert `fn` to ONNX at `path` with a dynamic batch dimension (needs the `onnx` extra).

    Raises:
      RuntimeError: the extra is missing, or `fn` holds an op jax2onnx cannot convert — among them the
        platform switch of conv impl "auto": export a model built with a fixed impl (same parameters).
    """
    try:
        from jax2onnx import to_onnx
    except ImportError as e:
        raise RuntimeError(f"ONNX export needs the onnx extra: pip install 'jaxnet[onnx]' ({e})") from None
    spec = jax.ShapeDtypeStruct((jax.export.symbolic_shape("B")[0], *image_shape), jnp.uint8)
    try:
        model = to_onnx(fn, [spec], model_name="jaxnet")
    except NotImplementedError as e:
        raise RuntimeError(f"ONNX export: {str(e).splitlines()[0]} (conv impl 'auto' is a platform switch ONNX "
                           f"cannot hold: build the model with a fixed impl, e.g. 'xla')") from None
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, path)
    return path
