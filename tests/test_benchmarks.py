"""The benchmark scripts run and print their tables (tiny settings, nothing appended to RESULTS.md)."""

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures import SHARED_CIFAR10

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args,expect", [
    (["benchmarks.augment", "--batch", "64", "--repeats", "2", "--no-record"], "median ms"),
    (["benchmarks.scaling_model", "--model", "airbench96", "--image-size", "24", "--batch-per-device", "64"],
     "| 64 |"),
    (["benchmarks.parallel_step", "--model", "fastnet_tiny", "--batch", "16", "--steps", "1", "--no-record"],
     "pmap, 8"),
    (["benchmarks.conv_impls", "--batch", "2", "--repeats", "1", "--impls", "xla,im2col,onednn", "--layers",
      "1x1", "--no-record"], "| onednn | "),
    (["benchmarks.batch_norm", "--shapes", "plain b32", "--repeats", "1", "--no-record"], "plain b32 layer 1"),
    (["benchmarks.train_step", "--models", "plain32", "--steps", "1", "--conv-impl", "auto,onednn", "--no-record"],
     "| plain32 | 32 | onednn |"),  # against PyTorch eager and torch.compile, the default modes
    (["benchmarks.train_step", "--models", "plain32", "--steps", "1", "--dtype", "bfloat16", "--conv-impl", "auto",
      "--torch-modes", "eager-bf16", "--no-record"], "peak: bfloat16 2048² GEMMs"),  # MFU in the step's dtype
    (["benchmarks.step_ops", "--model", "plain32", "--batch", "8", "--steps", "1", "--traced-steps", "1",
      "--no-record"], "| conv backward | "),
])
def test_benchmark_prints_its_table(args, expect):
    if args[0] in ("benchmarks.train_step", "benchmarks.step_ops"):
        pytest.importorskip("torch", reason="the PyTorch side needs the bench extra")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expect in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--batch-per-device", "0"], "argument --batch-per-device: must be > 0, got 0"),  # was a ZeroDivisionError
    (["--device-tflops", "inf"], "argument --device-tflops: must be finite, got inf"),  # the same
    (["--grad-bytes", "-4"], "argument --grad-bytes: must be > 0, got -4"),  # was a table of negative bytes
    (["--model", "airbench96", "--image-size", "4"], "--model airbench96 --image-size 4: conv2d: the kernel spans"),
])
def test_scaling_model_refuses_bad_arguments_in_one_line(args, message, monkeypatch, capsys):
    from benchmarks import scaling_model

    monkeypatch.setattr(sys, "argv", ["scaling_model", *args])
    with pytest.raises(SystemExit) as exited:
        scaling_model.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("args", [["benchmarks.augment", "--repeats", "0"],
                                  ["benchmarks.batch_norm", "--repeats", "0"],
                                  ["benchmarks.conv_impls", "--batch", "0"],
                                  ["benchmarks.parallel_step", "--steps", "0"],
                                  ["benchmarks.train_step", "--steps", "-1"]])
def test_benchmarks_refuse_counts_below_one_before_they_start(args):
    """Each was a StatisticsError ("no median for empty data") after its compilations."""
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].endswith(f"error: argument {args[1]}: must be > 0, got {args[2]}")


def test_recorded_section_names_the_versions_and_environment_that_change_the_numbers(tmp_path, monkeypatch):
    from importlib import metadata

    from benchmarks import common

    monkeypatch.setattr(common, "RESULTS", tmp_path / "RESULTS.md")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    common.append_results("Title", "| a |", "notes")
    text = (tmp_path / "RESULTS.md").read_text()
    assert "- environment: `" in text and "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in text
    assert "LD_PRELOAD" not in text and text.rstrip().endswith("| a |\n\nnotes")  # a blank line ends the table
    installed = {d.metadata["Name"] for d in metadata.distributions()}
    assert "jax" in installed and all(f"{p} {metadata.version(p)}" in text for p in common.VERSIONED if p in installed)


