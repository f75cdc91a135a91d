"""Export of the inference function: `jax.export` (serialized StableHLO, runs without the model's Python
code) and ONNX (optional extra `onnx`, via jax2onnx). Both take uint8 (B, H, W, C) images, any B, and
return (B, K) class probabilities; normalisation and the trained variables are baked in. Also the
predict side: reading image files for an exported model and naming its top classes."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import data as data_lib
from jaxnet.errors import ConfigError
from jaxnet.ops import conv
from jaxnet.train import TrainState, predict_logits

FORMATS = ("jax", "onnx")
# Platforms a jax export can be lowered for from any machine; the default is both of those jaxnet runs on.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda")
# Conv impls a jax export holds as they are: plain XLA ops, the same on every platform ("auto" traced `portable`,
# without its oneDNN row). The others go out as XLA's conv (the same function): "onednn"'s FFI calls exist only in
# a process that loaded jaxnet's handlers; "pallas" is interpret mode on CPUs and, on GPUs, a Triton kernel
# compiled for one GPU generation.
PORTABLE_IMPLS = ("xla", "im2col", "auto")


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
    """`platforms` as a tuple; ConfigError (one line) if empty or naming one jax.export does not know."""
    if not platforms or (unknown := [p for p in platforms if p not in PLATFORMS]):
        raise ConfigError(f"export platforms are one or more of {', '.join(PLATFORMS)}, got "
                          f"{', '.join(map(repr, unknown)) if platforms else 'none'}")
    return tuple(platforms)


def current_platform() -> str:
    """This process's platform as jax.export names it ("cpu", "cuda", "rocm", "tpu")."""
    device = jax.devices()[0]
    if device.platform == "gpu":
        return "rocm" if "rocm" in device.client.platform_version.lower() else "cuda"
    return device.platform


def inference_fn(state: TrainState, *, mean: Sequence[float], std: Sequence[float], tta: int = 0) -> Callable:
    """uint8 (B, H, W, C) → (B, K) softmax probabilities of the trained model, variables closed over."""

    def predict(images: jax.Array) -> jax.Array:
        x = data_lib.normalize(images, mean, std)
        return jax.nn.softmax(predict_logits(state, x, tta=tta), axis=-1)

    return predict


def export_jax(fn: Callable, path: str | os.PathLike, image_shape: Sequence[int] = (32, 32, 3),
               platforms: Sequence[str] = DEFAULT_PLATFORMS) -> Path:
    """Serialize `fn` with a symbolic batch size, lowered for each of `platforms` (from any machine: a CPU
    can export for GPUs), to `path` (written atomically); returns the path. Conv impl "auto" in `fn` is traced
    `portable` (XLA's own ops; no oneDNN FFI call, which a loading process would not have)."""
    batch = jax.export.symbolic_shape("b")[0]
    with conv.portable():
        exported = jax.export.export(jax.jit(fn), platforms=check_platforms(platforms))(
            jax.ShapeDtypeStruct((batch, *image_shape), jnp.uint8))
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(exported.serialize())
    os.replace(tmp, path)
    return path


def load_jax(path: str | os.PathLike) -> Callable[[np.ndarray], jax.Array]:
    """The function saved by `export_jax`, callable on uint8 (B, H, W, C) arrays of any B. ConfigError if the
    file cannot be read or is not a whole jax export (e.g. cut short by a kill or a full disk), or it was not
    exported for this process's platform."""
    try:
        exported = jax.export.deserialize(bytearray(Path(path).read_bytes()))
    except Exception as e:  # OSError, or whatever the flatbuffer parser raises on bytes it cannot take
        kind = f"{type(e).__module__}.{type(e).__name__}"
        why = e.strerror if isinstance(e, OSError) else f"not a whole jax export: {kind}"
        raise ConfigError(f"{path} cannot be loaded ({why}): export the model again (--export jax)") from None
    if (here := current_platform()) not in exported.platforms:
        raise ConfigError(f"{path} was exported for {', '.join(exported.platforms)}, not for {here}: export it "
                          f"again with --export-platforms {','.join(dict.fromkeys((*exported.platforms, here)))}")
    return exported.call


