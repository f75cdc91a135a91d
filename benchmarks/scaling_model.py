"""A model, not a measurement: predicted data-parallel efficiency of a jaxnet train step on 1–64 devices.

From the model's parameter count and XLA's cost analysis of one train step (FLOPs per example), it prints
per-step all-reduce bytes (ring all-reduce: each device sends and receives 2·(n−1)/n of the gradient
bytes), compute time at a given device FLOP/s, and efficiency = compute / (compute + communication) for
a fixed per-device batch (weak scaling), with no overlap of communication and compute (a lower bound;
XLA's async collectives hide part of it). Link bandwidths are per device, one direction.

    python -m benchmarks.scaling_model --model resnet50 --batch-per-device 256 --device-tflops 100

Its first line, the train step's GFLOP per example, is also the count docs/performance.md prices a recipe in
(fastnet, airbench95, airbench96: the records' nets; `--image-size 24` for the smaller images of progressive resizing):

    python -m benchmarks.scaling_model --model airbench96 --image-size 24
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

from jaxnet import models, train
from jaxnet.cli import Parser, positive
from jaxnet.errors import ConfigError

LINKS = {"NVLink-class (450 GB/s)": 450e9, "100 Gb/s-class (12.5 GB/s)": 12.5e9}
DEVICES = (1, 2, 4, 8, 16, 32, 64)


# name → (jaxnet.models registry name, its arguments, image size)
MODELS = {"resnet18": ("resnet18", {"num_classes": 10}, 32),
          "resnet50": ("resnet50", {"num_classes": 1000, "stem": "imagenet"}, 224),
          "fastnet": ("fastnet", {}, 32),
          "airbench95": ("fastnet_muon", {"widths": (128, 384, 384)}, 32),
          "airbench96": ("fastnet_muon", {"widths": (128, 384, 512), "depth": 3}, 32)}


def build(name: str):
    registered, kwargs, size = MODELS[name]
    return models.get(registered, **kwargs), size


def step_cost(model, size: int, batch: int) -> tuple[int, float]:
    """(parameter count, FLOPs of one train step on `batch` examples) from XLA's cost analysis (no run)."""
    state = jax.eval_shape(lambda: train.create_train_state(model, jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                                            optax.sgd(0.1, 0.9)))
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    cost = jax.jit(train.train_step).lower(state, {"image": images, "label": labels}).cost_analysis()
    params = sum(x.size for x in jax.tree.leaves(state.params))
    return params, float(cost["flops"])


def main() -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", choices=tuple(MODELS))
    p.add_argument("--image-size", type=positive(int), default=None, help="pixels a side (default: the model's own)")
    p.add_argument("--batch-per-device", type=positive(int), default=256)
    p.add_argument("--device-tflops", type=positive(float), default=100.0,
                   help="achieved (not peak) TFLOP/s per device; ~100 is ResNet-50 bf16 training on a recent GPU")
    p.add_argument("--grad-bytes", type=positive(int), default=4, help="bytes per gradient element (4 fp32, 2 bf16)")
    args = p.parse_args()
    model, size = build(args.model)
    size = args.image_size or size
    cost_batch = 64  # per-example FLOPs from a batch, so the per-step optimizer update weighs little (no run)
    try:
        params, flops = step_cost(model, size, cost_batch)
    except ConfigError as e:  # the net does not fit the image size
        p.error(f"--model {args.model} --image-size {size}: {e}")
    flops_per_example = flops / cost_batch
    compute_s = flops_per_example * args.batch_per_device / (args.device_tflops * 1e12)
    grad_bytes = params * args.grad_bytes
    print(f"model {args.model} at {size} px: {params / 1e6:.2f} M parameters, {flops_per_example / 1e9:.3f} GFLOP "
          f"per example (train step, XLA cost analysis); {args.batch_per_device} examples per device → compute "
          f"{compute_s * 1e3:.2f} ms per step at {args.device_tflops:g} TFLOP/s")
    header = "| devices | all-reduce MB sent per device | " + " | ".join(
        f"comm ms, {name} | efficiency, {name}" for name in LINKS) + " |"
    print(header)
    print("|" + " --- |" * (2 + 2 * len(LINKS)))
    for n in DEVICES:
        sent = 2 * (n - 1) / n * grad_bytes
        cells = []
        for bandwidth in LINKS.values():
            comm_s = sent / bandwidth
            cells += [f"{comm_s * 1e3:.2f}", f"{compute_s / (compute_s + comm_s):.1%}"]
        print(f"| {n} | {sent / 1e6:.1f} | " + " | ".join(cells) + " |")
    print("A model, not a measurement: no overlap of communication with compute, ideal ring all-reduce, "
          "no latency terms, no input pipeline.")


if __name__ == "__main__":
    main()
