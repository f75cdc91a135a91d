"""The CIFAR-10 experiment end to end: CLI smoke run, exact resume, early stopping, checkpoints, export,
predict, and every bad-input path (one line, exit code 2, nothing lost)."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from fixtures import SHARED_CIFAR10, require_onednn_bfloat16, synthetic, write_binary
from PIL import Image

from jaxnet import configs
from jaxnet import data, experiment, export, loop
from jaxnet.metrics import read_jsonl
from jaxnet.errors import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_binary(tmp_path_factory.mktemp("cifar"), synthetic(n_train=600, n_test=200))


def smoke(**overrides):
    config = configs.get_config("smoke")
    config.update(overrides)
    return config


def _run_cli(*args, timeout=300, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "experiments.cifar10", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def _last_arrays(workdir):
    ckpt = workdir / "checkpoints" / "last"
    step = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    return step, ocp.StandardCheckpointer().restore(ckpt / str(step) / "state")


def test_cli_smoke_run_end_to_end_then_predict(tmp_path, dataset):
    workdir = tmp_path / "run"
    result = _run_cli("--config", "smoke", "--workdir", str(workdir), "--data-dir", str(dataset), "--export", "jax",
                      "--dump-hlo", str(tmp_path / "hlo"), "--profile", str(tmp_path / "profile"),
                      "--compilation-cache", str(tmp_path / "xla-cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    index = json.loads((tmp_path / "hlo" / "index.json").read_text())
    assert set(index) == {"train_step", "eval_step"}
    assert "HloModule" in (tmp_path / "hlo" / index["train_step"]["hlo_after_optimizations"]).read_text()
    assert list((tmp_path / "profile").rglob("*.trace.json.gz")) and list((tmp_path / "profile").rglob("perfetto*"))
    assert any((tmp_path / "xla-cache").iterdir())
    assert "test accuracy" in result.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    for key in ("test_accuracy", "test_accuracy_tta", "wall_seconds", "compile_seconds", "images_per_second",
                "config", "versions"):
        assert summary[key] is not None, key
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["config"]["model"] == "fastnet_tiny"
    assert summary["step_flops"] > 0 and summary["flops_per_second"] > 0
    assert summary["mfu"] is None and summary["peak_flops"] is None  # no peak given: no MFU
    phases = summary["phase_seconds"]  # where the wall time went: all of it but the loop's setup and the summary
    assert set(phases) == {"data", "setup", "train", "test", "finish"} and min(phases.values()) >= 0
    assert 0.9 * summary["wall_seconds"] <= sum(phases.values()) <= summary["wall_seconds"]
    assert phases["train"] == summary["train_seconds"] and 0 < summary["checkpoint_seconds"] < phases["train"]
    assert summary["dtype"] == "float32"  # dtype "auto" on a CPU
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"train", "val"} and all(np.isfinite(r["loss"]) for r in rows)
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    good = tmp_path / "plane.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    result = _run_cli("predict", "--workdir", str(workdir), str(good), str(bad), str(tmp_path / "missing.png"))
    assert result.returncode == 1
    line = next(l for l in result.stdout.splitlines() if l.startswith(str(good)))
    probs = [float(tok) for tok in line.replace(",", " ").split()[2::2]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
    assert len([l for l in result.stderr.splitlines() if "cannot read image" in l]) == 2


@pytest.mark.parametrize("first", ["", "import torch"], ids=["alone", "after-torch"])
def test_metric_writer_writes_tensorboard_events_without_importing_pytorch(tmp_path, first):
    """tensorboardX's writer imports torch wherever it is installed (2 s of a run's start); the MetricWriter keeps
    it out, yet leaves a torch imported before it alone, and its event file holds the scalars either way."""
    if first:
        pytest.importorskip("torch", reason="the case of a process that imported PyTorch needs PyTorch")
    code = (f"{first}\nimport sys\nfrom jaxnet.metrics import MetricWriter\nw = MetricWriter(sys.argv[1])\n"
            "w.write('train', 3, {'loss': 0.5})\nw.close()\nprint('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                            timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(bool(first))
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    assert b"train/loss" in events.read_bytes()


def test_a_one_step_run_without_validation_logs_its_step_and_plots(tmp_path, dataset):
    """The first step (compile + run) is logged too: a run of one step and no validation split (as the muon
    recipes) still has a training curve, and a summary without a steady-state time (no second step)."""
    workdir = tmp_path / "run"
    result = _run_cli("--config", "smoke", "val_size=0", "epochs=0.1", "log_every=5", "--workdir", str(workdir),
                      "--data-dir", str(dataset))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 1)] and np.isfinite(rows[0]["loss"])
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["steady_step_seconds"] is None


def test_resume_after_a_mid_epoch_stop_is_bit_identical(tmp_path, dataset, monkeypatch):
    """18 steps of 6 per epoch, the first 12 on 20 × 20 images (progressive resizing), stopped inside the second
    epoch and resumed: the run ends where the straight run does, across the change of size; its summary's FLOPs
    per step are the mean of its steps', below a full-size run's."""
    config = smoke(epochs=3.0, low_res=20, low_res_fraction=2 / 3)
    traced, train_batch = [], data.train_batch
    monkeypatch.setattr(data, "train_batch",
                        lambda *a, size=None, **k: traced.append(size) or train_batch(*a, size=size, **k))
    straight = experiment.train_and_evaluate(config, tmp_path / "straight", data_dir=dataset, show_progress=False)
    assert sorted(traced, key=str) == [20, None]  # the batch function compiled once per size, 20 × 20 and full
    calls = {"n": 0}

    def stop_after_8_steps():
        calls["n"] += 1
        return calls["n"] >= 8  # 6 steps per epoch: this lands inside the second epoch

    out = experiment.train_and_evaluate(config, tmp_path / "stopped", data_dir=dataset, should_stop=stop_after_8_steps,
                                     show_progress=False)
    assert out["interrupted"] and 6 < out["step"] < 12, out  # stopped inside the second epoch, before the switch
    experiment.train_and_evaluate(config, tmp_path / "stopped", data_dir=dataset, resume=True, show_progress=False)
    step_a, a = _last_arrays(tmp_path / "straight")
    step_b, b = _last_arrays(tmp_path / "stopped")
    assert step_a == step_b == 18
    chex.assert_trees_all_equal(a, b)  # bit-identical: params, batch stats, optimizer state, step, rng
    full = experiment.train_and_evaluate(smoke(epochs=0.2), tmp_path / "full", data_dir=dataset, show_progress=False)
    assert 0.4 * full["step_flops"] < straight["step_flops"] < 0.8 * full["step_flops"]


def test_hard_fraction_trains_each_step_on_the_hardest_images_of_its_batch(tmp_path, dataset):
    """The run's compiled step selects: its FLOPs are a forward pass over the whole batch and a step over half,
    less with the forward pass on 16 × 16 images."""
    runs = {(fraction, size): experiment.train_and_evaluate(
        smoke(epochs=0.2, hard_fraction=fraction, hard_score_size=size), tmp_path / f"{fraction}-{size}",
        data_dir=dataset, show_progress=False) for fraction, size in ((1.0, 0), (0.5, 0), (0.5, 16))}
    full, half, small = runs[1.0, 0], runs[0.5, 0], runs[0.5, 16]
    assert 0.6 * full["step_flops"] < half["step_flops"] < 0.95 * full["step_flops"], (half, full)
    assert 0.4 * full["step_flops"] < small["step_flops"] < half["step_flops"] - 0.1 * full["step_flops"], small
    assert small["config"]["hard_fraction"] == 0.5 and small["config"]["hard_score_size"] == 16


def test_a_proxy_scored_run_resumes_bit_identical_with_its_proxy(tmp_path, dataset):
    """`proxy_widths`: a proxy FastNet in the state picks each step's images and trains every `proxy_every`-th step;
    stopped inside the second epoch and resumed, the run ends where the straight run does, proxy included."""
    config = smoke(epochs=2.0, hard_fraction=0.5, proxy_widths=(4, 8, 8), proxy_every=3)
    straight = experiment.train_and_evaluate(config, tmp_path / "straight", data_dir=dataset, show_progress=False)
    calls = {"n": 0}

    def stop_after_8_steps():
        calls["n"] += 1
        return calls["n"] >= 8

    out = experiment.train_and_evaluate(config, tmp_path / "stopped", data_dir=dataset, should_stop=stop_after_8_steps,
                                        show_progress=False)
    assert out["interrupted"] and 6 < out["step"] < 12, out
    experiment.train_and_evaluate(config, tmp_path / "stopped", data_dir=dataset, resume=True, show_progress=False)
    (step_a, a), (step_b, b) = _last_arrays(tmp_path / "straight"), _last_arrays(tmp_path / "stopped")
    assert step_a == step_b == 12 and tuple(straight["config"]["proxy_widths"]) == (4, 8, 8)
    assert int(a["proxy"]["step"]) == 4  # trained at steps 0, 3, 6 and 9
    assert a["proxy"]["params"]["ConvGroup_0"]["Conv_0"]["kernel"].shape[-1] == 4
    np.testing.assert_array_equal(a["proxy"]["params"]["stem"]["kernel"], a["params"]["stem"]["kernel"])  # whitened
    chex.assert_trees_all_equal(a, b)  # bit-identical, the proxy's params, statistics and optimizer state too


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path, dataset):
    import signal
    import time

    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.cifar10", "--config", "smoke", "epochs=100.0",
                             "--workdir", str(workdir), "--data-dir", str(dataset)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "interrupted at step" in stderr and "--resume" in stderr
    step = int(stderr.split("interrupted at step ")[1].split(";")[0])
    assert _last_arrays(workdir)[0] == step


def test_early_stopping_stops_and_keeps_the_best(tmp_path, dataset):
    config = smoke(epochs=20.0, patience=1, min_delta=1.0)  # no epoch can gain 100 points
    summary = experiment.train_and_evaluate(config, tmp_path / "es", data_dir=dataset, show_progress=False)
    assert summary["stopped_early"] and summary["epochs_completed"] == 2
    best = sorted(p.name for p in (tmp_path / "es" / "checkpoints" / "best").iterdir() if p.name.isdigit())
    assert best == ["6"]  # the first epoch's, since nothing after it counted as a gain


def test_incompatible_and_corrupt_checkpoints_are_errors_and_left_alone(tmp_path, dataset):
    workdir = tmp_path / "run"
    experiment.train_and_evaluate(smoke(epochs=1.0), workdir, data_dir=dataset, show_progress=False)
    ckpt = workdir / "checkpoints"
    before = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*"))
    with pytest.raises(CheckpointError, match=f"{ckpt}/last/6 was made with another config.*model"):
        experiment.train_and_evaluate(smoke(epochs=1.0, model="resnet_tiny", whiten_stem=False), workdir,
                                   data_dir=dataset, resume=True, show_progress=False)
    (ckpt / "last" / "6" / "state" / "_METADATA").write_text("{broken")
    with pytest.raises(CheckpointError, match=f"{ckpt}/last/6 cannot be restored"):
        experiment.train_and_evaluate(smoke(epochs=1.0), workdir, data_dir=dataset, resume=True, show_progress=False)
    assert sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")) == before


@pytest.mark.parametrize("args,message", [
    (["--config", "nope"], "invalid choice"),
    (["epochs"], "not key=value"),
    (["width=3"], "not key=value with a known key"),
    (["epochs=fast"], "expected a float"),
    (["model=vgg"], "model must be one of fastnet, fastnet_tiny"),
    (["flip=sideways"], "flip must be one of alternate, random, none, got 'sideways'"),
    (["mean=0.5"], "override mean=0.5: expected a tuple"),
    (["batch_size=64.5"], "override batch_size=64.5: expected an int"),
    (["whiten_stem=1"], "override whiten_stem=1: expected a bool"),
    (["batch_size=True"], "override batch_size=True: expected an int"),
    (["batch_size=0"], "batch_size must be > 0, got 0"),
    (["momentum=1.0"], "momentum must be in [0, 1), got 1.0"),
    (["label_smoothing=2.0"], "label_smoothing must be in [0, 1), got 2.0"),
    (["patience=-3"], "patience must be >= 0, got -3"),
    (["std=(0.2, 0.0, 0.2)"], "std must be 3 positive numbers"),
    (["conv_impl=fast"], "conv_impl must be one of xla, im2col"),
    (["xla_cpu_conv=mkl"], "xla_cpu_conv must be one of ynnpack, eigen"),
    (["lookahead_every=-5"], "lookahead_every must be >= 0, got -5"),
    (["--data-dir", "/nonexistent/cifar"], "does not exist"),
    (["--export", "tflite"], "--export takes jax and/or onnx"),
    (["--resume"], "no checkpoints"),
    (["--num-devices", "9"], "9 devices asked for, but 8 are available"),  # conftest: 8 CPU devices
    (["--parallel", "pmap", "--num-devices", "3"], "batch_size 64 does not divide over 3 devices"),
    (["--coordinator", "127.0.0.1:1"], "give all three"),
])
def test_bad_cli_input_is_one_line_exit_2_and_writes_nothing(tmp_path, dataset, args, message):
    workdir = tmp_path / "w"
    base = ["--config", "smoke", "--workdir", str(workdir), "--data-dir", str(dataset)]
    result = _run_cli(*base, *args, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not workdir.exists()


def test_a_workdir_that_is_a_file_is_one_line_exit_2_and_left_alone(tmp_path, dataset):
    workdir = tmp_path / "w"
    workdir.write_text("my notes")
    result = _run_cli("--config", "smoke", "--workdir", str(workdir), "--data-dir", str(dataset), timeout=120)
    assert result.returncode == 2 and "is not a directory" in result.stderr and "Traceback" not in result.stderr
    assert workdir.read_text() == "my notes"


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path, dataset):
    """Only jaxnet's own errors become one line: anything else (here a ValueError from inside the run, as a
    bug in jaxnet or JAX would raise) propagates with its traceback."""
    from jaxnet import cifar10

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(experiment, "train_and_evaluate", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        cifar10.main(["--config", "smoke", "xla_cpu_conv=ynnpack", "host_memory=system",
                      "--workdir", str(tmp_path / "w"), "--data-dir", str(dataset), "--compilation-cache", ""])


def test_the_cli_prints_jaxnets_notes_as_plain_lines_and_leaves_logging_as_it_was(monkeypatch, tmp_path, dataset,
                                                                                  capsys):
    """The notes of the experiment and of the data loader (a tfds copy passed over) are plain lines on stderr
    during main; afterwards the `jaxnet` logger is as it was (main may run in a process that goes on)."""
    from jaxnet import cifar10, data

    loggers = [logging.getLogger("jaxnet"), experiment.log, data.log]
    before = [(list(log.handlers), log.level, log.propagate) for log in loggers]

    def noting(*args, **kwargs):
        experiment.log.info("a note of the experiment")
        data.log.warning("a note of the data")
        return {"process": 0, "processes": 1, "test_accuracy": 0.5, "tta_level": 0, "test_accuracy_tta": 0.5,
                "wall_seconds": 1.0}

    monkeypatch.setattr(experiment, "train_and_evaluate", noting)
    code = cifar10.main(["--config", "smoke", "xla_cpu_conv=ynnpack", "host_memory=system",
                         "--workdir", str(tmp_path / "w"), "--data-dir", str(dataset), "--compilation-cache", ""])
    err = capsys.readouterr().err.splitlines()
    assert code == 0 and err.count("a note of the experiment") == 1 and err.count("a note of the data") == 1
    assert [(list(log.handlers), log.level, log.propagate) for log in loggers] == before


def test_existing_checkpoints_are_not_overwritten_without_resume(tmp_path, dataset):
    workdir = tmp_path / "run"
    experiment.train_and_evaluate(smoke(epochs=1.0), workdir, data_dir=dataset, show_progress=False)
    stamp = {p: p.stat().st_mtime_ns for p in (workdir / "checkpoints").rglob("*")}
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        experiment.train_and_evaluate(smoke(epochs=1.0), workdir, data_dir=dataset, show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in (workdir / "checkpoints").rglob("*")} == stamp


def test_airbench_optimizer_lr_groups_match_airbench94():
    """BN biases at 64x the lr; the whitening stem's bias at the plain lr until it freezes; its kernel frozen."""
    from jaxnet import models

    config = configs.get_config("default")
    config.whiten_bias_epochs = 0.1  # with 10 steps per epoch: the bias trains at step 0 only
    tx = experiment.build_optimizer(config, total_steps=100, steps_per_epoch=10)
    init = partial(models.FastNetTiny().init, train=False)
    shapes = jax.eval_shape(init, jax.random.key(0), jax.numpy.zeros((1, 32, 32, 3)))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])
    grads = jax.tree.map(np.ones_like, params)
    state = tx.init(params)
    first, state = tx.update(grads, state, params)
    second, _ = tx.update(grads, state, params)
    conv = np.abs(first["ConvGroup_0"]["Conv_0"]["kernel"]).max()
    assert conv > 0
    np.testing.assert_allclose(np.abs(first["ConvGroup_0"]["BatchNorm_0"]["bias"]), 64 * conv, rtol=1e-6)
    np.testing.assert_allclose(np.abs(first["stem"]["bias"]), conv, rtol=1e-6)
    assert not np.any(first["stem"]["kernel"]) and not np.any(second["stem"]["bias"])
    assert np.all(second["ConvGroup_0"]["Conv_0"]["kernel"])