def test_train_step_compares_with_pytorchs_fastest_mode_paired_by_round():
    from benchmarks.train_step import compare

    jax_times = [1.0, 2.0, 1.0]
    torch_times = {"eager": [1.5, 1.5, 1.5], "compile": [1.2, 1.8, 1.1]}  # compile: the lower median (1.2)
    c = compare(jax_times, torch_times, peaks=[10.0, 10.0, 5.0], flops=6.0)
    assert c["torch_mode"] == "compile" and c["jax_s"] == 1.0 and c["torch_s"] == 1.2
    assert c["ratio"] == pytest.approx(1.1)  # rounds: 1.2, 0.9, 1.1
    assert c["jax_mfu"] == pytest.approx(0.6)  # rounds: 0.6, 0.3, 1.2
    assert c["torch_mfu"] == pytest.approx(6.0 / 1.2 / 10.0)  # rounds: 0.5, 0.333, 1.09


def test_train_step_gemm_peak_leaves_out_a_framework_far_slower_than_the_other():
    """PyTorch's bfloat16 GEMM on a CPU without native bf16 ran at 1.4 GFLOP/s: its 2048² product took a minute a
    round for a peak it could never set. A probe over 4× slower than the fastest leaves it out."""
    from benchmarks.train_step import within

    assert within({"JAX": 0.01, "PyTorch": 0.5}, 4.0) == ["JAX"]
    assert within({"JAX": 0.03, "PyTorch": 0.01}, 4.0) == ["JAX", "PyTorch"]  # 3× is kept


def test_train_step_counts_onednn_steps_flops_as_xla_convs_steps():
    """XLA's cost analysis does not see oneDNN's FFI convs: a run of onednn, or of auto (oneDNN's convs where it is
    installed), must use XLA's conv count for its MFU."""
    pytest.importorskip("torch", reason="benchmarks.train_step imports PyTorch")
    import jax.numpy as jnp

    from benchmarks.train_step import jax_runner, step_flops

    xla = jax_runner("plain32", jnp.float32, "xla", "jaxnet")[2]
    onednn = jax_runner("plain32", jnp.float32, "onednn", "jaxnet")[2]
    assert onednn["flops"] < 0.5 * xla["flops"]  # what the table divided by before: the convs were missing
    assert step_flops("plain32", jnp.float32, "jaxnet", ["onednn"], [onednn]) == xla["flops"]
    auto = jax_runner("plain32", jnp.float32, "auto", "jaxnet")[2]
    assert step_flops("plain32", jnp.float32, "jaxnet", ["auto", "onednn"], [auto, onednn]) == xla["flops"]
    assert step_flops("plain32", jnp.float32, "jaxnet", ["xla", "onednn"], [xla, onednn]) == xla["flops"]


def test_train_step_rejects_an_unknown_pytorch_mode_in_one_line():
    result = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--torch-modes", "eager,jit"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown PyTorch mode(s) jit; valid: eager, compile" in result.stderr
    assert "Traceback" not in result.stderr


def _summary(acc, tta, wall):
    return {"test_accuracy": acc, "test_accuracy_tta": tta, "best_val_accuracy": None, "steps": 10,
            "train_seconds": wall - 1.0, "wall_seconds": wall, "process_seconds": wall + 2.0,
            "images_per_second": 100.0}


def test_time_to_accuracy_table_gives_mean_and_sample_std_over_seeds():
    from benchmarks.time_to_accuracy import table

    text = table({0: _summary(0.90, 0.93, 10.0), 3: _summary(0.92, 0.95, 14.0)}, target=0.94)
    rows = text.splitlines()
    assert rows[2].startswith("| 0 | 90.00% | 93.00% | — | 10 | 9.0 | 10.0 | 12.0 | 100.0 |")
    assert rows[3].startswith("| 3 | 92.00% | 95.00% |")
    # stdev([0.90, 0.92]) = 0.01414, stdev([10, 14]) = 2.83; no validation set: "—"
    assert rows[4] == ("| mean ± std | 91.00% ± 1.41% | 94.00% ± 1.41% | — | 10 ± 0 | 11.0 ± 2.8 | 12.0 ± 2.8 "
                       "| 14.0 ± 2.8 | 100.0 ± 0.0 |")
    assert text.endswith("Runs at ≥ 94.00% test accuracy with TTA: 1 of 2.")
    assert table({5: _summary(0.5, 0.5, 3.0)}, target=None).splitlines()[-1].startswith("| mean ± std | 50.00% ± — |")


