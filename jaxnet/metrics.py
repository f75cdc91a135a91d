"""Where metrics go: TensorBoard event files (tensorboardX, no TensorFlow needed), metrics.jsonl, a PNG of
the training curves, and a progress bar. Values arrive as host floats; fetching them is the loop's job."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class MetricWriter:
    """Appends {"kind": "train"|"val"|..., "step": int, **scalars} to workdir/metrics.jsonl and TensorBoard.

    The files are opened at the first write, so a run refused before training (a resume that does not fit)
    leaves nothing behind. With `enabled=False` (a non-zero process, in multi-host runs) it writes nothing.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
        self.workdir, self.enabled = Path(workdir), enabled
        self._jsonl = self._tb = None

    def write(self, kind: str, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._jsonl is None:
            SummaryWriter = _summary_writer_class()
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.workdir / "metrics.jsonl", "a")
            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
        self._jsonl.write(json.dumps({"kind": kind, "step": int(step), **scalars}) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tb.add_scalar(f"{kind}/{name}", value, int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._tb.close()


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without PyTorch where no one has imported it: tensorboardX's writer
    imports torch wherever it is installed (2 s of every run's start on a 2-core CPU) only to accept torch tensors,
    which jaxnet never passes. A torch already imported is left as it is."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while this stands
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(jsonl: str | os.PathLike, png: str | os.PathLike) -> None:
    """A PNG with three panels: loss (train, val), accuracy (train, val) and learning rate, against step. Drawn on
    a figure of its own (matplotlib's object API: no pyplot, no backend chosen for the process), so it may run
    beside other work in a thread."""
    from matplotlib.figure import Figure

    rows = read_jsonl(jsonl)
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    for ax, key in zip(axes, ("loss", "accuracy", "lr")):
        for kind in ("train", "val"):
            points = [(r["step"], r[key]) for r in rows if r["kind"] == kind and key in r]
            if points:
                ax.plot(*zip(*points), label=kind, marker="." if kind == "val" else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=80)


def progress(total: int, desc: str, *, enabled: bool = True) -> tqdm:
    """A per-epoch progress bar counting images (so tqdm shows img/s and the ETA)."""
    return tqdm(total=total, desc=desc, unit="img", unit_scale=True, disable=not enabled, leave=True,
                dynamic_ncols=True, mininterval=1.0)