@pytest.mark.parametrize("name", configs.NAMES)
def test_every_recipe_passes_validation_and_its_model_gives_ten_logits(name):
    config = configs.get_config(name)
    experiment.validate_config(config)
    model = experiment.build_model(config)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    assert jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x).shape == (2, 10)


def test_muon_recipe_gives_each_group_the_records_rate():
    """The muon recipe's optimizer: at step 0, the head and BN shifts take PyTorch's Nesterov SGD step at their
    own rates (head_lr, bias_lr), the stem's kernel is frozen and its bias trains until `whiten_bias_epochs`, and
    the filters move by Muon: renormalised to √(out channels), a step of lr on an orthogonalised direction."""
    from jaxnet import models, optim, train

    config = configs.get_config("muon")
    config.whiten_bias_epochs = 0.1  # with 10 steps per epoch: the bias trains at step 0 only
    tx = experiment.build_optimizer(config, total_steps=100, steps_per_epoch=10)
    params = models.FastNetMuon().init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False)["params"]
    grads = jax.tree.map(np.ones_like, params)
    state = tx.init(params)
    first, state = tx.update(grads, state, params)
    second, state = tx.update(grads, state, params)
    np.testing.assert_allclose(train.learning_rate(state), config.lr * 0.99, rtol=1e-6)  # linear decay, step 1
    b, m, wd = config.batch_size, config.momentum, config.weight_decay
    for leaf, rate in ((("head", "kernel"), config.head_lr), (("ConvGroup_1", "BatchNorm_0", "bias"), config.bias_lr),
                       (("stem", "bias"), config.bias_lr)):
        p, u = params, first
        for key in leaf:
            p, u = p[key], u[key]
        d = b * 1.0 + wd * b / rate * np.asarray(p)
        np.testing.assert_allclose(u, -rate * (1 + m) * d, rtol=1e-5, err_msg=str(leaf))
    assert not np.any(first["stem"]["kernel"]) and not np.any(second["stem"]["bias"])
    kernel = params["ConvGroup_1"]["Conv_0"]["kernel"]
    renormed = kernel * np.sqrt(kernel.shape[-1]) / np.linalg.norm(kernel)
    direction = (renormed - (kernel + first["ConvGroup_1"]["Conv_0"]["kernel"])) / config.lr
    np.testing.assert_allclose(direction, optim.orthogonalize(jax.numpy.asarray((1 + config.filter_momentum) *
                                                                                np.ones_like(kernel))), atol=1e-5)


