"""Every conv impl equals conv2d_reference, forward and in gradient, and lowers to what it claims."""

import functools
import warnings
from functools import partial
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import cpu_backend, onednn_platform, require_onednn_bfloat16

from jaxnet.errors import ConfigError
from jaxnet.ops import IMPLS, conv2d, conv2d_reference
from jaxnet.ops import conv as conv_ops

# (N, H, W, C, O, K, strides, padding, dilation, groups): stride, padding style, dilation and groups each vary.
CASES = [
    (2, 8, 8, 3, 4, 3, 1, "SAME", 1, 1),
    (2, 9, 7, 4, 6, 3, 2, "SAME", 1, 1),
    (1, 8, 8, 4, 4, 1, 2, "VALID", 1, 1),
    (2, 10, 10, 4, 8, 3, 1, "VALID", 2, 2),
    (1, 7, 7, 6, 6, 3, (2, 1), ((1, 2), (0, 1)), 1, 3),
    (3, 8, 7, 3, 4, 3, (2, 1), ((0, 2), (1, 0)), 1, 1),  # uneven padding on each side
    (2, 8, 8, 2, 3, 2, 1, 1, (1, 2), 1),
    (1, 12, 12, 3, 4, 7, 2, 3, 1, 1),
    (2, 2, 2, 4, 5, 3, 1, "SAME", 1, 1),  # kernel larger than the input (PlainCNN's last conv)
]


def _inputs(case, key=0):
    n, h, w, c, o, k, *_, groups = case
    kx, kw = jax.random.split(jax.random.key(key))
    return jax.random.normal(kx, (n, h, w, c)), jax.random.normal(kw, (k, k, c // groups, o))


def _kwargs(case):
    *_, strides, padding, dilation, groups = case
    return dict(strides=strides, padding=padding, dilation=dilation, groups=groups)


def _forward_and_gradient(conv, case):
    """conv(x, w) and the gradient of sum(sin(conv(x, w))) in x and w, each one compiled program."""
    f = partial(conv, **_kwargs(case))
    x, w = _inputs(case)
    return jax.jit(f)(x, w), jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1)))(x, w)


@functools.cache
def _reference(case):
    """Computed once per case and shared by every impl's test."""
    return _forward_and_gradient(conv2d_reference, case)


@pytest.mark.parametrize("impl", [pytest.param(i, marks=onednn_platform) if i == "onednn" else i for i in IMPLS])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_impl_matches_reference_forward_and_gradient(impl, case):
    if impl in ("pallas", "onednn") and (case[-1] != 1 or case[-2] != 1):
        with pytest.raises(ValueError, match=f"'{impl}' supports .*groups=1 and dilation 1 only"):
            conv2d(*_inputs(case), impl=impl, **_kwargs(case))
        return
    (ref, grads_ref), (out, grads) = _reference(case), _forward_and_gradient(partial(conv2d, impl=impl), case)
    chex.assert_equal_shape([out, ref])
    chex.assert_trees_all_close(out, ref, rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_close(grads, grads_ref, rtol=1e-4, atol=1e-4)


def test_same_padding_matches_xla_output_size():
    x, w = _inputs((1, 9, 9, 2, 2, 3, 2, "SAME", 1, 1))
    chex.assert_shape(conv2d(x, w, strides=2, padding="SAME"), (1, 5, 5, 2))


def test_reference_is_a_real_correlation():
    """A one-hot kernel picks one shifted input tap: checks the reference against a hand computation."""
    x = jnp.arange(1 * 4 * 4 * 1, dtype=jnp.float32).reshape(1, 4, 4, 1)
    w = jnp.zeros((3, 3, 1, 1)).at[0, 2, 0, 0].set(1.0)  # top-right tap
    out = conv2d_reference(x, w, padding="VALID")
    np.testing.assert_array_equal(np.asarray(out)[0, :, :, 0], np.asarray(x)[0, 0:2, 2:4, 0])


def test_unknown_impl_names_the_valid_ones():
    x, w = _inputs(CASES[0])
    with pytest.raises(ValueError, match="unknown conv impl 'cudnn'.*xla"):
        conv2d(x, w, impl="cudnn")


@pytest.mark.parametrize("bad", [dict(w_shape=(3, 3, 5, 4)), dict(groups=2, w_shape=(3, 3, 3, 4))])
def test_mismatched_shapes_raise(bad):
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match="channels"):
        conv2d(x, jnp.zeros(bad["w_shape"]), groups=bad.get("groups", 1))


