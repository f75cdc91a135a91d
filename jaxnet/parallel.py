"""Where jit, shardings and pmap are applied: compiled train/eval/data steps on one device or many, and
multi-process start-up through `jax.distributed`.

Main path: `jit` over a 1-D `Mesh` with axis "data": the batch is sharded `P("data")`, the state
replicated `P()`. The step bodies stay single-device code; XLA inserts the all-reduces, and BatchNorm
statistics are computed over the *global* batch (SyncBN) with no change to the model.

Compatibility path: `pmap_train_step` / `pmap_eval_step` (pmap is in maintenance mode since JAX 0.8 and
much slower per step here). Gradients and metrics are `pmean`ed over the axis; for global BatchNorm the
model must be built with `norm=partial(jaxnet.layers.BatchNorm, axis_name=AXIS)` (or Flax's). It gives the jit
path's numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnet import errors, train
from jaxnet.errors import ConfigError, JaxnetError, ParallelError
from jaxnet.train import Batch, Metrics

AXIS = "data"
# Seconds without a heartbeat after which JAX's runtime declares a process dead (and ends the others itself).
HEARTBEAT_TIMEOUT_S = 30
# How a collective reports a peer that is gone: gloo's closed connection, the coordination service's verdict.
PEER_FAILURE_MARKERS = ("Connection reset by peer", "Connection closed by peer", "Gloo", "heartbeat", "UNAVAILABLE")


# ---- meshes and shardings ----

def first_devices(devices: Sequence, num_devices: int | None) -> Sequence:
    """The first `num_devices` of `devices` (all of them for None); ParallelError for another number."""
    n = len(devices) if num_devices is None else num_devices
    if not errors.is_kind("positive integer", n):
        raise ParallelError(f"num_devices must be a positive integer, got {n!r}")
    if n > len(devices):
        raise ParallelError(f"{n!r} devices asked for, but {len(devices)} are available")
    return devices[:n]


def make_mesh(num_devices: int | None = None, axis: str = AXIS) -> Mesh:
    """A 1-D mesh over the first `num_devices` devices of all processes (default: all of them)."""
    devices = jax.devices()
    n = len(first_devices(devices, num_devices))
    if jax.process_count() > 1 and n != len(devices):
        raise ParallelError(f"with {jax.process_count()} processes every device takes part: "
                            f"num_devices must be {len(devices)}, got {n}")
    return jax.make_mesh((n,), (axis,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the mesh axis, the rest whole."""
    return NamedSharding(mesh, P(mesh.axis_names[0]))


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
    """This process's rows of a global batch → global arrays sharded over `mesh` (`P("data")`)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def process_rows(batch: Any) -> Any:
    """The rows of a host batch (present in full on every process) that this process contributes."""
    i, n = jax.process_index(), jax.process_count()
    return jax.tree.map(lambda x: x[i * (len(x) // n): (i + 1) * (len(x) // n)], batch)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Host or device arrays (the same on every process) → global arrays replicated on `mesh`."""
    sharding = replicated(mesh)

    def put(x):
        if jnp.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):  # typed keys travel as raw data
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, tree)


def local(tree: Any) -> Any:
    """`tree` with every global array that spans other processes' devices replaced by this process's copy (a
    single-device array): what can be fetched, exported or saved by one process. Replicated arrays only
    (the state, metrics); a sharded one is a ParallelError."""

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if not x.is_fully_replicated:
            raise ParallelError(f"an array sharded over other processes ({x.sharding}) has no local copy")
        return x.addressable_data(0)

    return jax.tree.map(one, tree)


def fetch(tree: Any) -> Any:
    """Host (NumPy) values of `tree`, global replicated arrays included (`jax.device_get` refuses those)."""
    return jax.device_get(local(tree))


# ---- compiled steps ----