def test_a_run_compiles_one_program_per_task_not_one_per_op(tmp_path, dataset):
    """Outside jit JAX compiles each op, for each shape, as a program of its own. Checking the parameters before
    each save, restarting the optimizer and the EMA for the whitened stem and drawing the epoch order did so:
    `isfinite` and `all` for each parameter's shape, zeros and copies for each leaf, a shuffle per epoch size, all
    paid for by a cold compilation cache. Each of those tasks is one program, lowered once however often it runs
    (two saves, two epoch orders here)."""
    # One device, not the suite's 8: orbax saves an array held by several devices with a slice program per shape.
    env = {"JAX_LOG_COMPILES": "1", "XLA_FLAGS": ""}
    result = _run_cli("--config", "smoke", "epochs=2", "--workdir", str(tmp_path / "run"), "--data-dir", str(dataset),
                      env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lowered = Counter(re.findall(r"Compiling jit\((\w+)\)", result.stderr))
    assert lowered["_all_finite"] == lowered["_epoch_order"] == lowered["_with_params"] == 1, lowered
    assert not {"isfinite", "_reduce_all", "copy", "_shuffle"} & set(lowered), lowered
    assert sum(lowered.values()) <= 50, lowered  # 41 on jax 0.10.2 and 0.12.1 (89 before; normalize is op by op)


def test_batch_function_compiles_once_over_epochs():
    from jaxnet import parallel

    config = smoke()
    flip = data.flip_schedule(config.flip, jax.random.key(1))
    make_batch = parallel.jit_batch_fn(partial(data.train_batch, flip=flip, translate=2, cutout=0,
                                               mean=config.mean, std=config.std))
    images, labels = np.zeros((32, 8, 8, 3), np.uint8), np.arange(32, dtype=np.int32)
    batches = [make_batch(jax.random.key(0), images, labels, jax.numpy.arange(16), epoch) for epoch in range(3)]
    assert make_batch._cache_size() == 1  # the epoch is traced, not a constant of the program
    assert batches[2]["image"].shape == (16, 8, 8, 3)


def test_help_is_complete_and_exits_0():
    result = _run_cli("--help", timeout=60)
    assert result.returncode == 0
    for flag in ("--config", "--workdir", "--data-dir", "--seed", "--resume", "--export", "predict", "key=value"):
        assert flag in result.stdout


def test_jax_export_round_trip_equals_the_live_model(tmp_path, dataset):
    import jax.numpy as jnp

    import jaxnet
    from jaxnet import models

    model = models.FastNetTiny()
    state = jaxnet.create_train_state(model, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jaxnet.sgd(0.1))
    fn = export.inference_fn(state, mean=(0.5,) * 3, std=(0.25,) * 3, tta=2)
    path = export.export_jax(fn, tmp_path / "m.jaxexport")
    assert jax.export.deserialize(bytearray(path.read_bytes())).platforms == ("cpu", "cuda")  # made here, runs on GPUs
    loaded = export.load_jax(path)
    for n in (1, 5):  # the batch size is symbolic
        images = np.random.default_rng(n).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        chex.assert_trees_all_close(loaded(images), fn(jnp.asarray(images)), rtol=1e-5, atol=1e-6)
    gpu_only = export.export_jax(fn, tmp_path / "gpu.jaxexport", platforms=("cuda",))
    with pytest.raises(ConfigError, match=r"exported for cuda, not for cpu: export it again with --export-platforms "
                                          r"cuda,cpu$"):
        export.load_jax(gpu_only)


def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpus():
    import jax.numpy as jnp

    assert experiment.compute_dtype("auto", "gpu") == jnp.bfloat16 == experiment.compute_dtype("auto", "tpu")
    assert experiment.compute_dtype("auto", "cpu") == jnp.float32 == experiment.compute_dtype("auto")  # this machine
    assert experiment.compute_dtype("float32", "gpu") == jnp.float32  # told otherwise
    config = smoke(dtype="auto")
    variables = experiment.build_model(config).init(jax.random.key(0), np.zeros((1, 32, 32, 3)), train=False)
    assert experiment.build_model(config).dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(variables["params"])} == {np.dtype(np.float32)}


def test_activation_sets_fastnets():
    from jaxnet import models

    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    silu = experiment.build_model(smoke(activation="silu", conv_impl="xla"))  # the models' default impl
    variables = silu.init(jax.random.key(0), images, train=False)
    np.testing.assert_allclose(silu.apply(variables, images, train=False), models.FastNetTiny(
        activation=jax.nn.silu).apply(variables, images, train=False), rtol=1e-6)
    assert not np.allclose(silu.apply(variables, images, train=False),
                           experiment.build_model(smoke()).apply(variables, images, train=False))


def test_depth_sets_fastnets_blocks():
    images = np.zeros((1, 32, 32, 3), np.float32)
    for depth, convs in ((2, {"Conv_0", "Conv_1"}), (3, {"Conv_0", "Conv_1", "Conv_2"})):
        variables = experiment.build_model(smoke(depth=depth)).init(jax.random.key(0), images, train=False)
        assert {name for name in variables["params"]["ConvGroup_2"] if name.startswith("Conv")} == convs


@pytest.mark.parametrize("name", ["smoke", "quick"])
def test_a_config_read_back_from_json_builds_the_same_model(name):
    """A summary's or checkpoint's config holds lists where the recipe had tuples (widths () or (32, 128, 128))."""
    import ml_collections

    config = configs.get_config(name)
    read_back = ml_collections.ConfigDict(json.loads(json.dumps(config.to_dict())))
    shapes = [jax.eval_shape(partial(experiment.build_model(c).init, train=False), jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3))) for c in (config, read_back)]
    chex.assert_trees_all_equal_shapes_and_dtypes(*shapes)


def test_widths_set_fastnets_blocks_and_the_muon_heads_scale():
    from jaxnet import models

    model = experiment.build_model(smoke(model="fastnet_muon", widths=(8, 16, 12), conv_impl="xla"))
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    variables = model.init(jax.random.key(0), images, train=False)
    assert variables["params"]["head"]["kernel"].shape == (12, 10)
    logits = model.apply(variables, images, train=False)
    # airbench94_muon divides the head's output by its input features: 1/12 here, not the full net's 1/256
    np.testing.assert_allclose(logits, models.FastNet(widths=(8, 16, 12), scale=1 / 12).apply(
        variables, images, train=False), rtol=1e-6)
    assert not np.allclose(logits, models.FastNet(widths=(8, 16, 12), scale=1 / 256).apply(
        variables, images, train=False))



def _export(state, config, directory, formats):
    return export.export_model(state, lambda impl: experiment.build_model(config, conv_impl=impl), config.conv_impl,
                               directory, formats, mean=config.mean, std=config.std)