@pytest.mark.parametrize("kwargs,message", [
    ({"strides": 1.5}, r"strides must be a positive int or a pair of them, got 1.5"),  # was "not iterable"
    ({"strides": True}, "strides must be a positive int"),
    ({"dilation": (1, 0)}, "dilation must be a positive int"),
    ({"padding": -1}, r"padding must be 'SAME', 'VALID', an int >= 0 or pairs of them, got -1"),  # cropped before
    ({"padding": ((1, 1, 1), (1, 1))}, "padding must be"),  # was NumPy's "inhomogeneous shape"
    ({"groups": 0}, "conv2d groups must be a positive integer, got 0"),
    ({"groups": 2.0}, "conv2d groups must be a positive integer, got 2.0"),
    # the forward gave an empty (1, 0, 0, 4) and its gradient an XLA shape error
    ({"padding": "VALID", "dilation": 4}, "conv2d: the kernel spans 9×9 pixels, more than the 8×8 of the padded "
                                          "input"),
], ids=["strides_float", "strides_bool", "dilation_0", "padding_negative", "padding_ragged", "groups_0",
        "groups_float", "kernel_larger"])
def test_a_bad_conv_argument_is_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        conv2d(jnp.zeros((1, 8, 8, 4)), jnp.zeros((3, 3, 4, 4)), **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("impl", [pytest.param(i, marks=onednn_platform) if i == "onednn" else i for i in IMPLS])
@pytest.mark.parametrize("x_shape,w_shape,kwargs", [
    ((0, 8, 8, 4), (3, 3, 4, 6), {}),  # an empty batch: Pallas's blocks were larger than the array
    ((2, 8, 8, 4), (3, 3, 4, 6), {"strides": np.int64(2), "padding": (1, (0, 2))}),  # NumPy ints, mixed pads
], ids=["empty_batch", "numpy_stride"])
def test_impl_matches_reference_at_the_edges(impl, x_shape, w_shape, kwargs):
    x, w = jax.random.normal(jax.random.key(0), x_shape), jax.random.normal(jax.random.key(1), w_shape)

    def f(conv):
        return jax.jit(jax.value_and_grad(lambda x, w: jnp.sin(conv(x, w, **kwargs)).sum(), argnums=(0, 1)))(x, w)

    chex.assert_equal_shape([conv2d(x, w, impl=impl, **kwargs), conv2d_reference(x, w, **kwargs)])
    chex.assert_trees_all_close(f(partial(conv2d, impl=impl)), f(conv2d_reference), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl,has_conv,has_dot", [("xla", True, False), ("im2col", False, True)])
def test_impl_lowers_as_claimed(impl, has_conv, has_dot):
    """XLA's conv is a convolution op; im2col is slices + one dot, with no convolution, in both passes."""
    x, w = _inputs(CASES[1])
    fwd = jax.jit(lambda x, w: conv2d(x, w, strides=2, impl=impl)).lower(x, w).as_text()
    assert ("stablehlo.convolution" in fwd) == has_conv and ("stablehlo.dot_general" in fwd) == has_dot
    bwd = jax.jit(jax.grad(lambda x, w: conv2d(x, w, strides=2, impl=impl).sum(), argnums=(0, 1))).lower(x, w)
    assert ("stablehlo.convolution" in bwd.as_text()) == has_conv


@pytest.mark.parametrize("in_hw,kernel,strides,channels,dtype,without_onednn,with_onednn", [
    (2, 3, 1, 256, "float32", "im2col", "im2col"),  # PlainCNN's last conv: kernel larger than the input
    (3, 3, 1, 256, "float32", "xla", "onednn"),     # FastNet's last: as large as the input
    (32, 1, 2, 64, "float32", "im2col", "onednn"),  # ResNet projection: strided 1x1
    (16, 1, 1, 512, "float32", "xla", "onednn"), (32, 3, 2, 64, "float32", "xla", "onednn"),
    (4, 3, 1, 512, "float32", "xla", "xla"),        # ResNet-18's stage 4
    (4, 3, 1, 512, "bfloat16", "xla", "onednn"),
    (4, 3, 1, 128, "float32", "xla", "onednn"), (8, 3, 1, 512, "float32", "xla", "onednn"),
    (4, 3, 2, 512, "float32", "xla", "onednn"),
])
def test_auto_follows_the_measured_table_per_platform(in_hw, kernel, strides, channels, dtype, without_onednn,
                                                      with_onednn):
    for onednn, cpu_impl in ((False, without_onednn), (True, with_onednn)):
        layer = conv_ops.Layer((in_hw, in_hw), (kernel, kernel), (strides, strides), onednn=onednn,
                               in_channels=channels, dtype=dtype)
        assert conv_ops.auto_impl("cpu", layer) == cpu_impl
        assert conv_ops.auto_impl("cuda", layer) == "xla"  # no GPU measurement yet: XLA's conv (cuDNN)


@pytest.fixture
def without_onednn(monkeypatch):
    """This process as one without oneDNN installed (the base install)."""
    from jaxnet.ops import onednn

    monkeypatch.setattr(onednn, "installed", lambda: False)
    onednn.available.cache_clear()
    yield
    onednn.available.cache_clear()


def _auto_grad_hlo(hw, kernel, strides, dtype=jnp.float32, channels=4):
    x = jax.random.normal(jax.random.key(0), (2, hw, hw, channels), dtype)
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, channels, 6), dtype)
    grad = jax.jit(jax.grad(lambda x, w: conv2d(x, w, strides=strides, impl="auto").sum(), argnums=(0, 1)))
    return grad.lower(x, w).compile().as_text()


