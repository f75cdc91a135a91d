"""Train-step time on 1 vs 8 (fake) CPU devices, jit+NamedSharding and pmap, interleaved in one run.

On a 2-core CPU, 8 "devices" share the same two cores: expect overhead, not speed-up. The numbers show
what the sharding machinery costs per step, not a scaling result (benchmarks/scaling_model.py models that).

    python -m benchmarks.parallel_step [--model fastnet_tiny|fastnet] [--batch 256] [--steps 5]
"""

from __future__ import annotations

import os

from jaxnet import compiler

# Both before JAX starts its backends: 8 fake devices, and the experiment's default CPU convolutions.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
compiler.set_cpu_conv("eigen")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import append_results  # noqa: E402
from jaxnet import layers, models, parallel, train  # noqa: E402
from jaxnet.cli import positive  # noqa: E402

MODELS = ("fastnet_tiny", "fastnet")


def make(kind: str, model_name: str, batch):
    norm = partial(layers.BatchNorm, axis_name=parallel.AXIS if kind == "pmap, 8" else None)
    state = train.create_train_state(models.get(model_name, norm=norm), jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                     optax.sgd(0.01, momentum=0.9))
    match kind:
        case "jit, 1":
            return state, parallel.jit_train_step(), jax.device_put(batch)
        case "jit, 8":
            mesh = parallel.make_mesh(8)
            return parallel.put_replicated(state, mesh), parallel.jit_train_step(mesh=mesh), parallel.shard_batch(batch, mesh)
        case "pmap, 8":
            return state, parallel.pmap_train_step(num_devices=8), batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fastnet", choices=MODELS)
    p.add_argument("--batch", type=positive(int), default=256)
    p.add_argument("--steps", type=positive(int), default=5, help="timed steps per variant (after 2 warm-up steps)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    if args.batch % 8:
        p.error(f"--batch must divide over 8 devices, got {args.batch}")
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(args.batch, 32, 32, 3)).astype(np.float32),
             "label": rng.integers(0, 10, args.batch).astype(np.int32)}
    kinds = ("jit, 1", "jit, 8", "pmap, 8")
    runs = {k: list(make(k, args.model, batch)) for k in kinds}
    for k in kinds:  # warm-up: compile and two steps
        for _ in range(2):
            state, step, b = runs[k]
            runs[k][0], m = step(state, b)
            jax.block_until_ready(m)
    times = {k: [] for k in kinds}
    for i in range(args.steps):  # interleaved: A B C, C B A, ...
        for k in (kinds if i % 2 == 0 else kinds[::-1]):
            state, step, b = runs[k]
            t = time.perf_counter()
            runs[k][0], m = step(state, b)
            jax.block_until_ready(m)
            times[k].append(time.perf_counter() - t)
    base = statistics.median(times["jit, 1"])
    rows = [f"| {args.model}, batch {args.batch} | path, devices | median step ms | img/s | vs jit, 1 |",
            "| --- | --- | --- | --- | --- |"]
    for k in kinds:
        med = statistics.median(times[k])
        rows.append(f"| | {k} | {med * 1e3:.1f} | {args.batch / med:.0f} | {med / base:.2f}× time |")
    table = "\n".join(rows)
    print(table)
    if not args.no_record:
        append_results("Data-parallel step on fake CPU devices", table,
                       "8 fake devices share the machine's 2 cores: this measures overhead, not speed-up.")


if __name__ == "__main__":
    main()