def _checked(compiled: Callable, num_classes: int | None, image_shape: Sequence[int] | None,
             mesh: Mesh | None) -> Callable:
    """`compiled(state, batch)` behind `train.validate_batch` (a user mistake is a one-line ValueError), with
    host batches placed on the mesh: every process passes the same global host batch, or global arrays. A state
    donated already is a ConfigError (`_donated`): under jax 0.10 XLA's CPU client crashed the process
    (SIGSEGV) when one reached a program over several devices; jax 0.12 raises "Array has been deleted"."""

    def step(state: Any, batch: Batch):
        train.check_batch(batch, num_classes, image_shape)
        if _donated(state):
            raise ConfigError("the state's arrays were donated to an earlier train step (their buffers hold the "
                              "new state): continue from the state that step returned")
        if mesh is not None:
            n = len(batch["label"])
            shards = mesh.shape[mesh.axis_names[0]]  # the batch axis's (`batch_sharding`)
            if n % shards:
                raise ParallelError(f"global batch of {n} does not divide over the {shards} shards of mesh axis "
                                    f"{mesh.axis_names[0]!r}")
            if not isinstance(batch["label"], jax.Array):  # host arrays, or labels given as a list
                batch = shard_batch(process_rows({k: np.asarray(v) if isinstance(v, list) else v
                                                  for k, v in batch.items()}), mesh)
        return compiled(state, batch)

    step.compiled = compiled  # the jitted function, for lower()/cost analysis
    return step


def _donated(state: Any) -> bool:
    """Whether `state`'s buffers went to an earlier step. Its step counter tells (donated with the rest, and
    read in ~1 µs where flattening a FastNet's state takes ~30); a state without one is searched leaf by leaf."""
    step = getattr(state, "step", None)
    leaves = [step] if isinstance(step, jax.Array) else jax.tree.leaves(state)
    return any(isinstance(x, jax.Array) and x.is_deleted() for x in leaves)


def jit_train_step(step_fn: Callable = train.train_step, *, mesh: Mesh | None = None, num_classes: int | None = None,
                   image_shape: Sequence[int] | None = None) -> Callable[[Any, Batch], tuple[Any, Metrics]]:
    """Compile `step_fn(state, batch) -> (state, metrics)` once, donating the input state; bind the step's own
    options first (`partial(jaxnet.train_step, label_smoothing=0.1)`).

    With `mesh`: batch `P("data")`, state and metrics replicated (pass the state through
    `put_replicated` first). The returned `step(state, batch)` validates the batch first (`num_classes`,
    `image_shape`: see `train.validate_batch`). The state passed in is donated: its buffers are reused for
    the new state and must not be used again.
    """
    train.check_batch_spec("jit_train_step", num_classes, image_shape)
    if mesh is None:
        compiled = jax.jit(step_fn, donate_argnums=(0,))
    else:
        compiled = jax.jit(step_fn, in_shardings=(replicated(mesh), batch_sharding(mesh)),
                           out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=(0,))
    return _checked(compiled, num_classes, image_shape, mesh)


def jit_eval_step(step_fn: Callable = train.eval_step, *, mesh: Mesh | None = None, num_classes: int | None = None,
                  image_shape: Sequence[int] | None = None) -> Callable[[Any, Batch], Metrics]:
    """Compile `step_fn(state, batch)` once (no donation: the state lives on); the batch is validated first."""
    train.check_batch_spec("jit_eval_step", num_classes, image_shape)
    if mesh is None:
        compiled = jax.jit(step_fn)
    else:
        compiled = jax.jit(step_fn, in_shardings=(replicated(mesh), batch_sharding(mesh)),
                           out_shardings=replicated(mesh))
    return _checked(compiled, num_classes, image_shape, mesh)


def jit_batch_fn(fn: Callable, *, mesh: Mesh | None = None, static_argnames: Sequence[str] = ()) -> Callable:
    """Compile a device-side data function (gather + augmentation of a batch); `static_argnames` as jax.jit's
    (e.g. the image size of progressive resizing). With `mesh`, its output is sharded like a batch, so each
    device computes (and each process holds) only its own rows."""
    sharding = {} if mesh is None else {"out_shardings": batch_sharding(mesh)}
    return jax.jit(fn, static_argnames=static_argnames, **sharding)