def onnx_converter() -> Callable:
    """jax2onnx's `to_onnx`; ConfigError (one line) where the `onnx` extra is not installed — asked before a run
    trains, so that a run given `--export onnx` does not end in it."""
    try:
        from jax2onnx import to_onnx
    except ImportError as e:
        raise ConfigError(f"ONNX export needs the onnx extra: pip install 'jaxnet[onnx]' ({e})") from None
    return to_onnx


def export_onnx(fn: Callable, path: str | os.PathLike, image_shape: Sequence[int] = (32, 32, 3)) -> Path:
    """Convert `fn` to ONNX at `path` with a dynamic batch dimension (needs the `onnx` extra).

    Raises:
      ConfigError: the extra is missing, or `fn` holds an op jax2onnx cannot convert — among them the
        platform switch of conv impl "auto": export a model built with a fixed impl (same parameters).
    """
    to_onnx = onnx_converter()
    spec = jax.ShapeDtypeStruct((jax.export.symbolic_shape("B")[0], *image_shape), jnp.uint8)
    try:
        model = to_onnx(fn, [spec], model_name="jaxnet")
    except NotImplementedError as e:
        raise ConfigError(f"ONNX export: {str(e).splitlines()[0]} (conv impl 'auto' is a platform switch ONNX "
                           f"cannot hold: build the model with a fixed impl, e.g. 'xla')") from None
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, path)
    return path


def export_model(state: TrainState, model_with_impl: Callable[[str], Any], conv_impl: str,
                 directory: str | os.PathLike, formats: Sequence[str], *, mean: Sequence[float],
                 std: Sequence[float], platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict[str, str]:
    """Write the inference function of `state` in each of `formats` ("jax", "onnx") to `directory` as
    model.jaxexport (lowered for each of `platforms`) / model.onnx; returns {format: path}.

    `model_with_impl(impl)` is the state's model built with conv impl `impl` (the parameters are the same
    for every impl). The jax export holds conv impl `conv_impl` if it is one of `PORTABLE_IMPLS`, else XLA's conv;
    ONNX always XLA's conv.
    Raises ConfigError for an unknown format (before writing anything).
    """
    if unknown := [f for f in formats if f not in FORMATS]:
        raise ConfigError(f"export formats are {' and '.join(FORMATS)}, got {', '.join(map(repr, unknown))}")

    def inference(impl: str) -> Callable:
        return inference_fn(state.replace(apply_fn=model_with_impl(impl).apply), mean=mean, std=std)

    exported = {}
    for fmt in formats:
        if fmt == "jax":
            fn = inference(conv_impl if conv_impl in PORTABLE_IMPLS else "xla")
            exported[fmt] = str(export_jax(fn, Path(directory) / "model.jaxexport", platforms=platforms))
        else:
            exported[fmt] = str(export_onnx(inference("xla"), Path(directory) / "model.onnx"))
    return exported


def read_images(paths: Sequence[str], size: tuple[int, int] = (32, 32)) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """Decode image files as RGB, resized to `size` (bilinear): ((N, H, W, 3) uint8, the N paths read,
    {path: why} for each file that is missing, unreadable or not an image)."""
    from PIL import Image

    images, names, failed = [], [], {}
    for path in paths:
        try:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB").resize(size, Image.BILINEAR), np.uint8))
                names.append(path)
        except Exception as e:  # PIL and the OS raise many types for a missing, unreadable or corrupt file
            failed[path] = type(e).__name__
    return np.stack(images) if images else np.zeros((0, *size, 3), np.uint8), names, failed


def top_classes(probs: np.ndarray, classes: Sequence[str], k: int = 3) -> list[list[tuple[str, float]]]:
    """For each row of (N, K) probabilities, its `k` most likely (class name, probability), most likely first."""
    return [[(classes[i], float(p[i])) for i in np.argsort(-p)[:k]] for p in np.asarray(probs)]