def _check_cpu_choice(hlo, chosen):
    # An XLA conv's gradient holds one conditional of its own (the input's buffer, see the next test).
    assert ("convolution(" in hlo) == (chosen == "xla") and hlo.count("conditional(") == (chosen == "xla")
    assert ("JaxnetOnednnConv" in hlo) == (chosen == "onednn")


@pytest.mark.parametrize("hw,kernel,strides,channels,dtype", [
    (8, 1, 2, 4, jnp.float32), (8, 3, 1, 4, jnp.float32), (2, 3, 1, 4, jnp.float32), (4, 3, 1, 512, jnp.float32),
    (4, 3, 1, 512, jnp.bfloat16)])
@cpu_backend
def test_auto_compiles_to_the_cpu_choice_only(hw, kernel, strides, channels, dtype):
    """The platform switch is resolved at compilation: the CPU program holds the chosen impl's ops alone."""
    from jaxnet.ops import onednn

    layer = conv_ops.Layer((hw, hw), (kernel, kernel), (strides, strides), onednn=onednn.available(dtype),
                           in_channels=channels, dtype=jnp.dtype(dtype).name)
    _check_cpu_choice(_auto_grad_hlo(hw, kernel, strides, dtype, channels), conv_ops.auto_impl("cpu", layer))


@onednn_platform
def test_auto_runs_onednn_where_installed_and_xla_where_not(without_onednn, monkeypatch):
    """The extra installed (as in this test environment), "auto" runs a 3x3 conv, forward and both gradients, as
    oneDNN's FFI calls; without it, as XLA's conv."""
    from jaxnet.ops import onednn

    _check_cpu_choice(_auto_grad_hlo(8, 3, 1), "xla")
    monkeypatch.undo()
    onednn.available.cache_clear()
    if not onednn.installed():
        pytest.skip("oneDNN is not installed here (extra onednn)")
    _check_cpu_choice(_auto_grad_hlo(8, 3, 1), "onednn")


@onednn_platform
def test_auto_runs_xla_where_onednn_has_no_kernels_in_the_dtype(monkeypatch):
    """bfloat16 on a CPU without oneDNN's bf16 kernels (AVX2 only): XLA's conv; float16: never oneDNN's."""
    from jaxnet.ops import onednn

    monkeypatch.setattr(onednn, "installed", lambda: True)
    monkeypatch.setattr(onednn, "load", lambda: type("Handlers", (), {"JaxnetOnednnSupports": lambda t: t == 3}))
    onednn.available.cache_clear()
    try:
        assert not onednn.available(jnp.bfloat16) and onednn.available(jnp.float32)
        assert not onednn.available(jnp.float16)
        _check_cpu_choice(_auto_grad_hlo(8, 3, 1, jnp.bfloat16), "xla")
    finally:
        onednn.available.cache_clear()