TTA = [sys.executable, "-m", "benchmarks.time_to_accuracy", "--config", "smoke", "--no-record"]


def _tta_env():
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _run_tta(*args):
    return subprocess.run([*TTA, *args], cwd=ROOT, env=_tta_env(), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def data(tmp_path):
    from fixtures import synthetic, write_binary

    return write_binary(tmp_path / "cifar", synthetic(n_train=600, n_test=200))


def test_time_to_accuracy_runs_the_experiment_once_per_seed(tmp_path, data):
    result = _run_tta("--seeds", "0,1", "--data-dir", str(data), "--workdir", str(tmp_path / "runs"),
                      "--target", "0.5", "epochs=0.5")
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = {s: json.loads((tmp_path / "runs" / f"jaxnet-seed{s}" / "summary.json").read_text()) for s in (0, 1)}
    assert [summaries[s]["seed"] for s in (0, 1)] == [0, 1] and summaries[0]["steps"] == 3  # epochs=0.5 reached it
    row = f"| 1 | {summaries[1]['test_accuracy']:.2%} | {summaries[1]['test_accuracy_tta']:.2%} |"
    assert row in result.stdout and "| mean ± std |" in result.stdout
    assert "test accuracy with TTA: " in result.stdout


def test_time_to_accuracy_ablates_a_variant_beside_the_recipe(tmp_path, data):
    result = _run_tta("--seeds", "0", "--data-dir", str(data), "--workdir", str(tmp_path / "runs"),
                      "--ablate", "silu:activation=silu,tta_fraction=0.5,jitter=0.2", "epochs=0.5")
    assert result.returncode == 0, result.stderr[-2000:]
    base, variant = (json.loads((tmp_path / "runs" / f"{name}-seed0" / "summary.json").read_text())
                     for name in ("jaxnet", "silu"))
    assert (base["config"]["activation"], variant["config"]["activation"]) == ("gelu", "silu")
    assert variant["config"]["tta_fraction"] == 0.5 and variant["config"]["jitter"] == 0.2
    assert variant["config"]["epochs"] == 0.5 and base["config"]["jitter"] == 0.0
    assert "Variant silu" in result.stdout
    assert "| silu | `activation=silu tta_fraction=0.5 jitter=0.2` |" in result.stdout


def test_an_ablated_override_may_hold_a_tuple():
    from benchmarks.time_to_accuracy import _variant

    assert _variant("p16:hard_fraction=0.5,proxy_widths=(16, 32, 32),widths=[8,16,16],epochs=8") == (
        "p16", ["hard_fraction=0.5", "proxy_widths=(16, 32, 32)", "widths=[8,16,16]", "epochs=8"])


def test_ablation_table_compares_each_variant_with_the_recipe():
    from benchmarks.time_to_accuracy import ablation

    rows = ablation({0: _summary(0.9, 0.90, 10.0), 1: _summary(0.9, 0.92, 14.0)},
                    {"fast": (["epochs=1"], {0: _summary(0.8, 0.89, 5.0), 1: _summary(0.8, 0.89, 7.0)})}).splitlines()
    assert rows[2] == "| recipe | — | 91.00% | — | 12.0 | 1.00× | 11.0 |"
    assert rows[3] == "| fast | `epochs=1` | 89.00% | -2.00 | 6.0 | 0.50× | 5.0 |"


def test_time_to_accuracy_passes_sigterm_to_the_run_which_keeps_its_checkpoint(tmp_path, data):
    runs = tmp_path / "runs"
    bench = subprocess.Popen([*TTA, "--seeds", "0,1", "--data-dir", str(data), "--workdir", str(runs),
                              "epochs=1000.0", "log_every=1"], cwd=ROOT, env=_tta_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = runs / "jaxnet-seed0" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.5)
        bench.send_signal(signal.SIGTERM)  # to the benchmark only: the run hears of it through the benchmark
        out, err = bench.communicate(timeout=120)
    finally:  # a run left behind by a failure is killed with its group, not left training
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bench.pid, signal.SIGKILL)
    assert bench.returncode == 143, err[-2000:]
    assert "error: the jaxnet run of seed 0 was interrupted (exit code 143); nothing recorded" in err
    assert any((runs / "jaxnet-seed0" / "checkpoints").rglob("*")) and not (runs / "jaxnet-seed1").exists()
    assert "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["--config", "nope"], "invalid choice: 'nope'"),
    (["--ablate", "silu"], "expected NAME:key=value[,key=value...], got 'silu'"),
    (["--ablate", "x:activation=tanh"], "--ablate x: activation must be one of gelu, silu, relu"),
    (["--ablate", "x:color=1"], "--ablate x: override 'color=1' is not key=value with a known key"),
    (["--ablate", "peer:jitter=0.1"], "--ablate names must differ"),
    (["--data-dir", "/nonexistent/cifar"], "error: the jaxnet run of seed 0 failed (exit code 2); nothing recorded"),
    (["--peer", "tensorflow"], "invalid choice: 'tensorflow'"),
    (["--peer-dtype", "bfloat16"], "--peer-dtype is the peer's: give --peer too"),
    (["--peer-device", "cuda"], "--peer-device is the peer's: give --peer too"),
    (["--peer", "torch_record", "--peer-dtype", "float16"], "invalid choice: 'float16'"),
    (["--peer", "torch_record", "--peer-device", "tpu"], "invalid choice: 'tpu'"),
    (["--seeds", "0,x"], "expected comma-separated integers"),
    (["--target", "94"], "--target is an accuracy in (0, 1]"),
])
def test_time_to_accuracy_bad_input_is_one_line_and_exit_2(args, message):
    result = _run_tta(*args)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def _tta_bench(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks.tta", "--no-record", *args], cwd=ROOT,
                          env=_tta_env(), capture_output=True, text=True, timeout=300)


