"""Every conv impl × a grid of ResNet-18 / airbench layer shapes: forward+backward time, GFLOP/s, and the
op each impl lowered to (after XLA's optimisations). Pallas runs in interpret mode on CPU (correctness
path, expected slow). The measured winners feed `jaxnet.ops.conv.AUTO_TABLE`.

    python -m benchmarks.conv_impls [--batch 64] [--repeats 5] [--impls xla,im2col,pallas[,onednn]]
        [--layers 1x1] [--xla-cpu-conv eigen|ynnpack] [--no-record]
"""

from __future__ import annotations

import argparse
import re

from jaxnet.cli import positive


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=positive(int), default=64)
    p.add_argument("--repeats", type=positive(int), default=5)
    p.add_argument("--impls", default="xla,im2col,pallas")
    p.add_argument("--layers", default="", help="only layers whose label contains this text, e.g. 1x1")
    p.add_argument("--xla-cpu-conv", default="eigen", choices=("eigen", "ynnpack"))
    p.add_argument("--no-record", action="store_true")
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # XLA reads its flags once, when JAX starts its backends
    from jaxnet import compiler

    compiler.set_cpu_conv(ARGS.xla_cpu_conv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import append_results, median_seconds  # noqa: E402
from jaxnet.ops import conv2d  # noqa: E402

# (label, H=W, C_in, C_out, kernel, stride): the conv layers of ResNet-18 (CIFAR stem) and FastNet, ResNet-50's
# bottleneck 1×1s, and PlainCNN's last two (a 3×3 kernel larger than its 2×2 input).
SHAPES = [
    ("resnet18 stage1 3x3", 32, 64, 64, 3, 1), ("resnet18 stage2 3x3/2", 32, 64, 128, 3, 2),
    ("resnet18 stage2 3x3", 16, 128, 128, 3, 1), ("resnet18 stage3 3x3", 8, 256, 256, 3, 1),
    ("resnet18 stage4 3x3", 4, 512, 512, 3, 1), ("resnet18 proj 1x1/2", 32, 64, 128, 1, 2),
    ("fastnet block1 3x3", 31, 24, 64, 3, 1), ("fastnet block2 3x3", 15, 64, 256, 3, 1),
    ("fastnet block3 3x3", 7, 256, 256, 3, 1), ("fastnet block3 3x3 on 3x3", 3, 256, 256, 3, 1),
    ("resnet50 1x1 reduce", 16, 512, 128, 1, 1), ("resnet50 1x1 expand", 16, 128, 512, 1, 1),
    ("plain conv4 3x3", 4, 128, 256, 3, 1), ("plain conv5 3x3 on 2x2", 2, 256, 256, 3, 1),
]


def lowered_ops(fn, *args) -> str:
    """The compute ops in XLA's optimised HLO: convolution, dot, custom calls (library kernels)."""
    text = fn.lower(*args).compile().as_text()
    found = []
    for op in ("convolution", "dot", "custom-call"):
        if re.search(rf"\b{op}\(", text):
            found.append(op)
    targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))
    return "+".join(found) + (f" ({', '.join(targets)})" if targets else "")


def main() -> None:
    args = ARGS
    rows = ["| layer | shape (B,H,W,C→O) | impl | fwd+bwd ms | GFLOP/s | lowered to |", "|" + " --- |" * 6]
    for label, hw, cin, cout, k, s in (shape for shape in SHAPES if args.layers in shape[0]):
        x = jax.random.normal(jax.random.key(0), (args.batch, hw, hw, cin))
        w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.05
        out_hw = -(-hw // s)
        flops = 3 * 2 * args.batch * out_hw * out_hw * cout * cin * k * k  # forward + two backward products
        for impl in args.impls.split(","):
            fn = jax.jit(jax.value_and_grad(lambda x, w, impl=impl: jnp.sum(conv2d(x, w, strides=s, impl=impl) ** 2),
                                            argnums=(0, 1)))
            seconds = median_seconds(lambda: fn(x, w), repeats=args.repeats, warmup=1)
            rows.append(f"| {label} | {args.batch},{hw},{hw},{cin}→{cout} | {impl} | {seconds * 1e3:.1f} | "
                        f"{flops / seconds / 1e9:.0f} | {lowered_ops(fn, x, w)} |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    notes = f"XLA CPU convs: {args.xla_cpu_conv}. GFLOP/s counts forward + input and weight gradients (3 GEMMs)."
    print(notes)
    if not args.no_record:
        append_results(f"Conv implementations ({args.xla_cpu_conv})", table, notes)


if __name__ == "__main__":
    main()
