"""Per-run XLA options: the CPU-conv choice reaches XLA before JAX starts and changes the compiled program, is
refused after, and names the valid choices when unknown; likewise malloc's settings for XLA's host buffers."""

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxnet import compiler

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_cpu_conv_names_the_choices():
    with pytest.raises(ValueError, match="xla_cpu_conv must be one of ynnpack, eigen, got 'onednn'"):
        compiler.set_cpu_conv("onednn")


def test_cpu_conv_after_the_backends_started_is_refused(monkeypatch):
    jax.devices()
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.raises(RuntimeError, match="before JAX starts its backends"):
        compiler.set_cpu_conv("eigen")
    assert os.environ["XLA_FLAGS"] == ""
    compiler.set_cpu_conv("ynnpack")  # XLA's default needs no flag, so it is never refused


PROBE = """
import os, sys, jax, jax.numpy as jnp
from jaxnet import compiler
from jaxnet.ops import conv2d
compiler.set_cpu_conv(sys.argv[1])
grad = jax.jit(jax.grad(lambda x, w: conv2d(x, w).sum(), argnums=(0, 1)))
hlo = grad.lower(jnp.ones((8, 16, 16, 64)), jnp.ones((3, 3, 64, 64))).compile().as_text()
print(os.environ.get("XLA_FLAGS", "") == compiler.CPU_CONV_FLAGS[sys.argv[1]], "__ynn_fusion" in hlo)
"""


@pytest.mark.parametrize("name,uses_ynnpack", [("eigen", False), ("ynnpack", True)])
def test_cpu_conv_choice_reaches_the_compiled_program(name, uses_ynnpack):
    """In a fresh process: the flag is set before JAX starts, XLA accepts it (it aborts on unknown flags), and
    the compiled conv gradient uses YNNPACK fusions only when ynnpack is chosen."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-c", PROBE, name], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", str(uses_ynnpack)]


def test_unknown_host_memory_names_the_choices():
    with pytest.raises(ValueError, match="host_memory must be one of keep, system, got 'jemalloc'"):
        compiler.set_host_memory("jemalloc")


def test_keeping_host_memory_after_the_backends_started_is_refused():
    jax.devices()
    with pytest.raises(RuntimeError, match="before JAX starts its backends"):
        compiler.set_host_memory("keep")
    compiler.set_host_memory("system")  # the C library's defaults need nothing, so they are never refused


FAULTS = """
import resource, sys
import jax, jax.numpy as jnp
from jaxnet import compiler
compiler.set_host_memory(sys.argv[1])
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
grad = jax.jit(jax.grad(lambda w, x: conv(jax.nn.relu(conv(x, w)), w).sum()))  # 16 MiB activations: temporaries
w, x = jnp.full((3, 3, 16, 16), 0.01), jnp.ones((64, 64, 64, 16))
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    grad(w, x).block_until_ready()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"), reason="malloc's settings are glibc's")
def test_kept_host_memory_stops_the_page_faults_of_every_step():
    """In fresh processes, the same jitted gradient called 20 times: with glibc's defaults every call faults its
    temporaries' pages in again (their blocks are mapped and unmapped per call); with "keep", once the heap has
    grown to the program's need (a few calls), most calls fault nothing (under jax 0.12 about one call in five
    still faults a block in, as live results move the heap's free blocks around)."""
    faults = {}
    for name in compiler.HOST_MEMORY:
        child = subprocess.run([sys.executable, "-c", FAULTS, name], cwd=ROOT, capture_output=True, text=True,
                               timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert child.returncode == 0, child.stderr[-2000:]
        faults[name] = [int(n) for n in child.stdout.split()]
    def faulting(calls):  # calls after the third that fault in at least one activation's pages (16 MiB)
        return sum(n * 4096 > 16 * 2**20 for n in calls[3:])

    assert faulting(faults["system"]) == 17, faults
    assert faulting(faults["keep"]) <= 8, faults


def test_run_once_computes_what_jit_computes():
    """The one-off compilation (backend optimisations off on CPU) gives jit's values, to the last bit or so."""
    def init(key, x):
        w = jax.random.truncated_normal(key, -2.0, 2.0, (3, 5))
        return w, jax.nn.gelu(x @ w)

    args = (jax.random.key(3), jax.numpy.linspace(-1.0, 1.0, 12).reshape(4, 3))
    out, ref = compiler.run_once(init, *args), jax.jit(init)(*args)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), out, ref)
    # Inside a transformation it is traced into the caller's program (here: shapes only, nothing compiled).
    shapes = jax.eval_shape(lambda key, x: compiler.run_once(init, key, x), *args)
    assert [s.shape for s in shapes] == [(3, 5), (4, 5)]


def test_xla_flags_are_checked_against_this_jaxlib_once_and_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compiler.xla_knows_flags(compiler.CPU_CONV_FLAGS["eigen"])
    assert not compiler.xla_knows_flags("--xla_jaxnet_no_such_flag=1")  # XLA aborts at start-up on it
    monkeypatch.setattr(compiler.subprocess, "run", lambda *a, **k: pytest.fail("asked the child again"))
    assert compiler.xla_knows_flags(compiler.CPU_CONV_FLAGS["eigen"])
    assert not compiler.xla_knows_flags("--xla_jaxnet_no_such_flag=1")
    assert list(tmp_path.joinpath("jaxnet").glob("xla-flags-jaxlib-*.json"))


def test_a_flag_this_jaxlib_does_not_know_is_left_out_with_a_notice(tmp_path):
    """A jaxlib without the experimental flag (simulated by asking for one no jaxlib knows): XLA starts with its
    default, the run goes on, and stderr says so in one line."""
    script = ("import os, jax; from jaxnet import compiler\n"
              "compiler.CPU_CONV_FLAGS['eigen'] = '--xla_jaxnet_no_such_flag=1'\n"
              "compiler.set_cpu_conv('eigen'); print(repr(os.environ.get('XLA_FLAGS', '')), len(jax.devices()))")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    child = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == 0 and child.stdout.split() == ["''", "1"], child.stderr[-2000:]
    notice = [line for line in child.stderr.splitlines() if line.startswith("notice:")]
    assert len(notice) == 1 and "does not accept --xla_jaxnet_no_such_flag" in notice[0]
    assert "XLA's default CPU convolutions are used" in notice[0]
