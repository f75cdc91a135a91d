"""oneDNN's convolutions inside XLA programs on CPU, through XLA's FFI: the kernels of conv impl "onednn".

`onednn_conv.cc` (beside this file) holds the three handlers: forward, input gradient and weight gradient. On
first use it is compiled with the C++ compiler ($CXX, else g++) against oneDNN from PyPI (extra `onednn`) and
jaxlib's FFI headers, into a directory of the jaxnet cache named by a hash of the source, the compiler, jaxlib's version
and oneDNN's (version and place); later processes load it from there. The handlers run on CPU only and take
float32 or bfloat16 NHWC inputs, HWIO kernels, one group and no dilation; `conv.py` checks that before calling
them. In bfloat16 oneDNN runs AMX or AVX-512 BF16 instructions where the CPU has them. On a mesh each device
calls them on its shard of the batch; the weight gradient's partial sums are added across the shards.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnet.cache import default_cache_dir
from jaxnet.errors import ConfigError

SOURCE = Path(__file__).with_name("onednn_conv.cc")
ONEDNN = ("onednn-devel-cpu-gomp", "onednn-cpu-gomp")  # the headers, and the library they require
TARGETS = {"forward": "JaxnetOnednnConvForward", "input_grad": "JaxnetOnednnConvInputGrad",
           "weight_grad": "JaxnetOnednnConvWeightGrad"}
INSTALL_HINT = "pip install 'jaxnet[onednn]'"


class OnednnError(ConfigError):
    """oneDNN or the C++ compiler is missing, or the handlers failed to build: conv impl "onednn" cannot run here."""


def _dist_file(dist: str, suffix: str) -> Path:
    try:
        files = metadata.distribution(dist).files or []
    except metadata.PackageNotFoundError:
        raise OnednnError(f"conv impl 'onednn' needs oneDNN, which is not installed: {INSTALL_HINT}") from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate()).resolve()
    raise OnednnError(f"{dist} is installed without {suffix}; reinstall it: {INSTALL_HINT}")


def _build(out: Path, header: Path, library: Path, compiler: str) -> None:
    found = shutil.which(compiler)
    if found is None:
        raise OnednnError(f"conv impl 'onednn' compiles its handlers with a C++ compiler: {compiler!r} not found "
                          "(set $CXX)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.TemporaryDirectory(dir=out.parent)
    except OSError as e:
        raise OnednnError(f"conv impl 'onednn' builds its handlers in {out.parent}, which cannot be written "
                          f"({e.strerror}; the folder follows $XDG_CACHE_HOME)") from None
    with scratch as tmp:  # then renamed: concurrent builds never see half a file
        built = Path(tmp) / out.name
        command = [found, "-O2", "-std=c++17", "-fopenmp", "-shared", "-fPIC", "-isystem", jax.ffi.include_dir(),
                   "-isystem", str(header.parents[2]), str(SOURCE), str(library), f"-Wl,-rpath,{library.parent}",
                   "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise OnednnError(f"building the oneDNN conv handlers failed ({' '.join(command)}):\n{result.stderr}")
        built.replace(out)


@functools.cache
def load() -> ctypes.CDLL:
    """Build the handlers unless this source, compiler, jaxlib and oneDNN have a build already; load and
    register them, once per process; the loaded library.

    Raises:
      OnednnError: oneDNN (extra `onednn`) or a C++ compiler is missing, or the build failed.
    """
    header = _dist_file(ONEDNN[0], "oneapi/dnnl/dnnl.hpp")
    library = _dist_file(ONEDNN[1], "libdnnl.so.3")
    compiler = os.environ.get("CXX", "g++")
    key = "\0".join([compiler, str(library), metadata.version("jaxlib"), metadata.version(ONEDNN[1])])
    digest = hashlib.sha256(SOURCE.read_bytes() + key.encode()).hexdigest()[:16]
    path = default_cache_dir() / "onednn" / digest / "libjaxnet_onednn_conv.so"
    if not path.exists():
        _build(path, header, library, compiler)
    handlers = ctypes.CDLL(str(path))
    for target in TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handlers, target)), platform="cpu")
    return handlers


# oneDNN's memory::data_type codes of the dtypes the handlers take.
DATA_TYPES = {jnp.dtype(jnp.bfloat16): 2, jnp.dtype(jnp.float32): 3}


@functools.cache
def installed() -> bool:
    """Whether oneDNN's headers and library (extra `onednn`) are installed."""
    try:
        for dist in ONEDNN:
            metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


@functools.cache
def available(dtype) -> bool:
    """Whether conv impl "onednn" runs convolutions in `dtype` here: oneDNN installed, and kernels in that dtype
    (float32, or bfloat16 on AVX-512 or AMX) on this CPU. What conv impl "auto" asks on CPUs.

    Raises:
      OnednnError: oneDNN is installed but its handlers cannot be built (no C++ compiler, or the build failed):
        its extra was asked for, so that is an error to fix, not a reason to run slower convs.
    """
    dtype = jnp.dtype(dtype)
    if dtype not in DATA_TYPES or not installed():
        return False
    try:
        return bool(load().JaxnetOnednnSupports(DATA_TYPES[dtype]))
    except OnednnError as e:
        raise OnednnError(f"{str(e).rstrip()} — conv impl 'auto' runs oneDNN's convs on CPUs where oneDNN is "
                          "installed: fix the build, or choose conv impl 'xla'") from None


