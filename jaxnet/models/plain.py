"""PlainCNN: the network of the project's reference PyTorch script (../shared/docs/seed-document.md)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnet.errors import check_sizes
from jaxnet.layers import BatchNorm, Conv, ModuleDef, max_pool


class PlainCNN(nn.Module):
    """conv 3→w0 + BN + ReLU + max-pool; for each further width: conv-BN-ReLU-max-pool; conv + BN + ReLU at the
    last width without pooling; global average pool; linear → num_classes. (N, 32, 32, 3) → (N, classes) float32.

    Default widths (64, 64, 128, 256) are the script's. The script flattens its 2×2×256 map with
    `view(-1, 256)`, which multiplies the batch by four and fails at the loss; this model takes the global
    average over the 2×2 map instead, the smallest change that makes the script's network well defined.
    Convs have biases, as PyTorch's default.
    """

    num_classes: int = 10
    widths: Sequence[int] = (64, 64, 128, 256)
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        check_sizes("PlainCNN", num_classes=self.num_classes, widths=self.widths)
        conv = partial(self.conv, kernel_size=(3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype)
        # PyTorch's BatchNorm2d defaults: running stats move by 0.1 per step, eps 1e-5.
        norm = partial(self.norm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)
        for width in self.widths:
            x = nn.relu(norm()(conv(width)(x)))
            x = max_pool(x, 2)
        x = nn.relu(norm()(conv(self.widths[-1])(x)))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


PlainCNNTiny = partial(PlainCNN, widths=(4, 4, 8, 8))
