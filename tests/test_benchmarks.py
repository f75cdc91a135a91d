"""The benchmark scripts run and print their tables (tiny settings, nothing appended to RESULTS.md)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args,expect", [
    (["benchmarks.augment", "--batch", "64", "--repeats", "2", "--no-record"], "median ms"),
    (["benchmarks.scaling_model", "--model", "fastnet", "--batch-per-device", "64"], "| 64 |"),
    (["benchmarks.parallel_step", "--model", "fastnet_tiny", "--batch", "16", "--steps", "1", "--no-record"],
     "pmap, 8"),
    (["benchmarks.conv_impls", "--batch", "2", "--repeats", "1", "--impls", "xla,im2col,onednn", "--layers",
      "1x1", "--no-record"], "| onednn | "),
    (["benchmarks.batch_norm", "--shapes", "plain b32", "--repeats", "1", "--no-record"], "plain b32 layer 1"),
    (["benchmarks.train_step", "--models", "plain32", "--steps", "1", "--conv-impl", "auto,onednn", "--no-record"],
     "| plain32 | 32 | onednn |"),
])
def test_benchmark_prints_its_table(args, expect):
    if args[0] == "benchmarks.train_step":
        pytest.importorskip("torch", reason="the PyTorch side needs the bench extra")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expect in result.stdout


def test_recorded_section_names_the_environment_that_changes_the_numbers(tmp_path, monkeypatch):
    from benchmarks import common

    monkeypatch.setattr(common, "RESULTS", tmp_path / "RESULTS.md")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    common.append_results("Title", "| a |", "notes")
    text = (tmp_path / "RESULTS.md").read_text()
    assert "- environment: `" in text and "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in text
    assert "LD_PRELOAD" not in text and text.rstrip().endswith("| a |\nnotes")