def test_auto_traced_portable_holds_no_ffi_call_and_lowers_for_cpu_and_cuda_at_once():
    """Inside `portable` (what an export traces in) "auto" holds XLA's ops only; outside it, where oneDNN is
    installed, its CPU branch is oneDNN's call, and a program lowered for CPU and CUDA at once holds both
    branches (no inner platform switch refusing the other platform)."""
    from jaxnet.ops import onednn

    x, w = jax.random.normal(jax.random.key(0), (2, 8, 8, 4)), jax.random.normal(jax.random.key(1), (3, 3, 4, 6))

    def lowered(x, w):
        return jax.jit(lambda x, w: conv2d(x, w, impl="auto")).trace(x, w).lower(
            lowering_platforms=("cpu", "cuda")).as_text()

    with conv_ops.portable():
        text = lowered(x, w)
    assert "JaxnetOnednn" not in text and "stablehlo.convolution" in text
    text = lowered(x, w)
    assert ("JaxnetOnednnConvForward" in text) == onednn.available(jnp.float32) and "stablehlo.convolution" in text


def test_onednn_handlers_with_nowhere_to_be_built_are_one_line(tmp_path):
    """The cache folder under a file (or read-only): was a traceback from mkdir."""
    from jaxnet.ops import onednn

    (tmp_path / "file").write_text("")
    with pytest.raises(onednn.OnednnError, match=r"builds its handlers in .*file/onednn, which cannot be written "
                                                 r"\(Not a directory; the folder follows \$XDG_CACHE_HOME\)"):
        onednn._build(tmp_path / "file" / "onednn" / "lib.so", Path("dnnl.hpp"), Path("libdnnl.so.3"), "true")


@onednn_platform
def test_auto_refuses_an_installed_onednn_that_does_not_build(monkeypatch):
    """oneDNN installed but no C++ compiler: "auto" is an error that says both fixes, not slower convs."""
    from jaxnet.ops import onednn

    def no_compiler():
        raise onednn.OnednnError("conv impl 'onednn' compiles its handlers with a C++ compiler: 'g++' not found")

    monkeypatch.setattr(onednn, "installed", lambda: True)
    monkeypatch.setattr(onednn, "load", no_compiler)
    onednn.available.cache_clear()
    try:
        with pytest.raises(onednn.OnednnError, match="'g\\+\\+' not found .*or choose conv impl 'xla'"):
            _auto_grad_hlo(8, 3, 1)
    finally:
        onednn.available.cache_clear()


