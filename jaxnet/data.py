"""CIFAR-10 as uint8 arrays (a local copy in any of three layouts, the official archive downloaded and
verified, or tensorflow-datasets), a validation split, and the device-side augmentation and epoch order of
the training loop.

Host side: `load_cifar10` decodes once and caches `.npz` arrays. Device side: `augment(key, images)`,
`alternating_flip` and `epoch_indices(key, n, batch_size)` are pure functions for jit (`jaxnet.parallel`
compiles them).
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import io
import logging
import os
import pickle
import re
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxnet.cache import default_cache_dir
from jaxnet.errors import ConfigError, DataError, check_values, is_kind

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the CIFAR-10 training images, in [0, 1] units.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
SPLITS = ("train", "test")
ENV_VAR = "JAXNET_CIFAR10"
URL_ENV_VAR = "JAXNET_CIFAR10_URL"
# The official python-pickle archive (torchvision, keras and airbench fetch the same) and its published SHA-256.
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

Split = dict[str, np.ndarray]  # {"image": (N, 32, 32, 3) uint8, "label": (N,) int32}
log = logging.getLogger(__name__)


def load_cifar10(data_dir: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
                 tfds_data_dir: str | None = None, show_progress: bool = True) -> dict[str, Split]:
    """CIFAR-10 as {"train": split, "test": split}, each {"image": (N, 32, 32, 3) uint8, "label": (N,) int32}.

    Sources, first found wins: `data_dir`; the environment variable JAXNET_CIFAR10 (unless empty); the
    official archive downloaded earlier into `cache_dir`; tensorflow-datasets' `cifar10` where it is prepared
    (tfrecord, its default format, where TensorFlow is installed; else passed over with a warning); else the
    official archive (`cifar-10-python.tar.gz`, 163 MiB) is downloaded from JAXNET_CIFAR10_URL (default: its
    Toronto home, with its published SHA-256; a URL of your own names its checksum as `URL#sha256=HEX`),
    verified and kept.
    A local source is a directory or a .tar/.tar.gz archive in one of three layouts: image folders
    `train|test/<class>/*.jpg|png`, `cifar-10-batches-py` (pickles) or `cifar-10-batches-bin`; or a data_dir
    of tensorflow-datasets with cifar10 prepared (DataError for tfrecord without TensorFlow). Decoded arrays
    are cached in `cache_dir` (default ~/.cache/jaxnet) under a key of the source's path, sizes and mtimes, so
    later loads read one .npz.

    Raises:
      DataError: a missing path, unknown layout, corrupt archive or image, wrong image size, missing or
        extra class folders, mismatched counts; a download that fails (no network, cut short, wrong checksum);
        a cache folder that cannot be written. Nothing is written in that case.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if data_dir is not None and not os.fspath(data_dir):  # Path("") is the working directory
        raise DataError("the CIFAR-10 source is an empty path: give a local copy's path, or no path at all")
    source = data_dir if data_dir is not None else os.environ.get(ENV_VAR) or None  # set but empty: unset
    if source is None:
        url, sha256 = _download_source()
        downloaded = cache / "downloads" / Path(urllib.parse.urlsplit(url).path).name
        if not downloaded.exists():
            prepared = _prepared_tfds(tfds_data_dir)
            if prepared is not None:
                return prepared
            download(url, downloaded, sha256=sha256, show_progress=show_progress)
        source = downloaded
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"CIFAR-10 source {path} does not exist")
    cached = cache / f"cifar10-{_fingerprint(path)}.npz"
    if cached.exists():
        with np.load(cached) as f:
            return {s: {"image": f[f"{s}_image"], "label": f[f"{s}_label"]} for s in SPLITS}
    data = _read_local(path)
    tmp = cached.with_suffix(f".tmp{os.getpid()}.npz")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, **{f"{s}_{k}": v for s in SPLITS for k, v in data[s].items()})
        os.replace(tmp, cached)  # atomic: a concurrent or killed run never sees half a cache file
    except OSError as e:
        if tmp.exists():  # disk full: a part written
            tmp.unlink()
        raise DataError(f"the cache of decoded CIFAR-10 in {cache} cannot be written ({e.strerror}): set "
                        f"XDG_CACHE_HOME to a folder this user can write") from None
    return data


