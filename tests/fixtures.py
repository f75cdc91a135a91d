"""Tiny CIFAR-10 copies in each local layout, built from synthetic arrays (never the real data)."""

import io
import pickle
import platform
import sys
import tarfile
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from jaxnet import layers
from jaxnet.data import CLASSES

# The suite runs on the CPU with 8 devices (tests/conftest.py) unless JAX_PLATFORMS says otherwise, as the GPU
# script (benchmarks/gpu_check.sh) does: there, claims about the CPU's programs and 8-device runs skip, saying why.
cpu_backend = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a claim about the CPU's compiled program; "
                                 f"this run's default backend is {jax.default_backend()}")
eight_devices = pytest.mark.skipif(len(jax.devices()) < 8, reason="runs on 8 devices, which tests/conftest.py makes of "
                                   f"the CPU; this run's default backend has {len(jax.devices())}")
# PyPI's oneDNN (the extras test and onednn) is built for Linux x86-64 only.
onednn_platform = pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64" and jax.default_backend() == "cpu"),
    reason="oneDNN from PyPI (impl 'onednn') is for CPUs, on Linux x86-64 only")

# The real CIFAR-10 copy (JPEG) where the workplace keeps it, beside the checkout; tests that need it skip without it.
SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "cifar10-jpeg.tar.gz"


def synthetic(n_train: int = 40, n_test: int = 20, seed: int = 0) -> dict:
    """Random uint8 images whose labels cycle through the 10 classes (every class present)."""
    rng = np.random.default_rng(seed)
    return {split: {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                    "label": (np.arange(n) % 10).astype(np.int32)}
            for split, n in (("train", n_train), ("test", n_test))}


def _batch_files(data: dict, suffix: str):
    """(file name, flat (N, 3072) CHW pixels, labels) for the five train batches and the test batch."""
    parts = [(f"data_batch_{i + 1}{suffix}", data["train"], idx)
             for i, idx in enumerate(np.array_split(np.arange(len(data["train"]["label"])), 5))]
    parts.append((f"test_batch{suffix}", data["test"], np.arange(len(data["test"]["label"]))))
    for name, split, idx in parts:
        yield name, split["image"][idx].transpose(0, 3, 1, 2).reshape(len(idx), -1), split["label"][idx]


def write_pickles(root: Path, data: dict) -> Path:
    out = root / "cifar-10-batches-py"
    out.mkdir(parents=True)
    for name, flat, labels in _batch_files(data, ""):
        (out / name).write_bytes(pickle.dumps({b"data": flat, b"labels": labels.tolist()}))
    return root


def write_binary(root: Path, data: dict) -> Path:
    out = root / "cifar-10-batches-bin"
    out.mkdir(parents=True)
    for name, flat, labels in _batch_files(data, ".bin"):
        (out / name).write_bytes(np.concatenate([labels[:, None].astype(np.uint8), flat], 1).tobytes())
    return root


def write_folders(root: Path, data: dict) -> Path:
    """train|test/<class>/NNNN.png (lossless, so pixels round-trip exactly); files sorted by class."""
    for split, arrays in data.items():
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(arrays["image"], arrays["label"])):
            Image.fromarray(image).save(root / split / CLASSES[label] / f"{i:04d}.png")
    return root


def sorted_by_class(data: dict) -> dict:
    """The order the image-folder layout yields: by class, then by file name."""
    out = {}
    for split, arrays in data.items():
        order = np.lexsort((np.arange(len(arrays["label"])), arrays["label"]))
        out[split] = {k: v[order] for k, v in arrays.items()}
    return out


def tar_gz(directory: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(directory.rglob("*")):
            tar.add(path, arcname=path.relative_to(directory).as_posix(), recursive=False)
    return archive


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def counting_conv(calls: list) -> type:
    """A jaxnet Conv that appends its kernel size to `calls` at each call: counts the conv layers a model runs."""

    class CountingConv(layers.Conv):
        @nn.compact
        def __call__(self, x):
            calls.append(self.kernel_size)
            return super().__call__(x)

    return CountingConv


def require_onednn_bfloat16() -> None:
    """Skip the calling test, saying why, unless oneDNN (conv impl "onednn") has bfloat16 convs on this CPU."""
    import pytest

    from jaxnet.ops import onednn

    try:
        onednn.check_dtype("bfloat16")
    except onednn.OnednnError as e:
        pytest.skip(str(e))
