"""2-D convolution over NHWC inputs and HWIO kernels, with named implementations and a plain reference.

Every implementation in `IMPLS` computes the same function as `conv2d_reference`; tests compare them
forward and in gradient. The implementation is chosen by name, outside traced code; "auto" picks the
measured winner for the layer's shape on the platform the program is lowered for: on CPUs, oneDNN's convs
where oneDNN is installed (extra `onednn`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Literal, NamedTuple, TypeAlias

import jax
import jax.extend
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.interpreters import ad, mlir

from jaxnet.errors import ConfigError, check_values, is_kind
from jaxnet.ops import onednn

Impl: TypeAlias = Literal["xla", "im2col", "pallas", "onednn", "auto"]
IMPLS: tuple[str, ...] = ("xla", "im2col", "pallas", "onednn", "auto")
DEFAULT_IMPL: Impl = "xla"


class Layer(NamedTuple):
    """What "auto" looks at: the unpadded input's (H, W), the kernel's (KH, KW), the strides, whether conv impl
    "onednn" can run the conv in this program (not traced inside `portable`, the process's default backend the CPU
    (a GPU process never builds oneDNN's handlers), `onednn.available` for the conv's dtype, one group, no
    dilation), the input's channels (0: unknown) and the conv's dtype (its name)."""

    in_hw: tuple[int, int]
    kernel_hw: tuple[int, int]
    strides: tuple[int, int]
    onednn: bool = False
    in_channels: int = 0
    dtype: str = "float32"


# What "auto" runs: per platform, the impl of the first row whose test holds for the layer, else "xla". Rows are
# the measured winners of `python -m benchmarks.conv_impls` (forward + both gradients; benchmarks/RESULTS.md,
# "Conv implementations", 2026-11-26, 2-core AMD EPYC, eigen CPU convs), where XLA's conv lost to im2col.
# Wins under 1.2x (im2col on ResNet-18's 4x4x512 and ResNet-50's 1x1 reduce) changed sides between two runs and
# are left out. Every other CPU conv runs as oneDNN's where it is installed (extra `onednn`): on the same grid
# (2026-12-03, 2-core AMD Zen 4, AVX-512) oneDNN's beat XLA's and im2col on 12 of 14 layers, by 1.1-2.2x (the
# strided 1x1 2.2x faster than im2col); XLA's won ResNet-18's 4x4x512 (its own row), im2col the 3x3 on 2x2
# (the first row). FastNet's train step with oneDNN's convs against XLA's, each beside PyTorch eager's
# in one run (`python -m benchmarks.step_ops`; 2026-12-02/03): 0.94x against 0.87x PyTorch's speed on an AVX2
# EPYC (family 23), 1.00x against 0.76x on the Zen 4; `quick` in 0.72x the wall time on an AMX Xeon
# (2026-11-30). A platform with no measurement (GPUs so far: cuDNN through XLA) has no rows and runs "xla".
AUTO_TABLE: dict[str, tuple[tuple[str, Callable[[Layer], bool], Impl], ...]] = {
    "cpu": (
        # XLA swaps such a conv's operands (the activations become the kernel) into a conv Eigen runs 16-27x
        # slower than im2col's dot: PlainCNN's last 3x3 on a 2x2 map.
        ("kernel larger than the input", lambda l: l.in_hw[0] < l.kernel_hw[0] or l.in_hw[1] < l.kernel_hw[1],
         "im2col"),
        # ResNet-18/34's stage 4 (4x4x512 -> 512) in float32: XLA's conv 1.35x, 1.53x and 1.05x faster than
        # oneDNN's in three runs of the grid on a Zen 4 (forward and both gradients; its 4x4x128 -> 256 and
        # 3x3x256 -> 256 go to oneDNN), the ResNet-18 b256 step 0.96x the time of oneDNN's convs throughout. Not in
        # bfloat16, where XLA's CPU convs are no faster than in float32: there the same step took 1.14x with it.
        ("float32 3x3 on a map of at most 4x4 with 512 or more input channels",
         lambda l: (l.dtype == "float32" and l.kernel_hw == (3, 3) and l.strides == (1, 1) and max(l.in_hw) <= 4
                    and l.in_channels >= 512),
         "xla"),
        ("oneDNN installed, and has kernels for the conv", lambda l: l.onednn, "onednn"),
        # A strided slice + one dot: 1.2-1.6x faster than XLA's conv on ResNet-18's projection.
        ("strided 1x1", lambda l: l.kernel_hw == (1, 1) and l.strides != (1, 1), "im2col"),
    ),
}

# Whether "auto" may run oneDNN's FFI calls: not in a program traced to be serialized (`portable`).
_FFI_ALLOWED = contextvars.ContextVar("jaxnet_conv_ffi_allowed", default=True)


@contextlib.contextmanager
def portable() -> Iterator[None]:
    """Within it, conv impl "auto" traces to XLA's own ops only (its choice without the oneDNN row): for programs
    to serialize (`jaxnet.export.export_jax`), since oneDNN's FFI calls exist only in a process that loaded
    jaxnet's handlers. The choice is made at tracing, so a program traced inside holds no FFI call."""
    token = _FFI_ALLOWED.set(False)
    try:
        yield
    finally:
        _FFI_ALLOWED.reset(token)


Padding: TypeAlias = str | int | Sequence[int] | Sequence[tuple[int, int]]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, Sequence) else (value, value)
    if len(pair) != 2 or not all(is_kind("positive integer", v) for v in pair):
        raise ConfigError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


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
                raise ConfigError(f"padding must be 'SAME', 'VALID', an int >= 0 or pairs of them, got {padding!r}")
    pads = tuple((p, p) if not isinstance(p, Sequence) else tuple(p) for p in padding) if isinstance(
        padding, Sequence) else ((padding, padding),) * 2
    if len(pads) != 2 or not all(len(p) == 2 and all(is_kind("non-negative integer", q) for q in p) for p in pads):
        raise ConfigError(f"padding must be 'SAME', 'VALID', an int >= 0 or pairs of them, got {padding!r}")
    return tuple((int(lo), int(hi)) for lo, hi in pads)


