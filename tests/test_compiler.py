"""Per-run XLA options: the CPU-conv choice reaches XLA before JAX starts and changes the compiled program, is
refused after, and names the valid choices when unknown."""

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