def test_tta_benchmark_evaluates_the_state_the_run_tested_as_the_run_did(tmp_path, data):
    """On a finished smoke run (a validation split: its best checkpoint is the tested state), level 0 and full
    TTA reproduce the run's own test accuracies; a selective variant runs beside them. Its summary is made an
    older jaxnet's, without fields added since (`activation`, `tta_fraction`): they take their defaults, said so."""
    run = tmp_path / "run"
    trained = subprocess.run([sys.executable, "-m", "experiments.cifar10", "--config", "smoke", "epochs=2.0",
                              "--workdir", str(run), "--data-dir", str(data)], cwd=ROOT, env=_tta_env(),
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["config"].pop("activation"), summary["config"].pop("tta_fraction")) == ("gelu", 1.0)
    (run / "summary.json").write_text(json.dumps(summary))
    shutil.rmtree(run / "checkpoints" / "last")  # the run tested its best checkpoint: the benchmark needs no other
    result = _tta_bench("--workdir", str(run), "--data-dir", str(data), "--variants", "0:1,2:1,2:0.5",
                        "--rounds", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "config has no activation, tta_fraction (an older jaxnet's run): jaxnet's defaults taken" in result.stderr
    rows = [r for r in result.stdout.splitlines() if r.startswith("| ") and r[2].isdigit()]
    assert [r.split(" | ")[:3] for r in rows] == [["| 0", "1", f"{summary['test_accuracy']:.2%}"],
                                                  ["| 2", "1", f"{summary['test_accuracy_tta']:.2%}"],
                                                  ["| 2", "0.5", rows[2].split(" | ")[2]]]
    assert rows[0].endswith("| 1.00 |")


@pytest.mark.parametrize("args,message", [
    (["--variants", "3:1"], "variant 3:1.0: the level is 0, 1 or 2"),
    (["--variants", "0:0.5"], "(1 for level 0)"),
    (["--variants", "2:all"], "variants are LEVEL:FRACTION"),
    (["--variants", "2:1,2:1.0"], "variants repeat"),
    (["--rounds", "0"], "--rounds must be ≥ 1, got 0"),
    (["--workdir", "/nonexistent/run"], "/nonexistent/run/summary.json not found: --workdir must be a finished run"),
])
def test_tta_benchmark_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = _tta_bench(*(["--workdir", str(tmp_path)] if "--workdir" not in args else []), *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("text", ["{not json", '{"seed": 0}', "[]"])
def test_tta_benchmark_refuses_a_summary_that_is_not_a_runs_in_one_line(tmp_path, text):
    (tmp_path / "summary.json").write_text(text)
    result = _tta_bench("--workdir", str(tmp_path))
    assert result.returncode == 2 and "summary.json is not a run's summary (" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("config,message", [
    ({"widths": [8], "from_the_future": 1}, "its config has fields this jaxnet does not know: from_the_future"),
    ({"lr": "fast"}, "its config's lr='fast' does not fit the field"),
])
def test_tta_benchmark_refuses_a_config_this_jaxnet_cannot_read_in_one_line(tmp_path, config, message):
    (tmp_path / "summary.json").write_text(json.dumps({"seed": 0, "config": config}))
    result = _tta_bench("--workdir", str(tmp_path))
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_tta_benchmark_names_a_run_without_checkpoints_in_one_line(tmp_path, data):
    from jaxnet import configs

    (tmp_path / "run").mkdir()
    summary = {"seed": 0, "config": configs.get_config("smoke").to_dict()}
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    result = _tta_bench("--workdir", str(tmp_path / "run"), "--data-dir", str(data))
    assert result.returncode == 2 and "error: no checkpoint in" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_time_to_accuracy_ratios_are_of_the_means():
    from benchmarks.time_to_accuracy import ratios

    ours = {0: _summary(0.90, 0.93, 10.0), 1: _summary(0.92, 0.95, 14.0)}  # process 14 s, wall 12, train 11
    peer = {0: _summary(0.91, 0.94, 20.0), 1: _summary(0.91, 0.94, 28.0)}  # process 26 s, wall 24, train 23
    assert ratios(ours, peer) == ("\njaxnet / peer, mean over seeds: process time 0.54×, wall time 0.50×, training "
                                  "time 0.48×; test accuracy with TTA 94.00% (jaxnet) vs 94.00% (peer).")


def test_time_to_accuracy_runs_the_pytorch_record_interleaved_on_the_same_images(tmp_path, data):
    """The peer at smoke scale, so the benchmark cannot rot: the record script (float32, its default) and the muon
    recipe on the same 200 images, after a warm-up run of each, seeds in the order jaxnet, peer, peer, jaxnet; both
    summaries in the table (not the warm-ups') and the ratio line."""
    pytest.importorskip("torch", reason="the peer needs PyTorch: pip install -e '.[bench]'")
    result = subprocess.run([*TTA[:3], "--config", "muon", "--no-record", "--peer", "torch_record", "--seeds", "0,1",
                             "--warmup",
                             "--data-dir", str(data), "--workdir", str(tmp_path / "runs"), "epochs=1.0",
                             "batch_size=100", "train_subset=200", "test_subset=100"],
                            cwd=ROOT, env=_tta_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    order = [line for line in result.stdout.splitlines() if line.startswith(("seed ", "warm-up"))]
    assert order == ["warm-up: jaxnet (muon)", "warm-up: peer (torch_record)", "seed 0: jaxnet (muon)",
                     "seed 0: peer (torch_record)", "seed 1: peer (torch_record)",
                     "seed 1: jaxnet (muon)"], result.stdout
    assert (tmp_path / "runs" / "jaxnet-warmup" / "summary.json").exists()
    assert result.stdout.count("| 0 | ") == result.stdout.count("| 1 | ") == 2  # one row per seed in each table
    peer = json.loads((tmp_path / "runs" / "peer-seed1" / "summary.json").read_text())
    ours = json.loads((tmp_path / "runs" / "jaxnet-seed1" / "summary.json").read_text())
    assert peer["steps"] == ours["steps"] == 2  # 200 images: 2 steps of 100 per epoch, for both
    assert peer["dtype"] == "float32" and "Peer, torch_record (float32):" in result.stdout
    assert f"| 1 | {peer['test_accuracy']:.2%} | {peer['test_accuracy_tta']:.2%} |" in result.stdout
    assert "jaxnet / peer, mean over seeds: process time " in result.stdout
    assert f"| {ours['wall_seconds']:.1f} | " in result.stdout  # the process's own seconds: its wall and more
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 1 | "))
    assert float(row.split(" | ")[7]) >= ours["wall_seconds"]
    assert "Where jaxnet's time went" in result.stdout and "\n| jaxnet | " in result.stdout
    assert "\n| peer | " not in result.stdout  # the peer's summary has no phases


def test_time_to_accuracy_runs_the_peer_in_the_dtype_asked(tmp_path, data):
    """--peer-dtype bfloat16 reaches the record script (its autocast), on 50 images: PyTorch's bfloat16 is
    slow on CPUs without native bf16 (7 images/s on a 2-core AMD EPYC)."""
    pytest.importorskip("torch", reason="the peer needs PyTorch: pip install -e '.[bench]'")
    result = subprocess.run([*TTA[:3], "--config", "muon", "--no-record", "--peer", "torch_record", "--seeds", "0",
                             "--peer-dtype", "bfloat16", "--data-dir", str(data), "--workdir", str(tmp_path / "runs"),
                             "epochs=1.0", "batch_size=25", "train_subset=50", "test_subset=25"],
                            cwd=ROOT, env=_tta_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    peer = json.loads((tmp_path / "runs" / "peer-seed0" / "summary.json").read_text())
    assert peer["dtype"] == "bfloat16" and peer["steps"] == 2 and "Peer, torch_record (bfloat16):" in result.stdout


def test_time_to_accuracy_refuses_a_gpu_peer_without_a_gpu_before_any_run():
    """--peer-device cuda where PyTorch sees no GPU: one line and exit 2 at once, not after jaxnet's first run."""
    torch = pytest.importorskip("torch", reason="the peer needs PyTorch: pip install -e '.[bench]'")
    if torch.cuda.is_available():
        pytest.skip("this PyTorch sees a CUDA GPU: the GPU peer can run here")
    result = _run_tta("--peer", "torch_record", "--peer-device", "cuda", "--data-dir", "/nonexistent/cifar")
    assert result.returncode == 2, result.stderr
    assert f"the peer's device is cuda, but this PyTorch ({torch.__version__}) sees no CUDA GPU" in result.stderr
    assert "seed 0" not in result.stdout and "Traceback" not in result.stderr


def test_kill_resume_kills_three_times_and_ends_bit_identical(data):
    """The long tally (benchmarks.kill_resume --kills 10+, RESULTS.md) in small: 3 SIGKILLs at random moments of a
    smoke run, each followed by --resume; every checkpoint readable after each kill; the end bit-identical."""
    env = {**_tta_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.kill_resume", "--kills", "3", "--data-dir", str(data),
                             "--no-record", "epochs=8.0"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=500)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "| SIGKILLs in all | 3 |" in result.stdout
    assert "| final state bit-identical to the uninterrupted run | yes |" in result.stdout
    assert "| metrics.jsonl the uninterrupted run's, row for row | yes (" in result.stdout


def test_memory_samples_every_epoch_and_reports_the_drift(data):
    result = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--data-dir", str(data), "--no-record",
                             "epochs=3.0"], cwd=ROOT, env=_tta_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2", "3"], result.stdout
    assert "| epoch 2 → last |" in result.stdout and "| peak (VmHWM) |" in result.stdout


def test_published_peaks_follow_the_device_kind_and_dtype():
    from benchmarks.common import published_peak

    assert published_peak("NVIDIA H200", "bfloat16") == 989.4e12
    assert published_peak("NVIDIA H100 80GB HBM3", "float32") == 494.7e12  # TF32 on the tensor cores
    assert published_peak("NVIDIA H100 PCIe", "bfloat16") == 756e12  # not the SXM figure
    assert published_peak("cpu", "float32") is None  # CPUs: measured in the run


def test_gpu_checks_run_on_this_cpu(monkeypatch):
    """The GPU script's own checks, here on the CPU: a user's model's train step with each impl equals XLA's, and an
    export made by a CPU-only process (for cpu and cuda) runs in this one."""
    from benchmarks import gpu_check

    rows = gpu_check.train_step_rows() + gpu_check.export_rows()
    assert len(rows) == len(gpu_check.IMPLS) + 1 and all(ok for _, ok in rows), rows


@pytest.mark.skipif(not SHARED_CIFAR10.exists(),
                    reason=f"the script's recipe runs on the shared CIFAR-10 copy, not at {SHARED_CIFAR10}")
def test_gpu_check_script_dry_runs_its_cpu_parts(tmp_path):
    pytest.importorskip("torch", reason="the train-step comparison needs the bench extra")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {
        "GPU_CHECK_DRY": "1", "PYTHON": sys.executable}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert report.count(": ok,") == 6 and "FAIL" not in report, report
    assert "The warm run under cProfile" in report and "experiment.py" in report and "(train_and_evaluate)" in report
    assert "| plain32 | 32 | xla |" in report and "/run/summary.json: fastnet_tiny / float32" in report
    assert "Where jaxnet's time went" in report and "; phases data " in report
    assert "Peer, torch_record (float32):" in report and "jaxnet / peer, mean over seeds" in report


@pytest.mark.skipif(not SHARED_CIFAR10.exists(),
                    reason=f"the script's recipe runs on the shared CIFAR-10 copy, not at {SHARED_CIFAR10}")
def test_gpu_check_script_dry_runs_the_hours_recipe_alone(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {
        "GPU_CHECK_DRY": "1", "GPU_CHECK_ONLY": "hour", "GPU_CHECK_EPOCHS": "0.5", "PYTHON": sys.executable}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "- the hour's recipe for 0.5 epochs: ok," in report and report.count(": ok,") == 1, report
    assert "/hour0.5/jaxnet-seed0/summary.json: fastnet_muon / float32" in report, report


@pytest.mark.parametrize("impl", ["xla", "onednn"])
def test_step_ops_classes_every_conv_of_a_train_step_by_direction(impl):
    """plain32 has 5 convs: 5 forward, 5 weight gradients, and 4 input gradients (the first conv's is not
    needed) — XLA's own convs, or oneDNN's custom calls; its max-pools and BatchNorms are classed as such."""
    import collections

    from benchmarks import step_ops, train_step
    from jaxnet import profiling

    step, state, data = train_step.jax_step("plain32", None, impl, "jaxnet", batch=4)
    ops = profiling.hlo_instructions(step.compiled.lower(state, data).compile().as_text())
    kernels = step_ops.kernel_dims(state.params)
    assert len(kernels) == 5
    kinds = collections.Counter(step_ops.jax_category(name, op, kernels) for name, op in ops.items())
    assert (kinds["conv forward"], kinds["conv input grads"], kinds["conv weight grads"]) == (5, 4, 5)
    assert kinds["pooling"] and kinds["BatchNorm"] and kinds["optimizer and metrics"] and kinds["head and loss"]


def _op(opcode="fusion", op_name="", shape="f32[8]{0}"):
    return {"opcode": opcode, "shape": shape, "op_name": op_name, "target": "", "computation": "main", "calls": ""}


@pytest.mark.parametrize("name,op,inner,kind", [
    # BatchNorm's normalisation fused into the GELU after it: the root multiplies, the erfc nearest to it names it
    ("multiply_fusion", _op(op_name="jit(s)/jvp(Net)/G_0/mul"),
     ["jit(s)/jvp(Net)/G_0/BatchNorm_0/sub", "jit(s)/jvp(Net)/G_0/erfc", "jit(s)/jvp(Net)/G_0/mul"], "activation"),
    ("multiply_fusion.2", _op(op_name="jit(s)/jvp(Net)/G_0/BatchNorm_0/mul"), ["jit(s)/jvp(Net)/G_0/erfc"],
     "BatchNorm"),
    ("add_fusion", _op(op_name="jit(s)/add"), ["jit(s)/mul"], "optimizer and metrics"),
    ("dot.3", _op("dot"), [], "other"),  # no metadata (XLA's rewrite of BatchNorm's statistics, say)
    ("transpose_copy_fusion.1", _op(), [], "layout copies"),
    ("cond.1.clone", _op("conditional", "jit(s)/jvp(Net)/Conv_0/cond"), [], None),
    ("convolution.4", _op("convolution", shape="f32[64,3,3,256]{3,2,1,0}"), [], "conv weight grads"),
    ("convolution.5", _op("convolution", shape="f32[64,3,3,64]{3,2,1,0}"), [], "other"),
])
def test_step_ops_classes_an_xla_op_by_its_own_path_then_its_fused_ops_nearest_the_root(name, op, inner, kind):
    from benchmarks.step_ops import jax_category

    assert jax_category(name, op, {(3, 3, 64, 256)}, inner) == kind


@pytest.mark.parametrize("lineage,kind", [
    (["aten::empty", "aten::convolution_backward", "autograd::engine::evaluate_function: ConvolutionBackward0"],
     "conv backward"),
    (["aten::mkldnn_convolution", "aten::_convolution", "aten::convolution", "aten::conv2d"], "conv forward"),
    (["aten::native_batch_norm_backward", "NativeBatchNormBackward0"], "BatchNorm"),
    (["aten::threshold_backward", "ReluBackward0"], "activation"),
    (["aten::max_pool2d_with_indices"], "pooling"),
    (["aten::add_", "aten::_foreach_add_", "Optimizer.step#SGD.step"], "optimizer and metrics"),
    (["aten::copy_", "aten::to"], "layout copies"),
    (["aten::add", "AccumulateGrad"], "other"),
])
def test_step_ops_classes_pytorch_events_by_themselves_or_their_nearest_classed_caller(lineage, kind):
    from benchmarks.step_ops import torch_category

    assert torch_category(lineage) == kind


def test_step_ops_table_sums_jaxnets_conv_gradients_into_its_backward_row():
    from benchmarks.step_ops import table

    text = table({"conv forward": 10.0, "conv input grads": 6.0, "conv weight grads": 14.0},
                 {"conv forward": 12.0, "conv backward": 30.0, "other": 3.0}, 0.04, 0.05)
    rows = {r.split(" | ")[0].lstrip("| "): r for r in text.splitlines()}
    assert rows["conv backward"] == "| conv backward | 20.0 | 67% | 30.0 | 67% | 1.50× |"
    assert "input grads 6.0, weight grads 14.0" in text
    assert rows["**all ops, traced**"].startswith("| **all ops, traced** | 30.0 | 100% | 45.0 | 100% | 1.50× |")
    assert rows["**step, untraced (median)**"] == "| **step, untraced (median)** | 40.0 | | 50.0 | | 1.25× |"


def test_step_ops_without_pytorch_says_what_to_install_in_one_line():
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("PyTorch is installed here (the bench extra): this checks the message where it is not")
    result = subprocess.run([sys.executable, "-m", "benchmarks.step_ops", "--model", "plain32", "--batch", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "pip install -e '.[bench]'" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "must be at least 1"),
    (["--model", "vgg"], "invalid choice: 'vgg'"),
    (["--model", "plain32", "--batch", "2", "--conv-impl", "bogus"], "error: unknown conv impl 'bogus'; valid: xla"),
])
def test_step_ops_bad_input_is_one_line_and_exit_2(args, message):
    if "--conv-impl" in args:
        pytest.importorskip("torch", reason="benchmarks.step_ops imports PyTorch before building the step")
    result = subprocess.run([sys.executable, "-m", "benchmarks.step_ops", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_phases_table_gives_each_runs_mean_seconds_where_they_went():
    from benchmarks.time_to_accuracy import phases

    def run(process, train):
        return {"process_seconds": process, "wall_seconds": process - 2.0, "checkpoint_seconds": train / 10,
                "phase_seconds": {"data": 1.0, "setup": 2.0, "train": train, "test": 0.5, "finish": 0.25}}

    rows = phases({"jaxnet": {0: run(10.0, 4.0), 1: run(12.0, 6.0)}, "fast": {0: run(5.0, 1.0)}}).splitlines()
    assert rows[0] == "| run | process | wall | data | setup | train | test | finish | of train: checkpoints |"
    assert rows[2] == "| jaxnet | 11.00 | 9.00 | 1.00 | 2.00 | 5.00 | 0.50 | 0.25 | 0.50 |"
    assert rows[3] == "| fast | 5.00 | 3.00 | 1.00 | 2.00 | 1.00 | 0.50 | 0.25 | 0.10 |"
