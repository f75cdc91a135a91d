"""The GPU checks that need no PyTorch and no data, as a table: every conv impl against `conv2d_reference` on
the shipped models' layer shapes (forward and both gradients, float32 and bfloat16), one train step of a user's
Flax model per impl, and a jax export made on the CPU loaded and run here. Run by `benchmarks/gpu_check.sh`
(which also runs the tests, the train-step benchmark, a recipe and a profile); on a CPU it checks the same
things, at smaller sizes and on two of the layers with `--small`.

    python -m benchmarks.gpu_check [--small] [--out FILE]

Exit status 1 if any check fails; each row says by how much.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnet import layers, train
from jaxnet.export import current_platform, inference_fn, load_jax
from jaxnet.ops import conv2d, conv2d_reference

IMPLS = ("xla", "im2col", "pallas", "auto")
# (N, H, C, O, K, strides, padding) of the shipped models' distinct conv layers: FastNet's stem and blocks,
# ResNet's 3x3s and strided 3x3 and 1x1 projections, PlainCNN's last conv on a 2x2 map.
LAYERS = [(64, 32, 3, 24, 2, 1, "VALID"), (64, 31, 24, 64, 3, 1, "SAME"), (64, 15, 64, 256, 3, 1, "SAME"),
          (64, 7, 256, 256, 3, 1, "SAME"), (64, 32, 64, 128, 3, 2, "SAME"), (64, 32, 64, 128, 1, 2, "SAME"),
          (64, 8, 256, 512, 3, 1, "SAME"), (64, 2, 256, 256, 3, 1, "SAME")]
# Largest error allowed, relative to the reference's largest magnitude: float32 runs TF32 on a GPU's tensor cores
# (10-bit mantissa), bfloat16 has an 8-bit one.
TOLERANCE = {"float32": 1e-2, "bfloat16": 4e-2}


def _relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def conv_rows(small: bool) -> list[tuple[str, bool]]:
    """One row per (layer, impl, dtype): the worst relative error of forward, input and kernel gradient."""
    rows = []
    for n, h, c, o, k, s, pad in ([LAYERS[0], LAYERS[4]] if small else LAYERS):
        n = 2 if small else n
        kx, kw, kg = jax.random.split(jax.random.key(h * c + o), 3)
        x, w = jax.random.normal(kx, (n, h, h, c)), jax.random.normal(kw, (k, k, c, o)) / np.sqrt(k * k * c)

        def run(conv, x, w):
            out, vjp = jax.vjp(partial(conv, strides=s, padding=pad), x, w)
            return (out, *vjp(jax.random.normal(kg, out.shape).astype(out.dtype)))

        with jax.default_matmul_precision("highest"):
            ref = jax.jit(partial(run, conv2d_reference))(x, w)
        for dtype in TOLERANCE:
            for impl in IMPLS:
                got = jax.jit(partial(run, partial(conv2d, impl=impl)))(x.astype(dtype), w.astype(dtype))
                err = max(_relative_error(g, r) for g, r in zip(got, ref))
                ok = err <= TOLERANCE[dtype]
                rows.append((f"| conv {n}x{h}x{h}x{c} -> {o}, {k}x{k}/{s} | {impl} | {dtype} | {err:.1e} | "
                             f"{'ok' if ok else 'FAIL'} |", ok))
    return rows


class UserNet(nn.Module):
    """A user's own Flax model with jaxnet's injected conv (the impl under test)."""

    impl: str

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(layers.Conv(32, (3, 3), impl=self.impl)(x))
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(layers.Conv(64, (3, 3), strides=2, impl=self.impl)(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def user_state(impl: str, image_shape=(32, 32, 3)) -> train.TrainState:
    """UserNet(impl), initialised with key 0, in Flax's own TrainState with SGD."""
    model = UserNet(impl)
    variables = model.init(jax.random.key(0), jnp.zeros((1, *image_shape)))
    return train.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.1),
                                   batch_stats=variables["batch_stats"])


def train_step_rows() -> list[tuple[str, bool]]:
    """One jaxnet.train_step of a user's model and Flax's TrainState per impl: loss and parameters equal XLA's."""
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(16, 16, 16, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
    results = {}
    for impl in IMPLS:
        with jax.default_matmul_precision("highest"):
            results[impl] = jax.jit(train.train_step)(user_state(impl, (16, 16, 3)), batch)
    rows = []
    for impl, (state, metrics) in results.items():
        ref_state, ref_metrics = results["xla"]
        err = max(_relative_error(metrics["loss"], ref_metrics["loss"]),
                  *(_relative_error(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                          jax.tree.leaves(ref_state.params))))
        rows.append((f"| train step of a user's Flax model | {impl} | float32 | {err:.1e} | "
                     f"{'ok' if err <= 1e-3 else 'FAIL'} |", err <= 1e-3))
    return rows


_EXPORT_ON_CPU = """
import sys
from benchmarks.gpu_check import user_state
from jaxnet.export import export_jax, inference_fn
export_jax(inference_fn(user_state("auto"), mean=(0.5,) * 3, std=(0.25,) * 3), sys.argv[1])
"""


def export_rows() -> list[tuple[str, bool]]:
    """A model exported by a CPU-only process (platforms cpu and cuda, the default), loaded and run here, against the
    same model computed live here."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.jaxexport"
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        subprocess.run([sys.executable, "-c", _EXPORT_ON_CPU, str(path)], check=True, env=env)
        loaded = load_jax(path)
        images = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
        live = inference_fn(user_state("auto"), mean=(0.5,) * 3, std=(0.25,) * 3)(jnp.asarray(images))
        err = _relative_error(loaded(images), live)
    ok = err <= 1e-2
    return [(f"| jax export made on a CPU, run on {current_platform()} | auto | float32 | {err:.1e} | "
             f"{'ok' if ok else 'FAIL'} |", ok)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="batch 2 instead of 64, two layers (a CPU dry run)")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    rows = [("| check | impl | dtype | max error / max magnitude | verdict |", True), ("| --- | --- | --- | --- | --- |", True)]
    for part in (conv_rows(args.small), train_step_rows(), export_rows()):
        for row, ok in part:
            print(row, flush=True)
            rows.append((row, ok))
    device = jax.devices()[0]
    table = f"Device: {device.device_kind} ({device.platform}); jax {jax.__version__}\n\n" + "\n".join(r for r, _ in rows)
    if args.out:
        Path(args.out).write_text(table + "\n")
    failed = sum(not ok for _, ok in rows)
    print(f"{failed} check(s) failed" if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