# ---- the pmap path ----

def _pmap_sharding(devices: Sequence, axis_name: str) -> NamedSharding:
    """The layout pmap (jit over shard_map since JAX 0.8) expects: leading axis split over `devices`."""
    return NamedSharding(Mesh(np.asarray(devices), (axis_name,)), P(axis_name))


def replicate(tree: Any, devices: Sequence, axis_name: str = AXIS) -> Any:
    """One copy of every leaf per device, stacked on a new leading axis and placed as pmap expects."""
    sharding = _pmap_sharding(devices, axis_name)
    return jax.tree.map(lambda x: jax.device_put(jnp.broadcast_to(x, (len(devices), *jnp.shape(x))), sharding), tree)


def unreplicate(tree: Any) -> Any:
    """The first copy of every leaf of a pmapped output: the first device's buffer, taken as it is. (`x[0]` would
    be a program over all the devices, an all-reduce per leaf and per step; on XLA's CPU client many of those in
    flight at once can deadlock in its collective rendezvous.)"""
    return jax.tree.map(lambda x: x.addressable_data(0).reshape(x.shape[1:]), tree)


def _split_batch(batch: Batch, devices: Sequence, axis_name: str) -> Batch:
    n = len(devices)
    if len(batch["label"]) % n:
        raise ParallelError(f"global batch of {len(batch['label'])} does not divide over {n} devices")
    sharding = _pmap_sharding(devices, axis_name)
    return jax.tree.map(lambda x: jax.device_put(jnp.reshape(x, (n, -1, *x.shape[1:])), sharding), batch)


def _unreplicated(state: Any, step_name: str) -> Any:
    """`state`, which the pmap steps replicate themselves; ParallelError for one replicated already (the Flax
    idiom `flax.jax_utils.replicate(state)`: a step counter with a device axis), which failed deep in the step."""
    step = getattr(state, "step", None)
    if step is not None and jnp.ndim(step) != 0:
        raise ParallelError(f"{step_name} takes the state as it is and replicates it itself; got one replicated "
                            f"already (its step has shape {jnp.shape(step)}): pass the unreplicated state")
    return state


def pmap_train_step(step_fn: Callable = train.train_step, *, num_devices: int | None = None, axis_name: str = AXIS,
                    num_classes: int | None = None,
                    image_shape: Sequence[int] | None = None) -> Callable[[Any, Batch], tuple[Any, Metrics]]:
    """pmap of `step_fn(..., axis_name=axis_name)` with the jit path's interface: `step(state, batch)` on an
    ordinary state and a global batch, split evenly over the devices. The state is replicated in and the
    first copy taken out on every call — a per-step copy this compatibility path accepts."""
    train.check_batch_spec("pmap_train_step", num_classes, image_shape)
    devices = first_devices(jax.local_devices(), num_devices)
    compiled = jax.pmap(partial(step_fn, axis_name=axis_name), axis_name=axis_name, devices=devices,
                        donate_argnums=(0,))

    def step(state: Any, batch: Batch):
        train.check_batch(batch, num_classes, image_shape)
        new_state, metrics = compiled(replicate(_unreplicated(state, "pmap_train_step"), devices, axis_name),
                                      _split_batch(batch, devices, axis_name))
        return unreplicate(new_state), unreplicate(metrics)

    return step


def pmap_eval_step(step_fn: Callable = train.eval_step, *, num_devices: int | None = None, axis_name: str = AXIS,
                   num_classes: int | None = None, image_shape: Sequence[int] | None = None) -> Callable:
    """pmap of `step_fn(..., axis_name=axis_name)`: `step(state, batch)`, metrics over the global batch."""
    train.check_batch_spec("pmap_eval_step", num_classes, image_shape)
    devices = first_devices(jax.local_devices(), num_devices)
    compiled = jax.pmap(partial(step_fn, axis_name=axis_name), axis_name=axis_name, devices=devices)

    def step(state: Any, batch: Batch):
        train.check_batch(batch, num_classes, image_shape)
        return unreplicate(compiled(replicate(_unreplicated(state, "pmap_eval_step"), devices, axis_name),
                                    _split_batch(batch, devices, axis_name)))

    return step


