"""FastNet: the airbench94-class CIFAR-10 net (Jordan 2024), in Flax with the convolution injected.

Stem: a 2×2 VALID "patch-whitening" conv of 2·3·2² = 24 channels + GELU; then three conv-pool-BN-GELU
blocks; a max-pool to 1×1; a bias-free linear head times `scale`. (N, 32, 32, 3) → (N, num_classes) float32.
The recipe (jaxnet/configs/default.py) sets the stem kernel from data with `whitening_kernel` and
freezes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.errors import ConfigError, check_sizes
from jaxnet.layers import BatchNorm, Conv, ModuleDef, max_pool

# PyTorch's default conv init (kaiming-uniform, a=√5), which the airbench recipe was tuned with.
torch_conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def dirac_init(base: Callable = torch_conv_init) -> Callable:
    """`base`, then the identity on the first C_in output channels (torch.nn.init.dirac_): blocks start near identity."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        kh, kw, cin, cout = shape
        w = base(key, shape, dtype)
        eye = jnp.zeros((kh, kw, cin, min(cin, cout)), dtype).at[kh // 2, kw // 2].set(jnp.eye(cin, min(cin, cout), dtype=dtype))
        return w.at[..., : min(cin, cout)].set(eye)

    return init


gelu = partial(nn.gelu, approximate=False)


def widened(x: jax.Array) -> jax.Array:
    """`x` in float32 if it is narrower (bfloat16 from a conv), else as it is.

    FastNet's convs and head compute in the model's `dtype`; its pooling, BatchNorm and activations in
    float32, rounded once into the next conv's dtype. XLA's CPU backend computes each bf16 elementwise op in
    float32 and rounds its result, so a bf16 GELU is a chain of converts — slower than the float32 one and
    rounded at every op; and XLA pools a float32 copy faster than bf16 (2026-11-30, Xeon: with both, a FastNet
    b512 bf16 train step with oneDNN's convs takes 0.78× the time).
    """
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"gelu": gelu, "silu": nn.silu, "relu": nn.relu}


class ConvGroup(nn.Module):
    """conv3×3 → max-pool 2 → BN → activation → conv3×3 → BN → activation; halves H and W.

    `depth` 3 is airbench96's group: a third conv3×3 → BN, added to the output of the first activation (a
    residual over the last two convs), then the activation."""

    features: int
    conv: ModuleDef
    norm: ModuleDef
    activation: Callable[[jax.Array], jax.Array] = gelu
    depth: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.depth not in (2, 3):
            raise ConfigError(f"ConvGroup depth must be 2 or 3, got {self.depth!r}")
        x = self.conv(self.features, (3, 3))(x)
        x = max_pool(widened(x), 2)
        x = shortcut = self.activation(self.norm()(x))
        x = self.conv(self.features, (3, 3))(x)
        x = self.activation(self.norm()(x))
        if self.depth == 2:
            return x
        x = self.conv(self.features, (3, 3))(x)
        return self.activation(self.norm()(x) + shortcut)


class FastNet(nn.Module):
    """airbench-class net. Attributes: `widths` of the three blocks, their `depth` in convs (2, airbench94's;
    3, airbench96's: see `ConvGroup`), `stem_width` (2·3·2² for whitening),
    BN `bn_momentum` (Flax convention: weight of the running value), head `scale` (None: 1 / the head's input
    features) and `head_init`, `activation` (exact GELU, airbench's), compute `dtype` of the convs and the
    head (pooling, BatchNorm and activations compute in float32: see `widened`)."""

    num_classes: int = 10
    widths: Sequence[int] = (64, 256, 256)
    depth: int = 2
    stem_width: int = 24
    bn_momentum: float = 0.6
    scale: float | None = 1 / 9
    head_init: Callable = torch_conv_init
    activation: Callable[[jax.Array], jax.Array] = gelu
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        check_sizes("FastNet", num_classes=self.num_classes, widths=self.widths, stem_width=self.stem_width)
        if not callable(self.activation):
            raise ConfigError(f"FastNet activation must be a function (e.g. jax.nn.gelu, or jaxnet.models.ACTIVATIONS"
                              f"[name] for one of {', '.join(ACTIVATIONS)}), got {self.activation!r}")
        conv = partial(self.conv, use_bias=False, dtype=self.dtype, kernel_init=dirac_init())
        # airbench's BN: no learnable scale, eps 1e-12, fast-moving running statistics.
        norm = partial(self.norm, use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-12,
                       use_scale=False)
        x = self.conv(self.stem_width, (2, 2), padding="VALID", use_bias=True, dtype=self.dtype,
                      kernel_init=torch_conv_init, name="stem")(x)
        x = self.activation(widened(x))
        for width in self.widths:
            x = ConvGroup(width, conv=conv, norm=norm, activation=self.activation, depth=self.depth)(x)
        x = max_pool(x, x.shape[1])
        x = x.reshape(x.shape[0], -1)
        scale = 1 / self.widths[-1] if self.scale is None else self.scale
        x = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, kernel_init=self.head_init, name="head")(x)
        return (x * scale).astype(jnp.float32)


