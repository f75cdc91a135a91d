"""Time of the jitted device-side batch pipeline (gather + translate + flip [+ cutout] + normalise) per batch.

Target (issue 3): ≤ 10 ms for 1024 images on this CPU.  `python -m benchmarks.augment [--batch 1024]`
"""

from __future__ import annotations

import argparse
from functools import partial

import jax
import numpy as np

from benchmarks.common import append_results, median_seconds
from jaxnet import data, parallel
from jaxnet.cli import positive


def pipeline(key, images, indices, *, cutout):
    batch = data.augment(key, images[indices], translate=2, flip=True, cutout=cutout)
    return data.normalize(batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=positive(int), default=1024)
    p.add_argument("--repeats", type=positive(int), default=50)
    p.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = p.parse_args()
    images = jax.device_put(np.random.default_rng(0).integers(0, 256, (45_000, 32, 32, 3), dtype=np.uint8))
    indices = jax.random.permutation(jax.random.key(0), 45_000)[: args.batch]
    rows = ["| pipeline | batch | median ms |", "| --- | --- | --- |"]
    for cutout in (0, 8):
        fn = parallel.jit_batch_fn(partial(pipeline, cutout=cutout))
        keys = iter(jax.random.split(jax.random.key(1), args.repeats + 2))
        ms = 1e3 * median_seconds(lambda: fn(next(keys), images, indices), repeats=args.repeats)
        rows.append(f"| translate 2 + flip{' + cutout 8' if cutout else ''} + normalise | {args.batch} | {ms:.2f} |")
    table = "\n".join(rows)
    print(table)
    if not args.no_record:
        append_results("Augmentation pipeline", table, "Target: ≤ 10 ms per 1024-image batch.")


if __name__ == "__main__":
    main()
