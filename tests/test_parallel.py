"""Data parallelism: one device, jit over an 8-device mesh and pmap over 8 devices give the same numbers;
BatchNorm statistics are global; two processes equal one; checkpoints move between device counts."""

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from parallel_case import global_batch, initial_state
from processes import finish, free_port

from jaxnet import checkpoint, errors, layers, models, parallel, train

TESTS = Path(__file__).resolve().parent


def _three_steps(kind: str, model=None, batch=None):
    batch = global_batch() if batch is None else batch
    match kind:
        case "one":
            state, step = initial_state(model), parallel.jit_train_step()
        case "jit8":
            mesh = parallel.make_mesh(8)
            state, step = parallel.put_replicated(initial_state(model), mesh), parallel.jit_train_step(mesh=mesh)
        case "pmap8":
            state, step = initial_state(model), parallel.pmap_train_step(num_devices=8)
    for _ in range(3):
        state, metrics = step(state, batch)
    return state, metrics


@pytest.fixture(scope="module")
def runs():
    pmap_model = models.FastNetTiny(norm=partial(layers.BatchNorm, axis_name=parallel.AXIS))
    return {"one": _three_steps("one"), "jit8": _three_steps("jit8"), "pmap8": _three_steps("pmap8", pmap_model)}


@pytest.mark.parametrize("kind", ["jit8", "pmap8"])
def test_many_devices_match_one(runs, kind):
    (state, metrics), (ref, ref_metrics) = runs[kind], runs["one"]
    chex.assert_trees_all_close((state.params, state.batch_stats), (ref.params, ref.batch_stats), atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(metrics, ref_metrics, atol=1e-5, rtol=1e-5)
    assert int(state.step) == 3


def test_jit_path_shardings_are_as_documented(runs):
    state, metrics = runs["jit8"]
    mesh = parallel.make_mesh(8)
    for leaf in jax.tree.leaves((state.params, state.batch_stats, state.opt_state, metrics)):
        assert leaf.sharding.is_equivalent_to(parallel.replicated(mesh), leaf.ndim), leaf.sharding
    make_batch = parallel.jit_batch_fn(lambda images, idx: images[idx], mesh=mesh)
    out = make_batch(jnp.zeros((32, 4, 4, 3)), jnp.arange(16))
    assert out.sharding.spec == P(parallel.AXIS) and len(out.addressable_shards) == 8
    assert out.addressable_shards[0].data.shape == (2, 4, 4, 3)


def test_pmap_path_hands_back_the_first_devices_state_without_a_program_over_all_devices(runs):
    """The pmap path's state and metrics come back as the first device's buffers. Taking them with `x[0]` ran an
    all-reduce over the 8 devices per leaf and per step, and XLA's CPU client deadlocked in its collective
    rendezvous now and then with many in flight (`Termination timeout ... only 7 of them arrived`, an abort)."""
    state, metrics = runs["pmap8"]
    leaves = jax.tree.leaves((state.params, state.batch_stats, state.opt_state, metrics))
    assert all(leaf.devices() == {jax.local_devices()[0]} for leaf in leaves)
    replicated = parallel.replicate({"w": jnp.arange(6.0).reshape(2, 3)}, jax.local_devices())
    np.testing.assert_array_equal(parallel.unreplicate(replicated)["w"], np.arange(6.0).reshape(2, 3))


class InputNorm(nn.Module):
    """BatchNorm straight on the inputs, so its batch statistics are those of the images."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.0, axis_name=self.axis_name)(x)
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("kind", ["jit8", "pmap8"])
def test_batchnorm_statistics_are_global_not_per_device(kind):
    batch = global_batch()
    batch["image"] = batch["image"] + 10.0 * np.repeat(np.arange(8), 2)[:, None, None, None]  # shard i sits at 10·i
    model = InputNorm(axis_name=parallel.AXIS if kind == "pmap8" else None)
    state = initial_state(model)
    step = parallel.pmap_train_step(num_devices=8) if kind == "pmap8" else parallel.jit_train_step(
        mesh=parallel.make_mesh(8))
    if kind == "jit8":
        state = parallel.put_replicated(state, parallel.make_mesh(8))
    state, _ = step(state, batch)
    var = np.asarray(state.batch_stats["BatchNorm_0"]["var"])  # momentum 0: exactly this batch's variance
    global_var = batch["image"].reshape(-1, 3).var(0)
    per_device_var = np.mean([s.reshape(-1, 3).var(0) for s in np.split(batch["image"], 8)], axis=0)
    np.testing.assert_allclose(var, global_var, rtol=1e-4)
    assert np.all(np.abs(var - per_device_var) > 10)


def test_a_users_two_axis_mesh_splits_the_batch_over_its_first_axis():
    """On a user's (4, 2) mesh the batch is split 4 ways (replicated over the second axis): a batch of 4 was
    refused as "does not divide over 8 devices"."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    batch = {k: v[:4] for k, v in global_batch().items()}
    step = parallel.jit_train_step(mesh=mesh)
    state, metrics = step(parallel.put_replicated(initial_state(), mesh), batch)
    reference_state, reference = jax.jit(train.train_step)(initial_state(), batch)
    chex.assert_trees_all_close(parallel.fetch(metrics), reference, rtol=1e-5)
    chex.assert_trees_all_close(parallel.fetch(state.params), reference_state.params, rtol=1e-4, atol=1e-6)
    with pytest.raises(parallel.ParallelError, match="global batch of 6 does not divide over the 4 shards of mesh "
                                                     "axis 'data'"):
        step(state, {k: v[:6] for k, v in global_batch().items()})


def test_batch_not_divisible_and_too_many_devices_are_errors():
    batch = {k: v[:12] for k, v in global_batch().items()}
    with pytest.raises(parallel.ParallelError, match="global batch of 12 does not divide over the 8 shards of mesh "
                                                     "axis 'data'"):
        parallel.jit_train_step(mesh=parallel.make_mesh(8))(parallel.put_replicated(initial_state(),
                                                                                     parallel.make_mesh(8)), batch)
    with pytest.raises(parallel.ParallelError, match="global batch of 12 does not divide over 8 devices"):
        parallel.pmap_train_step(num_devices=8)(initial_state(), batch)
    with pytest.raises(parallel.ParallelError, match="9 devices asked for, but 8 are available"):
        parallel.make_mesh(9)
    with pytest.raises(parallel.ParallelError, match="9 devices asked for"):
        parallel.pmap_train_step(num_devices=9)
    for wrong in (0, -1, 2.0, "4"):  # 0 was worded as too many devices
        for make in (parallel.make_mesh, lambda n: parallel.pmap_train_step(num_devices=n)):
            with pytest.raises(parallel.ParallelError, match=f"num_devices must be a positive integer, got {wrong!r}"):
                make(wrong)
    with pytest.raises(parallel.ParallelError, match="give all three"):
        parallel.init_distributed("127.0.0.1:1234")


@pytest.mark.parametrize("make", [parallel.jit_train_step, parallel.jit_eval_step, parallel.pmap_train_step,
                                  parallel.pmap_eval_step])
def test_the_compiled_steps_refuse_a_batch_spec_that_no_batch_can_meet(make):
    """num_classes=0 refused every label, image_shape=(32, 32) every batch, each only at the first step."""
    for kwargs, message in (({"num_classes": 0}, f"^{make.__name__} num_classes must be a positive integer or None, "
                                                 "got 0$"),
                            ({"num_classes": 10.0}, "num_classes must be a positive integer or None, got 10.0"),
                            ({"image_shape": (32, 32)}, r"image_shape must be \(H, W, C\), 3 positive integers, got "
                                                        r"\(32, 32\)"),
                            ({"image_shape": 32}, "image_shape must be")):
        with pytest.raises(errors.ConfigError, match=message):
            make(**kwargs)


@pytest.mark.parametrize("make", [parallel.jit_train_step, parallel.jit_eval_step, parallel.pmap_train_step,
                                  parallel.pmap_eval_step])
def test_the_compiled_steps_check_their_spec_once_and_every_batch_against_it(make, monkeypatch):
    """The spec is checked when the step is built, not again on every step; each batch still is."""
    checked = []
    spec_check = train.check_batch_spec
    monkeypatch.setattr(train, "check_batch_spec", lambda *args: checked.append(args) or spec_check(*args))
    step = make(num_classes=10, image_shape=(32, 32, 3), **({"num_devices": 8} if "pmap" in make.__name__ else {}))
    assert len(checked) == 1
    batch = global_batch()
    state = initial_state()
    for _ in range(2):
        out = step(state, batch)
        state = out[0] if "train" in make.__name__ else state
    assert len(checked) == 1
    with pytest.raises(errors.DataError, match=r"labels must be in \[0, 10\), got values in \[\d, 10\]"):
        step(state, {**batch, "label": np.where(np.arange(len(batch["label"])) == 0, 10, batch["label"])})


@pytest.mark.parametrize("make", [parallel.pmap_train_step, parallel.pmap_eval_step])
def test_the_pmap_steps_refuse_a_state_replicated_already(make):
    """The Flax idiom replicates the state before a pmapped step; jaxnet's pmap steps replicate it themselves, and
    one replicated twice failed deep in the step (fold_in of a step counter with a device axis)."""
    state = initial_state()
    replicated = parallel.replicate(state, jax.local_devices()[:8])
    with pytest.raises(parallel.ParallelError, match=r"takes the state as it is and replicates it itself; got one "
                                                     r"replicated already \(its step has shape \(8,\)\)"):
        make(num_devices=8)(replicated, global_batch())


@pytest.mark.parametrize("make", [parallel.jit_train_step, parallel.jit_eval_step])
def test_the_mesh_steps_take_labels_given_as_a_list(make):
    mesh = parallel.make_mesh(8)
    batch = global_batch()
    listed = {**batch, "label": batch["label"].tolist()}
    step = make(mesh=mesh)
    metrics = [step(parallel.put_replicated(initial_state(), mesh), b) for b in (listed, batch)]
    chex.assert_trees_all_close(*(m[1] if isinstance(m, tuple) else m for m in metrics), rtol=1e-6)


@pytest.mark.parametrize("devices", [1, 8])
def test_a_state_donated_to_an_earlier_step_is_one_line_not_a_crash(devices):
    """A user who steps twice from one state: on an 8-device mesh XLA's CPU client crashed the process (SIGSEGV)."""
    mesh = parallel.make_mesh(devices)
    state = parallel.put_replicated(initial_state(), mesh)
    train_step, eval_step = parallel.jit_train_step(mesh=mesh), parallel.jit_eval_step(mesh=mesh)
    new_state, _ = train_step(state, global_batch())
    for step in (train_step, eval_step):
        with pytest.raises(errors.ConfigError, match="the state's arrays were donated to an earlier train step"):
            step(state, global_batch())
    assert int(eval_step(new_state, global_batch())["count"]) == len(global_batch()["label"])
    plain = {"w": jnp.ones(3)}  # a state without a step counter: searched leaf by leaf
    scale = parallel.jit_train_step(lambda state, batch: ({"w": state["w"] * 2}, {}), mesh=mesh)
    scale(plain, global_batch())
    with pytest.raises(errors.ConfigError, match="the state's arrays were donated to an earlier train step"):
        scale(plain, global_batch())


@pytest.mark.parametrize("src,dst", [(8, 1), (1, 8)])
def test_checkpoints_move_between_device_counts(tmp_path, src, dst):
    def place(state, n):
        return parallel.put_replicated(state, parallel.make_mesh(n)) if n > 1 else state

    saved, _ = _three_steps("jit8" if src == 8 else "one")
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(saved, {"epoch": 0})
    restored, meta = ckpt.restore(place(initial_state(), dst))
    ckpt.close()
    chex.assert_trees_all_equal(jax.device_get(restored.params), jax.device_get(saved.params))
    assert meta["epoch"] == 0 and int(restored.step) == 3
    assert len(jax.tree.leaves(restored.params)[0].sharding.device_set) == dst


def _workers(out: Path, tags=("same", "same"), timeout=120):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    procs = [subprocess.Popen([sys.executable, str(TESTS / "distributed_worker.py"), "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), "--out", str(out),
                               "--tag", tag], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, tag in enumerate(tags)]
    return finish(procs, timeout)


def test_two_processes_equal_one_process_with_four_devices(tmp_path):
    results = _workers(tmp_path / "dist")
    assert [r[0] for r in results] == [0, 0], [r[2][-1500:] for r in results]
    assert "devices 4" in results[0][1]
    mesh = parallel.make_mesh(4)
    state, step = parallel.put_replicated(initial_state(), mesh), parallel.jit_train_step(mesh=mesh)
    for _ in range(3):
        state, _ = step(state, global_batch())
    two = np.load(tmp_path / "dist.npz")
    leaves = jax.tree_util.tree_flatten_with_path({"params": state.params, "batch_stats": state.batch_stats})[0]
    assert len(leaves) == len(two.files)
    for path, value in leaves:
        np.testing.assert_allclose(two[jax.tree_util.keystr(path)], np.asarray(value), atol=1e-6, rtol=1e-6)
    # ... and their checkpoint restores in this single process.
    restored, _ = checkpoint.Checkpointer(tmp_path / "dist-ckpt").restore(initial_state())
    chex.assert_trees_all_close(restored.params, jax.device_get(state.params), atol=1e-6, rtol=1e-6)


def test_mismatched_configs_across_processes_are_detected(tmp_path):
    results = _workers(tmp_path / "dist", tags=("a", "b"))
    for code, _, stderr in results:
        assert code == 2 and "differs between processes" in stderr, stderr[-1500:]


def test_unreachable_coordinator_fails_fast_with_a_message():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    result = subprocess.run([sys.executable, str(TESTS / "distributed_worker.py"), "--coordinator",
                             f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id", "1", "--out", "x",
                             "--timeout", "3"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot reach the coordinator" in result.stderr and "Traceback" not in result.stderr


def test_train_step_axis_name_averages_gradients_not_sums():
    """Under pmap each device's gradient is pmean-ed: with 8 equal shards the update equals one device's
    on the global batch (a psum would give 8x the step)."""
    batch = global_batch()
    state = initial_state(models.PlainCNNTiny(norm=partial(layers.BatchNorm, axis_name=parallel.AXIS)))
    ref_state = initial_state(models.PlainCNNTiny())
    one, _ = train.train_step(ref_state, batch)
    many, _ = parallel.pmap_train_step(num_devices=8)(state, batch)
    delta = jax.tree.map(lambda a, b: a - b, many.params, state.params)
    ref_delta = jax.tree.map(lambda a, b: a - b, one.params, ref_state.params)
    chex.assert_trees_all_close(delta, ref_delta, atol=1e-5, rtol=1e-4)
    assert optax.tree.norm(ref_delta) > 0


def test_one_process_errors_return_their_code_and_steps_run_once():
    """Without JAX's multi-process runtime, exit_after_error only returns the code (this test process would end
    otherwise) and on_every_process is the call itself, its error unchanged."""
    def missing():
        raise errors.DataError("no data")

    calls = []
    assert parallel.exit_after_error(2) == 2
    assert parallel.on_every_process(lambda: calls.append(1) or 7) == 7 and calls == [1]
    with pytest.raises(errors.DataError, match="^no data$"):
        parallel.on_every_process(missing)
