"""Checkpoints of the whole training state (orbax): the last k and the best, atomic, for exact resume.

A checkpoint holds params, batch stats, optimizer state, step, the dropout key and the lookahead EMA
(the `TrainState` arrays), plus JSON metadata: epoch, position in the epoch, early-stopping state and the
run's config.
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

from jaxnet.errors import CheckpointError, ConfigError
from jaxnet.train import TrainState


# Fields of jaxnet's TrainState that Flax's TrainState lacks: saved and restored where the state has them.
_OPTIONAL = ("batch_stats", "rng", "ema")


def _arrays(state: TrainState) -> dict[str, Any]:
    arrays = {"params": state.params, "opt_state": state.opt_state, "step": state.step}
    arrays |= {name: getattr(state, name) for name in _OPTIONAL if hasattr(state, name)}
    if arrays.get("rng") is not None:
        arrays["rng"] = jax.random.key_data(arrays["rng"])
    return arrays


class Checkpointer:
    """Checkpoints under `directory`: `last/<step>` (the newest `keep` of them) and `best/<step>` (one).

    `save` is asynchronous where orbax can be; `wait()` (called by `close`) blocks until it is on disk.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2):
        self.directory = Path(directory).resolve()
        options = dict(create=True, enable_async_checkpointing=False)
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
        """Save `state` and JSON-able `meta` as the newest checkpoint (and as the best one if `best`)."""
        step = int(state.step)
        args = ocp.args.Composite(state=ocp.args.StandardSave(_arrays(state)), meta=ocp.args.JsonSave(meta))
        for manager in (self._last, self._best) if best else (self._last,):
            if step not in manager.all_steps():
                manager.save(step, args=args, force=True)

    def restore(self, template: TrainState, which: str = "last",
                config: dict[str, Any] | None = None) -> tuple[TrainState, dict[str, Any]]:
        """The newest `which` checkpoint as a TrainState shaped like `template`, and its metadata.

        Raises CheckpointError (naming the directory) if there is none, it is unreadable, its arrays do
        not fit `template`, or its saved config differs from `config` in any key both have.
        """
        manager = self._manager(which)
        where = self.directory / which
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint in {where}")
        try:
            meta = dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
        except Exception as e:  # orbax raises many types (ValueError, KeyError, FileNotFoundError, ...)
            raise CheckpointError(f"checkpoint {where}/{step} cannot be read "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        if config is not None:
            saved, wanted = meta.get("config", {}), json.loads(json.dumps(config))  # tuples → lists, as saved
            diff = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
            if diff:
                raise CheckpointError(f"checkpoint {where}/{step} was made with another config "
                                      f"(differs in {', '.join(diff)})")
        target = _arrays(template)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # orbax raises many types (ValueError, KeyError, FileNotFoundError, ...)
            raise CheckpointError(f"checkpoint {where}/{step} cannot be restored into this model "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        leaves = jax.tree.leaves(restored.state)
        if [np.shape(x) for x in leaves] != [np.shape(x) for x in jax.tree.leaves(target)]:
            raise CheckpointError(f"checkpoint {where}/{step} holds arrays of other shapes than this model")
        arrays = jax.tree.unflatten(jax.tree.structure(target), leaves)
        if arrays.get("rng") is not None:
            arrays["rng"] = jax.random.wrap_key_data(arrays["rng"])
        state = template.replace(**arrays)
        return state, meta

    def close(self) -> None:
        for manager in (self._last, self._best):
            manager.wait_until_finished()
            manager.close()