def _fingerprint(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


# ---- local layouts: a tree of named byte blobs, from a directory or an archive ----

def _read_local(path: Path) -> dict[str, Split]:
    if path.is_dir() and any(path.glob("cifar10/*/dataset_info.json")):  # a data_dir of tensorflow-datasets
        builder = _tfds_builder(str(path))
        if builder is not None:
            return _read_tfds(builder)
    files = _archive_files(path) if path.is_file() else _dir_files(path)
    names = list(files)
    for layout, reader in (("cifar-10-batches-py", _read_pickles), ("cifar-10-batches-bin", _read_binary),
                           ("image folders", _read_image_folders)):
        root = _find_root(names, layout)
        if root is not None:
            return reader(files, root, path)
    raise DataError(f"{path}: unknown layout; expected train|test/<class>/*.jpg|png, cifar-10-batches-py, "
                    f"cifar-10-batches-bin or a tensorflow-datasets folder holding cifar10")


class _Files(dict):
    """Relative posix name → zero-argument function returning the file's bytes."""


def _dir_files(path: Path) -> _Files:
    return _Files({p.relative_to(path).as_posix(): p.read_bytes for p in path.rglob("*") if p.is_file()})


def _archive_files(path: Path) -> _Files:
    try:
        with tarfile.open(path) as tar:
            blobs = {m.name.lstrip("./"): tar.extractfile(m).read() for m in tar if m.isfile()}
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable tar archive ({type(e).__name__}: {e})".replace("\n", " ")) from None
    return _Files({name: (lambda b=blob: b) for name, blob in blobs.items()})


def _find_root(names: list[str], layout: str) -> str | None:
    """The directory prefix under which `layout`'s marker files sit, or None."""
    match layout:
        case "cifar-10-batches-py":
            markers = [n for n in names if n.endswith("data_batch_1") or n == "data_batch_1"]
        case "cifar-10-batches-bin":
            markers = [n for n in names if n.endswith("data_batch_1.bin")]
        case _:
            markers = [n[: n.index("train/") + len("train/")] for n in names
                       if "train/" in n and (n.startswith("train/") or "/train/" in n)]
            return min((m[: -len("train/")] for m in markers), key=len, default=None)
    return min((m.rsplit("/", 1)[0] + "/" if "/" in m else "" for m in markers), key=len, default=None)


def _read_pickles(files: _Files, root: str, source: Path) -> dict[str, Split]:
    def batch(name: str) -> Split:
        key = root + name
        if key not in files:
            raise DataError(f"{source}: cifar-10-batches-py is missing {name}")
        try:
            d = pickle.loads(files[key](), encoding="bytes")
            data, labels = np.asarray(d[b"data"], np.uint8), np.asarray(d[b"labels"], np.int32)
        except Exception as e:  # any unpickling failure means a corrupt file
            raise DataError(f"{source}: {name} is not a CIFAR-10 pickle ({type(e).__name__})") from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
            raise DataError(f"{source}: {name} holds {data.shape} pixels for {len(labels)} labels, "
                            f"expected (N, 3072) for N labels")
        return {"image": data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), "label": labels}

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    return {"train": {k: np.concatenate([b[k] for b in train]) for k in ("image", "label")},
            "test": batch("test_batch")}


def _read_binary(files: _Files, root: str, source: Path) -> dict[str, Split]:
    def batch(name: str) -> Split:
        key = root + name
        if key not in files:
            raise DataError(f"{source}: cifar-10-batches-bin is missing {name}")
        raw = np.frombuffer(files[key](), np.uint8)
        if raw.size == 0 or raw.size % 3073:
            raise DataError(f"{source}: {name} has {raw.size} bytes, not a whole number of 3073-byte records")
        records = raw.reshape(-1, 3073)
        return {"image": records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(),
                "label": records[:, 0].astype(np.int32)}

    train = [batch(f"data_batch_{i}.bin") for i in range(1, 6)]
    return {"train": {k: np.concatenate([b[k] for b in train]) for k in ("image", "label")},
            "test": batch("test_batch.bin")}