@partial(jax.jit, static_argnames="patch_size")
def patch_covariance(images: jax.Array, patch_size: int = 2) -> jax.Array:
    """The uncentred covariance of every `patch_size`² patch of `images` (N, H, W, C float), (p²C, p²C) float32
    with the patch's values in (h, w, c) order, matching HWIO: one program on the device, in float32 at full
    precision, summed in 64 parts and then their sums: within ~2e-7 of float64's (relative to the largest entry)
    on 2 000 images (1.9 million patches). One sum over every patch was at 1.0e-6 (jaxlib 0.10-0.12.0) to 1.5e-6
    (0.12.1) and no faster (2-core Xeon, 5 000 images: 190-490 ms against 140-410 ms in parts)."""
    _, h, w, c = images.shape
    p = patch_size
    flat = jnp.concatenate([images[:, i: h - p + 1 + i, j: w - p + 1 + j] for i in range(p) for j in range(p)],
                           axis=3).reshape(-1, p * p * c).astype(jnp.float32)
    parts = jnp.pad(flat, ((0, -flat.shape[0] % 64), (0, 0))).reshape(64, -1, flat.shape[1])  # zero rows add 0
    sums = jnp.matmul(jnp.swapaxes(parts, 1, 2), parts, precision=jax.lax.Precision.HIGHEST)
    return sums.sum(0) / flat.shape[0]


def whitening_kernel(images: jax.Array | np.ndarray, *, patch_size: int = 2, eps: float = 5e-4) -> np.ndarray:
    """The stem kernel that whitens `patch_size`² patches: (p, p, C, 2·p²·C) float32, HWIO.

    Eigenvectors of the patch covariance of `images` (N, H, W, C float, already normalised; `patch_covariance`,
    on the device), largest eigenvalue first, each scaled by 1/√(λ + eps), then the same filters negated (so GELU
    keeps both signs). The eigendecomposition runs in float64 on the host; call once before training.
    """
    p, c = patch_size, images.shape[-1]
    covariance = np.asarray(patch_covariance(jnp.asarray(images, jnp.float32), p), np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    filters = (eigenvectors / np.sqrt(eigenvalues + eps)).reshape(p, p, c, p * p * c)
    return np.concatenate([filters, -filters], axis=-1).astype(np.float32)


def unit_std_init(base: Callable = torch_conv_init) -> Callable:
    """`base`, rescaled to a standard deviation of 1 (airbench94_muon's head: `w *= 1 / w.std()`)."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        w = base(key, shape, dtype)
        return w / jnp.std(w)

    return init


FastNetTiny = partial(FastNet, widths=(8, 16, 16))
# airbench94_muon's head: unit-std weights, logits divided by its input features (256).
FastNetMuon = partial(FastNet, scale=None, head_init=unit_std_init())


def with_whitening_stem(params: dict, images: jax.Array | np.ndarray, *, module: str = "stem") -> dict:
    """`params` with the kernel of `module` (a `patch_size`×`patch_size` conv of 2·p²·C features, FastNet's
    stem) set by `whitening_kernel` from `images` (N, H, W, C float, normalised as the model sees them)."""
    p = params[module]["kernel"].shape[0]
    return {**params, module: {**params[module], "kernel": jnp.asarray(whitening_kernel(images, patch_size=p))}}
