"""Model shapes, parameter counts against the published references, and that the injected conv is used."""

from functools import partial

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import counting_conv

from jaxnet import layers, models
from jaxnet.errors import ConfigError

TINY = {
    "resnet_cifar": partial(models.ResNetTiny, stem="cifar"),
    "resnet_imagenet": partial(models.ResNetTiny, stem="imagenet"),
    "resnet_bottleneck": partial(models.ResNet, stage_sizes=(1, 1), block_cls=models.Bottleneck, num_filters=4),
    "fastnet": models.FastNetTiny,
    "plain": models.PlainCNNTiny,
}


def _param_count(model, shape):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    return sum(x.size for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("model,shape,expected", [
    (models.ResNet18(num_classes=10), (1, 32, 32, 3), 11_173_962),       # kuangliu/pytorch-cifar ResNet18
    (models.ResNet20(num_classes=10), (1, 32, 32, 3), 272_474),          # He et al.: 0.27 M
    (models.ResNet56(num_classes=10), (1, 32, 32, 3), 855_770),          # He et al.: 0.85 M
    (models.ResNet18(num_classes=1000, stem="imagenet"), (1, 224, 224, 3), 11_689_512),  # torchvision
    (models.ResNet34(num_classes=1000, stem="imagenet"), (1, 224, 224, 3), 21_797_672),  # torchvision
    (models.ResNet50(num_classes=1000, stem="imagenet"), (1, 224, 224, 3), 25_557_032),  # torchvision
    (models.FastNet(), (1, 32, 32, 3), 1_971_640),                        # airbench94 (all its tensors)
    (models.FastNet(widths=(128, 384, 512), depth=3), (1, 32, 32, 3), 9_915_704),  # airbench96 (trained tensors)
], ids=["resnet18", "resnet20", "resnet56", "resnet18_imagenet", "resnet34_imagenet", "resnet50_imagenet",
        "fastnet", "fastnet_airbench96"])
def test_parameter_counts_match_references(model, shape, expected):
    assert _param_count(model, shape) == expected


@pytest.mark.parametrize("name,size", [(n, s) for n in TINY for s in (32,)] + [("resnet_imagenet", 64)])
def test_output_shapes_and_dtype(name, size):
    model = TINY[name](num_classes=7)
    x = jnp.ones((2, size, size, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    logits = model.apply(variables, x, train=False)
    chex.assert_shape(logits, (2, 7))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize("name", TINY)
def test_bf16_compute_keeps_fp32_params(name):
    model = TINY[name](dtype=jnp.bfloat16)
    x = jnp.ones((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    assert {p.dtype for p in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
    chex.assert_type(model.apply(variables, x, train=False), jnp.float32)


def _equations(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs inside it (jit, custom VJPs, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from _equations(getattr(sub, "jaxpr", sub))


def test_fastnet_in_bf16_convolves_in_bf16_and_pools_normalises_activates_in_float32():
    """The dtype policy of `widened`: XLA's CPU backend rounds after every bf16 elementwise op (slow, inexact)."""
    model = models.FastNetTiny(dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    variables = model.init(jax.random.key(1), x, train=False)

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(logits)

    eqns = list(_equations(jax.make_jaxpr(jax.grad(loss))(variables["params"]).jaxpr))
    by_dtype = {}
    for eqn in eqns:
        by_dtype.setdefault(eqn.primitive.name, set()).update(v.aval.dtype for v in eqn.invars if hasattr(v, "aval"))
    assert by_dtype["conv_general_dilated"] == {jnp.dtype(jnp.bfloat16)}  # forward and both gradients
    gelu = {p for p in ("erf", "erfc") if p in by_dtype}
    assert gelu and all(by_dtype[p] == {jnp.dtype(jnp.float32)} for p in gelu)
    assert by_dtype["max"] == {jnp.dtype(jnp.float32)}  # the pools (the forward's and the gradient's)


@pytest.mark.parametrize("name", TINY)
def test_injected_conv_is_the_one_used(name):
    calls = []
    model = TINY[name](conv=counting_conv(calls))
    params = model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)), train=False)["params"]
    n_convs = sum(1 for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
                  if path[-1].key == "kernel" and path[0].key != "head")
    assert len(calls) == n_convs > 0


@pytest.mark.parametrize("name", TINY)
def test_eval_mode_leaves_batch_stats_unchanged(name):
    model = TINY[name]()
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) * 3 + 1
    variables = model.init(jax.random.key(0), x, train=False)
    _, updated = model.apply(variables, x, train=False, mutable=["batch_stats"])
    chex.assert_trees_all_equal(updated["batch_stats"], variables["batch_stats"])
    _, trained = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(jax.tree.leaves(trained["batch_stats"])[0], jax.tree.leaves(variables["batch_stats"])[0])


def test_conv_layer_matches_flax_conv():
    """Same parameter names, shapes and initial values as nn.Conv, and the same output."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))
    kwargs = dict(features=6, kernel_size=(3, 3), strides=2, padding="SAME", feature_group_count=2)
    ours, ref = layers.Conv(**kwargs), nn.Conv(**kwargs)
    v_ours, v_ref = ours.init(jax.random.key(1), x), ref.init(jax.random.key(1), x)
    chex.assert_trees_all_equal(v_ours, v_ref)
    chex.assert_trees_all_close(ours.apply(v_ours, x), ref.apply(v_ref, x), rtol=1e-5, atol=1e-5)


def test_conv_layer_takes_an_int_kernel_size_as_a_square_and_refuses_what_is_not_2d():
    """`Conv(4, 3)` (PyTorch's spelling) was "cannot unpack non-iterable int"; a 3-D kernel a ValueError."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = nn.Conv(4, (3, 3)).init(jax.random.key(1), x)
    chex.assert_trees_all_close(layers.Conv(4, 3).apply(variables, x), nn.Conv(4, (3, 3)).apply(variables, x),
                                rtol=1e-5, atol=1e-5)
    for conv, message in ((layers.Conv(4, (3, 3, 3)), r"Conv is 2-D: kernel_size must be an int or \(KH, KW\)"),
                          (layers.Conv(0, 3), "Conv features must be a positive integer, got 0")):
        with pytest.raises(ConfigError, match=message):
            conv.init(jax.random.key(1), x)


def test_patch_covariance_matches_float64_on_the_host():
    """The device's float32 covariance of every 2×2 (and 3×3) patch against numpy's in float64, patches stacked
    in (h, w, c) order: within 5e-7 of the largest entry on 2 000 CIFAR-sized images (one float32 sum over all
    1.9 million patches was at 1.0-1.5e-6)."""
    images = np.random.default_rng(0).normal(size=(2000, 32, 32, 3)) * [1.0, 2.0, 0.5] + 0.3
    for p in (2, 3):
        patches = np.stack([images[:, i: 33 - p + i, j: 33 - p + j] for i in range(p) for j in range(p)], axis=3)
        flat = patches.reshape(-1, p * p * 3)
        ref = flat.T @ flat / len(flat)
        ours = np.asarray(models.patch_covariance(jnp.asarray(images, jnp.float32), p), np.float64)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=5e-7 * np.abs(ref).max())


def test_whitening_kernel_whitens_patches():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(12, 12))
    patches = rng.normal(size=(4000, 12)) @ mix  # correlated 2×2×3 patches
    images = patches.reshape(-1, 2, 2, 3)
    kernel = models.whitening_kernel(images, eps=0.0)
    chex.assert_shape(kernel, (2, 2, 3, 24))
    out = images.reshape(-1, 12) @ kernel.reshape(12, 24)[:, :12]
    # Uncentred, as airbench. The covariance is float32's (within ~1e-7 of float64's largest entry), an error the
    # weakest direction's whitening magnifies by the condition number (2.3e4 here): seen 4e-5 (jaxlib 0.10.2) and
    # 1.2e-4 (0.12.1). A wrong kernel is off by O(1).
    np.testing.assert_allclose(out.T @ out / len(out), np.eye(12), atol=1e-3)
    np.testing.assert_array_equal(kernel[..., 12:], -kernel[..., :12])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("size,window", [(8, 2), (7, 2), (9, 3), (3, 3), (1, 2)])
def test_max_pool_matches_flax_forward_and_gradient(size, window, ties, dtype):
    x = jax.random.normal(jax.random.key(0), (2, size, size, 5))
    # Rounded to integers most windows hold ties: the gradient must go to the first maximum, as Flax's does.
    x = (jnp.round(x) if ties else x).astype(dtype)

    def ref(x):
        return nn.max_pool(x, (window, window), strides=(window, window))

    chex.assert_trees_all_equal(layers.max_pool(x, window), ref(x))
    g = jax.grad(lambda x: jnp.sum(jnp.sin(layers.max_pool(x, window).astype(jnp.float32))))(x)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.sin(ref(x).astype(jnp.float32))))(x)
    chex.assert_trees_all_equal(g, g_ref)
    assert "select_and_scatter" not in str(jax.make_jaxpr(jax.grad(lambda x: layers.max_pool(x, window).sum()))(x))


@pytest.mark.parametrize("name", models.NAMES)
def test_registry_builds_every_name_with_the_given_arguments(name):
    model = models.get(name, num_classes=7)
    assert isinstance(model, nn.Module) and model.num_classes == 7
    logits = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros((2, 32, 32, 3)),
                                                          train=False)[0])
    assert logits.shape == (2, 7)