def test_xla_conv_weight_gradient_does_not_recompute_its_input():
    """On CPU the input of an XLA conv, here relu(2a + b), is computed once for the weight gradient: no fused
    computation transposes it while recomputing the ReLU (XLA's own choice, 10x slower at ResNet shapes)."""
    ka, kb, kw = jax.random.split(jax.random.key(0), 3)
    a, b = jax.random.normal(ka, (4, 8, 8, 8)), jax.random.normal(kb, (4, 8, 8, 8))
    w = jax.random.normal(kw, (3, 3, 8, 8))

    def loss(w, a, b):
        return jnp.sum(conv2d(jnp.maximum(2 * a + b, 0.0), w, impl="xla") ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(w, a, b).compile().as_text()
    computations = hlo.split("\n\n")
    assert any(" transpose(" in c for c in computations)  # the weight gradient's transposes are there
    assert not [c.splitlines()[0] for c in computations if " transpose(" in c and " maximum(" in c]


@pytest.mark.parametrize("strides", [2, (2, 1)])
@cpu_backend
def test_strided_xla_conv_input_gradient_has_no_dilated_conv(strides):
    """On CPU a strided conv's input gradient is stride-1 convs over the output gradient, not XLA's conv over
    that gradient dilated with zeros (up to 2x slower, at ResNet-18's first downsampling conv); the values are
    checked against the reference over `CASES`."""
    x, w = _inputs(CASES[1])
    grad = jax.jit(jax.grad(lambda x, w: jnp.sin(conv2d(x, w, strides=strides, impl="xla")).sum()))
    hlo = grad.lower(x, w).compile().as_text()
    assert "convolution(" in hlo and "lhs_dilate" not in hlo


def test_strided_xla_conv_input_gradient_is_xlas_own_off_cpu():
    """The phases are a CPU choice: lowered for a GPU, the input gradient is XLA's single dilated conv (cuDNN's)."""
    x, w = _inputs(CASES[1])
    grad = jax.jit(jax.grad(lambda x, w: jnp.sin(conv2d(x, w, strides=2, impl="xla")).sum()))
    convs = {p: [line for line in grad.trace(x, w).lower(lowering_platforms=(p,)).as_text().splitlines()
                 if "stablehlo.convolution" in line] for p in ("cpu", "cuda")}
    assert len(convs["cuda"]) == 2 and "lhs_dilate = [2, 2]" in convs["cuda"][1]  # forward, input gradient
    assert len(convs["cpu"]) == 5 and not any("lhs_dilate = [2, 2]" in c for c in convs["cpu"])  # forward, 4 phases


@pytest.mark.parametrize("perturbed", ["x", "w", "both"])
def test_xla_conv_forward_mode_matches_reference(perturbed):
    """The XLA conv's custom derivative is a JVP, so forward mode works, whichever inputs are perturbed."""
    case = CASES[1]
    x, w = _inputs(case)
    tx, tw = _inputs(case, key=1)

    def jvp(conv):
        f = partial(conv, **_kwargs(case))
        match perturbed:
            case "x":
                return jax.jvp(lambda x: f(x, w), (x,), (tx,))
            case "w":
                return jax.jvp(lambda w: f(x, w), (w,), (tw,))
            case _:
                return jax.jvp(f, (x, w), (tx, tw))

    chex.assert_trees_all_close(jax.jit(lambda: jvp(partial(conv2d, impl="xla")))(),
                                jvp(conv2d_reference), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("strides", [1, 2])
def test_pallas_kernel_across_its_blocks(dtype, tol, strides):
    """Channel counts and widths that the kernel pads to Triton's powers of two and splits into several
    64-channel blocks (80 → 128 in, 72 → 2 × 64 out; width 19 → 32), in both compute dtypes."""
    x, w = (a.astype(dtype) for a in _inputs((2, 11, 19, 80, 72, 3, strides, "SAME", 1, 1)))
    out = jax.jit(partial(conv2d, impl="pallas", strides=strides))(x, w)
    ref = conv2d_reference(x.astype(jnp.float32), w.astype(jnp.float32), strides=strides)
    assert out.dtype == dtype
    chex.assert_trees_all_close(out.astype(jnp.float32), ref, rtol=tol, atol=tol * float(jnp.abs(ref).max()))


def test_pallas_forward_is_a_pallas_kernel():
    x, w = _inputs(CASES[0])
    jaxpr = str(jax.make_jaxpr(lambda x, w: conv2d(x, w, impl="pallas"))(x, w))
    assert "pallas_call" in jaxpr and "conv_general_dilated" not in jaxpr


@onednn_platform
def test_onednn_runs_all_three_convs_as_onednn_calls():
    """Forward, input gradient and weight gradient are the FFI calls: no XLA convolution is left in the program."""
    x, w = _inputs(CASES[1])
    grad = jax.jit(jax.grad(lambda x, w: jnp.sin(conv2d(x, w, strides=2, impl="onednn")).sum(), argnums=(0, 1)))
    hlo = grad.lower(x, w).compile().as_text()
    for target in ("JaxnetOnednnConvForward", "JaxnetOnednnConvInputGrad", "JaxnetOnednnConvWeightGrad"):
        assert f'custom_call_target="{target}"' in hlo
    assert "convolution(" not in hlo


@onednn_platform
@pytest.mark.parametrize("channels", [3, 4, 12, 24])
def test_onednn_strided_1x1_weight_gradients_in_a_row_match_the_reference(channels):
    """Strided 1x1 convs of fewer input channels than oneDNN's block (8 on AVX2, 16 on AVX-512), several in one
    process: oneDNN's own strided path for their weight gradient overran its workspace (issue #6035), so the first
    one was right, the next ones wrong, then the heap corrupt. Each geometry a new primitive; padded ones too."""
    for i, (size, strides, padding) in enumerate([(8, 2, "VALID"), (10, 2, "VALID"), (12, (2, 3), "VALID"),
                                                 (9, 2, ((1, 0), (0, 1))), (14, 3, "VALID"), (16, 2, "VALID")]):
        x = jax.random.normal(jax.random.key(i), (3, size, size, channels))
        w = jax.random.normal(jax.random.key(i + 100), (1, 1, channels, 8))

        def grads(conv):
            loss = lambda x, w: jnp.sin(conv(x, w, strides=strides, padding=padding)).sum()  # noqa: E731
            return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)

        chex.assert_trees_all_close(grads(partial(conv2d, impl="onednn")), grads(conv2d_reference), rtol=1e-4,
                                    atol=1e-4, custom_message=f"size {size}, strides {strides}, padding {padding}")


@onednn_platform
@pytest.mark.parametrize("n", [0, 1, 5])
def test_onednn_any_batch_size(n):
    """The handlers split the batch over XLA's threads: empty, single and uneven batches are whole, and the weight
    gradient's partial sums (one per chunk) add up, to zero for an empty batch."""
    x, w = jax.random.normal(jax.random.key(0), (n, 6, 6, 3)), jax.random.normal(jax.random.key(1), (3, 3, 3, 4))

    def f(conv):
        return jax.jit(jax.value_and_grad(lambda x, w: jnp.sin(conv(x, w)).sum(), argnums=(0, 1)))(x, w)

    chex.assert_trees_all_close(f(partial(conv2d, impl="onednn")), f(conv2d_reference), rtol=1e-4, atol=1e-4)


@onednn_platform
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5], (4, 12, 10, 40, 24, 3, 2, "SAME", 1, 1)], ids=str)
def test_onednn_bfloat16_matches_reference_forward_and_gradient(case):
    """In bfloat16 the outputs and the input gradient are bfloat16, the weight gradient is summed in float32 and
    rounded to w's dtype once; all within bfloat16's rounding of the float32 reference on the same inputs."""
    require_onednn_bfloat16()
    x, w = (a.astype(jnp.bfloat16) for a in _inputs(case))

    dy = jax.random.normal(jax.random.key(2), jax.eval_shape(partial(conv2d_reference, **_kwargs(case)), x, w).shape)

    def f(conv, x, w):
        out, vjp = jax.vjp(partial(conv, **_kwargs(case)), x, w)
        return out, *vjp(dy.astype(out.dtype))

    got = jax.jit(partial(f, partial(conv2d, impl="onednn")))(x, w)
    ref = f(conv2d_reference, x.astype(jnp.float32), w.astype(jnp.float32))
    assert [a.dtype for a in got] == [jnp.bfloat16] * 3
    for a, r in zip(got, ref):
        chex.assert_trees_all_close(a.astype(jnp.float32), r, rtol=3e-2, atol=3e-2 * float(jnp.abs(r).max()))


