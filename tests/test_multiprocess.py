"""The experiment's real entry point on several processes (JAX's multi-process runtime over gloo on
127.0.0.1): equal to one process with as many devices, stopped and resumed together, and resume semantics."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import pytest
from fixtures import synthetic, write_binary
from processes import finish, free_port

from jaxnet import checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_binary(tmp_path_factory.mktemp("cifar"), synthetic(n_train=600, n_test=200))


def _env(devices):
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _start(dataset, workdirs, *args, own=None):
    """One `python -m experiments.cifar10` per workdir, as the processes of one run (1 device each); `own[i]`:
    arguments for process i only."""
    port, n = free_port(), len(workdirs)
    own = own or [()] * n
    return [subprocess.Popen([sys.executable, "-m", "experiments.cifar10", "--config", "smoke", "--data-dir",
                              str(dataset), "--workdir", str(w), "--coordinator", f"127.0.0.1:{port}",
                              "--num-processes", str(n), "--process-id", str(i), *args, *own[i]],
                             cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
            for i, w in enumerate(workdirs)]


def _why(stderr: str) -> str:
    """A failed process's stderr for an assertion message: without progress bars and native stack frames (an
    abort's trace would push the cause out of the message), the last 2000 characters."""
    return "\n".join(line for line in stderr.splitlines()
                     if "|" not in line and not line.lstrip().startswith("@"))[-2000:]


def _stop_all(procs) -> list[tuple[int, str]]:
    """Kill the processes still running (-9); every process's exit code and `_why`."""
    for p in procs:
        p.kill()
    return [(r[0], _why(r[2])) for r in finish(procs)]


def _one_process(dataset, workdir, *args):
    return subprocess.run([sys.executable, "-m", "experiments.cifar10", "--config", "smoke", "--data-dir",
                           str(dataset), "--workdir", str(workdir), *args], cwd=ROOT, env=_env(2),
                          capture_output=True, text=True, timeout=300)


def _last(workdir):
    """(step, arrays) of the newest checkpoint."""
    ckpt = Path(workdir) / "checkpoints" / "last"
    step = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    return step, checkpoint.read_arrays(ckpt / str(step))


def test_two_processes_equal_one_process_with_two_devices(tmp_path, dataset):
    """Also with the splits (128 validation, 192 test images) smaller than the eval batch: one batch each, its
    rows shared between the processes. Without the compilation cache it names: on CPU the processes cannot share
    one (and on jaxlib 0.12.1 one loaded by process 0 hung the runs after the first), said once by process 0."""
    procs = _start(dataset, [tmp_path / "p0", tmp_path / "p1"], "--export", "jax", "eval_batch_size=256",
                   "--compilation-cache", str(tmp_path / "xla"))
    one = _one_process(dataset, tmp_path / "one", "eval_batch_size=256")
    results = finish(procs)
    assert [r[0] for r in results] == [0, 0], [_why(r[2]) for r in results]
    assert one.returncode == 0, _why(one.stderr)
    two, single = (json.loads((tmp_path / w / "summary.json").read_text()) for w in ("p0", "one"))
    assert two["processes"] == 2 and two["devices"] == 2 and single["devices"] == 2
    for key in ("test_accuracy", "test_accuracy_tta", "best_val_accuracy", "steps"):
        assert two[key] == single[key], key
    (step_a, a), (step_b, b) = _last(tmp_path / "p0"), _last(tmp_path / "one")
    assert step_a == step_b == 24
    chex.assert_trees_all_close(a["params"], b["params"], atol=1e-6, rtol=1e-6)
    assert (tmp_path / "p0" / "model.jaxexport").exists() and (tmp_path / "p0" / "curves.png").exists()
    assert not (tmp_path / "p1").exists()  # process 0 writes every output; the others write nothing
    assert "process 1 of 2" in results[1][1]
    assert not (tmp_path / "xla").exists()
    assert [r[2].count("note: no compilation cache in a run of several processes on CPU") for r in results] == [1, 0]


@pytest.mark.parametrize("own", [[["epochs=1.0"], ["epochs=2.0"]], [["--seed", "1"], []],
                                 [[], ["--num-processes", "3"]], [[], ["--parallel", "pmap"]]],
                         ids=["config", "seed", "num-processes", "parallel"])
def test_processes_started_differently_each_stop_in_one_line_before_writing_anything(tmp_path, dataset, own):
    """Processes of one run with different configs, seeds or parallel flags would train different programs (or
    wait for each other at collectives that never match; a process count that differs went unnoticed): each
    says so in one line and exits 2 before training, with no workdir written, and none hangs at JAX's shutdown."""
    workdirs = [tmp_path / "p0", tmp_path / "p1"]
    results = finish(_start(dataset, workdirs, own=own), timeout=120)
    for code, _, stderr in results:
        ours = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert code == 2 and "Traceback" not in stderr, _why(stderr)
        assert len(ours) == 1 and "differs between processes (process 0 vs [1])" in ours[0], _why(stderr)
    assert not any(w.exists() for w in workdirs)


@pytest.mark.parametrize("failing", [1, 0], ids=["worker", "coordinator"])
def test_a_process_whose_data_is_missing_stops_every_process_in_one_line(tmp_path, dataset, failing):
    """One host without the data: every process stops at once, exit 2, one line each (the others name the failed
    process and quote its line), before writing anything. Before, the others waited at their next collective:
    a traceback, or JAX's runtime ending them with its own stack trace."""
    workdirs = [tmp_path / "p0", tmp_path / "p1"]
    own = [[], []]
    own[failing] = ["--data-dir", str(tmp_path / "missing")]
    results = finish(_start(dataset, workdirs, own=own), timeout=120)
    for i, (code, _, stderr) in enumerate(results):
        ours = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert code == 2 and "Traceback" not in stderr and len(ours) == 1, _why(stderr)
        said = "" if i == failing else f"process {failing}: "
        assert ours[0].startswith(f"error: {said}CIFAR-10 source {tmp_path / 'missing'} does not exist"), ours
    assert not any(w.exists() for w in workdirs)