@functools.cache
def check_dtype(dtype) -> None:
    """Raise OnednnError unless oneDNN has convolutions in `dtype` on this CPU (bfloat16 needs AVX-512 or AMX)."""
    load()  # oneDNN missing, or the build failed: its own error
    if not available(dtype):
        raise OnednnError(f"conv impl 'onednn' has no {jnp.dtype(dtype).name} convolution on this CPU (oneDNN's "
                          "bfloat16 kernels need AVX-512 or AMX); use dtype float32 or impl 'xla'")


def _pool_threads() -> int:
    """The threads of XLA's CPU thread pool: one per CPU this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _ffi(target: str, out: jax.ShapeDtypeStruct, a, b, strides, pads):
    load()
    (pt, pb), (pl, pr) = pads
    attrs = dict(sh=strides[0], sw=strides[1], pt=pt, pb=pb, pl=pl, pr=pr)
    return jax.ffi.ffi_call(TARGETS[target], out)(a, b, **{k: np.int64(v) for k, v in attrs.items()})


def _batch_axes(arg_shapes):
    spec = arg_shapes[0].sharding.spec
    return spec[0] if spec else None


def _batch_parallel(call, rule: str, reduce_batch: bool = False):
    """`call` (two operands, then static arguments) as a custom partitioning: on a mesh, one call per shard of the
    batch (the leading axis of its first operand), with the whole of the other operand. XLA's partitioner would
    otherwise gather the whole batch into every device's call. The other axes stay whole (`rule` names them; b is
    the batch). The result is batch-sharded like the first operand, or, with `reduce_batch` (a sum over the batch),
    replicated: each shard's result is added across the batch's mesh axes."""

    def partition(*static_and_shapes):  # the three static arguments, mesh, arg_shapes, result_shape
        *static, mesh, arg_shapes, _ = static_and_shapes
        axes = _batch_axes(arg_shapes)
        sharded = NamedSharding(mesh, P(axes))
        if not reduce_batch:
            return mesh, lambda a, b: call(a, b, *static), sharded, (sharded, NamedSharding(mesh, P()))

        def summed(a, b):
            local = call(a, b, *static)
            return jax.lax.psum(local, axes) if axes else local

        return mesh, summed, NamedSharding(mesh, P()), (sharded, sharded)

    def infer(*static_and_shapes):
        *_, mesh, arg_shapes, _ = static_and_shapes
        return NamedSharding(mesh, P() if reduce_batch else P(_batch_axes(arg_shapes)))

    partitioned = custom_partitioning(call, static_argnums=(2, 3, 4))
    whole = tuple(f for f in dict.fromkeys(re.findall(r"\w+", rule)) if f != "b")  # in order of appearance
    partitioned.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                              need_replication_factors=whole)
    return partitioned


def _forward_call(x, w, out_tail, strides, pads):
    return _ffi("forward", jax.ShapeDtypeStruct((x.shape[0], *out_tail), x.dtype), x, w, strides, pads)


def _input_grad_call(dy, w, x_tail, strides, pads):
    return _ffi("input_grad", jax.ShapeDtypeStruct((dy.shape[0], *x_tail), dy.dtype), dy, w, strides, pads)


def _weight_grad_call(x, dy, w_shape, strides, pads):
    chunks = max(1, min(_pool_threads(), x.shape[0]))  # one partial sum per task of the handler
    partials = _ffi("weight_grad", jax.ShapeDtypeStruct((chunks, *w_shape), jnp.float32), x, dy, strides, pads)
    return partials.sum(0)


_forward = _batch_parallel(_forward_call, "b h w c, i j c o -> b p q o")
_input_grad = _batch_parallel(_input_grad_call, "b p q o, i j c o -> b h w c")
_weight_grad = _batch_parallel(_weight_grad_call, "b h w c, b p q o -> i j c o", reduce_batch=True)


def forward(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads) -> jax.Array:
    """The conv of x (N, H, W, C) with w (KH, KW, C, O): (N, OH, OW, O), in x's dtype.

    Raises:
      OnednnError: oneDNN is missing or failed to build, or has no convolution in x's dtype on this CPU.
    """
    check_dtype(x.dtype)
    out_hw = [(size + sum(pad) - k) // s + 1 for size, pad, k, s in zip(x.shape[1:3], pads, w.shape[:2], strides)]
    return _forward(x, w, (*out_hw, w.shape[3]), tuple(strides), tuple(pads))


def input_grad(dy: jax.Array, w: jax.Array, x_shape: tuple[int, ...], strides: tuple[int, int], pads) -> jax.Array:
    """The gradient in x of the conv's output paired with dy: the transposed conv of dy, of x's shape."""
    return _input_grad(dy, w, tuple(x_shape[1:]), tuple(strides), tuple(pads))


def weight_grad(x: jax.Array, dy: jax.Array, w_shape: tuple[int, ...], strides: tuple[int, int], pads) -> jax.Array:
    """The gradient in w (of `w_shape`) of the conv's output paired with dy: float32, summed over the batch.

    A strided 1x1 conv's weight gradient is computed as the unit-stride one of the pixels the conv reads: oneDNN's
    own "reduce to unit stride" copy for it writes past its workspace on NHWC inputs of fewer channels than its
    block (8 on AVX2, 16 on AVX-512): wrong gradients, then a corrupted heap (oneDNN issue #6035, open; v3.2).
    """
    strides, pads = tuple(strides), tuple(tuple(p) for p in pads)
    if tuple(w_shape[:2]) == (1, 1) and strides != (1, 1):
        (sh, sw), (oh, ow) = strides, dy.shape[1:3]
        padded = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)))
        x = padded[:, :(oh - 1) * sh + 1:sh, :(ow - 1) * sw + 1:sw]
        strides, pads = (1, 1), ((0, 0), (0, 0))
    return _weight_grad(x, dy, tuple(w_shape), strides, pads)
