"""Per-run XLA options: the CPU-conv choice reaches XLA_FLAGS before JAX starts (and XLA accepts the flag),
is refused after, and names the valid choices when unknown."""

import os
import subprocess
import sys
from pathlib import Path

import jax
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


def test_eigen_flag_is_set_before_start_and_accepted_by_xla():
    """XLA aborts the process on a flag it does not know, so a started backend proves the name is right."""
    code = ("import os; from jaxnet import compiler; compiler.set_cpu_conv('eigen'); import jax; "
            "print(jax.devices()[0].platform, os.environ['XLA_FLAGS'])")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["cpu", compiler.CPU_CONV_FLAGS["eigen"]]
