"""Compiler-side measurements: lower/compile times, XLA's cost and memory analysis, MFU, HLO dumps of the
steps, profiler traces, and an offline summary of a trace.

    python -m jaxnet.profiling summarize DIR [--top 20]   # top ops by time from DIR/**/*.trace.json.gz
"""

from __future__ import annotations

import bisect
import collections
import gzip
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxnet.cli import Parser, positive


def compile_stats(fn: Callable, *args: Any) -> dict[str, float | None]:
    """Lower and compile `fn` (a jitted function) for `args` and report what XLA says about it.

    Returns lower_s and compile_s (wall seconds), flops and bytes_accessed (XLA's cost analysis of the
    optimised module, per call), and peak_memory_bytes (arguments + outputs + temporaries, from the
    memory analysis); None where the backend does not report a value.
    """
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older JAX: one dict per device program
        cost = cost[0] if cost else {}
    memory = compiled.memory_analysis()
    peak = None
    if memory is not None:
        peak = sum(getattr(memory, f, 0) for f in ("argument_size_in_bytes", "output_size_in_bytes",
                                                     "temp_size_in_bytes")) - getattr(memory, "alias_size_in_bytes", 0)
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "flops": cost.get("flops"),
            "bytes_accessed": cost.get("bytes accessed"), "peak_memory_bytes": peak}


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOP utilisation: achieved FLOP/s (`flops` per `seconds`) over `peak_flops`."""
    return flops / seconds / peak_flops


def dump_hlo(directory: str | os.PathLike, fns: dict[str, tuple[Callable, tuple]]) -> Path:
    """Write StableHLO, HLO before optimisation and HLO after optimisation of each named jitted function
    (`{"train_step": (jitted, args), ...}`) to `directory`, with index.json naming which file is which."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index = {}
    for name, (fn, args) in fns.items():
        lowered = fn.lower(*args)
        files = {"stablehlo": f"{name}.stablehlo.mlir", "hlo_before_optimizations": f"{name}.before_optimizations.hlo",
                 "hlo_after_optimizations": f"{name}.after_optimizations.hlo"}
        (directory / files["stablehlo"]).write_text(lowered.as_text())
        (directory / files["hlo_before_optimizations"]).write_text(lowered.as_text(dialect="hlo"))
        (directory / files["hlo_after_optimizations"]).write_text(lowered.compile().as_text())
        index[name] = files
    (directory / "index.json").write_text(json.dumps(index, indent=2))
    return directory


def op_intervals(directory: str | os.PathLike) -> list[tuple[str, float, float]]:
    """(op name, start µs, end µs) of each device/XLA op event in the newest `*.trace.json.gz` under
    `directory` (written by `jax.profiler.trace`), host Python frames and the runtime's own scopes left out.

    XLA's CPU runtime runs some ops asynchronously (convolutions among them): their event covers only the
    dispatch, and an "end: NAME" event marks completion. Such an op lasts from its dispatch to the first
    "end:" event of its name after it.
    """
    traces = sorted(Path(directory).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"no *.trace.json.gz under {directory}")
    with gzip.open(traces[-1], "rt") as f:
        events = json.load(f).get("traceEvents", [])
    threads = {(e.get("pid"), e.get("tid")): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    ops, ends = [], collections.defaultdict(list)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e or "ts" not in e:
            continue
        thread = threads.get((e.get("pid"), e.get("tid")), "")
        # Host Python frames and the runtime's own scopes (ThunkExecutor::Execute, ...) are not ops.
        if "python" in thread.lower() or e["name"].startswith("$") or "::" in e["name"]:
            continue
        if e["name"].startswith("end: "):
            ends[e["name"][len("end: "):]].append(e["ts"])
        else:
            ops.append(e)
    for times in ends.values():
        times.sort()
    intervals = []
    for e in ops:
        times = ends.get(e["name"])
        i = bisect.bisect_left(times, e["ts"]) if times else 0
        end = times[i] if times and i < len(times) else e["ts"] + e["dur"]
        intervals.append((e["name"], e["ts"], end))
    return intervals


def summarize_trace(directory: str | os.PathLike, top: int = 20) -> list[tuple[str, float, int]]:
    """(op name, total milliseconds, count) of the `top` device/XLA ops by time in the newest
    `*.trace.json.gz` under `directory` (`op_intervals`: an asynchronous op from its dispatch to its end, so
    concurrent ops can add up to more than the wall time; `exclusive_ms` shares such time out)."""
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for name, start, end in op_intervals(directory):
        totals[name][0] += (end - start) / 1e3
        totals[name][1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return [(name, ms, int(count)) for name, (ms, count) in ranked]


def exclusive_ms(intervals: list[tuple[str, float, float]]) -> dict[str, float]:
    """Milliseconds of wall time per op name from (name, start µs, end µs) intervals, each moment shared
    equally among the ops running then: XLA's CPU runtime runs independent ops at once (a conv's input and
    weight gradients, say, each on part of the cores), so their own durations add up to more than the time
    they took. The values add up to the time during which any op ran."""
    edges = sorted([(start, 1, name) for name, start, _ in intervals] + [(end, -1, name) for name, _, end in intervals])
    running: collections.Counter = collections.Counter()
    totals: dict[str, float] = collections.defaultdict(float)
    before = None
    for t, change, name in edges:
        if running and before is not None and t > before:
            share = (t - before) / 1e3 / sum(running.values())
            for op, n in running.items():
                totals[op] += share * n
        running[name] += change
        if running[name] == 0:
            del running[name]
        before = t
    return dict(totals)


_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_HLO_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")


def hlo_instructions(hlo_text: str) -> dict[str, dict[str, str]]:
    """Each instruction of an HLO module's text (`compiled.as_text()`) by name — the names its profiler trace
    gives ops — as {"opcode", "shape", "op_name" (the JAX source path of its metadata, "" if none), "target"
    (a custom call's), "computation" (the one it is in), "calls" (a fusion's or call's computation, else "")}."""
    instructions, computation = {}, ""
    for line in hlo_text.splitlines():
        if m := _HLO_INSTRUCTION.match(line):
            name, shape, opcode, rest = m.groups()
            op_name = re.search(r'op_name="((?:[^"\\]|\\.)*)"', rest)
            target = re.search(r'custom_call_target="([^"]*)"', rest)
            calls = re.search(r"\bcalls=%?([^\s,}]+)", rest)
            instructions[name] = {"opcode": opcode, "shape": shape, "op_name": op_name[1] if op_name else "",
                                  "target": target[1] if target else "", "computation": computation,
                                  "calls": calls[1] if calls else ""}
        elif m := _HLO_COMPUTATION.match(line):
            computation = m[1]
    return instructions


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m jaxnet.profiling")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summarize", help="top ops by time from a profile directory")
    s.add_argument("directory")
    s.add_argument("--top", type=positive(int), default=20)
    args = p.parse_args(argv)
    try:
        rows = summarize_trace(args.directory, args.top)
    except (FileNotFoundError, json.JSONDecodeError, OSError, EOFError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'ms':>10}  {'count':>6}  op")
    for name, ms, count in rows:
        print(f"{ms:10.2f}  {count:6d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