def _read_image_folders(files: _Files, root: str, source: Path) -> dict[str, Split]:
    from PIL import Image

    out = {}
    for split in SPLITS:
        prefix = f"{root}{split}/"
        entries = [n[len(prefix):] for n in files if n.startswith(prefix)]
        classes = {e.split("/", 1)[0] for e in entries if "/" in e}
        if classes != set(CLASSES):
            missing, extra = sorted(set(CLASSES) - classes), sorted(classes - set(CLASSES))
            raise DataError(f"{source}: {split}/ class folders do not match CIFAR-10 (missing {missing}, extra {extra})")
        images, labels = [], []
        for label, cls in enumerate(CLASSES):
            names = sorted(e for e in entries if e.startswith(cls + "/") and e.lower().endswith(_IMAGE_SUFFIXES))
            if not names:
                raise DataError(f"{source}: {split}/{cls}/ holds no .jpg or .png images")
            for name in names:
                try:
                    with Image.open(io.BytesIO(files[prefix + name]())) as im:
                        im.load()
                        if im.size != (32, 32):
                            raise DataError(f"{source}: {split}/{name} is {im.size[0]}×{im.size[1]}, expected 32×32")
                        images.append(np.asarray(im.convert("RGB"), np.uint8))
                except DataError:
                    raise
                except Exception as e:  # PIL raises several types for a corrupt or truncated file
                    raise DataError(f"{source}: {split}/{name} is not a readable image ({type(e).__name__})") from None
            labels += [label] * len(names)
        out[split] = {"image": np.stack(images), "label": np.asarray(labels, np.int32)}
    return out


# ---- the official archive, downloaded ----

def _download_source() -> tuple[str, str]:
    """(url, sha256) of the archive to download: JAXNET_CIFAR10_URL as `URL#sha256=HEX`, else the official one."""
    given = os.environ.get(URL_ENV_VAR)
    if not given:
        return OFFICIAL_URL, OFFICIAL_SHA256
    url, _, fragment = given.partition("#sha256=")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", fragment):
        raise DataError(f"{URL_ENV_VAR} must be URL#sha256=<64 hex digits> (the archive's checksum), got {given!r}")
    return url, fragment.lower()


