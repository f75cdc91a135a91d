"""jaxnet's BatchNorm vs Flax's, training mode, forward + backward (BN → ReLU → loss), at the activation
shapes of PlainCNN b32/b256, FastNet b512 and ResNet-18 b256; and `channel_sum` vs `jnp.sum` over all but
the channels, the reduction behind the difference (see `jaxnet.ops.channel`).

    python -m benchmarks.batch_norm [--repeats 10] [--shapes TEXT] [--xla-cpu-conv eigen|ynnpack] [--no-record]
"""

from __future__ import annotations

import argparse

from jaxnet.cli import positive


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=positive(int), default=10)
    p.add_argument("--shapes", default="", help="only shapes whose label contains this text")
    p.add_argument("--xla-cpu-conv", default="eigen", choices=("eigen", "ynnpack"),
                   help="XLA CPU library choice, as in the experiment (ynnpack also takes the reductions)")
    p.add_argument("--no-record", action="store_true")
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # XLA reads its flags once, when JAX starts its backends
    from jaxnet import compiler

    compiler.set_cpu_conv(ARGS.xla_cpu_conv)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import append_results, median_seconds  # noqa: E402
from jaxnet import layers  # noqa: E402
from jaxnet.ops import channel_sum  # noqa: E402


# (label, N, H, W, C): each model's largest BatchNorm input.
SHAPES = [("plain b32 layer 1", 32, 32, 32, 64), ("plain b256 layer 1", 256, 32, 32, 64),
          ("fastnet b512 block 1", 512, 16, 16, 64), ("resnet18 b256 stage 1", 256, 32, 32, 64),
          ("resnet18 b256 stage 4", 256, 4, 4, 512)]


def bn_step(norm, x):
    """jitted value and gradient (input, scale, bias) of sum(relu(BN(x))²), running statistics updated."""
    model = norm(use_running_average=False, momentum=0.9)
    variables = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)

    def loss(x, params):
        y, updates = model.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.square(nn.relu(y))), updates

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    return lambda: step(x, variables["params"])


def main() -> None:
    args = ARGS
    rows = ["| shape | N,H,W,C | Flax BN ms | jaxnet BN ms | speed-up | jnp.sum ms | channel_sum ms | speed-up |",
            "|" + " --- |" * 8]
    for label, *shape in SHAPES:
        if args.shapes not in label:
            continue
        x = jax.random.normal(jax.random.key(1), shape)
        flax_ms, ours_ms = (median_seconds(bn_step(norm, x), repeats=args.repeats) * 1e3
                            for norm in (nn.BatchNorm, layers.BatchNorm))
        reduce = jax.jit(lambda x: jnp.sum(x, axis=(0, 1, 2)))
        sum_ms, csum_ms = (median_seconds(lambda f=f: f(x), repeats=args.repeats) * 1e3
                           for f in (reduce, jax.jit(channel_sum)))
        rows.append(f"| {label} | {','.join(map(str, shape))} | {flax_ms:.2f} | {ours_ms:.2f} | "
                    f"{flax_ms / ours_ms:.2f}× | {sum_ms:.2f} | {csum_ms:.2f} | {sum_ms / csum_ms:.2f}× |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if not args.no_record:
        append_results("BatchNorm: jaxnet vs Flax, forward + backward", table,
                       f"float32; XLA CPU: {args.xla_cpu_conv}; medians of jitted calls after warm-up; "
                       "loss sum(relu(BN(x))²).")


if __name__ == "__main__":
    main()
