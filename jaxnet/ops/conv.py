"""2-D convolution over NHWC inputs and HWIO kernels, with named implementations and a plain reference.

Every implementation in `IMPLS` computes the same function as `conv2d_reference`; tests compare them
forward and in gradient. The implementation is chosen by name, outside traced code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypeAlias

import jax
import jax.numpy as jnp
from jax import lax

Impl: TypeAlias = Literal["xla"]
IMPLS: tuple[str, ...] = ("xla",)
DEFAULT_IMPL: Impl = "xla"

Padding: TypeAlias = str | int | Sequence[int] | Sequence[tuple[int, int]]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return value


def resolve_padding(
    padding: Padding, kernel_hw: tuple[int, int], strides: tuple[int, int],
    dilation: tuple[int, int], in_hw: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Explicit ((top, bottom), (left, right)) padding for "SAME", "VALID", an int, or per-dim pairs.

    "SAME" follows XLA/TensorFlow: output size ceil(in / stride), the extra pixel at the end.
    """
    if isinstance(padding, str):
        match padding.upper():
            case "VALID":
                return ((0, 0), (0, 0))
            case "SAME":
                pads = []
                for size, k, s, d in zip(in_hw, kernel_hw, strides, dilation):
                    effective = (k - 1) * d + 1
                    out = -(-size // s)
                    total = max((out - 1) * s + effective - size, 0)
                    pads.append((total // 2, total - total // 2))
                return tuple(pads)
            case _:
                raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs, got {padding!r}")
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    pads = tuple(padding)
    if len(pads) == 2 and all(isinstance(p, int) for p in pads):
        return ((pads[0], pads[0]), (pads[1], pads[1]))
    if len(pads) == 2 and all(len(p) == 2 for p in pads):
        return tuple((int(lo), int(hi)) for lo, hi in pads)
    raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs, got {padding!r}")


def _check(x: jax.Array, w: jax.Array, groups: int) -> None:
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(
            f"conv2d expects x of rank 4 (N, H, W, C) and w of rank 4 (KH, KW, C/groups, O), "
            f"got x{tuple(x.shape)} and w{tuple(w.shape)}")
    if groups < 1 or x.shape[-1] != w.shape[2] * groups or w.shape[-1] % groups:
        raise ValueError(
            f"conv2d: x has {x.shape[-1]} channels, w expects {w.shape[2]} per group × {groups} groups "
            f"and has {w.shape[-1]} outputs (must divide by groups)")


def conv2d(
    x: jax.Array, w: jax.Array, *, strides: int | Sequence[int] = 1, padding: Padding = "SAME",
    dilation: int | Sequence[int] = 1, groups: int = 1, impl: str | None = None,
) -> jax.Array:
    """2-D cross-correlation, as in every deep-learning framework.

    Args:
      x: (N, H, W, C) input.
      w: (KH, KW, C // groups, O) kernel.
      strides, dilation: an int or (h, w) pair (dilation is of the kernel).
      padding: "SAME", "VALID", an int, (ph, pw), or ((top, bottom), (left, right)).
      groups: feature groups; C and O must divide by it.
      impl: a name from `IMPLS`, or None for `DEFAULT_IMPL`.

    Returns:
      (N, H', W', O) in the promoted dtype of x and w.

    Raises:
      ValueError: for an unknown impl name, or shapes that do not fit together.
    """
    _check(x, w, groups)
    strides, dilation = _pair(strides, "strides"), _pair(dilation, "dilation")
    pads = resolve_padding(padding, w.shape[:2], strides, dilation, x.shape[1:3])
    match DEFAULT_IMPL if impl is None else impl:
        case "xla":
            return lax.conv_general_dilated(
                x, w, window_strides=strides, padding=pads, rhs_dilation=dilation,
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
        case other:
            raise ValueError(f"unknown conv impl {other!r}; valid: {', '.join(IMPLS)}")


def conv2d_reference(
    x: jax.Array, w: jax.Array, *, strides: int | Sequence[int] = 1, padding: Padding = "SAME",
    dilation: int | Sequence[int] = 1, groups: int = 1,
) -> jax.Array:
    """The definition, written plainly: a sum over kernel taps of shifted, strided input slices.

    Same contract as `conv2d`. Slow; used only to check the implementations.
    """
    _check(x, w, groups)
    (sh, sw), (dh, dw) = _pair(strides, "strides"), _pair(dilation, "dilation")
    pads = resolve_padding(padding, w.shape[:2], (sh, sw), (dh, dw), x.shape[1:3])
    kh, kw, cin_g, cout = w.shape
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out_h = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
    out_w = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
    n = x.shape[0]
    xg = xp.reshape(n, xp.shape[1], xp.shape[2], groups, cin_g)
    wg = w.reshape(kh, kw, cin_g, groups, cout // groups)
    out = jnp.zeros((n, out_h, out_w, groups, cout // groups), jnp.result_type(x, w))
    for i in range(kh):
        for j in range(kw):
            tap = xg[:, i * dh: i * dh + (out_h - 1) * sh + 1: sh, j * dw: j * dw + (out_w - 1) * sw + 1: sw]
            out = out + jnp.einsum("nhwgc,cgo->nhwgo", tap, wg[i, j], precision=lax.Precision.HIGHEST)
    return out.reshape(n, out_h, out_w, cout)