def test_registry_rejects_an_unknown_name_naming_the_valid_ones():
    from jaxnet.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown model 'vgg'; valid: fastnet, "):
        models.get("vgg")


@pytest.mark.parametrize("make,message", [
    (lambda: models.ResNet20(num_classes=0), "ResNet num_classes must be a positive integer, got 0"),  # 1/0 in init
    (lambda: models.ResNet20(num_classes=10.0), "ResNet num_classes must be a positive integer, got 10.0"),
    (lambda: models.ResNet(stage_sizes=(), block_cls=models.BasicBlock), "ResNet stage_sizes must be a non-empty"),
    (lambda: models.FastNet(widths=(0, 8, 8)), r"FastNet widths must be a non-empty sequence of positive integers, "
                                               r"got \(0, 8, 8\)"),
    (lambda: models.FastNet(widths=()), "FastNet widths must be a non-empty"),  # an IndexError
    (lambda: models.FastNet(activation="relu"), r"FastNet activation must be a function .* got 'relu'"),
    (lambda: models.PlainCNN(num_classes=-1), "PlainCNN num_classes must be a positive integer, got -1"),
], ids=["resnet_classes_0", "resnet_classes_float", "resnet_no_stages", "fastnet_width_0", "fastnet_no_widths",
        "fastnet_activation_name", "plain_classes_negative"])