def download(url: str, dest: str | os.PathLike, *, sha256: str, timeout_s: float = 30,
             show_progress: bool = True) -> Path:
    """`url` saved as `dest` once its bytes have the SHA-256 `sha256`; returns `dest`.

    The bytes go to a temporary file beside `dest`, renamed to `dest` only when complete (its announced length)
    and verified, so `dest` never exists half-written or wrong. Raises DataError (one line, the temporary file
    removed) when the server cannot be reached within `timeout_s`, answers with an error, the transfer is cut
    short, or the checksum differs.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.part{os.getpid()}")
    hint = f"pass --data-dir PATH or set {ENV_VAR} to a local copy of CIFAR-10"
    digest, received = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, desc=f"downloading {dest.name}", unit="B", unit_scale=True,
                      disable=not show_progress, leave=False) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise DataError(f"download of {url} was cut short ({received} of {total} bytes); run again, or {hint}")
        if digest.hexdigest() != sha256:
            raise DataError(f"download of {url} has SHA-256 {digest.hexdigest()}, expected {sha256}: not the "
                            f"CIFAR-10 archive (a proxy page, a corrupted transfer?); {hint}")
        os.replace(tmp, dest)
    except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts, IncompleteRead, disk full
        raise DataError(f"cannot download CIFAR-10 from {url} ({type(e).__name__}: "
                        f"{str(getattr(e, 'reason', None) or e).splitlines()[0][:160]}); {hint}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ---- tensorflow-datasets ----

def _prepared_tfds(data_dir: str | None) -> dict[str, Split] | None:
    """tensorflow-datasets' cifar10 if tfds is installed and has it prepared (in `data_dir`, else in its
    default folders), else None; a copy that cannot be read here is passed over with a warning."""
    builder = _tfds_builder(data_dir)
    if builder is None:
        return None
    try:
        return _read_tfds(builder)
    except DataError as e:
        log.warning(f"{e}: passed over")
        return None


def _tfds_builder(data_dir: str | None):
    """tfds' reader of a prepared cifar10, or None. Not tfds.builder, which also asks GCS for metadata and
    leaves a temporary folder behind."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        return None
    try:
        return tfds.core.read_only_builder.builder_from_files("cifar10", data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        return None


def _read_tfds(builder) -> dict[str, Split]:
    """The splits of a prepared tfds copy: its random-access formats directly; its default, tfrecord, through
    TensorFlow (DataError where it is not installed)."""
    import tensorflow_datasets as tfds

    if builder.info.available_file_formats() & set(tfds.core.FileFormat.with_random_access()):
        out = {}
        for split in SPLITS:
            source = builder.as_data_source(split=split)
            records = [source[i] for i in range(len(source))]
            out[split] = {"image": np.stack([r["image"] for r in records]).astype(np.uint8),
                          "label": np.asarray([r["label"] for r in records], np.int32)}
        return out
    if importlib.util.find_spec("tensorflow") is None:  # tfds reads tfrecord through tf.data
        raise DataError(f"tensorflow-datasets' cifar10 in {builder.data_dir} is in {builder.info.file_format.value} "
                        f"format, which only TensorFlow reads (install tensorflow, or prepare it again with "
                        f"file_format='array_record')")
    arrays = {split: tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1)) for split in SPLITS}
    return {split: {"image": a["image"].astype(np.uint8), "label": a["label"].astype(np.int32)}
            for split, a in arrays.items()}


def subset(split: Split, size: int, seed: int) -> Split:
    """`size` examples drawn without replacement (deterministic in `seed`); the local layouts are sorted
    by class, so a prefix would hold one class only."""
    n = len(split["label"])
    if not (is_kind("positive integer", size) and size <= n):
        raise DataError(f"subset size must be an integer in [1, {n}], got {size!r}")
    chosen = np.sort(np.random.default_rng(seed).permutation(n)[:size])
    return {k: v[chosen] for k, v in split.items()}