def _check(x: jax.Array, w: jax.Array, groups: int) -> None:
    if jnp.ndim(x) != 4 or jnp.ndim(w) != 4:
        raise ConfigError(
            f"conv2d expects x of rank 4 (N, H, W, C) and w of rank 4 (KH, KW, C/groups, O), "
            f"got x{jnp.shape(x)} and w{jnp.shape(w)}")
    check_values("conv2d", groups=("positive integer", groups))
    if x.shape[-1] != w.shape[2] * groups or w.shape[-1] % groups:
        raise ConfigError(
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
      padding: "SAME", "VALID", an int, (ph, pw), or ((top, bottom), (left, right)); none negative.
      groups: feature groups; C and O must divide by it.
      impl: a name from `IMPLS`, or None for `DEFAULT_IMPL`. "auto" runs `auto_impl` of the platform the
        program is lowered for (chosen at lowering by `lax.platform_dependent`, not in Python).

    Returns:
      (N, H', W', O) in the promoted dtype of x and w.

    Raises:
      ConfigError (a ValueError): for an unknown impl name, an argument out of its range, shapes that do not
        fit together, or a kernel that spans more than the padded input (no output pixel).
    """
    _check(x, w, groups)
    dtype = jnp.result_type(x, w)  # every impl computes in one dtype, as `conv2d_reference` does (JAX's: no float64)
    x, w = x.astype(dtype), w.astype(dtype)
    strides, dilation = _pair(strides, "strides"), _pair(dilation, "dilation")
    pads = resolve_padding(padding, w.shape[:2], strides, dilation, x.shape[1:3])
    reach = [(k - 1) * d + 1 for k, d in zip(w.shape[:2], dilation)]  # the kernel's extent, dilation included
    padded = [size + lo + hi for size, (lo, hi) in zip(x.shape[1:3], pads)]
    if any(r > p for r, p in zip(reach, padded)):
        raise ConfigError(f"conv2d: the kernel spans {reach[0]}×{reach[1]} pixels, more than the {padded[0]}×"
                          f"{padded[1]} of the padded input: no output pixel")
    return _run(DEFAULT_IMPL if impl is None else impl, x, w, strides, pads, dilation, groups)


def auto_impl(platform: str | None, layer: Layer) -> Impl:
    """The impl "auto" runs on `platform` ("cpu", "cuda", ...) for `layer`: the first matching `AUTO_TABLE` row."""
    for _, applies, impl in AUTO_TABLE.get(platform, ()):
        if applies(layer):
            return impl
    return "xla"


def _run(impl, x, w, strides, pads, dilation, groups):
    match impl:
        case "xla":
            return _xla(x, w, strides, pads, dilation, groups)
        case "im2col":
            return _im2col(x, w, strides, pads, dilation, groups)
        case "pallas":
            if groups != 1 or dilation != (1, 1):
                raise ConfigError(f"conv impl 'pallas' supports groups=1 and dilation 1 only, got groups={groups}, "
                                 f"dilation={dilation}; use impl='xla'")
            return _pallas(x, w, strides, pads)
        case "onednn":
            if groups != 1 or dilation != (1, 1) or x.dtype not in (jnp.float32, jnp.bfloat16):
                raise ConfigError(f"conv impl 'onednn' supports float32 or bfloat16 (x and w promoted to one), "
                                 f"groups=1 and dilation 1 only, got {x.dtype}, groups={groups}, dilation={dilation}; "
                                 f"use impl='xla'")
            out = jax.eval_shape(partial(_xla, strides=strides, pads=pads, dilation=dilation, groups=groups), x, w)
            try:
                onednn.check_dtype(x.dtype)
                cpu = partial(_onednn, strides=strides, pads=pads)
            except onednn.OnednnError as e:  # said if (and when) lowered for a CPU: a GPU's program is refused alike
                message = str(e).replace("{", "{{").replace("}", "}}")
                cpu = partial(_refused_at_lowering, out=out, message=message, error=onednn.OnednnError)
            return lax.platform_dependent(
                x, w, cpu=cpu, default=partial(_refused_at_lowering, out=out, error=ConfigError,
                                               message="conv impl 'onednn' runs on CPUs only (oneDNN's CPU "
                                                       "kernels); lowering for {platform}: use impl='xla' or 'auto'"))
        case "auto":
            layer = Layer(tuple(x.shape[1:3]), tuple(w.shape[:2]), strides,
                          onednn=(_FFI_ALLOWED.get() and jax.default_backend() == "cpu" and groups == 1
                                  and dilation == (1, 1) and onednn.available(x.dtype)),
                          in_channels=int(x.shape[3]), dtype=jnp.dtype(x.dtype).name)

            def on(platform):
                impl = auto_impl(platform, layer)
                if impl == "onednn":  # the CPU branch already: no platform switch of its own inside this one
                    return partial(_onednn, strides=strides, pads=pads)
                return partial(_run, impl, strides=strides, pads=pads, dilation=dilation, groups=groups)

            return lax.platform_dependent(x, w, default=on(None), **{p: on(p) for p in AUTO_TABLE})
        case other:
            raise ConfigError(f"unknown conv impl {other!r}; valid: {', '.join(IMPLS)}")


def _conv(x, w, strides, pads, dilation, groups):
    return lax.conv_general_dilated(x, w, window_strides=strides, padding=pads, rhs_dilation=dilation,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


@partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _xla(x, w, strides, pads, dilation, groups):
    """XLA's convolution op. Its derivative is XLA's too, with two changes on CPU: the input that the weight
    gradient reads is first written to a buffer of its own, and a strided conv's input gradient avoids dilation.

    For a conv's weight gradient XLA's CPU backend transposes the input to (C, H, W, N). When the input is
    the output of elementwise ops (BatchNorm, ReLU, the residual adds of a ResNet), XLA fuses that whole chain
    into the transpose again, reading each of its operands in transposed order: 10x slower than computing
    the chain and transposing the result (a 3-op chain on (256, 32, 32, 64): 550 ms fused against 37 + 52 ms).
    Such transposes took a third of a ResNet-18 b256 step. XLA's CPU compiler drops `optimization_barrier`,
    so the buffer comes from a conditional, which fusion does not cross (benchmarks/RESULTS.md, 2026-11-26).

    The input gradient of a strided conv is, in XLA, a conv over the output gradient dilated with zeros, which
    XLA's CPU backend runs up to 2x slower than the same FLOPs undilated (ResNet-18's 3x3/2 from 32x32, b256:
    319 against 153 ms). On CPU the tangent in x is therefore `_conv_by_phases`, whose transpose has no dilation.
    """
    return _conv(x, w, strides, pads, dilation, groups)


def _xla_jvp(strides, pads, dilation, groups, primals, tangents):
    x, w = primals
    tx, tw = tangents
    conv = partial(_conv, strides=strides, pads=pads, dilation=dilation, groups=groups)
    x = lax.platform_dependent(x, cpu=_copy_through_conditional, default=lambda x: x)
    terms = []  # JAX calls this rule with at least one of the two perturbed
    if not isinstance(tx, SymbolicZero):
        if strides != (1, 1) and dilation == (1, 1):
            stride1 = lambda x, w, p: _conv(x, w, (1, 1), p, (1, 1), groups)  # noqa: E731
            phases = partial(_conv_by_phases, strides=strides, pads=pads, conv=stride1)
            terms.append(lax.platform_dependent(tx, w, cpu=phases, default=conv))
        else:
            terms.append(conv(tx, w))
    if not isinstance(tw, SymbolicZero):
        terms.append(conv(x, tw))
    return conv(x, w), terms[0] if len(terms) == 1 else terms[0] + terms[1]


_xla.defjvp(_xla_jvp, symbolic_zeros=True)


def _conv_by_phases(x, w, strides, pads, conv):
    """A strided, undilated conv as the sum over the phases (i mod sh, j mod sw) of the padded input of a
    stride-1 VALID conv of that phase with the kernel taps that land on it: `conv(x, w, pads)`. The same FLOPs
    as the strided conv; its transpose (the input gradient) is stride-1 convs and interior padding, with no
    dilated conv."""
    (kh, kw), (sh, sw) = w.shape[:2], strides
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    out_h, out_w = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    out = None
    for i in range(min(sh, kh)):
        for j in range(min(sw, kw)):
            taps = w[i::sh, j::sw]
            phase = lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + (out_h + taps.shape[0] - 2) * sh + 1,
                                                 j + (out_w + taps.shape[1] - 2) * sw + 1, xp.shape[3]), (1, sh, sw, 1))
            y = conv(phase, taps, ((0, 0), (0, 0)))
            out = y if out is None else out + y
    return out


def _copy_through_conditional(x):
    if x.size == 0:
        return x
    # A predicate that is always true but that XLA cannot fold (it would fold the conditional away with it):
    # a byte of the first element with its lowest bit set. The other branch never runs.
    byte = lax.bitcast_convert_type(jnp.real(x.reshape(-1)[0]), jnp.uint8).reshape(-1)[0]
    return lax.cond((byte | 1) != 0, lambda x: x, lambda x: -x, x)


def _taps(x, kernel_hw, strides, pads, dilation):
    """The KH·KW shifted, strided views of the padded input, each (N, OH, OW, C), in (kh, kw) order."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_hw, strides, dilation
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out_h = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
    out_w = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
    return [lax.slice(xp, (0, i * dh, j * dw, 0), (xp.shape[0], i * dh + (out_h - 1) * sh + 1,
                                                    j * dw + (out_w - 1) * sw + 1, xp.shape[3]), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


def _im2col(x, w, strides, pads, dilation, groups):
    """The seed's conv-as-matrix-product: patches (N·OH·OW, KH·KW·C) by slicing, then one dot_general
    (batched over groups). Lowers to slices, a concatenate and a dot — no convolution op."""
    kh, kw, cin_g, cout = w.shape
    taps = _taps(x, (kh, kw), strides, pads, dilation)
    n, oh, ow, _ = taps[0].shape
    patches = jnp.stack(taps, axis=3).reshape(n * oh * ow, kh * kw, groups, cin_g)
    kernel = w.reshape(kh * kw, cin_g, groups, cout // groups)
    out = lax.dot_general(patches, kernel, (((1, 3), (0, 1)), ((2,), (2,))))  # (G, N·OH·OW, O/G)
    return out.transpose(1, 0, 2).reshape(n, oh, ow, cout)


# ---- Pallas: an implicit-GEMM kernel, one output row per program, for Triton on NVIDIA GPUs ----

def _pow2(n: int, least: int = 16) -> int:
    """The smallest power of two >= max(n, least): Triton's arrays are powers of two, its dots at least 16 wide."""
    return max(least, 1 << (n - 1).bit_length())


def _pallas_forward(x, w, pads, *, interpret: bool):
    """A stride-1 conv as a Pallas kernel (Triton on GPU; interpret mode on CPU, the same kernel).

    Program (image b, output row r, block q of 64 output channels): one loop over (kernel tap, block of 64
    input channels), each iteration adding one (OW, 64) row of the padded input times the tap's (64, 64) kernel
    block, in float32. One dot per iteration keeps what Triton's pipeliner stages in shared memory to two tiles
    whatever the kernel's size: with the taps unrolled in the loop body, a 3×3 float32 conv asked for 432 KiB
    of the H200's 227 KiB. Triton takes arrays whose sizes are powers of two and dots at least 16 wide: the input
    is zero-padded to a power-of-two output width and channel count (at least 16) and the result sliced back.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    kh, kw, c, o = w.shape
    n, h, width, _ = x.shape
    oh, ow = h + sum(pads[0]) - kh + 1, width + sum(pads[1]) - kw + 1
    if n == 0:  # an empty batch: a grid of no programs, with blocks larger than the arrays
        return jnp.zeros((0, oh, ow, o), jnp.result_type(x, w))
    owp, cp = _pow2(ow), _pow2(c)
    bc, bo = min(cp, 64), min(_pow2(o), 64)
    op = -(-o // bo) * bo
    xp = jnp.pad(x, ((0, 0), pads[0], (pads[1][0], pads[1][1] + owp - ow), (0, cp - c)))
    wp = jnp.pad(w, ((0, 0), (0, 0), (0, cp - c), (0, op - o)))

    blocks = cp // bc

    def kernel(x_ref, w_ref, o_ref):
        row = pl.program_id(1)

        def tap_block(t, acc):  # t = (i * kw + j) * blocks + k: tap (i, j), input channels [k * bc, (k + 1) * bc)
            tap, k = lax.div(t, blocks), lax.rem(t, blocks)  # not // and %: their sign fix-ups do not lower
            i, j = lax.div(tap, kw), lax.rem(tap, kw)
            c0 = pl.multiple_of(k * bc, bc)
            return acc + jnp.dot(x_ref[0, row + i, pl.ds(j, owp), pl.ds(c0, bc)], w_ref[i, j, pl.ds(c0, bc), :],
                                 preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, kh * kw * blocks, tap_block, jnp.zeros((owp, bo), jnp.float32))
        o_ref[0, 0] = acc.astype(o_ref.dtype)

    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((n, oh, owp, op), jnp.result_type(x, w)), grid=(n, oh, op // bo),
        in_specs=[pl.BlockSpec((1, *xp.shape[1:]), lambda b, r, q: (b, 0, 0, 0)),
                  pl.BlockSpec((kh, kw, cp, bo), lambda b, r, q: (0, 0, 0, q))],
        out_specs=pl.BlockSpec((1, 1, owp, bo), lambda b, r, q: (b, r, 0, q)),
        compiler_params=pl_triton.CompilerParams(num_warps=4), interpret=interpret)(xp, wp)
    return out[:, :, :ow, :o]


def _pallas_stride1(x, w, pads):
    # Interpret mode on CPU (Pallas has no CPU compiler), Triton elsewhere; chosen per platform at lowering.
    return lax.platform_dependent(x, w, cpu=partial(_pallas_forward, pads=pads, interpret=True),
                                  default=partial(_pallas_forward, pads=pads, interpret=False))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _pallas(x, w, strides, pads):
    """The kernel for stride 1; a strided conv as the sum of its phases' stride-1 convs (`_conv_by_phases`)."""
    if strides == (1, 1):
        return _pallas_stride1(x, w, pads)
    return _conv_by_phases(x, w, strides, pads, conv=_pallas_stride1)


def _pallas_fwd(x, w, strides, pads):
    return _pallas(x, w, strides, pads), (x, w)


def _pallas_bwd(strides, pads, residuals, g):
    # pallas_call has no derivative of its own: the backward pass is XLA's, of the same function.
    x, w = residuals
    _, vjp = jax.vjp(lambda x, w: _xla(x, w, strides, pads, (1, 1), 1), x, w)
    return vjp(g)


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


# ---- A branch for a platform an impl cannot run on: it traces, and its lowering is a one-line ConfigError ----

_refusal = jax.extend.core.Primitive("jaxnet_refused_at_lowering")
_refusal.def_abstract_eval(lambda *args, out, message, error: jax.core.ShapedArray(out.shape, out.dtype))


def _refusal_lowering(ctx, *args, out, message, error):
    raise error(message.format(platform="/".join(ctx.module_context.platforms)))


mlir.register_lowering(_refusal, _refusal_lowering)
# Called outside jit (on a GPU, `conv2d(x, w, impl="onednn")` runs this branch at once), it is compiled alone: the
# same one-line error, not JAX's missing evaluation rule.
_refusal.def_impl(lambda *args, **params: jax.jit(partial(_refusal.bind, **params))(*args))
# Its output is a constant to differentiation: the gradient program holds the refusal too, and fails alike.
ad.primitive_jvps[_refusal] = lambda primals, tangents, *, out, **params: (
    _refusal.bind(*primals, out=out, **params), lax.full(out.shape, 0, out.dtype))


def _refused_at_lowering(*args, out: jax.ShapeDtypeStruct, message: str,
                         error: type[ConfigError] = ConfigError) -> jax.Array:
    """A value of `out`'s shape that cannot be lowered: lowering raises `error`(`message`), with "{platform}"
    replaced by the platform(s) lowered for. For the branch of `lax.platform_dependent` that an impl cannot run:
    the refusal comes when (and only when) the program is lowered for that platform."""
    return _refusal.bind(*args, out=out, message=message, error=error)


# ---- oneDNN: its convs and their gradients as XLA FFI calls on CPU (extra `onednn`; see onednn.py) ----

@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn(x, w, strides, pads):
    return onednn.forward(x, w, strides, pads)


def _onednn_fwd(x, w, strides, pads):
    return _onednn(x, w, strides, pads), (x, w)


def _onednn_bwd(strides, pads, residuals, dy):
    x, w = residuals
    dw = onednn.weight_grad(x, dy, w.shape, strides, pads).astype(w.dtype)
    return onednn.input_grad(dy, w, x.shape, strides, pads), dw


_onednn.defvjp(_onednn_fwd, _onednn_bwd)


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
