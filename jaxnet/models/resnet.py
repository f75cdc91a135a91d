"""ResNet family (He et al. 2015): CIFAR ResNet-20/56, ResNet-18/34/50 with a CIFAR or an ImageNet stem.

Written once, with the convolution and the normalisation injected (`conv=partial(jaxnet.layers.Conv,
impl=...)`). Inputs are (N, H, W, 3) NHWC; outputs are (N, num_classes) logits in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnet.errors import ConfigError, check_sizes
from jaxnet.layers import BatchNorm, Conv, ModuleDef


class _Block(nn.Module):
    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[jax.Array], jax.Array]
    strides: int = 1


class BasicBlock(_Block):
    """Two 3×3 convs; a 1×1 projection on the shortcut when the shape changes. Output has `filters` channels."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.act(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
        # Zero-init of the last BN scale makes every block start as the identity (Goyal et al. 2017).
        y = self.norm(scale_init=nn.initializers.zeros_init())(self.conv(self.filters, (3, 3))(y))
        if x.shape != y.shape:
            x = self.norm(name="norm_proj")(self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(x))
        return self.act(x + y)


class Bottleneck(_Block):
    """1×1 reduce, 3×3 (strided, as in torchvision's v1.5), 1×1 expand ×4. Output has 4·`filters` channels."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.act(self.norm()(self.conv(self.filters, (1, 1))(x)))
        y = self.act(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
        y = self.norm(scale_init=nn.initializers.zeros_init())(self.conv(self.filters * 4, (1, 1))(y))
        if x.shape != y.shape:
            x = self.norm(name="norm_proj")(self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(x))
        return self.act(x + y)


class ResNet(nn.Module):
    """ResNet with `len(stage_sizes)` stages; stage i has `num_filters · 2**i` filters, stride 2 from stage 1 on.

    Attributes:
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
      block_cls: `BasicBlock` or `Bottleneck`.
      num_classes: size of the logits.
      num_filters: width of the stem and the first stage.
      stem: "cifar" (3×3 conv, stride 1, no pooling) or "imagenet" (7×7/2 conv + 3×3/2 max-pool).
      conv: conv constructor with `nn.Conv`'s signature (default: jaxnet's `Conv`, default impl).
      norm: constructor with `nn.BatchNorm`'s keywords `use_running_average`, `momentum`, `epsilon`, `dtype`
        (default: jaxnet's `BatchNorm`).
      dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int = 10
    num_filters: int = 64
    stem: Literal["cifar", "imagenet"] = "cifar"
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm
    act: Callable[[jax.Array], jax.Array] = nn.relu
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        check_sizes("ResNet", num_classes=self.num_classes, num_filters=self.num_filters, stage_sizes=self.stage_sizes)
        conv = partial(self.conv, use_bias=False, dtype=self.dtype)
        norm = partial(self.norm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)
        match self.stem:
            case "cifar":
                x = self.act(norm(name="norm_init")(conv(self.num_filters, (3, 3), name="conv_init")(x)))
            case "imagenet":
                x = conv(self.num_filters, (7, 7), 2, padding=((3, 3), (3, 3)), name="conv_init")(x)
                x = self.act(norm(name="norm_init")(x))
                x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
            case other:
                raise ConfigError(f"unknown stem {other!r}; valid: 'cifar', 'imagenet'")
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                strides = 2 if i > 0 and j == 0 else 1
                x = self.block_cls(self.num_filters * 2 ** i, conv=conv, norm=norm, act=self.act, strides=strides)(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
# CIFAR ResNets of He et al. §4.2: three stages of 16/32/64 filters, 6n+2 layers (projection shortcuts).
ResNet20 = partial(ResNet, stage_sizes=(3, 3, 3), block_cls=BasicBlock, num_filters=16)
ResNet56 = partial(ResNet, stage_sizes=(9, 9, 9), block_cls=BasicBlock, num_filters=16)
# For tests: every code path (stem, projection, stride) at a width that compiles in seconds.
ResNetTiny = partial(ResNet, stage_sizes=(1, 1), block_cls=BasicBlock, num_filters=4)
