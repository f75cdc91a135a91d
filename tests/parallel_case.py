"""The model, state and global batch shared by the multi-device tests and their worker processes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnet import models, train


def global_batch(n: int = 16) -> dict:
    rng = np.random.default_rng(0)
    return {"image": rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, 10, n).astype(np.int32)}


def initial_state(model=None):
    """The smoke config's model (FastNetTiny) unless another is given."""
    return train.create_train_state(model or models.FastNetTiny(), jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                    optax.sgd(0.1, momentum=0.9))


def params_to_npz(state, path) -> None:
    """Every parameter and batch statistic (this process's copy of a replicated array) into one .npz."""
    leaves = jax.tree_util.tree_flatten_with_path({"params": state.params, "batch_stats": state.batch_stats})[0]
    np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v.addressable_data(0)) for k, v in leaves})