def split_validation(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """(train minus val, val): `val_size` examples drawn without replacement, deterministic in `seed`."""
    n = len(train["label"])
    if not (is_kind("non-negative integer", val_size) and val_size < n):
        raise DataError(f"val_size must be an integer in [0, {n}), got {val_size!r}")
    order = np.random.default_rng(seed).permutation(n)
    return ({k: v[order[val_size:]] for k, v in train.items()}, {k: v[order[:val_size]] for k, v in train.items()})


# ---- device side: pure functions for jit ----

def normalize(images: jax.Array, mean=MEAN, std=STD, dtype=jnp.float32) -> jax.Array:
    """uint8 (..., C) → (x/255 − mean)/std in `dtype`; `mean` and `std` hold one value, or one per channel
    (DataError otherwise: CIFAR-10's three would broadcast a 1-channel batch into 3 channels)."""
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    per_channel = (1,) * (x.ndim - 1) + (-1,)
    stats = {"mean": jnp.asarray(mean, jnp.float32), "std": jnp.asarray(std, jnp.float32)}
    for name, value in stats.items():
        if value.size not in (1, x.shape[-1]) or value.ndim > 1:
            raise DataError(f"normalize: images of shape {x.shape} have {x.shape[-1]} channels, but {name} holds "
                            f"{value.size} values")
    return ((x - jnp.reshape(stats["mean"], per_channel)) / jnp.reshape(stats["std"], per_channel)).astype(dtype)


def augment(key: jax.Array, images: jax.Array, *, translate: int = 2, flip: bool | jax.Array = True,
            cutout: int = 0) -> jax.Array:
    """Random translation by up to ±`translate` px (reflect-pad, then a random crop), a horizontal flip,
    and an optional `cutout`×`cutout` zeroed square. (N, H, W, C) uint8 → same shape and dtype, each image
    with its own draws from `key`.

    `flip`: True mirrors each image with p = 1/2; False never; an (N,) bool array mirrors exactly the
    images it marks (e.g. `alternating_flip`). DataError for images of another rank, ConfigError for a negative
    `translate` or `cutout`.
    """
    if jnp.ndim(images) != 4:
        raise DataError(f"augment needs (N, H, W, C) images, got shape {jnp.shape(images)}")
    check_values("augment", translate=("non-negative integer", translate), cutout=("non-negative integer", cutout))
    n, h, w, _ = images.shape
    k_crop, k_flip, k_cut = jax.random.split(key, 3)
    if translate:
        padded = jnp.pad(images, ((0, 0), (translate, translate), (translate, translate), (0, 0)), mode="reflect")
        offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * translate + 1)
        images = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))(
            padded, offsets)
    if flip is True:
        flip = jax.random.bernoulli(k_flip, 0.5, (n,))
    if flip is not False:
        images = jnp.where(jnp.reshape(flip, (n, 1, 1, 1)), images[:, :, ::-1], images)
    if cutout:
        k_row, k_col = jax.random.split(k_cut)
        row = jax.random.randint(k_row, (n, 1, 1), 0, h)
        col = jax.random.randint(k_col, (n, 1, 1), 0, w)
        rows, cols = jnp.arange(h)[None, :, None] - row + cutout // 2, jnp.arange(w)[None, None, :] - col + cutout // 2
        inside = (rows >= 0) & (rows < cutout) & (cols >= 0) & (cols < cutout)  # centred square, clipped
        images = jnp.where(inside[..., None], jnp.zeros((), images.dtype), images)
    return images


def color_jitter(key: jax.Array, images: jax.Array, strength: float) -> jax.Array:
    """Per image, contrast (about the image's mean) and then brightness scaled by factors drawn uniformly from
    [1 − `strength`, 1 + `strength`], rounded and clipped to [0, 255]: (N, H, W, C) uint8 → same shape and dtype
    (hiverge's CIFAR-10 speedrun jitters both). ConfigError for a `strength` outside [0, 1)."""
    check_values("color_jitter", strength=("in [0, 1)", strength))
    n = images.shape[0]
    k_contrast, k_brightness = jax.random.split(key)
    contrast, brightness = (jax.random.uniform(k, (n, 1, 1, 1), minval=1 - strength, maxval=1 + strength)
                            for k in (k_contrast, k_brightness))
    x = images.astype(jnp.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return jnp.clip(jnp.round(((x - mean) * contrast + mean) * brightness), 0, 255).astype(images.dtype)


def alternating_flip(key: jax.Array, indices: jax.Array, epoch: int | jax.Array) -> jax.Array:
    """airbench's flip schedule: (N,) bool, which of the training images `indices` to mirror in `epoch`.

    Each image gets one fair coin from `key` (fixed for the run) and is mirrored in the even epochs if it
    came up heads, in the odd epochs if not: every two epochs the net sees every image both ways, where
    independent flips show half of them one way only (Jordan 2024, "alternating flip").
    """
    heads = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(key, i)))(indices)
    return heads ^ (jnp.asarray(epoch) % 2 == 1)


FlipSchedule = Callable[[jax.Array, "int | jax.Array"], "bool | jax.Array"]


def flip_schedule(kind: str, key: jax.Array) -> FlipSchedule:
    """`(indices, epoch) -> flip` for `augment`: "alternate" (`alternating_flip` with coins from `key`),
    "random" (p = 1/2 each time) or "none". Raises ConfigError for another kind."""
    match kind:
        case "alternate":
            return partial(alternating_flip, key)
        case "random" | "none":
            return lambda indices, epoch: kind == "random"
        case other:
            raise ConfigError(f"unknown flip {other!r}; valid: alternate, random, none")