# ---- many processes ----

def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, timeout_s: int = 60) -> None:
    """Start JAX's multi-process runtime (`jax.distributed.initialize`); call before any other JAX call.

    With no arguments the cluster is detected (Slurm, Kubernetes/JobSet, ...); otherwise all three are
    needed. On CPU the collectives go through gloo. A coordinator that cannot be reached within
    `timeout_s` seconds is a ParallelError (one line), not a hang.
    """
    given = [a is not None for a in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ParallelError("coordinator address, number of processes and process id go together: give all three")
    if num_processes is not None:
        if num_processes < 1:
            raise ParallelError(f"number of processes must be at least 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise ParallelError(f"process id {process_id} is not in [0, {num_processes})")
        host, port = _host_and_port(coordinator_address)
        if process_id:  # not the coordinator: JAX aborts the process if it cannot connect, so look first
            _wait_for_coordinator(host, port, timeout_s)
        else:  # the coordinator: JAX crashes if its service cannot listen on the port
            _check_port_free(port)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, initialization_timeout=timeout_s,
                                   heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    except Exception as e:  # XlaRuntimeError (DEADLINE_EXCEEDED, UNAVAILABLE, ...) from the coordination service
        raise ParallelError(f"cannot join the JAX cluster at {coordinator_address or '(auto-detected)'} within "
                            f"{timeout_s} s: {str(e).splitlines()[0][:200]}") from None


def start_backend() -> None:
    """Start JAX's backend now (after `init_distributed`, if any), so that one it cannot start is a one-line
    ConfigError before any work: JAX_PLATFORMS=cuda on a machine without a visible NVIDIA GPU (JAX's bare
    AssertionError), a platform whose plugin is missing (its RuntimeError)."""
    try:
        jax.devices()
    except RuntimeError as e:
        raise ConfigError(f"JAX cannot start its backend: {str(e).splitlines()[0]}") from None
    except AssertionError:  # every platform JAX_PLATFORMS names was skipped: none is on this machine
        raise ConfigError(f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r} names no platform this machine "
                          "has ('cuda' needs a visible NVIDIA GPU and jax[cuda12] or jax[cuda13]): set it to cpu, "
                          "or leave it unset") from None


@contextlib.contextmanager
def peer_failures() -> Iterator[None]:
    """Turn the error a collective raises when a peer process died (its connection closed, gloo on CPU, or its
    heartbeats stopped) into a ParallelError: one line, the same on every surviving process."""
    try:
        yield
    except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as e:  # a collective's error surfaces as any
        text = str(e)
        if isinstance(e, JaxnetError) or jax.process_count() == 1 or not any(m in text for m in PEER_FAILURE_MARKERS):
            raise
        raise ParallelError(f"a peer process failed or left the run ({text.splitlines()[0][:160]}); every "
                            f"process stops: start them all again, with --resume if a checkpoint was saved") from None


def exit_after_error(code: int) -> int:
    """The exit code for a process that stops on an error: returned as it is without JAX's multi-process runtime;
    with it, the process leaves at once with that code (output flushed). JAX's own shutdown at exit waits at a
    barrier for every peer, which a peer that already left or stopped elsewhere never reaches: the process would
    hang there, then abort."""
    if jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _host_and_port(address: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) as (host, port); a ParallelError for anything else. Checked on every
    process: JAX's runtime crashes on an address it cannot parse."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ParallelError(f"coordinator address must be HOST:PORT with a port in 1-65535, got {address!r}")
    return host, int(port)


def _check_port_free(port: int) -> None:
    """ParallelError if something on this host listens on `port` (every address, as JAX's service binds it)."""
    try:
        probe, anywhere = socket.socket(socket.AF_INET6), "::"
    except OSError:  # no IPv6 on this host
        probe, anywhere = socket.socket(socket.AF_INET), "0.0.0.0"
    with probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: a closed run's port is free
        try:
            probe.bind((anywhere, port))
        except OSError as e:
            raise ParallelError(f"the coordinator's port {port} is in use on this host ({e.strerror or e}): another "
                                f"run's coordinator? Pick another port for every process") from None


def _wait_for_coordinator(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise ParallelError(f"cannot reach the coordinator at {host}:{port} within {timeout_s} s "
                                    f"({e.strerror or e})") from None
            time.sleep(0.5)


def assert_same_across_processes(config: dict, what: str = "config") -> None:
    """ParallelError unless every process passes an equal `config` (compared by a hash, gathered)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).digest()[:8]
    mine = np.frombuffer(digest, np.uint32)
    everyone = np.asarray(multihost_utils.process_allgather(mine))
    differing = [i for i, h in enumerate(everyone) if not np.array_equal(h, everyone[0])]
    if differing:
        raise ParallelError(f"the {what} differs between processes (process 0 vs {differing}); start all with the same one")


def broadcast_from_main(fn: Callable[[], Any]) -> Any:
    """`fn()` run on process 0 only, its JSON-able result given to every process; a jaxnet error it raises
    is raised on every process (same type, same message), so all of them stop together instead of the
    others waiting at the next collective. With one process, just `fn()`."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    text = ""
    if is_main_process():
        try:
            text = json.dumps({"ok": fn()})
        except JaxnetError as e:
            text = _error_json(e)
    data = np.frombuffer(text.encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    received = multihost_utils.broadcast_one_to_all(data if is_main_process() else np.zeros(size, np.uint8))
    payload = json.loads(np.asarray(received, np.uint8).tobytes().decode())
    if "error" in payload:
        _raise_json(payload)
    return payload["ok"]


def on_every_process(fn: Callable[[], Any]) -> Any:
    """`fn()` run on every process (its result stays local), which must succeed on all: a jaxnet error it raises
    on some is raised on every process at once, as its own on those and with "process i: " before the message on
    the others (the first failed process's type and line). Alone, a process that failed would leave the others
    waiting at their next collective, until JAX's runtime ends them. With one process, just `fn()`."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    result, error = None, None
    try:
        result = fn()
    except JaxnetError as e:
        error = e
    data = np.frombuffer((_error_json(error) if error else "").encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.int32(data.size))))
    everyone = np.asarray(multihost_utils.process_allgather(np.pad(data, (0, size - data.size))), np.uint8)
    if error is not None:
        raise error
    failed = [i for i, row in enumerate(everyone) if row.any()]
    if failed:
        _raise_json(json.loads(everyone[failed[0]].tobytes().rstrip(b"\0").decode()), f"process {failed[0]}: ")
    return result


def _error_json(e: JaxnetError) -> str:
    """A jaxnet error as JSON for the other processes: {"error": its public type's name, "message"}."""
    kind = next(c.__name__ for c in type(e).__mro__ if getattr(errors, c.__name__, None) is c)
    return json.dumps({"error": kind, "message": str(e)})


def _raise_json(payload: dict, prefix: str = "") -> NoReturn:
    raise getattr(errors, payload["error"])(prefix + payload["message"])


def broadcast_arrays(tree: Any, like: Any) -> Any:
    """Process 0's host arrays `tree` as global arrays replicated like `like` (a tree of global arrays of the
    same shapes) on every process; the other processes pass None. With one process, `tree` placed like `like`."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), like)
        tree = multihost_utils.broadcast_one_to_all(tree if is_main_process() else zeros)
    return jax.tree.map(lambda x, ref: jax.make_array_from_process_local_data(ref.sharding, np.asarray(x)), tree, like)


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (one small all-gather; no-op with one process)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def is_main_process() -> bool:
    """Process 0 logs, writes TensorBoard/plots and prints progress; the others stay quiet."""
    return jax.process_index() == 0