def test_onednn_rejects_float16():
    x, w = _inputs(CASES[0])
    with pytest.raises(ValueError, match="'onednn' supports float32 or bfloat16 \\(x and w promoted to one\\), "
                                         "groups=1 and dilation 1 only, got float16"):
        conv2d(x.astype(jnp.float16), w.astype(jnp.float16), impl="onednn")


@pytest.mark.parametrize("impl", [pytest.param(i, marks=onednn_platform) if i == "onednn" else i for i in IMPLS])
def test_mixed_dtypes_compute_in_the_promoted_one_as_the_reference_does(impl):
    """bfloat16 activations with a float32 kernel: XLA's impls failed in lax ("requires arguments to have the same
    dtypes"), the docstring's promised promotion happened only in the reference."""
    x, w = _inputs(CASES[0])
    x = x.astype(jnp.bfloat16)

    def f(conv, x):
        return jax.jit(jax.value_and_grad(lambda x, w: jnp.sin(conv(x, w)).sum(), argnums=(0, 1)))(x, w)

    out = conv2d(x, w, impl=impl)
    assert out.dtype == jnp.float32 == conv2d_reference(x, w).dtype
    value, (gx, gw) = f(partial(conv2d, impl=impl), x)
    # The reference on the same values in float32: its own bfloat16 x gradient rounds each tap's share.
    ref_value, (ref_gx, ref_gw) = f(conv2d_reference, x.astype(jnp.float32))
    assert (value.dtype, gx.dtype, gw.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
    chex.assert_trees_all_close((value, gw), (ref_value, ref_gw), rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_close(gx, ref_gx.astype(jnp.bfloat16), rtol=1e-2, atol=1e-2)  # one rounding apart
    with warnings.catch_warnings():  # NumPy's float64 is JAX's float32 (x64 off), with no warning of truncation
        warnings.simplefilter("error")
        out = conv2d(np.asarray(x, np.float64), w, impl=impl)
    assert out.dtype == jnp.float32


@onednn_platform
def test_onednn_without_bfloat16_kernels_says_so(monkeypatch):
    """A CPU for which oneDNN has no bfloat16 convolution (no AVX-512, e.g. AMD Zen 3): one clear error at tracing,
    not a failure inside the compiled step."""
    from jaxnet.ops import onednn

    library = onednn.load()

    class NoBfloat16:
        def JaxnetOnednnSupports(self, code):
            return int(code != onednn.DATA_TYPES[jnp.dtype(jnp.bfloat16)] and library.JaxnetOnednnSupports(code))

    monkeypatch.setattr(onednn, "load", lambda: NoBfloat16())
    for verdict in ("check_dtype", "available"):  # past this process's verdicts
        monkeypatch.setattr(onednn, verdict, getattr(onednn, verdict).__wrapped__)
    x, w = _inputs(CASES[0])
    conv2d(x, w, impl="onednn")  # float32 still runs
    with pytest.raises(onednn.OnednnError, match="no bfloat16 convolution on this CPU .*use dtype float32"):
        conv2d(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), impl="onednn")


@pytest.mark.skipif(jax.default_backend() == "cpu", reason="impl 'onednn' runs on this CPU backend")
def test_onednn_off_the_cpu_says_so_in_one_line_even_outside_jit():
    """On a GPU, `conv2d(impl="onednn")` called eagerly runs the refusing branch at once: the one-line ConfigError
    that jit's lowering gives, not JAX's missing evaluation rule."""
    from jaxnet.errors import ConfigError

    x, w = _inputs(CASES[0])
    for conv in (partial(conv2d, impl="onednn"), jax.jit(partial(conv2d, impl="onednn"))):
        with pytest.raises(ConfigError) as info:
            conv(x, w)
        assert str(info.value).splitlines()[0].startswith("conv impl 'onednn' runs on CPUs only"), info.value


@onednn_platform
def test_onednn_without_onednn_installed_says_how_to_install(monkeypatch):
    """No silent fallback to another impl: a missing oneDNN is an error that names the extra."""
    from jaxnet.ops import onednn

    def missing(name):
        raise onednn.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(onednn.metadata, "distribution", missing)
    monkeypatch.setattr(onednn, "load", onednn.load.__wrapped__)  # past this process's loaded build
    x, w = _inputs(CASES[0])
    with pytest.raises(onednn.OnednnError, match=r"jaxnet\[onednn\]"):
        conv2d(x, w, impl="onednn")


@onednn_platform
def test_onednn_runs_per_batch_shard_on_a_mesh():
    """On 8 devices with the batch sharded, each device's FFI calls take its shard: no all-gather of the batch,
    the input gradient comes back sharded like the input, and the values are the reference's."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("data",))
    x = jax.random.normal(jax.random.key(0), (16, 8, 8, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 6))
    xs, ws = jax.device_put(x, NamedSharding(mesh, P("data"))), jax.device_put(w, NamedSharding(mesh, P()))
    grad = jax.jit(jax.grad(lambda x, w: jnp.sin(conv2d(x, w, strides=(2, 1), impl="onednn")).sum(), argnums=(0, 1)))
    dx, dw = grad(xs, ws)
    assert "all-gather" not in grad.lower(xs, ws).compile().as_text()
    assert dx.sharding.is_equivalent_to(xs.sharding, x.ndim)
    ref = jax.grad(lambda x, w: jnp.sin(conv2d_reference(x, w, strides=(2, 1))).sum(), argnums=(0, 1))(x, w)
    chex.assert_trees_all_close((dx, dw), ref, rtol=1e-4, atol=1e-4)