def resize(images: jax.Array, size: int) -> jax.Array:
    """(N, H, W, C) float images → (N, size, size, C): antialiased bilinear (a triangle filter as wide as the
    scale, as PIL's and tf.image.resize's); the images themselves when they are size × size already.
    DataError for images of another rank, ConfigError for a `size` that is not a positive integer."""
    if jnp.ndim(images) != 4:
        raise DataError(f"resize needs (N, H, W, C) images, got shape {jnp.shape(images)}")
    check_values("resize", size=("positive integer", size))
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    return jax.image.resize(images, (n, size, size, c), method="linear", antialias=True)


def train_batch(key: jax.Array, images: jax.Array, labels: jax.Array, indices: jax.Array, epoch: int | jax.Array,
                *, flip: FlipSchedule, translate: int, cutout: int, jitter: float = 0.0, mean=MEAN,
                std=STD, size: int | None = None) -> dict[str, jax.Array]:
    """The training batch of `indices` (B,) from the device-resident uint8 set: gathered, augmented
    (`augment`, with `flip(indices, epoch)`; then `color_jitter` if `jitter`), normalised to float32 and, with
    `size`, resized to size × size (progressive resizing) → {"image": (B, H, W, C), "label": (B,)}. Bind
    everything after `epoch` but `size` with `partial`; `epoch` stays traced, so one compile serves every epoch
    (and one more each other `size`)."""
    if jitter:
        key, k_jitter = jax.random.split(key)
    images = augment(key, images[indices], translate=translate, flip=flip(indices, epoch), cutout=cutout)
    if jitter:
        images = color_jitter(k_jitter, images, jitter)
    images = normalize(images, mean, std)
    return {"image": images if size is None else resize(images, size), "label": labels[indices]}


def normalized(split: Split, mean=MEAN, std=STD) -> dict[str, np.ndarray]:
    """A host split with its images normalised to float32 (for evaluation batches)."""
    return {"image": np.asarray(normalize(split["image"], mean, std)), "label": split["label"]}


def epoch_indices(key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
    """(num_examples // batch_size, batch_size) int32 indices: one random order, the ragged tail dropped; one
    program per size. ConfigError unless both are positive integers and a batch fits in the examples."""
    check_values("epoch_indices", num_examples=("positive integer", num_examples),
                 batch_size=("positive integer", batch_size))
    if batch_size > num_examples:
        raise ConfigError(f"epoch_indices batch_size {batch_size} is more than the {num_examples} examples: "
                          "no full batch")
    return _epoch_order(key, int(num_examples), int(batch_size))


@partial(jax.jit, static_argnums=(1, 2))
def _epoch_order(key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
    steps = num_examples // batch_size
    return jax.random.permutation(key, num_examples)[: steps * batch_size].reshape(steps, batch_size)


def eval_batch_size(n: int, batch_size: int, multiple: int = 1) -> int:
    """The rows of each of `eval_batches`' batches for a split of `n` rows."""
    return min(batch_size, max(multiple, -(-n // multiple) * multiple))


def eval_batches(split: Split, batch_size: int, multiple: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Host batches of one size (the last one padded, with "mask" False on the padding): `batch_size` rows, or,
    where the whole split fits in fewer, its row count rounded up to `multiple` (the devices a batch is split
    over), so that a small split is not padded to a large batch and evaluated at the large batch's cost.
    ConfigError (at the first batch) unless `batch_size` and `multiple` are positive integers."""
    check_values("eval_batches", batch_size=("positive integer", batch_size), multiple=("positive integer", multiple))
    n = len(split["label"])
    batch_size = eval_batch_size(n, batch_size, multiple)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        pad = batch_size - (stop - start)
        yield {"image": np.pad(split["image"][start:stop], ((0, pad), (0, 0), (0, 0), (0, 0))),
               "label": np.pad(split["label"][start:stop], (0, pad)),
               "mask": np.arange(batch_size) < stop - start}
