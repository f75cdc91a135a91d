"""XLA compiler and runtime options: per run, the library behind XLA's CPU convolutions, how the C library's
malloc keeps the host memory of XLA's buffers (both set before JAX starts its backends: the first array or device
query) and the persistent compilation cache; per program, `run_once` for programs whose compile time outweighs
their run time."""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import jax
from jax._src import xla_bridge  # backends_are_initialized: no public equivalent in jax 0.10

from jaxnet.cache import check_directory, default_cache_dir
from jaxnet.errors import ConfigError

CPU_CONV_FLAGS = {
    # XLA's default: convolutions through YNNPACK.
    "ynnpack": "",
    # Convolutions through Eigen (XLA's older CPU path): 2-3x faster training steps on the CPUs measured here
    # (benchmarks/RESULTS.md, "Train step"); the flag needs the full enum name. Adding
    # LIBRARY_FUSION_TYPE_REDUCE would keep reductions on YNNPACK: a lone per-channel sum gets 18x faster, but
    # PlainCNN b32 steps get slower than with jaxnet's BatchNorm and XLA's own reductions (RESULTS.md, 2026-11-26).
    "eigen": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}


def set_cpu_conv(name: str) -> None:
    """Route XLA's CPU convolutions to `name` ("eigen" or "ynnpack") by adding its flag to XLA_FLAGS.

    The flag is experimental: a jaxlib that does not know it would abort at start-up, so it is set only if
    `xla_knows_flags` says this jaxlib accepts it; otherwise XLA's default (YNNPACK) stays, with a one-line
    notice on stderr.

    Raises:
      ConfigError: an unknown name.
      RuntimeError: JAX's backends have started already, so the flag could no longer take effect.
    """
    if name not in CPU_CONV_FLAGS:
        raise ConfigError(f"xla_cpu_conv must be one of {', '.join(CPU_CONV_FLAGS)}, got {name!r}")
    flags = CPU_CONV_FLAGS[name]
    current = os.environ.get("XLA_FLAGS", "")
    if not flags or flags in current:
        return
    if xla_bridge.backends_are_initialized():
        raise RuntimeError(f"xla_cpu_conv={name} must be chosen before JAX starts its backends; set it first")
    if not xla_knows_flags(flags):
        print(f"notice: jaxlib {jaxlib_version()} does not accept {flags.split('=')[0]}; xla_cpu_conv={name} is "
              f"ignored and XLA's default CPU convolutions are used", file=sys.stderr)
        return
    os.environ["XLA_FLAGS"] = f"{current} {flags}".strip()


# glibc's mallopt parameters (malloc.h) and the values of host_memory="keep": one arena, no block served by mmap,
# the heap never trimmed (-1: mallopt's way to say so). A finite threshold, an int, is at most 2 GiB: under the
# temporaries of the `muon` recipe's step (2000 images, about 4x the 650 MiB of 512), which then still gave their
# block back and faulted it in again every step (13.2 M minor faults in 10 steps against 1.4 M with -1).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
KEEP_HOST_MEMORY = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
HOST_MEMORY = ("keep", "system")


def set_host_memory(name: str) -> None:
    """How the C library's malloc keeps the host memory of XLA's CPU buffers: "keep" or "system".

    XLA's CPU runtime takes a program's temporaries as one block per execution and frees it after (650 MiB for a
    FastNet b512 bf16 train step). glibc serves a block that large (over its mmap threshold, 32 MiB at most) with a
    fresh `mmap` and unmaps it when freed, so every step faulted in all its pages again: 166 000 minor page
    faults, a fifth of the step (benchmarks/RESULTS.md, "Host memory of XLA's buffers"). "keep" makes every thread
    allocate from glibc's main heap, never by `mmap`, and never trims that heap: the block is mapped once and
    reused by every step. The cost is that the process holds its peak memory until it exits. "system" leaves the
    C library's defaults. C libraries other than glibc have no such settings: "keep" leaves them as they are, with
    a one-line notice on stderr.

    Raises:
      ConfigError: an unknown name.
      RuntimeError: JAX's backends have started already: XLA's threads have their malloc arenas.
    """
    if name not in HOST_MEMORY:
        raise ConfigError(f"host_memory must be one of {', '.join(HOST_MEMORY)}, got {name!r}")
    if name == "system":
        return
    if xla_bridge.backends_are_initialized():
        raise RuntimeError(f"host_memory={name} must be chosen before JAX starts its backends; set it first")
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        print(f"notice: the C library is not glibc; host_memory={name} is ignored", file=sys.stderr)
        return
    for parameter, value in KEEP_HOST_MEMORY:
        if libc.mallopt(parameter, value) != 1:
            raise RuntimeError(f"glibc's mallopt({parameter}, {value}) failed")


def jaxlib_version() -> str:
    return importlib.metadata.version("jaxlib")


def xla_knows_flags(flags: str) -> bool:
    """Whether XLA (this jaxlib) starts with `flags` in XLA_FLAGS: tried once per jaxlib version in a child
    process that starts the CPU backend (XLA aborts on a flag it does not know), the verdict kept in the
    jaxnet cache directory where it can be written."""
    record = default_cache_dir() / f"xla-flags-jaxlib-{jaxlib_version()}.json"
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = {}
    if flags not in known:
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        child = subprocess.run([sys.executable, "-c", "import jax; jax.devices('cpu')"], env=env,
                               capture_output=True, timeout=120)
        known[flags] = child.returncode == 0
        try:  # the verdict's record only saves the next run this child process
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, record)
        except OSError:
            pass
    return known[flags]


def enable_compilation_cache(directory: str | os.PathLike) -> None:
    """Keep compiled executables in `directory` (XLA's persistent cache), so a later run of the same
    program skips compilation. Every compilation is cached, however short. ConfigError if `directory` cannot be
    one (JAX would warn and compile every program again)."""
    check_directory(directory, "compilation cache")
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def compilation_cache_serves() -> bool:
    """Whether XLA's persistent cache can serve this run (ask once the backend has started): not in a run of
    several processes on CPU. There each process's cache keys differ (they hold its devices) and only process 0
    writes entries, so the others compile every program anyway, and process 0 gains nothing by loading them: it
    waits for its peers at the first collective. And jaxlib 0.12.1 hangs (0.12.0.1 did not) when process 0 runs
    a collective it loaded from the cache, compiled in an earlier run at another point of that run, against a
    peer's fresh compile of it."""
    return jax.process_count() == 1 or jax.default_backend() != "cpu"


# XLA's backend optimisation level for programs that run once. On CPU the default level spends most of the
# compile time in LLVM: the initialisation of the tiny PlainCNN (random initializers, one forward pass)
# compiles in 16 s at the default level and 1.1 s at 0 (2-core Zen 3, 2026-11-26).
RUN_ONCE_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}


def run_once(fn: Callable, *args: Any) -> Any:
    """`jax.jit(fn)(*args)`, compiled for speed of compilation rather than of execution: for one-off programs
    such as initialisation. Results may differ from the default compilation in the last bit. Called inside a
    transformation (`jax.eval_shape`, an outer jit), `fn` becomes part of the caller's program instead."""
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args)):
        return jax.jit(fn)(*args)
    options = RUN_ONCE_OPTIONS.get(jax.default_backend(), {})
    return jax.jit(fn).lower(*args).compile(compiler_options=options)(*args)