def test_experiment_exports_match_the_live_model_with_auto_convs(tmp_path):
    """PlainCNN's last conv (3x3 on 2x2) is one that "auto" runs as im2col on CPU (the others oneDNN's where it is
    installed), through a platform switch ONNX cannot express: the jax export keeps the switch without its oneDNN
    choice (FFI calls exist only in a process that loaded jaxnet's handlers), the ONNX export writes the same
    function with XLA's conv."""
    import jax.numpy as jnp

    ort = pytest.importorskip("onnxruntime", reason="ONNX export needs the onnx extra")
    pytest.importorskip("jax2onnx", reason="ONNX export needs the onnx extra")
    import jaxnet

    config = smoke(model="plain_tiny", conv_impl="auto")
    state = jaxnet.create_train_state(experiment.build_model(config), jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                      jaxnet.sgd(0.1))
    paths = _export(state, config, tmp_path, ("jax", "onnx"))
    live = export.inference_fn(state, mean=config.mean, std=config.std)
    images = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    expected = np.asarray(live(jnp.asarray(images)))
    session = ort.InferenceSession(paths["onnx"])
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: images})[0], expected, atol=1e-4)
    np.testing.assert_allclose(np.asarray(export.load_jax(paths["jax"])(images)), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="conv impl 'auto' is a platform switch"):
        export.export_onnx(live, tmp_path / "auto.onnx")
    assert not (tmp_path / "auto.onnx").exists()


@pytest.mark.parametrize("impl", ["onednn", "pallas"])
def test_experiment_exports_onednn_and_pallas_models_with_xlas_convs(tmp_path, impl):
    """oneDNN's FFI calls cannot be serialized (they exist only where jaxnet loaded its handlers), and a Pallas
    kernel is interpret mode on a CPU and on a GPU Triton code for one GPU generation: the jax export (for cpu and
    cuda) of such a model is the same function with XLA's convs."""
    import jax.numpy as jnp

    import jaxnet

    config = smoke(model="plain_tiny", conv_impl=impl)
    state = jaxnet.create_train_state(experiment.build_model(config), jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                      jaxnet.sgd(0.1))
    path = _export(state, config, tmp_path, ("jax",))["jax"]
    serialized = Path(path).read_bytes()
    assert b"xla.gpu.triton" not in serialized and b"JaxnetOnednn" not in serialized  # no kernel, no FFI call
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    live = export.inference_fn(state, mean=config.mean, std=config.std)
    np.testing.assert_allclose(np.asarray(export.load_jax(path)(images)), np.asarray(live(jnp.asarray(images))),
                               rtol=1e-5, atol=1e-6)


def test_onednn_run_reports_the_flops_of_its_convs(tmp_path, dataset):
    """XLA's cost analysis sees no FLOPs inside FFI calls: an onednn run's step FLOPs (and so its MFU) are those
    of the same step with XLA's convs; so are an auto run's, which runs oneDNN's convs where it is installed."""
    runs = {impl: experiment.train_and_evaluate(smoke(epochs=1.0, conv_impl=impl), tmp_path / impl, data_dir=dataset,
                                             show_progress=False)
            for impl in ("xla", "onednn", "auto")}
    assert runs["onednn"]["step_flops"] == runs["auto"]["step_flops"] == runs["xla"]["step_flops"] > 0


def test_a_run_with_xla_convs_traces_its_train_step_once(tmp_path, dataset, monkeypatch):
    """The FLOP count lowers the step the run then calls, on a batch placed as the loop's: one trace in all
    (a second one, seconds of a GPU run's fixed costs, only where custom calls hide FLOPs: see above)."""
    traces = []
    build = experiment.build_train_step

    def counted(config, total_steps):
        step = build(config, total_steps)
        return lambda state, batch: traces.append(1) or step(state, batch)

    monkeypatch.setattr(experiment, "build_train_step", counted)
    summary = experiment.train_and_evaluate(smoke(epochs=1.0, conv_impl="xla"), tmp_path / "run", data_dir=dataset,
                                            show_progress=False)
    assert summary["steps"] == 6 and summary["step_flops"] > 0 and len(traces) == 1


def test_cli_auto_with_an_installed_onednn_that_cannot_build_is_one_line(tmp_path):
    """oneDNN installed (as here) but no C++ compiler to build jaxnet's handlers with (and none built before: an
    empty cache): conv impl "auto" stops the run at its options, one line, exit 2, nothing written."""
    from jaxnet.ops import onednn

    if not onednn.installed() or jax.default_backend() != "cpu":
        pytest.skip("needs oneDNN installed (extra onednn) and a CPU backend")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CXX": str(tmp_path / "no-such-compiler"),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "experiments.cifar10", "--config", "smoke", "--workdir",
                             str(tmp_path / "w"), "--data-dir", str(tmp_path / "no-data")], capture_output=True,
                            text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-compiler" in lines[0] and "choose conv impl 'xla'" in lines[0], lines
    assert not (tmp_path / "w").exists()


def test_cli_runs_onednn_convs_in_bfloat16(tmp_path, dataset):
    """The real entry point with oneDNN's convs in bfloat16 (all three passes FFI calls): trains, evaluates and
    records the dtype; on a CPU without oneDNN bf16 kernels the test says why it cannot run."""
    require_onednn_bfloat16()
    workdir = tmp_path / "run"
    result = _run_cli("--config", "smoke", "--workdir", str(workdir), "--data-dir", str(dataset),
                      "conv_impl=onednn", "dtype=bfloat16")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["dtype"] == "bfloat16" and summary["steps"] > 0 and 0.0 <= summary["test_accuracy"] <= 1.0


def test_onednn_without_bfloat16_kernels_is_refused_before_any_data_is_read(tmp_path, monkeypatch):
    """A CPU where oneDNN has no bfloat16 convs (e.g. AMD Zen 3): the run stops at its options, one ConfigError,
    before reading data (this data dir does not exist) or creating the workdir."""
    from jaxnet.ops import onednn

    def no_bfloat16(dtype):
        if jnp.dtype(dtype) == jnp.bfloat16:
            raise onednn.OnednnError("conv impl 'onednn' has no bfloat16 convolution on this CPU")

    monkeypatch.setattr(onednn, "check_dtype", no_bfloat16)
    with pytest.raises(ConfigError, match="no bfloat16 convolution on this CPU"):
        experiment.train_and_evaluate(smoke(conv_impl="onednn", dtype="bfloat16"), tmp_path / "w",
                                      data_dir=tmp_path / "no-data", show_progress=False)
    assert not (tmp_path / "w").exists()


def test_smoke_on_eight_devices_matches_one_and_pmap(tmp_path, dataset):
    """With progressive resizing too: the resized batches are sharded over the mesh, or split for pmap, alike."""
    runs = {name: experiment.train_and_evaluate(smoke(low_res=24), tmp_path / name, data_dir=dataset,
                                             show_progress=False, parallel_mode=mode, num_devices=n)
            for name, mode, n in (("one", "jit", 1), ("jit8", "jit", 8), ("pmap8", "pmap", 8))}
    assert runs["one"]["devices"] == 1 and runs["jit8"]["devices"] == runs["pmap8"]["devices"] == 8
    for name in ("jit8", "pmap8"):
        assert abs(runs[name]["best_val_accuracy"] - runs["one"]["best_val_accuracy"]) <= 0.005, runs[name]