def test_two_processes_stopped_together_resume_andfinish(tmp_path, dataset):
    """SIGTERM to both (as a scheduler sends it): they agree on the stop, process 0 saves, both exit 143; the
    same two commands with --resume (and another checkpoint_minutes) finish, equal to one uninterrupted process
    with two devices."""
    workdirs = [tmp_path / "p0", tmp_path / "p1"]
    procs = _start(dataset, workdirs, "epochs=10.0")
    metrics = workdirs[0] / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        if not all(p.poll() is None for p in procs) or time.monotonic() > deadline:
            raise AssertionError(f"training did not start: {_stop_all(procs)}")
        time.sleep(0.1)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    results = finish(procs, timeout=120)
    assert [r[0] for r in results] == [143, 143], [_why(r[2]) for r in results]
    stopped = [int(r[2].split("interrupted at step ")[1].split(";")[0]) for r in results]
    assert stopped[0] == stopped[1] < 60 and _last(workdirs[0])[0] == stopped[0]
    # Resumed with epoch-end saves spaced by the clock (6 ms: most epochs due), which the processes agree on.
    results = finish(_start(dataset, workdirs, "epochs=10.0", "checkpoint_minutes=0.0001", "--resume"))
    assert [r[0] for r in results] == [0, 0], [_why(r[2]) for r in results]
    reference = _one_process(dataset, tmp_path / "one", "epochs=10.0")
    assert reference.returncode == 0, _why(reference.stderr)
    (step_a, a), (step_b, b) = _last(workdirs[0]), _last(tmp_path / "one")
    assert step_a == step_b == 60
    chex.assert_trees_all_close(a["params"], b["params"], atol=1e-6, rtol=1e-6)


def test_two_processes_with_a_time_budget_train_the_steps_process_0_timed(tmp_path, dataset):
    """8000 steps cannot fit in two minutes: both processes time their steps, process 0's count of the steps that
    fit decides for both (a disagreement would leave one waiting at a collective), and so does its count when
    the run is planned again after its first epoch: the run trains that many. (One minute was too little
    beside the other tests of the suite: data and compilation took 45-66 s of it on a 2-core Zen 4, and the
    budget also keeps a recompilation's time.)"""
    results = finish(_start(dataset, [tmp_path / "p0", tmp_path / "p1"], "epochs=1000.0", "val_size=0",
                             "time_budget=2.0"))
    assert [r[0] for r in results] == [0, 0], [_why(r[2]) for r in results]
    assert "time_budget 2 min: timing this machine's train and eval steps first" in results[0][2]
    fit = int(results[0][2].split(" of 8000 steps fit")[0].rsplit("time_budget 2 min: ", 1)[1])
    # After the first epoch process 0 plans the run again from its pace, for both, unless the plan stands.
    again = results[0][2].split(f" steps instead of {fit}, planned again at step 8")
    steps = int(again[0].rsplit("time_budget 2 min: ", 1)[1]) if len(again) > 1 else fit
    summary = json.loads((tmp_path / "p0" / "summary.json").read_text())
    assert 0 < fit < 8000 and 8 < steps and summary["steps"] == steps and summary["config"]["epochs"] == steps / 8
    assert "time_budget" not in results[1][2]  # process 1 says nothing of it


@pytest.mark.parametrize("killed", [1, 0], ids=["worker", "coordinator"])
def test_a_process_killed_mid_run_stops_the_other_within_seconds_then_both_resume(tmp_path, dataset, killed):
    """kill -9 of one process: the other stops within seconds, never hangs, and the same two commands with
    --resume then finish. A worker's death: the survivor's next collective finds the connection closed: one
    line, exit 2. The coordinator's (process 0, which hosts JAX's coordination service): JAX's runtime ends the
    survivor itself by design (its fate-sharing: its own fatal log line, then SIGABRT, on jax 0.10 and 0.12 alike)
    unless our line wins the race (exit 2): bounded either way, and never a Python traceback."""
    workdirs = [tmp_path / "p0", tmp_path / "p1"]
    procs = _start(dataset, workdirs, "epochs=10.0")
    metrics = workdirs[0] / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 8):  # past the first checkpoint
        if not all(p.poll() is None for p in procs) or time.monotonic() > deadline:
            raise AssertionError(f"training did not start: {_stop_all(procs)}")
        time.sleep(0.1)
    procs[killed].kill()
    killed_at = time.monotonic()
    code, _, stderr = finish([procs[1 - killed]], timeout=60)[0]
    assert time.monotonic() - killed_at < 30
    ours = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert "Traceback" not in stderr and len(ours) <= 1, _why(stderr)
    if killed == 1 or code == 2:
        assert code == 2 and len(ours) == 1 and "a peer process failed or left the run" in ours[0], _why(stderr)
    else:
        assert code == -signal.SIGABRT and "Terminating process because the JAX distributed service" in stderr, \
            _why(stderr)
    results = finish(_start(dataset, workdirs, "epochs=10.0", "--resume"))
    assert [r[0] for r in results] == [0, 0], [_why(r[2]) for r in results]
    assert _last(workdirs[0])[0] == 60
