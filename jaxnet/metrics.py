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
    A run that continues after step s (`start_at(s)`: resumed from its checkpoint at s, or started again from 0
    after a kill before its first save) logs again the steps after s that a killed run had logged: those rows are
    dropped from metrics.jsonl when it is opened, and TensorBoard hides their events (`purge_step`), so each
    (kind, step) is there once, as in a run that never stopped. Without `start_at` it appends to what is there.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
        self.workdir, self.enabled = Path(workdir), enabled
        self._jsonl = self._tb = None
        self._start: int | None = None  # None: append to what is there

    def start_at(self, step: int) -> None:
        """The run goes on after `step`: what an earlier run in this workdir logged after it is dropped (see above)."""
        self._start = step

    def write(self, kind: str, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._jsonl is None:
            SummaryWriter = _summary_writer_class()
            self.workdir.mkdir(parents=True, exist_ok=True)
            path, tensorboard = self.workdir / "metrics.jsonl", self.workdir / "tensorboard"
            resumed = self._start is not None
            if resumed and path.exists():
                _drop_rows_after(path, self._start)
            self._jsonl = open(path, "a")
            self._tb = SummaryWriter(str(tensorboard),
                                     purge_step=self._start + 1 if resumed and tensorboard.exists() else None)
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


def _drop_rows_after(path: Path, step: int) -> None:
    """Rewrite the metrics.jsonl at `path` without its rows after `step` (and a last line cut short by a kill), by
    a complete temporary file renamed over it: a kill during the rewrite leaves the old file or the new one."""
    lines = path.read_text().splitlines(keepends=True)

    def kept(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    keep = [line if line.endswith("\n") else line + "\n" for line in lines if kept(line)]
    if keep != lines:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


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