@pytest.mark.skipif(not SHARED_CIFAR10.exists(), reason=f"the shared CIFAR-10 copy is not at {SHARED_CIFAR10}")
def test_default_recipe_at_smoke_scale_still_learns_real_cifar10(tmp_path):
    """The default recipe (airbench's optimizer groups, lookahead EMA, whitening stem, alternating flip, TTA)
    with the tiny FastNet on 4 500 real training images, 8 epochs: 47.1 % / 50.0 % with TTA when this test was
    written (and bit-identical metrics before and after the library split). A broken recipe lands far below."""
    result = _run_cli("--config", "default", "--workdir", str(tmp_path / "run"), "--data-dir", str(SHARED_CIFAR10),
                      "model=fastnet_tiny", "train_subset=5000", "val_size=500", "test_subset=2000",
                      "batch_size=256", "eval_batch_size=500", "epochs=8.0", "--num-devices", "1", timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.42 and summary["test_accuracy_tta"] >= 0.44, summary
    # All 8 epochs ran; the test set is scored with the best-validation checkpoint, made at the end of an epoch.
    assert summary["epochs_completed"] == 8 and not summary["stopped_early"], summary
    assert summary["steps"] % (4500 // 256) == 0 and 0 < summary["steps"] <= 8 * (4500 // 256), summary


def test_resume_refuses_another_seed_or_data_and_allows_logging_changes(tmp_path, dataset):
    """A resume must repeat the math (every config field but RESUME_MAY_CHANGE, the seed, the data): the
    message names what differs. The seed also draws the validation split, so the data differs too."""
    workdir = tmp_path / "run"
    calls = iter(range(100))
    stopped = experiment.train_and_evaluate(smoke(epochs=2.0), workdir, data_dir=dataset, show_progress=False,
                                            should_stop=lambda: next(calls) >= 2)  # after step 2
    assert stopped["interrupted"] and stopped["step"] == 2
    with pytest.raises(CheckpointError, match=r"was made with another seed \(0, not 1\); data \("):
        experiment.train_and_evaluate(smoke(epochs=2.0), workdir, data_dir=dataset, seed=1, resume=True,
                                      show_progress=False)
    other = write_binary(tmp_path / "other", synthetic(n_train=600, n_test=200, seed=1))  # same shapes
    with pytest.raises(CheckpointError, match=r"was made with another data \('[0-9a-f]+', not '[0-9a-f]+'\)$"):
        experiment.train_and_evaluate(smoke(epochs=2.0), workdir, data_dir=other, resume=True, show_progress=False)
    with pytest.raises(CheckpointError, match=r"another config \(differs in epochs\)"):
        experiment.train_and_evaluate(smoke(epochs=3.0), workdir, data_dir=dataset, resume=True, show_progress=False)
    summary = experiment.train_and_evaluate(smoke(epochs=2.0, log_every=3, keep_checkpoints=1, eval_batch_size=32,
                                                  host_memory="system", checkpoint_minutes=5.0),
                                            workdir, data_dir=dataset, resume=True, show_progress=False)
    assert summary["steps"] == 12 and summary["epochs_completed"] == 2


def test_a_run_killed_before_its_first_save_can_be_started_again(tmp_path, dataset):
    """Checkpoint folders with nothing complete in them (orbax's temporary directory of a killed save): a plain
    rerun starts, and so does --resume (from step 0)."""
    for resume in (False, True):
        workdir = tmp_path / f"run-{resume}"
        (workdir / "checkpoints" / "last" / "6.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)
        (workdir / "checkpoints" / "best").mkdir()
        summary = experiment.train_and_evaluate(smoke(epochs=1.0), workdir, data_dir=dataset, resume=resume,
                                                show_progress=False)
        assert summary["steps"] == 6


def test_a_run_resumed_after_a_kill_logs_each_step_once_as_an_uninterrupted_run_does(tmp_path, dataset):
    """A kill after a run logged steps past its last checkpoint (here the later checkpoints removed, as a kill just
    before their saves leaves the workdir, and a line cut short): the resumed run logs those steps again, and its
    metrics.jsonl is then the uninterrupted run's row for row (the rows after the checkpoint and the torn line
    dropped, nothing appended twice). Before, they were there twice and the curves went back and forth."""
    config = smoke(epochs=3.0, keep_checkpoints=5)
    experiment.train_and_evaluate(config, tmp_path / "straight", data_dir=dataset, show_progress=False)
    killed = tmp_path / "killed"
    experiment.train_and_evaluate(config, killed, data_dir=dataset, show_progress=False)
    for which in ("last", "best"):
        saved = sorted(int(p.name) for p in (killed / "checkpoints" / which).iterdir() if p.name.isdigit())
        for step in saved[1:] if which == "last" else saved:
            shutil.rmtree(killed / "checkpoints" / which / str(step))
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')
    experiment.train_and_evaluate(config, killed, data_dir=dataset, resume=True, show_progress=False)
    straight = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert read_jsonl(killed / "metrics.jsonl") == straight
    assert {r["kind"] for r in straight} == {"train", "val"} and straight[-1]["step"] == 18


def test_divergence_stops_within_one_log_interval_and_keeps_the_last_good_checkpoint(tmp_path, dataset):
    """lr 1e6 from the third epoch on (1e-6·1e6 before): exit 1, one line naming the quantity and the step, and
    every checkpoint left is readable with finite parameters, the newest from before the divergence."""
    workdir = tmp_path / "run"
    result = _run_cli("--config", "smoke", "optimizer=sgd", "lr=1000000.0", "lookahead_every=0", "epochs=10.0",
                      "schedule_points=((0.0, 1e-12), (0.2, 1e-12), (0.2001, 1.0), (1.0, 1.0))",
                      "--workdir", str(workdir), "--data-dir", str(dataset), timeout=200)
    errors = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-2000:]
    assert "training loss is nan at step" in errors[0] and "Traceback" not in result.stderr
    diverged_at = int(errors[0].rsplit(" ", 1)[1])
    step, arrays = _last_arrays(workdir)
    assert 12 <= step < diverged_at <= step + 6 + 2  # within one epoch and one log interval (2) of the last save
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(arrays["params"]))


def test_a_state_with_non_finite_parameters_is_never_saved(tmp_path):
    """A step whose loss is still finite but whose update made the parameters NaN: fit raises before saving."""
    import jax.numpy as jnp

    from jaxnet import checkpoint as checkpoint_lib
    from jaxnet.errors import TrainingDiverged

    state = jaxnet_state()
    images, labels = jnp.zeros((8, 32, 32, 3), jnp.uint8), jnp.zeros((8,), jnp.int32)

    def poisoned_step(state, batch):
        metrics = {"loss": jnp.float32(1.0), "accuracy": jnp.float32(0.0), "count": jnp.int32(8)}
        return state.replace(step=state.step + 1, params=jax.tree.map(lambda p: p * jnp.nan, state.params)), metrics

    data = loop.TrainData(images, labels, lambda key, im, lb, idx, epoch: {"image": im[idx], "label": lb[idx]}, 4,
                          jax.random.key(0))
    ckpt = checkpoint_lib.Checkpointer(tmp_path / "ckpt")
    with pytest.raises(TrainingDiverged, match="parameters are not finite after step 2"):
        loop.fit(state, poisoned_step, data, 4, checkpointer=ckpt, options=loop.FitOptions(show_progress=False))
    ckpt.close()
    assert not [p for p in (tmp_path / "ckpt" / "last").iterdir() if p.name.isdigit()]


@pytest.mark.parametrize("interval,last,best", [(0.0, [2, 4, 6], [6]), (1e-9, [2, 4, 6], [6]),
                                                 (3600.0, [2, 6], [6])])
def test_checkpoint_interval_spaces_the_saves_but_keeps_every_best_and_the_end(tmp_path, interval, last, best):
    """3 epochs of 2 steps whose validation accuracy goes 0.5, 0.4, 0.6: checkpoint_interval 0 (or any time at
    all) saves every epoch; an hour apart, only the improving first and last epochs, each as "best" too, and
    the run's end; the time spent saving is reported."""
    import jax.numpy as jnp

    from jaxnet import checkpoint as checkpoint_lib, loop

    def step(state, batch):
        return state.replace(step=state.step + 1), {"loss": jnp.float32(1.0), "accuracy": jnp.float32(0.5),
                                                     "count": jnp.int32(4)}

    def eval_step(state, batch):
        return {"loss": jnp.float32(1.0), "accuracy": jnp.array([0.0, 0.0, 0.5, 0.0, 0.4, 0.0, 0.6])[state.step],
                "count": jnp.int32(1)}

    images, labels = jnp.zeros((8, 32, 32, 3), jnp.uint8), jnp.zeros((8,), jnp.int32)
    data = loop.TrainData(images, labels, lambda key, im, lb, idx, epoch: {"image": im[idx], "label": lb[idx]}, 4,
                          jax.random.key(0))
    ckpt = checkpoint_lib.Checkpointer(tmp_path / "ckpt", keep=5)
    result = loop.fit(jaxnet_state(), step, data, 6, eval_step=eval_step, val_batches=lambda: [None],
                      checkpointer=ckpt, options=loop.FitOptions(show_progress=False, checkpoint_interval=interval))
    ckpt.close()
    assert result.best_val_accuracy == pytest.approx(0.6) and 0 < result.checkpoint_seconds < result.train_seconds
    for which, steps in (("last", last), ("best", best)):
        assert sorted(int(p.name) for p in (tmp_path / "ckpt" / which).iterdir() if p.name.isdigit()) == steps


@pytest.mark.parametrize("finished,updates", [(True, [4] * 7), (False, [12, 12, 4])])
def test_the_progress_bar_counts_finished_steps_not_dispatched_ones(monkeypatch, finished, updates):
    """7 steps of 4 images, metrics fetched every 3 steps: a step whose metrics are computed moves the bar at
    once; one still running (asynchronous dispatch) only when its metrics are fetched."""
    import jax.numpy as jnp

    from jaxnet import loop

    class Bar:
        def __init__(self, total, desc, enabled):
            self.total, self.updates = total, []

        def update(self, n):
            self.updates.append(n)

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            bars.append(self)

    def step(state, batch):
        return state.replace(step=state.step + 1), {"loss": jnp.float32(1.0), "accuracy": jnp.float32(0.5),
                                                     "count": jnp.int32(4)}

    bars = []
    monkeypatch.setattr(loop, "progress", Bar)
    monkeypatch.setattr(loop, "_done", lambda metrics: finished)
    images, labels = jnp.zeros((28, 32, 32, 3), jnp.uint8), jnp.zeros((28,), jnp.int32)
    data = loop.TrainData(images, labels, lambda key, im, lb, idx, epoch: {"image": im[idx], "label": lb[idx]}, 4,
                          jax.random.key(0))
    loop.fit(jaxnet_state(), step, data, 14, options=loop.FitOptions(log_every=3))
    assert [bar.updates for bar in bars] == [updates, updates] and all(bar.total == 28 for bar in bars)


@pytest.mark.parametrize("make,message", [
    (lambda data: loop.TrainData(**data, batch_size=0), "TrainData batch_size must be a positive integer, got 0"),
    (lambda data: loop.FitOptions(log_every=0), "FitOptions log_every must be a positive integer, got 0"),
    (lambda data: loop.FitOptions(patience=-1), "FitOptions patience must be an integer >= 0 or None, got -1"),
    (lambda data: loop.FitOptions(checkpoint_interval=-60.0), "FitOptions checkpoint_interval must be >= 0"),
    (lambda data: loop.fit(None, None, loop.TrainData(**data, batch_size=4), 2.5),
     "fit total_steps must be an integer"),
], ids=["batch_0", "log_every_0", "patience_negative", "interval_negative", "steps_float"])
def test_the_loops_options_refuse_values_out_of_range_in_one_line(make, message):
    """A batch of 0 was a ZeroDivisionError inside fit, log_every=0 a modulo by zero at the first step."""
    with pytest.raises(ConfigError, match=message):
        make({"images": jnp.zeros((8, 4, 4, 3), jnp.uint8), "labels": jnp.zeros((8,), jnp.int32),
              "make_batch": lambda *args: None, "key": jax.random.key(0)})


def test_progressive_resizing_feeds_each_step_its_size_and_compiles_once_per_size():
    """fit with `image_size`: of 7 steps the first 4 get 24 × 24 images, the rest 32 × 32; a user's model (global
    pooling, so any size) with Flax's own TrainState, stepped by jaxnet.train_step under jit, compiles once per
    size, and so does the batch function."""
    import flax.linen as nn
    import jax.numpy as jnp
    import optax
    from flax.training import train_state

    import jaxnet
    from jaxnet import loop, parallel

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(10)(nn.relu(nn.Conv(4, (3, 3))(x)).mean((1, 2)))

    model = Net()
    state = train_state.TrainState.create(apply_fn=model.apply, tx=optax.sgd(0.1),
                                          params=model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
    sizes = []

    def gather(key, images, labels, indices, epoch, size=None):
        image = images[indices].astype(jnp.float32)
        return {"image": image if size is None else data.resize(image, size), "label": labels[indices]}

    chex.clear_trace_counter()
    make_batch = parallel.jit_batch_fn(chex.assert_max_traces(gather, n=2), static_argnames=("size",))
    step = jax.jit(chex.assert_max_traces(jaxnet.train_step, n=2))

    def spy_step(state, batch):
        sizes.append(batch["image"].shape[1])
        return step(state, batch)

    rng = np.random.default_rng(0)
    images, labels = jnp.asarray(rng.integers(0, 256, (16, 32, 32, 3), np.uint8)), jnp.arange(16) % 10
    train_data = loop.TrainData(images, labels, make_batch, 4, jax.random.key(1),
                                image_size=lambda s: 24 if s < 4 else None)
    result = loop.fit(state, spy_step, train_data, 7, options=loop.FitOptions(show_progress=False, log_every=3))
    assert sizes == [24] * 4 + [32] * 3  # and each function traced (so compiled) twice at most: once per size
    assert int(result.state.step) == 7 and isinstance(result.state, train_state.TrainState)


def test_the_loop_keeps_at_most_two_steps_in_flight():
    """JAX dispatches steps asynchronously: unchecked, fit ran `log_every` steps ahead of the device and then
    blocked fetching them, and a SIGTERM's handler waited for all of them (73 s for 10-s steps, 2026-12-06).
    With slow steps (a chain of matmuls) and a long log interval, each step is dispatched with at most
    `loop.IN_FLIGHT` (2) earlier ones unfinished; the spy counts them at every dispatch."""
    from jaxnet import loop

    @jax.jit
    def slow_step(state, batch):
        m = jnp.full((384, 384), 1e-3, jnp.float32) + batch["image"][0, 0, 0, 0]
        loss = jax.lax.fori_loop(0, 200, lambda _, x: x @ m, m).sum()
        return state.replace(step=state.step + 1), {"loss": loss * 0, "accuracy": loss * 0, "count": jnp.int32(4)}

    dispatched = []

    def spy_step(state, batch):
        dispatched.append(sum(not m["loss"].is_ready() for m in outputs))
        out = slow_step(state, batch)
        outputs.append(out[1])
        return out

    outputs = []
    images, labels = jnp.zeros((64, 32, 32, 3), jnp.uint8), jnp.zeros((64,), jnp.int32)
    # Jitted, as the experiment's batch function is: op by op, CPU ops run inline wait for the queued steps.
    gather = jax.jit(lambda key, images, labels, indices, epoch: {"image": images[indices].astype(jnp.float32),
                                                                  "label": labels[indices]})
    data = loop.TrainData(images, labels, gather, 4, jax.random.key(0))
    slow_step(jaxnet_state(), gather(None, images, labels, jnp.arange(4), 0))  # compiled outside the count
    result = loop.fit(jaxnet_state(), spy_step, data, 14, options=loop.FitOptions(show_progress=False, log_every=14))
    assert int(result.state.step) == 14
    assert max(dispatched) == loop.IN_FLIGHT, dispatched  # 2: the device is kept fed, and no more (5 unbounded)


def test_the_steady_step_time_spans_the_image_sizes_and_leaves_compilation_out(monkeypatch):
    """With progressive resizing a step's steady time (so the summary's img/s and FLOP/s) is the run's: each
    size's median window weighted by its steps, not the median of all windows (the size with more of them);
    compilation is the first step less a steady step of its size. A fake clock: a 16-pixel step takes 1 s, a
    32-pixel one 3 s, the first at each size 100 s more; 26 of 40 steps small, windows of 4 steps."""
    from types import SimpleNamespace

    import jax.numpy as jnp

    from jaxnet import loop

    now, compiled = [0.0], set()

    def step(state, batch):
        size = batch["image"].shape[1]
        now[0] += (1.0 if size == 16 else 3.0) + (0.0 if size in compiled else 100.0)
        compiled.add(size)
        return state.replace(step=state.step + 1), {"loss": jnp.float32(1.0), "accuracy": jnp.float32(0.5),
                                                     "count": jnp.int32(4)}

    def gather(key, images, labels, indices, epoch, size=None):
        return {"image": images[indices] if size is None else images[indices][:, :size, :size],
                "label": labels[indices]}

    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    images, labels = jnp.zeros((160, 32, 32, 3), jnp.uint8), jnp.zeros((160,), jnp.int32)
    data = loop.TrainData(images, labels, gather, 4, jax.random.key(0), image_size=lambda s: 16 if s < 26 else None)
    result = loop.fit(jaxnet_state(), step, data, 40, options=loop.FitOptions(show_progress=False, log_every=4))
    assert result.steady_step_seconds == pytest.approx((26 * 1.0 + 14 * 3.0) / 40)
    assert result.first_step_seconds == 101.0 and result.compile_seconds == pytest.approx(100.0)


def test_a_step_compiled_before_the_run_reports_no_compilation_rather_than_a_negative_one(monkeypatch):
    """A step compiled before `fit` (a time budget's timing, the persistent compilation cache) makes a first call no
    slower than the rest: `make run`'s summary said compile_seconds -0.29. A fake clock: the first step 0.9 s, then
    1.0 s each."""
    from types import SimpleNamespace

    from jaxnet import loop

    now, calls = [0.0], []

    def step(state, batch):
        now[0] += 0.9 if not calls else 1.0
        calls.append(1)
        return state.replace(step=state.step + 1), {"loss": jnp.float32(1.0), "accuracy": jnp.float32(0.5),
                                                     "count": jnp.int32(4)}

    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    images, labels = jnp.zeros((40, 32, 32, 3), jnp.uint8), jnp.zeros((40,), jnp.int32)
    data = loop.TrainData(images, labels, lambda key, im, lb, idx, epoch: {"image": im[idx], "label": lb[idx]}, 4,
                          jax.random.key(0))
    result = loop.fit(jaxnet_state(), step, data, 10, options=loop.FitOptions(show_progress=False, log_every=5))
    assert result.first_step_seconds == pytest.approx(0.9) and result.steady_step_seconds == pytest.approx(1.0)
    assert result.compile_seconds == 0.0


def test_a_plan_from_replan_changes_the_run_from_the_next_step(tmp_path, monkeypatch):
    """fit asks `replan` at the end of each epoch but the last (2 steps an epoch, 6 steps planned): the first
    answer makes it a run of 9 steps with another train step, whose first call (it compiles: 100 s on a fake
    clock) stays out of the step timings, and another meta, which the checkpoints carry from that epoch on;
    the pace it is given is that of the steps after the first."""
    from types import SimpleNamespace

    import jax.numpy as jnp

    from jaxnet import checkpoint as checkpoint_lib

    now, used, asked = [0.0], [], []

    def stepper(name, compile_seconds):
        def step(state, batch):
            now[0] += 1.0 + (compile_seconds if name not in used else 0.0)
            used.append(name)
            return state.replace(step=state.step + 1), {"loss": jnp.float32(1.0), "accuracy": jnp.float32(0.5),
                                                         "count": jnp.int32(4)}
        return step

    def replan(state, step, pace):
        asked.append((step, pace))
        return None if len(asked) > 1 else loop.Plan(9, stepper("new", 100.0), state, None, {"plan": "new"})

    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    images, labels = jnp.zeros((8, 32, 32, 3), jnp.uint8), jnp.zeros((8,), jnp.int32)
    data = loop.TrainData(images, labels, lambda key, im, lb, idx, epoch: {"image": im[idx], "label": lb[idx]}, 4,
                          jax.random.key(0))
    ckpt = checkpoint_lib.Checkpointer(tmp_path / "ckpt", keep=10)
    result = loop.fit(jaxnet_state(), stepper("old", 50.0), data, 6, checkpointer=ckpt, meta={"plan": "old"},
                      replan=replan, options=loop.FitOptions(show_progress=False, log_every=2))
    ckpt.close()
    metas = {int(p.name): json.loads((p / "meta" / "metadata").read_text())["plan"]
             for p in (tmp_path / "ckpt" / "last").iterdir() if p.name.isdigit()}
    assert int(result.state.step) == 9 and used == ["old"] * 2 + ["new"] * 7
    assert [step for step, _ in asked] == [2, 4, 6, 8] and asked[0][1] == 1.0
    assert metas == {2: "new", 4: "new", 6: "new", 8: "new", 9: "new"}
    assert result.steady_step_seconds == 1.0 and result.compile_seconds == 50.0


def jaxnet_state():
    import jax.numpy as jnp

    import jaxnet
    from jaxnet import models

    return jaxnet.create_train_state(models.PlainCNNTiny(), jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                     jaxnet.sgd(0.1))


def test_budget_steps_keeps_a_run_that_fits_cuts_one_that_does_not_and_lengthens_one_up_to_its_most():
    """72 s of room, a step 1 s (2 s), a run of another length compiling 5.5 s more."""
    steps = partial(experiment.budget_steps, 72.0, cost=lambda n: 1.0 * n, recompile=5.5)
    assert steps(planned=50, most=50) == 50 and steps(planned=72, most=72) == 72
    assert steps(planned=73, most=73) == 66  # cut: the shorter run's compilation comes out of the 72 s
    assert experiment.budget_steps(72.0, cost=lambda n: 2.0 * n, planned=73, most=73, recompile=5.5) == 33
    assert steps(planned=50, most=100) == 66 and steps(planned=50, most=60) == 60  # lengthened: up to its most
    assert steps(planned=66, most=100) == 66  # 66 fit; 67 would not beside a recompilation
    assert steps(planned=73, most=73, least=70) == 69  # none from 70 on fit: least - 1
    assert experiment.budget_steps(5.0, cost=lambda n: 1.0 * n, planned=10, most=10, recompile=0.0, least=1) == 5
    assert experiment.budget_steps(0.5, cost=lambda n: 1.0 * n, planned=10, most=10, recompile=0.0) == 0


def test_a_run_planned_again_scales_the_estimate_by_its_own_pace():
    """Planned again at step 10 of 50: the run's steps took 3 s against the 2 s estimated (scale 1.5); 100 s
    left, the test's 10 out, 5 % in reserve: 85.5 s. 40 more steps (120 s) do not fit: 27 (81 s, and the
    recompilation's 4) do; with 300 s left all 50 fit and more would, up to the config's `most`; with 12 s
    left none fit, and the run ends at the next step, its schedule's end."""
    times = experiment.RunTimes(step={None: 2.0}, validation=0.0, test=10.0, compile=4.0)
    again = partial(experiment.replanned_steps, smoke(val_size=0), times, step=10, pace=3.0, total_steps=50)
    assert again(left=100.0, most=50) == (37, 1.5)
    assert again(left=300.0, most=50) == (50, 1.5) and again(left=300.0, most=80) == (80, 1.5)
    assert again(left=300.0, most=200) == (100, 1.5)
    assert again(left=12.0, most=50) == (11, 1.5)


def test_a_run_planned_again_compares_its_pace_with_the_steps_it_ran():
    """With progressive resizing the first steps ran at low resolution (1 s estimated; full size 2 s): a pace of
    1.5 s is 1.5× the estimate of the steps it measured, and the steps left are costed at their own sizes."""
    times = experiment.RunTimes(step={None: 2.0, 16: 1.0}, validation=0.0, test=0.0, compile=0.0)
    config = smoke(val_size=0, low_res=16)  # low_res_fraction 0.5: of 40 steps the first 20 at 16 px
    steps, scale = experiment.replanned_steps(config, times, left=1000.0, step=8, pace=1.5, total_steps=40, most=40)
    assert scale == 1.5 and steps == 40
    assert experiment.plan_seconds(config, times, 40, 8, 40) == 12 * 1.0 + 20 * 2.0
    assert experiment.plan_seconds(config, times, 10, 8, 10) == 2 * 2.0  # 5 low steps, all run: the rest full


def test_a_resized_run_plans_again_after_its_first_epoch_and_its_first_whole_full_size_epoch():
    """40 steps, 8 an epoch, the first 20 at 16 px; an epoch's end is (steps done, seconds since the first step
    ended). The first end plans from the steps after the first; the second plan waits for an epoch whose steps
    were all full size (24 to 31: the one from 16 to 23 resized, and compiled the full-size step) and takes that
    epoch's pace alone; there is no third. A run that does not resize plans once."""
    config = smoke(val_size=0, low_res=16)
    ends = [(8, 14.0), (16, 30.0), (24, 60.0), (32, 100.0)]
    window = partial(experiment.replan_window, config, 40)
    assert window(ends[:1], 0) == (1, 2.0)
    assert window(ends[:2], 1) is None and window(ends[:3], 1) is None
    assert window(ends, 1) == (24, 5.0)
    assert window(ends, 2) is None
    assert experiment.replan_window(smoke(val_size=0), 40, ends, 1) is None


def test_a_run_planned_again_past_its_resizing_costs_only_full_size_steps_and_does_not_resize_again():
    """At step 32 of 40 (the first 20 at 16 px, estimated 1 s; full size 2 s), steps 24 to 31 took 3 s each:
    1.5× the estimate. With room for many more, the run lengthens only as far as keeps its resized steps behind
    it (65: 32 of them resize, round half to even; 66 would resize 33, one at 16 px again after the switch); before
    the switch it lengthens to its most. With 20 s left (19 after the reserve) 6 more steps fit: 38."""
    times = experiment.RunTimes(step={None: 2.0, 16: 1.0}, validation=0.0, test=0.0, compile=0.0)
    config = smoke(val_size=0, low_res=16)
    steps, scale = experiment.replanned_steps(config, times, left=1000.0, step=32, pace=3.0, total_steps=40,
                                              most=100, since=24)
    assert scale == 1.5 and steps == 65 and experiment.low_res_steps(config, 65) == 32
    assert experiment.replanned_steps(config, times, left=1000.0, step=8, pace=1.5, total_steps=40,
                                      most=100) == (100, 1.5)
    assert experiment.replanned_steps(config, times, left=20.0, step=32, pace=3.0, total_steps=40, most=100,
                                      since=24) == (38, 1.5)


def test_time_run_parts_times_a_train_step_past_its_slow_first_runs(monkeypatch):
    """A fake clock: the compiling call takes 10 s, the train step's next runs 3, then 2 and 2 s; the eval step
    runs 4 s. A train step is the median of three runs (2 s, not the first run's 3), compile what the first calls
    took beyond a run; the train steps run on a copy of the state (the step donates it)."""
    durations = iter([10.0, 3.0, 2.0, 2.0, 7.0, 4.0])
    clock = [0.0]
    monkeypatch.setattr(experiment.time, "perf_counter", lambda: clock[0])
    states = []

    def train_step(state, batch):
        clock[0] += next(durations)
        states.append(state)
        return state + 1, {"loss": state}

    def eval_step(state, batch):
        clock[0] += next(durations)
        return {"loss": state}

    state = jnp.zeros(())
    parts = experiment.time_run_parts(train_step, {0: eval_step}, state, {None: "batch"}, "batch")
    assert parts == {"compile": 8.0 + 3.0, "step": {None: 2.0}, "eval": {0: 4.0}}
    assert len(states) == 4 and states[0] is not state and float(states[-1]) == 3.0


@pytest.mark.parametrize("tta_level", [2, 0])
def test_the_test_split_is_evaluated_in_one_pass(tmp_path, dataset, monkeypatch, tta_level):
    """The test accuracy without TTA is the TTA step's plain view: one pass over the test split gives both (and
    with tta_level 0 both are the plain step's)."""
    calls, evaluate = [], loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a: calls.append(evaluate(*a)) or calls[-1])
    summary = experiment.train_and_evaluate(smoke(val_size=0, epochs=1.0, tta_level=tta_level), tmp_path / "w",
                                            data_dir=dataset, show_progress=False)
    assert len(calls) == 1 and calls[0]["count"] == summary["config"]["test_subset"]
    assert summary["test_accuracy"] == calls[0]["plain_accuracy" if tta_level else "accuracy"]
    assert summary["test_accuracy_tta"] == calls[0]["accuracy"]


def test_a_time_budget_the_run_fits_in_changes_nothing(tmp_path, dataset):
    """With a budget it fits in, the run times its steps (both image sizes and the evaluations) on a copy of its
    state first, then ends exactly as without a budget: the same steps, bit-identical parameters."""
    plain = experiment.train_and_evaluate(smoke(low_res=20, val_size=0), tmp_path / "plain", data_dir=dataset,
                                          show_progress=False)
    timed = experiment.train_and_evaluate(smoke(low_res=20, val_size=0, time_budget=600.0), tmp_path / "timed",
                                          data_dir=dataset, show_progress=False)
    assert timed["steps"] == plain["steps"] == 32 and timed["config"]["epochs"] == plain["config"]["epochs"]
    assert timed["test_accuracy_tta"] == plain["test_accuracy_tta"]
    chex.assert_trees_all_equal(_last_arrays(tmp_path / "plain"), _last_arrays(tmp_path / "timed"))


def test_timing_a_budget_compiles_no_batch_function_of_its_own(tmp_path, dataset, monkeypatch):
    """The budget's timed steps run on batches made as the loop makes them, `size` left out as the loop leaves it
    out without progressive resizing: the batch function is traced (so compiled) once in the whole run."""
    traced, train_batch = [], data.train_batch
    monkeypatch.setattr(data, "train_batch", lambda *a, **k: traced.append(k.get("size")) or train_batch(*a, **k))
    summary = experiment.train_and_evaluate(smoke(val_size=0, time_budget=600.0), tmp_path / "w", data_dir=dataset,
                                            show_progress=False)
    assert summary["steps"] == 32 and traced == [None]


def test_a_time_budget_too_short_trains_fewer_epochs_and_a_resume_keeps_them(tmp_path, dataset, monkeypatch):
    """A budget the run does not fit in (budget_steps: 9 of its 32 steps fit) makes it a run of 9 steps, 1.125
    epochs of 8, saved with its checkpoints as its config; stopped and resumed with the same command line, it
    keeps them and does not time its steps again."""
    monkeypatch.setattr(experiment, "budget_steps", lambda room, **plan: 9)
    config, calls = smoke(time_budget=1.0, val_size=0), {"n": 0}

    def stop_after_4_steps():
        calls["n"] += 1
        return calls["n"] >= 5  # once before training, then after each step

    out = experiment.train_and_evaluate(config, tmp_path / "w", data_dir=dataset, should_stop=stop_after_4_steps,
                                        show_progress=False)
    assert out == {"interrupted": True, "step": 4}
    monkeypatch.setattr(experiment, "time_run_parts", lambda *a, **k: pytest.fail("the resumed run timed again"))
    summary = experiment.train_and_evaluate(config, tmp_path / "w", data_dir=dataset, resume=True,
                                            show_progress=False)
    assert summary["steps"] == 9 and summary["config"]["epochs"] == 9 / 8 and summary["config"]["time_budget"] == 1.0
    assert config.epochs == 4.0  # the caller's config is left as it was


def test_a_budgeted_run_is_planned_again_from_its_own_pace_and_a_resume_keeps_that_plan(tmp_path, dataset,
                                                                                          monkeypatch, caplog):
    """The estimate says a step takes 30 s (fake timings), so only part of the 32 steps fit in 10 minutes; after
    the first epoch (8 steps) the run's own pace, far faster, says all fit: it trains all 32, with their
    schedule, and its checkpoints carry the 4 epochs from then on. Stopped right after that first epoch and
    resumed with the same command line, it keeps that plan, times nothing again and ends bit-identical to the
    run that was not stopped."""
    def fake_times(train_step, eval_steps, state, train_batches, eval_batch, **repeats):
        return {"compile": 1.0, "step": {size: 30.0 for size in train_batches}, "eval": dict.fromkeys(eval_steps, 0.01)}

    monkeypatch.setattr(experiment, "time_run_parts", fake_times)
    config, calls = smoke(time_budget=10.0, val_size=0), {"n": 0}

    def stop_after_the_first_epoch():
        calls["n"] += 1
        return calls["n"] >= 9  # once before training, then after each step but an epoch's last, then at its end

    with caplog.at_level("INFO", logger="jaxnet.experiment"):
        out = experiment.train_and_evaluate(config, tmp_path / "w", data_dir=dataset,
                                            should_stop=stop_after_the_first_epoch, show_progress=False)
    assert out == {"interrupted": True, "step": 8}
    timing = caplog.text.index("time_budget 10 min: timing this machine's train and eval steps first")
    assert timing < caplog.text.index(" of 32 steps fit")  # said before the silent minutes, not after
    first = int(caplog.text.split("time_budget 10 min: ")[2].split(" of 32 steps fit")[0])
    assert 8 < first < 32 and f"32 steps instead of {first}, planned again at step 8" in caplog.text
    saved = json.loads((tmp_path / "w" / "checkpoints" / "last" / "8" / "meta" / "metadata").read_text())
    assert saved["config"]["epochs"] == 4.0
    monkeypatch.setattr(experiment, "time_run_parts", lambda *a, **k: pytest.fail("the resumed run timed again"))
    summary = experiment.train_and_evaluate(config, tmp_path / "w", data_dir=dataset, resume=True,
                                            show_progress=False)
    assert summary["steps"] == 32 and summary["config"]["epochs"] == 4.0
    monkeypatch.setattr(experiment, "time_run_parts", fake_times)
    whole = experiment.train_and_evaluate(config, tmp_path / "whole", data_dir=dataset, show_progress=False)
    assert whole["steps"] == 32 and whole["config"]["epochs"] == 4.0
    chex.assert_trees_all_equal(_last_arrays(tmp_path / "w"), _last_arrays(tmp_path / "whole"))


def test_a_resized_budgeted_run_plans_again_after_its_first_whole_full_size_epoch(tmp_path, dataset, monkeypatch):
    """48 steps configured, 8 an epoch, the first half at 16 px; the estimate (30 s a step) cuts them to fit 10
    minutes. Planned again at the first epoch's end (a scripted plan: 40 steps, so 20 resized), the run plans once
    more at step 32, the first end after a whole full-size epoch (24 to 31), from that epoch (a scripted plan: 36),
    and trains those 36 steps, its summary saying so."""
    def fake_times(train_step, eval_steps, state, train_batches, eval_batch, **repeats):
        return {"compile": 1.0, "step": {size: 30.0 for size in train_batches}, "eval": dict.fromkeys(eval_steps, 0.01)}

    plans, calls = iter([40, 36]), []

    def scripted(config, times, *, left, step, pace, total_steps, most, since=1):
        calls.append((step, since, total_steps, most, config.epochs))
        return next(plans), 1.0

    monkeypatch.setattr(experiment, "time_run_parts", fake_times)
    monkeypatch.setattr(experiment, "replanned_steps", scripted)
    summary = experiment.train_and_evaluate(smoke(time_budget=10.0, val_size=0, low_res=16, epochs=6.0),
                                            tmp_path / "w", data_dir=dataset, show_progress=False)
    first = calls[0][2]
    assert 8 < first < 40 and calls == [(8, 1, first, 48, first / 8), (32, 24, 40, 48, 5.0)]
    assert summary["steps"] == 36 and summary["config"]["epochs"] == 4.5


def test_a_time_budget_too_short_for_one_step_is_one_line_before_training(tmp_path, dataset):
    with pytest.raises(ConfigError, match=r"^time_budget 0.001 min leaves no time to train: data, compilation and "
                                          r"evaluation take [\d.]+ min here, a step [\d.]+ s$"):
        experiment.train_and_evaluate(smoke(time_budget=0.001), tmp_path / "w", data_dir=dataset, show_progress=False)
    assert not [p for p in (tmp_path / "w").rglob("*") if p.name.isdigit()]  # no checkpoint


def test_too_little_disk_space_is_one_line_before_training(tmp_path, dataset, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(experiment.shutil, "disk_usage", lambda path: SimpleNamespace(free=2**20))  # 1 MB free
    with pytest.raises(ConfigError, match=r"has 1 MB free; this run's checkpoints and logs need about \d+ MB"):
        experiment.train_and_evaluate(smoke(), tmp_path / "w", data_dir=dataset, show_progress=False)
    assert not (tmp_path / "w").exists()


def test_a_stop_asked_for_while_the_data_is_read_ends_before_training(tmp_path, dataset):
    out = experiment.train_and_evaluate(smoke(), tmp_path / "w", data_dir=dataset, should_stop=lambda: True,
                                        show_progress=False)
    assert out == {"interrupted": True, "step": None}
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_save_that_fails_mid_run_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path, dataset, monkeypatch):
    """The disk fills after the first epoch's checkpoint: the next save is a CheckpointError naming the
    checkpoint and the cause, and the first checkpoint stays complete and readable."""
    from jaxnet import checkpoint as checkpoint_lib

    saves = {"n": 0}
    original = ocp.CheckpointManager.save

    def filling_up(self, step, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] > 2:  # the first epoch's "last" and "best"
            raise OSError(28, "No space left on device")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", filling_up)
    workdir = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*/last/12: No space left on device"):
        experiment.train_and_evaluate(smoke(epochs=3.0), workdir, data_dir=dataset, show_progress=False)
    assert sorted(p.name for p in (workdir / "checkpoints" / "last").iterdir()) == ["6"]
    assert int(checkpoint_lib.read_arrays(workdir / "checkpoints" / "last" / "6")["step"]) == 6
