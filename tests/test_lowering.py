"""Every shipped model's train and eval steps lower for NVIDIA GPUs from this CPU machine, with each conv impl
and compute dtype, and the lowered program is what the impl claims: XLA's convolution (cuDNN's on a GPU) for
"xla" and "auto", a dot and no convolution for "im2col", Pallas's Triton kernel for "pallas"; "onednn" (a CPU
library) refuses the GPU in one line, at lowering."""

import contextlib
import re
from functools import partial

import jax
import jax.numpy as jnp
import optax
import pytest
from fixtures import counting_conv

from jaxnet import layers, models, train
from jaxnet.errors import ConfigError

GPU_IMPLS = ("xla", "im2col", "pallas")
# "auto" (a choice per platform and layer, made at lowering) is lowered on the models whose layers it gives
# another impl on a CPU: a strided 1x1 (ResNets' projections) and a kernel larger than its input (PlainCNN's last).
AUTO_MODELS = ("resnet_tiny", "resnet18", "plain_tiny")
DTYPES = {"float32": "f32", "bfloat16": "bf16"}
BATCH = 2
TRITON = "__gpu$xla.gpu.triton"
# The GPU the Pallas kernel is lowered for. A Triton kernel is compiled for one compute capability, which jax >= 0.12
# takes from the device, or, with none (this CPU machine), from an abstract device: an H100's, Hopper, as the lent
# H200's. (Only there: with it, jax refuses programs holding primitives that need real devices, onednn's.)
H100 = jax.sharding.AbstractMesh((1,), ("batch",), abstract_device=jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100", num_cores=None, platform="gpu"))


def _lowered(name: str, impl: str, dtype: str, which: str) -> str:
    """StableHLO of `name`'s train or eval step (batch of BATCH CIFAR images), lowered for CUDA."""
    model = models.get(name, num_classes=10, conv=partial(layers.Conv, impl=impl), dtype=jnp.dtype(dtype))
    sample = jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.float32)
    state = jax.eval_shape(lambda: train.create_train_state(model, jax.random.key(0), jnp.zeros(sample.shape),
                                                            optax.sgd(0.1, momentum=0.9)))
    batch = {"image": sample, "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32)}
    step = train.train_step if which == "train" else train.eval_step
    with jax.sharding.use_abstract_mesh(H100) if impl == "pallas" else contextlib.nullcontext():
        return jax.jit(step).trace(state, batch).lower(lowering_platforms=("cuda",)).as_text()


def _conv_layers(name: str) -> int:
    """How many conv layers `name` has (its Conv modules, counted by a model that records each call)."""
    calls = []
    model = models.get(name, num_classes=10, conv=counting_conv(calls))
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    return len(calls)


def _convolutions(text: str) -> list[str]:
    return [line for line in text.splitlines() if "stablehlo.convolution" in line]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,impl", [(name, impl) for name in models.NAMES for impl in GPU_IMPLS] +
                         [(name, "auto") for name in AUTO_MODELS])
def test_steps_lower_for_cuda_as_the_impl_claims(name, impl, dtype):
    n_convs = _conv_layers(name)
    for which in ("train", "eval"):
        text = _lowered(name, impl, dtype, which)
        convs, triton = _convolutions(text), text.count(TRITON)
        if impl in ("xla", "auto"):  # no GPU measurement yet: "auto" runs XLA's conv there
            assert len(convs) >= n_convs and triton == 0
        elif impl == "im2col":
            assert not convs and "stablehlo.dot_general" in text and triton == 0
        elif which == "eval":  # pallas: the forward pass is the kernel, one call per layer (or per phase)
            assert not convs and triton >= n_convs
        else:  # pallas, train: the kernel forward, XLA's convs for the gradients
            assert triton >= n_convs and convs
        operand_types = {t for line in convs for t in re.findall(r"tensor<[^>]*x(bf16|f32)>", line)}
        assert operand_types <= {DTYPES[dtype]}, operand_types


@pytest.mark.parametrize("which", ("train", "eval"))
def test_onednn_refuses_a_gpu_at_lowering_in_one_line(which):
    with pytest.raises(ConfigError, match="onednn") as info:
        _lowered("fastnet_tiny", "onednn", "float32", which)
    assert "\n" not in str(info.value)


def test_a_refused_branch_called_outside_jit_raises_the_same_one_line_error():
    """Outside jit, `lax.platform_dependent` calls the branch of the platform at hand at once (on a GPU, impl
    "onednn"'s refusal): the refusal then compiles alone and says the same, not that an evaluation rule is missing.
    Here with a refusal made for the test, on whichever platform runs it."""
    from jaxnet.ops import conv as conv_ops

    x = jnp.ones((2, 3))
    with pytest.raises(ConfigError) as info:
        conv_ops._refused_at_lowering(x, out=jax.ShapeDtypeStruct((2, 3), x.dtype),
                                      message="no kernel for {platform} here")
    platform = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())  # as lowering names it
    assert str(info.value).splitlines()[0] == f"no kernel for {platform} here"  # then JAX's note on its frames


def test_onednn_missing_here_is_still_refused_for_a_gpu_as_cpu_only(monkeypatch):
    """On a host without oneDNN, impl "onednn" lowered for a GPU says it runs on CPUs only (installing oneDNN would
    not help there); lowered for the CPU, that oneDNN is missing and how to install it. Both at lowering: the same
    traced program holds both branches."""
    from jaxnet.ops import conv2d, onednn

    def missing(name):
        raise onednn.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(onednn.metadata, "distribution", missing)
    monkeypatch.setattr(onednn, "load", onednn.load.__wrapped__)  # past this process's loaded build
    onednn.check_dtype.cache_clear()
    try:
        traced = jax.jit(partial(conv2d, impl="onednn")).trace(jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4)))
        with pytest.raises(ConfigError, match="^conv impl 'onednn' runs on CPUs only .*lowering for cuda") as info:
            traced.lower(lowering_platforms=("cuda",))
        assert not isinstance(info.value, onednn.OnednnError)
        with pytest.raises(onednn.OnednnError, match=r"needs oneDNN, which is not installed: .*jaxnet\[onednn\]"):
            traced.lower(lowering_platforms=("cpu",))
    finally:
        onednn.check_dtype.cache_clear()
