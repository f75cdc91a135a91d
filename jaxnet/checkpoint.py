"""Checkpoints of the whole training state (orbax): the last k and the best, atomic, for exact resume.

A checkpoint holds params, batch stats, optimizer state, step, the dropout key, the lookahead EMA and a
proxy model's state (the `TrainState` arrays), plus JSON metadata: epoch, position in the epoch,
early-stopping state and the run's config.
Orbax writes into a temporary directory and renames it when complete, so a killed save is never restored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxnet import parallel
from jaxnet.errors import CheckpointError, ConfigError, check_values
from jaxnet.train import TrainState, check_state


# The fields every state saved has (any object with them: a TrainState, Flax's or jaxnet's, or the user's own), and
# those of jaxnet's TrainState that Flax's TrainState lacks: saved and restored where the state has them.
_SAVED = ("params", "opt_state", "step")
_OPTIONAL = ("batch_stats", "rng", "ema", "proxy")


def _arrays(state: TrainState) -> dict[str, Any]:
    """The state's arrays as saved: the dropout key as its raw data, a proxy's state as its own arrays."""
    arrays = {"params": state.params, "opt_state": state.opt_state, "step": state.step}
    arrays |= {name: getattr(state, name) for name in _OPTIONAL if hasattr(state, name)}
    if arrays.get("rng") is not None:
        arrays["rng"] = jax.random.key_data(arrays["rng"])
    if arrays.get("proxy") is not None:
        arrays["proxy"] = _arrays(arrays["proxy"])
    return arrays


def _with_arrays(template: TrainState, arrays: dict[str, Any]) -> TrainState:
    """`template` holding `arrays` (as `_arrays` gives them)."""
    if arrays.get("rng") is not None:
        arrays["rng"] = jax.random.wrap_key_data(arrays["rng"])
    if arrays.get("proxy") is not None:
        arrays["proxy"] = _with_arrays(template.proxy, arrays["proxy"])
    return template.replace(**arrays)


def _differences(saved: dict[str, Any], expect: dict[str, Any]) -> str:
    """'' if `saved` agrees with `expect`, else what differs: "config (differs in lr, model)", "seed (0, not 1)"."""
    expect = json.loads(json.dumps(expect))  # tuples → lists, as saved
    parts = []
    for key, wanted in expect.items():
        have = saved.get(key)
        if isinstance(wanted, dict) and isinstance(have, dict):
            if fields := sorted(k for k in set(have) & set(wanted) if have[k] != wanted[k]):
                parts.append(f"{key} (differs in {', '.join(fields)})")
        elif have != wanted:
            parts.append(f"{key} ({have!r}, not {wanted!r})")
    return "; ".join(parts)


class Checkpointer:
    """Checkpoints under `directory`: `last/<step>` (the newest `keep` of them) and `best/<step>` (one).

    With several processes (a multi-host run) the state is replicated, so process 0 alone writes it, in its
    own `directory`, from a host copy; `restore` reads it there and hands it to every process. The other
    processes' directories stay empty, so the hosts need no shared filesystem. Every process must call
    `save` and `restore` at the same points.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2):
        check_values("Checkpointer", keep=("positive integer", keep))
        self.directory = Path(directory).resolve()
        self._multi = jax.process_count() > 1
        if self._multi and not parallel.is_main_process():
            self._last = self._best = None
            return
        options = dict(enable_async_checkpointing=False, create=not self._multi)
        if self._multi:  # process 0 writes alone; orbax cannot create directories then
            options["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
                primary_host=0, active_processes={0}, barrier_sync_key_prefix="jaxnet-process-0")
            for which in ("last", "best"):
                (self.directory / which).mkdir(parents=True, exist_ok=True)
        self._last = ocp.CheckpointManager(self.directory / "last",
                                           options=ocp.CheckpointManagerOptions(max_to_keep=keep, **options))
        self._best = ocp.CheckpointManager(self.directory / "best",
                                           options=ocp.CheckpointManagerOptions(max_to_keep=1, **options))

    def _manager(self, which: str) -> ocp.CheckpointManager:
        match which:
            case "last":
                return self._last
            case "best":
                return self._best
            case _:
                raise ConfigError(f"unknown checkpoint kind {which!r}; valid: 'last', 'best'")

    def save(self, state: TrainState, meta: dict[str, Any], *, best: bool = False) -> None:
        """Save `state` and JSON-able `meta` as the newest checkpoint (and as the best one if `best`); ConfigError
        for a `meta` that is not (orbax failed half-way, leaving a temporary directory behind) or a `state` that is
        not a TrainState (`train.check_state`)."""
        check_state("Checkpointer.save", state, _SAVED)
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"checkpoint meta must be JSON-able: {e}") from None
        if self._last is None:  # not process 0 of a multi-process run
            return
        arrays = parallel.fetch(_arrays(state)) if self._multi else _arrays(state)
        step = int(jax.device_get(arrays["step"]))
        args = ocp.args.Composite(state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta))
        for manager in (self._last, self._best) if best else (self._last,):
            if step not in manager.all_steps():
                try:  # orbax writes a temporary directory and renames it: a failed save leaves the others intact
                    manager.save(step, args=args, force=True)
                except OSError as e:
                    raise CheckpointError(f"cannot write checkpoint {manager.directory}/{step}: "
                                          f"{e.strerror or e}") from None

    def restore(self, template: TrainState, which: str = "last",
                expect: dict[str, Any] | None = None) -> tuple[TrainState, dict[str, Any]]:
        """The newest `which` checkpoint as a TrainState shaped (and placed) like `template`, and its metadata.

        `expect`: metadata the checkpoint must have been saved with (e.g. {"config": {...}, "seed": 0});
        a dict value is compared field by field over the fields both have.

        Raises CheckpointError (naming the directory) if there is none, it is unreadable, its arrays do
        not fit `template`, or its metadata differs from `expect` (naming the fields) — on every process of a
        multi-process run; ConfigError for a `template` that is not a TrainState (`train.check_state`).
        """
        check_state("Checkpointer.restore", template, _SAVED)
        target = _arrays(template)
        if not self._multi:
            arrays, meta = self._read(jax.tree.map(ocp.utils.to_shape_dtype_struct, target), which, expect)
        else:
            host = {}

            def read() -> dict[str, Any]:
                abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
                host["arrays"], meta = self._read(abstract, which, expect)
                return meta

            meta = parallel.broadcast_from_main(read)
            arrays = parallel.broadcast_arrays(host.get("arrays"), target)
        return _with_arrays(template, dict(arrays)), meta

    def meta(self, which: str = "last") -> dict[str, Any]:
        """The metadata of the newest `which` checkpoint, without its arrays (process 0 reads it for all);
        CheckpointError if there is none or it is unreadable."""
        return parallel.broadcast_from_main(lambda: self._meta(which)[1])

    def _meta(self, which: str) -> tuple[int, dict[str, Any]]:
        manager = self._manager(which)
        where = self.directory / which
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint in {where}")
        try:
            return step, dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
        except Exception as e:  # orbax raises many types (ValueError, KeyError, FileNotFoundError, ...)
            raise CheckpointError(f"checkpoint {where}/{step} cannot be read "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None

    def _read(self, abstract: dict[str, Any], which: str,
              expect: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        manager = self._manager(which)
        where = self.directory / which
        step, meta = self._meta(which)
        if diff := _differences(meta, expect or {}):
            raise CheckpointError(f"checkpoint {where}/{step} was made with another {diff}")
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # orbax raises many types (ValueError, KeyError, FileNotFoundError, ...)
            raise CheckpointError(f"checkpoint {where}/{step} cannot be restored into this model "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        leaves = jax.tree.leaves(restored.state)
        if [np.shape(x) for x in leaves] != [np.shape(x) for x in jax.tree.leaves(abstract)]:
            raise CheckpointError(f"checkpoint {where}/{step} holds arrays of other shapes than this model")
        return jax.tree.unflatten(jax.tree.structure(abstract), leaves), meta

    def close(self) -> None:
        for manager in (self._last, self._best) if self._last is not None else ():
            manager.wait_until_finished()
            manager.close()


def read_arrays(step_dir: str | os.PathLike) -> dict[str, Any]:
    """The arrays of one saved checkpoint (`…/last/<step>`) as saved — params, batch_stats, opt_state, step,
    rng (as key data), ema, proxy — on this process's first device, whatever devices saved them and without a
    template state: for inspecting or comparing checkpoints."""
    path = Path(step_dir) / "state"
    device = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
    checkpointer = ocp.StandardCheckpointer()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            checkpointer.metadata(path).item_metadata)
    return checkpointer.restore(path, abstract)
