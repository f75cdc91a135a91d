"""oneDNN's convolutions inside XLA programs on CPU, through XLA's FFI: the kernels of conv impl "onednn".

`onednn_conv.cc` (beside this file) holds the two handlers, forward and input gradient. On first use it is
compiled with the C++ compiler ($CXX, else g++) against oneDNN from PyPI (extra `onednn`) and jaxlib's FFI
headers, into a directory of the jaxnet cache named by a hash of the source, the compiler, jaxlib's version
and oneDNN's (version and place); later processes load it from there. The handlers run on CPU only and take
float32 NHWC inputs, HWIO kernels, one group and no dilation; `conv.py` checks that before calling them. On a
mesh each device calls them on its shard of the batch.
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
TARGETS = {"forward": "JaxnetOnednnConvForward", "input_grad": "JaxnetOnednnConvInputGrad"}
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
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # then renamed: concurrent builds never see half a file
        built = Path(tmp) / out.name
        command = [found, "-O2", "-std=c++17", "-fopenmp", "-shared", "-fPIC", "-isystem", jax.ffi.include_dir(),
                   "-isystem", str(header.parents[2]), str(SOURCE), str(library), f"-Wl,-rpath,{library.parent}",
                   "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise OnednnError(f"building the oneDNN conv handlers failed ({' '.join(command)}):\n{result.stderr}")
        built.replace(out)


@functools.cache
def load() -> None:
    """Build the handlers unless this source, compiler, jaxlib and oneDNN have a build already; load and
    register them, once per process.

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


def _batch_parallel(target: str, rule: str):
    """The FFI call of `target` as a custom partitioning: on a mesh, one call per shard of the batch (the leading
    axis of its input and output), with the whole kernel. XLA's partitioner would otherwise gather the whole
    batch into every device's call. The other axes stay whole (`rule` names them; b is the batch)."""

    def call(a, w, out_tail, strides, pads):
        load()
        (pt, pb), (pl, pr) = pads
        attrs = dict(sh=strides[0], sw=strides[1], pt=pt, pb=pb, pl=pl, pr=pr)
        return jax.ffi.ffi_call(TARGETS[target], jax.ShapeDtypeStruct((a.shape[0], *out_tail), jnp.float32))(
            a, w, **{k: np.int64(v) for k, v in attrs.items()})

    def batch(mesh, arg_shapes):
        spec = arg_shapes[0].sharding.spec
        return NamedSharding(mesh, P(spec[0] if spec else None))

    def partition(out_tail, strides, pads, mesh, arg_shapes, result_shape):
        sharded = batch(mesh, arg_shapes)
        return (mesh, lambda a, w: call(a, w, out_tail, strides, pads), sharded,
                (sharded, NamedSharding(mesh, P())))

    def infer(out_tail, strides, pads, mesh, arg_shapes, result_shape):
        return batch(mesh, arg_shapes)

    partitioned = custom_partitioning(call, static_argnums=(2, 3, 4))
    whole = tuple(f for f in dict.fromkeys(re.findall(r"\w+", rule)) if f != "b")  # in order of appearance
    partitioned.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                              need_replication_factors=whole)
    return partitioned


_forward = _batch_parallel("forward", "b h w c, i j c o -> b p q o")
_input_grad = _batch_parallel("input_grad", "b p q o, i j c o -> b h w c")


def forward(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads) -> jax.Array:
    """The conv of x (N, H, W, C) with w (KH, KW, C, O): (N, OH, OW, O)."""
    out_hw = [(size + sum(pad) - k) // s + 1 for size, pad, k, s in zip(x.shape[1:3], pads, w.shape[:2], strides)]
    return _forward(x, w, (*out_hw, w.shape[3]), tuple(strides), tuple(pads))


def input_grad(dy: jax.Array, w: jax.Array, x_shape: tuple[int, ...], strides: tuple[int, int], pads) -> jax.Array:
    """The gradient in x of the conv's output paired with dy: the transposed conv of dy, of x's shape."""
    return _input_grad(dy, w, tuple(x_shape[1:]), tuple(strides), tuple(pads))