def test_a_model_with_a_size_it_cannot_have_is_one_line_at_init(make, message):
    with pytest.raises(ConfigError, match="^" + message) as err:
        make().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    assert "\n" not in str(err.value)  # (JAX adds a note of its own, which is not the message)


def test_whitening_stem_sets_the_stem_kernel_from_data_only():
    params = jax.tree.map(np.asarray, models.FastNetTiny().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                                                train=False)["params"])
    images = np.random.default_rng(0).normal(size=(16, 32, 32, 3)).astype(np.float32)
    whitened = models.with_whitening_stem(params, images)
    chex.assert_trees_all_equal(whitened["stem"]["kernel"], models.whitening_kernel(images))
    chex.assert_trees_all_equal({k: v for k, v in whitened.items() if k != "stem"},
                                {k: v for k, v in params.items() if k != "stem"})
    chex.assert_trees_all_equal(whitened["stem"]["bias"], params["stem"]["bias"])


def _fastnet_reference(variables, x, depth):
    """FastNet's eval-mode forward written out from airbench's network definition, with `variables`' values:
    stem conv + GELU; per block conv, pool, BN, GELU, conv, BN, GELU (depth 3: then conv, BN, plus the first
    GELU's output, GELU); global max-pool; head times 1/9."""
    params, stats = variables["params"], variables["batch_stats"]
    conv = partial(jax.lax.conv_general_dilated, window_strides=(1, 1), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                   precision="highest")
    gelu = partial(jax.nn.gelu, approximate=False)

    def channels(v):  # a per-channel vector, broadcast over NHWC explicitly (the tests raise on rank promotion)
        return v.reshape(1, 1, 1, -1)

    def bn(x, group, i):
        s, b = stats[group][f"BatchNorm_{i}"], params[group][f"BatchNorm_{i}"]["bias"]
        return (x - channels(s["mean"])) / channels(jnp.sqrt(s["var"] + 1e-12)) + channels(b)

    x = gelu(conv(x, params["stem"]["kernel"], padding="VALID") + channels(params["stem"]["bias"]))
    for g in range(3):
        group, kernel = f"ConvGroup_{g}", lambda i: params[f"ConvGroup_{g}"][f"Conv_{i}"]["kernel"]
        x = nn.max_pool(conv(x, kernel(0), padding="SAME"), (2, 2), strides=(2, 2))
        x = shortcut = gelu(bn(x, group, 0))
        x = gelu(bn(conv(x, kernel(1), padding="SAME"), group, 1))
        if depth == 3:
            x = gelu(bn(conv(x, kernel(2), padding="SAME"), group, 2) + shortcut)
    return x.max(axis=(1, 2)) @ params["head"]["kernel"] / 9


@pytest.mark.parametrize("depth", [2, 3])
def test_fastnet_blocks_of_two_and_three_convs_match_airbenchs_definition(depth):
    model = models.FastNet(widths=(8, 16, 12), depth=depth)
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    # non-trivial BN statistics and biases, so that every term of the reference counts
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    variables = jax.tree.unflatten(treedef, [
        leaf + 0.1 * jax.random.uniform(k, leaf.shape) if leaf.ndim == 1 else leaf for leaf, k in zip(leaves, keys)])
    assert len(variables["params"]["ConvGroup_0"]) == 2 * depth  # its convs and BatchNorms
    np.testing.assert_allclose(model.apply(variables, x, train=False), _fastnet_reference(variables, x, depth),
                               rtol=1e-4, atol=1e-5)


def test_fastnet_refuses_another_depth():
    with pytest.raises(ValueError, match="ConvGroup depth must be 2 or 3, got 4"):
        models.FastNet(widths=(8, 16, 16), depth=4).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


def test_fastnet_initialises_in_its_dtype_with_64_bit_mode_on():
    """A user's program with jax_enable_x64: the identity set into FastNet's kernels was a float64 eye, which JAX
    warns it will refuse to scatter into float32 (a FutureWarning at every run's start)."""
    import warnings

    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("error")
        variables = models.FastNetTiny().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32), train=False)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
