"""CIFAR-10 readers (three local layouts, archives, cache), their errors, the shared copy, and augmentation."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import (SHARED_CIFAR10, png_bytes, sorted_by_class, synthetic, tar_gz, write_binary, write_folders,
                      write_pickles)

from jaxnet import data, errors


@pytest.fixture(scope="module")
def arrays():
    return synthetic()


def _assert_same(loaded, expected):
    for split in data.SPLITS:
        chex.assert_trees_all_equal(loaded[split], expected[split])
        assert loaded[split]["image"].dtype == np.uint8 and loaded[split]["label"].dtype == np.int32


@pytest.mark.parametrize("layout", ["pickles", "binary", "folders", "folders_tar_gz", "pickles_tar_gz"])
def test_each_layout_reads_back_the_arrays(tmp_path, arrays, layout):
    writer = {"pickles": write_pickles, "binary": write_binary}.get(layout.removesuffix("_tar_gz"), write_folders)
    source = writer(tmp_path / "src", arrays)
    if layout.endswith("tar_gz"):
        source = tar_gz(source, tmp_path / "cifar.tar.gz")
    expected = sorted_by_class(arrays) if layout.startswith("folders") else arrays
    _assert_same(data.load_cifar10(source, cache_dir=tmp_path / "cache"), expected)


def test_second_load_comes_from_the_cache(tmp_path, arrays, monkeypatch):
    source = write_binary(tmp_path / "src", arrays)
    first = data.load_cifar10(source, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("cifar10-*.npz"))) == 1

    def fail(_):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(data, "_read_local", fail)
    _assert_same(data.load_cifar10(source, cache_dir=tmp_path / "cache"), first)


def test_environment_variable_is_a_source(tmp_path, arrays, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(write_pickles(tmp_path / "src", arrays)))
    _assert_same(data.load_cifar10(cache_dir=tmp_path / "cache"), arrays)


def _corrupt_image(root):
    next((root / "train" / "cat").glob("*.png")).write_bytes(b"not a png")


def _wrong_size(root):
    from PIL import Image
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(next((root / "test" / "dog").glob("*.png")))


def _truncated_png(root):
    path = next((root / "train" / "ship").glob("*.png"))
    path.write_bytes(png_bytes(np.full((32, 32, 3), 7, np.uint8))[:60])


BAD_FOLDERS = {
    "corrupt image": (_corrupt_image, r"train/cat/\d+\.png is not a readable image"),
    "truncated image": (_truncated_png, r"train/ship/\d+\.png is not a readable image"),
    "wrong size": (_wrong_size, r"test/dog/\d+\.png is 28×28, expected 32×32"),
    "missing class": (lambda r: [p.unlink() for p in (r / "train" / "frog").iterdir()] and (r / "train" / "frog").rmdir(),
                      r"train/ class folders do not match CIFAR-10 \(missing \['frog'\], extra \[\]\)"),
    "extra class": (lambda r: (r / "test" / "unicorn").mkdir() or (r / "test" / "unicorn" / "x.png").write_bytes(b""),
                    r"extra \['unicorn'\]"),
    "class without images": (lambda r: [p.unlink() for p in (r / "test" / "bird").iterdir()]
                             and (r / "test" / "bird" / "notes.txt").write_text("x"), r"test/bird/ holds no"),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_image_folders_raise_one_line_and_write_nothing(tmp_path, arrays, case):
    damage, message = BAD_FOLDERS[case]
    root = write_folders(tmp_path / "src", arrays)
    damage(root)
    with pytest.raises(data.DataError, match=message) as err:
        data.load_cifar10(root, cache_dir=tmp_path / "cache")
    assert "\n" not in str(err.value) and str(root) in str(err.value)
    assert not (tmp_path / "cache").exists()


def test_bad_sources_raise(tmp_path, arrays):
    cache = tmp_path / "cache"
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_cifar10(tmp_path / "nope", cache_dir=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="unknown layout"):
        data.load_cifar10(tmp_path / "empty", cache_dir=cache)
    archive = tar_gz(write_folders(tmp_path / "src", arrays), tmp_path / "a.tar.gz")
    (tmp_path / "cut.tar.gz").write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(data.DataError, match="not a readable tar archive"):
        data.load_cifar10(tmp_path / "cut.tar.gz", cache_dir=cache)
    binary = write_binary(tmp_path / "bin", arrays) / "cifar-10-batches-bin" / "test_batch.bin"
    binary.write_bytes(binary.read_bytes()[:-5])
    with pytest.raises(data.DataError, match="not a whole number of 3073-byte records"):
        data.load_cifar10(tmp_path / "bin", cache_dir=cache)
    pickles = write_pickles(tmp_path / "pk", arrays) / "cifar-10-batches-py"
    (pickles / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="data_batch_3 is not a CIFAR-10 pickle"):
        data.load_cifar10(tmp_path / "pk", cache_dir=cache)
    (write_pickles(tmp_path / "pk2", arrays) / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(data.DataError, match="cifar-10-batches-py is missing test_batch"):
        data.load_cifar10(tmp_path / "pk2", cache_dir=cache)
    assert not cache.exists()


def test_a_cache_folder_that_cannot_be_written_is_one_line(tmp_path, arrays):
    """A read-only home, or $XDG_CACHE_HOME under a file: the decoded data cannot be cached (was a traceback)."""
    (tmp_path / "file").write_text("mine")
    source = write_binary(tmp_path / "bin", arrays)
    with pytest.raises(data.DataError, match=r"the cache of decoded CIFAR-10 in .*file/cache cannot be written "
                                             r"\(Not a directory\): set XDG_CACHE_HOME") as err:
        data.load_cifar10(source, cache_dir=tmp_path / "file" / "cache")
    assert "\n" not in str(err.value) and (tmp_path / "file").read_text() == "mine"


def test_validation_split_and_subset_are_deterministic_and_disjoint(arrays):
    train, val = data.split_validation(arrays["train"], 10, seed=3)
    train2, val2 = data.split_validation(arrays["train"], 10, seed=3)
    chex.assert_trees_all_equal((train, val), (train2, val2))
    assert len(val["label"]) == 10 and len(train["label"]) == 30
    rows = {im.tobytes() for im in train["image"]}
    assert not rows & {im.tobytes() for im in val["image"]}
    assert not np.array_equal(data.split_validation(arrays["train"], 10, seed=4)[1]["label"], val["label"]) or \
        not np.array_equal(data.split_validation(arrays["train"], 10, seed=4)[1]["image"], val["image"])
    sub = data.subset(arrays["train"], 20, seed=0)
    assert len(set(sub["label"].tolist())) > 1  # not a class-sorted prefix
    with pytest.raises(data.DataError, match="val_size"):
        data.split_validation(arrays["train"], 40, seed=0)


@pytest.mark.skipif(not SHARED_CIFAR10.exists(), reason=f"the shared CIFAR-10 copy is not at {SHARED_CIFAR10}")
def test_shared_copy_counts_and_class_order(tmp_path_factory):
    cifar = data.load_cifar10(SHARED_CIFAR10, cache_dir=tmp_path_factory.getbasetemp() / "cifar-cache")
    assert cifar["train"]["image"].shape == (50_000, 32, 32, 3)
    assert cifar["test"]["image"].shape == (10_000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(cifar["train"]["label"]), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(cifar["test"]["label"]), [1000] * 10)
    assert data.CLASSES[cifar["train"]["label"][0]] == "airplane" and data.CLASSES[cifar["test"]["label"][-1]] == "truck"
    np.testing.assert_allclose(cifar["train"]["image"].mean((0, 1, 2)) / 255, [0.4913, 0.4821, 0.4465], atol=2e-4)


# ---- augmentation ----

@pytest.fixture(scope="module")
def images():
    return jax.random.randint(jax.random.key(0), (16, 8, 8, 3), 0, 256).astype(jnp.uint8)


def test_augment_shapes_dtypes_and_determinism(images):
    f = jax.jit(lambda k, x: data.augment(k, x, translate=2, flip=True, cutout=3))
    a, b = f(jax.random.key(1), images), f(jax.random.key(1), images)
    chex.assert_shape(a, images.shape)
    chex.assert_type(a, jnp.uint8)
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(a, f(jax.random.key(2), images))


@pytest.mark.parametrize("call,error,message", [
    (lambda x: data.augment(jax.random.key(0), x[0]), "DataError", r"augment needs \(N, H, W, C\) images, got shape "
                                                                   r"\(8, 8, 3\)"),
    (lambda x: data.augment(jax.random.key(0), x, translate=-1), "ConfigError",
     "augment translate must be an integer >= 0, got -1"),
    (lambda x: data.augment(jax.random.key(0), x, cutout=2.5), "ConfigError",
     "augment cutout must be an integer >= 0, got 2.5"),
    (lambda x: data.normalize(x[..., :1]), "DataError",  # silently 3 channels out of 1 before
     r"normalize: images of shape \(16, 8, 8, 1\) have 1 channels, but mean holds 3 values"),
    (lambda x: data.normalize(x, std=(0.5, 0.5)), "DataError", "have 3 channels, but std holds 2 values"),
], ids=["augment_rank", "augment_translate", "augment_cutout", "normalize_grey", "normalize_std"])
def test_augment_and_normalize_refuse_what_they_cannot_take_in_one_line(images, call, error, message):
    with pytest.raises(getattr(errors, error), match=message) as err:
        jax.jit(call)(images)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("call,error,message", [
    (lambda x: data.color_jitter(jax.random.key(0), x, 1.5), "ConfigError",  # negative contrast factors
     r"color_jitter strength must be in \[0, 1\), got 1.5"),
    (lambda x: data.resize(x.astype(np.float32), 0), "ConfigError", "resize size must be a positive integer, got 0"),
    (lambda x: data.resize(x.astype(np.float32), 4.5), "ConfigError", "resize size must be a positive integer"),
    (lambda x: data.resize(x[0].astype(np.float32), 4), "DataError", r"resize needs \(N, H, W, C\) images"),
    (lambda x: data.epoch_indices(jax.random.key(0), len(x), 0), "ConfigError",  # was a ZeroDivisionError
     "epoch_indices batch_size must be a positive integer, got 0"),
    (lambda x: data.epoch_indices(jax.random.key(0), len(x), len(x) + 1), "ConfigError",  # was (0, 17): no steps
     "epoch_indices batch_size 17 is more than the 16 examples: no full batch"),
    (lambda x: next(data.eval_batches({"image": x, "label": np.zeros(len(x), np.int32)}, 0)), "ConfigError",
     "eval_batches batch_size must be a positive integer, got 0"),  # was range()'s "arg 3 must not be zero"
    (lambda x: data.subset({"image": x, "label": np.zeros(len(x))}, 2.5, seed=0), "DataError",
     r"subset size must be an integer in \[1, 16\], got 2.5"),  # was a slice's TypeError
    (lambda x: data.split_validation({"image": x, "label": np.zeros(len(x))}, 4.0, seed=0), "DataError",
     r"val_size must be an integer in \[0, 16\), got 4.0"),
], ids=["jitter", "resize_0", "resize_float", "resize_rank", "epoch_batch_0", "epoch_batch_too_big", "eval_batch_0",
        "subset_float", "val_size_float"])
def test_the_data_functions_refuse_arguments_out_of_range_in_one_line(images, call, error, message):
    with pytest.raises(getattr(errors, error), match=message) as err:
        call(np.asarray(images))
    assert "\n" not in str(err.value)


def test_normalize_takes_one_value_or_one_per_channel(images):
    grey = images[..., :1]
    np.testing.assert_allclose(data.normalize(grey, mean=0.5, std=0.25), (grey / 255.0 - 0.5) / 0.25, rtol=1e-6)
    np.testing.assert_allclose(data.normalize(grey, mean=(0.5,), std=(0.25,)), (grey / 255.0 - 0.5) / 0.25, rtol=1e-6)
    chex.assert_shape(data.normalize(images), images.shape)


def test_crop_is_a_translation_of_the_padded_image(images):
    out = np.asarray(data.augment(jax.random.key(5), images, translate=2, flip=False))
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    shifts = set()
    for img, pad in zip(out, padded):
        hits = [(dy, dx) for dy in range(5) for dx in range(5) if np.array_equal(pad[dy:dy + 8, dx:dx + 8], img)]
        assert hits, "augmented image is not a crop of the padded image"
        shifts.add(hits[0])
    assert len(shifts) > 1


def test_flip_mirrors_about_half(images):
    out = np.asarray(data.augment(jax.random.key(7), images, translate=0, flip=True))
    flipped = [np.array_equal(o, np.asarray(i)[:, ::-1]) for o, i in zip(out, images)]
    same = [np.array_equal(o, np.asarray(i)) for o, i in zip(out, images)]
    assert all(f or s for f, s in zip(flipped, same)) and 0 < sum(flipped) < len(out)


def test_flip_mask_mirrors_exactly_the_marked_images(images):
    mask = np.arange(len(images)) % 3 == 0
    out = np.asarray(data.augment(jax.random.key(7), images, translate=0, flip=jnp.asarray(mask)))
    expected = np.where(mask[:, None, None, None], np.asarray(images)[:, :, ::-1], np.asarray(images))
    np.testing.assert_array_equal(out, expected)


def test_alternating_flip_mirrors_each_image_every_other_epoch():
    key, indices = jax.random.key(4), jnp.arange(1000)
    flip = jax.jit(data.alternating_flip)
    e0, e1, e2 = (np.asarray(flip(key, indices, e)) for e in (0, 1, 2))
    np.testing.assert_array_equal(e1, ~e0)
    np.testing.assert_array_equal(e2, e0)
    assert 400 < e0.sum() < 600
    order = np.asarray(jax.random.permutation(jax.random.key(1), 1000))  # a coin per image, not per position
    np.testing.assert_array_equal(np.asarray(flip(key, jnp.asarray(order), 3)), e1[order])
    assert not np.array_equal(np.asarray(flip(jax.random.key(5), indices, 0)), e0)


def test_cutout_zeroes_a_square(images):
    out = np.asarray(data.augment(jax.random.key(3), images + 1, translate=0, flip=False, cutout=4))
    zeros = (out == 0).all(-1).sum((1, 2))
    assert zeros.max() == 16 and zeros.min() >= 4  # a 4×4 square, clipped at the border


def test_epoch_indices_are_a_permutation_without_the_tail():
    idx = np.asarray(data.epoch_indices(jax.random.key(0), 103, 10))
    assert idx.shape == (10, 10) and len(set(idx.ravel().tolist())) == 100 and idx.max() < 103


def test_eval_batches_pad_and_mask(arrays):
    batches = list(data.eval_batches(arrays["test"], 8))
    assert [b["mask"].sum() for b in batches] == [8, 8, 4]
    assert all(b["image"].shape == (8, 32, 32, 3) for b in batches)


@pytest.mark.parametrize("batch_size,multiple,sizes", [(64, 1, [20]), (64, 8, [24]), (16, 8, [16, 16]), (8, 4, [8] * 3)])
def test_a_split_smaller_than_the_eval_batch_is_not_padded_past_the_devices_multiple(arrays, batch_size, multiple,
                                                                                      sizes):
    """20 test rows: one batch of 20 (24 split over 8 devices), not of 64; the rows and their count unchanged."""
    batches = list(data.eval_batches(arrays["test"], batch_size, multiple))
    assert [len(b["label"]) for b in batches] == sizes and sum(int(b["mask"].sum()) for b in batches) == 20
    np.testing.assert_array_equal(np.concatenate([b["image"][b["mask"]] for b in batches]), arrays["test"]["image"])


def test_color_jitter_scales_contrast_and_brightness_within_its_strength():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(64, 192, (256, 8, 8, 3)), jnp.uint8)  # mid-range: nothing clips
    key = jax.random.key(1)
    out = data.color_jitter(key, images, 0.2)
    assert out.dtype == jnp.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(data.color_jitter(key, images, 0.0), images)
    np.testing.assert_array_equal(data.color_jitter(key, images, 0.2), out)  # a function of the key
    x, y = np.asarray(images, np.float64), np.asarray(out, np.float64)
    brightness = y.mean(axis=(1, 2, 3)) / x.mean(axis=(1, 2, 3))  # contrast keeps the mean; brightness scales it
    contrast = y.std(axis=(1, 2, 3)) / x.std(axis=(1, 2, 3)) / brightness
    for factor in (brightness, contrast):
        assert 0.79 < factor.min() and factor.max() < 1.21  # within [0.8, 1.2], rounding aside
        assert factor.max() - factor.min() > 0.3  # and spread over it, one draw per image


def test_train_batch_jitters_only_when_asked(images):
    from jaxnet.data import flip_schedule

    labels = jnp.zeros(len(images), jnp.int32)
    kwargs = dict(flip=flip_schedule("none", jax.random.key(0)), translate=2, cutout=0)
    plain = data.train_batch(jax.random.key(3), images, labels, jnp.arange(8), 0, **kwargs)
    again = data.train_batch(jax.random.key(3), images, labels, jnp.arange(8), 0, jitter=0.0, **kwargs)
    jittered = data.train_batch(jax.random.key(3), images, labels, jnp.arange(8), 0, jitter=0.3, **kwargs)
    np.testing.assert_array_equal(plain["image"], again["image"])
    assert not np.allclose(plain["image"], jittered["image"])


@pytest.mark.parametrize("size", [16, 20, 24, 31])
def test_resize_is_pils_antialiased_bilinear(size):
    """The reference: PIL's bilinear resize (a triangle filter widened by the scale), per image and channel."""
    from PIL import Image

    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    ref = [[np.asarray(Image.fromarray(x[n, :, :, c]).resize((size, size), Image.BILINEAR)) for c in range(3)]
           for n in range(2)]
    ours = data.resize(jnp.asarray(x), size)
    chex.assert_shape(ours, (2, size, size, 3))
    np.testing.assert_allclose(ours, np.moveaxis(np.asarray(ref), 1, -1), atol=1e-5)


def test_train_batch_resizes_the_augmented_batch_only_when_asked(images):
    from jaxnet.data import flip_schedule

    labels = jnp.arange(len(images), dtype=jnp.int32)
    kwargs = dict(flip=flip_schedule("random", jax.random.key(0)), translate=2, cutout=0)
    full = data.train_batch(jax.random.key(3), images, labels, jnp.arange(8), 0, **kwargs)
    same = data.train_batch(jax.random.key(3), images, labels, jnp.arange(8), 0, size=8, **kwargs)
    small = data.train_batch(jax.random.key(3), images, labels, jnp.arange(8), 0, size=6, **kwargs)
    chex.assert_shape(full["image"], (8, 8, 8, 3))
    np.testing.assert_array_equal(same["image"], full["image"])
    np.testing.assert_allclose(small["image"], data.resize(full["image"], 6), atol=1e-6)
    np.testing.assert_array_equal(small["label"], full["label"])
