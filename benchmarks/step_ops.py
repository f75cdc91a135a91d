"""Where a train step's time goes, jaxnet against PyTorch, by kind of op: conv forward, conv backward (jaxnet's
split into input and weight gradients), BatchNorm, activation, pooling, head and loss, optimizer, layout copies.

jaxnet: a `jax.profiler` trace of the jitted step; each traced op is found in the compiled HLO by name and
classed by its opcode and the JAX source path of its metadata (`jaxnet.profiling.hlo_instructions`). XLA's CPU
runtime runs independent ops at once, so each moment is shared among the ops running then
(`jaxnet.profiling.exclusive_ms`). PyTorch: `torch.profiler`'s self CPU time of each op, classed by the op or
its nearest classed caller (an allocation inside a conv's backward counts as the conv's). Untraced step times
are taken too, interleaved (A B B A ...), to say what the traces leave out. Needs the `bench` extra (PyTorch).

    python -m benchmarks.step_ops [--model fastnet] [--conv-impl auto] [--dtype float32|bfloat16]
        [--torch-mode eager|eager-bf16] [--steps 5] [--traced-steps 2] [--batch N] [--no-record]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import sys
import tempfile

ROWS = ("conv forward", "conv backward", "BatchNorm", "activation", "pooling", "head and loss",
        "optimizer and metrics", "layout copies", "other")
CONV_GRADS = ("conv input grads", "conv weight grads")  # jaxnet's conv backward, in two


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fastnet", choices=("resnet18", "fastnet", "plain32", "plain256"))
    p.add_argument("--conv-impl", default="auto", help="jaxnet conv impl of the model (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--torch-mode", default=None, choices=("eager", "eager-bf16"),
                   help="PyTorch's mode (default: eager, eager-bf16 with --dtype bfloat16)")
    p.add_argument("--xla-cpu-conv", default="eigen", choices=("eigen", "ynnpack"))
    p.add_argument("--steps", type=int, default=5, help="untraced steps per framework, interleaved (≥ 1)")
    p.add_argument("--traced-steps", type=int, default=2, help="steps in each profile (≥ 1)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: the model's in train_step)")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count())
    p.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = p.parse_args(argv)
    if min(args.steps, args.traced_steps, args.batch or 1, args.torch_threads) < 1:
        p.error("--steps, --traced-steps, --batch and --torch-threads must be at least 1")
    args.torch_mode = args.torch_mode or ("eager-bf16" if args.dtype == "bfloat16" else "eager")
    return args


def shape_dims(shape: str) -> tuple[int, ...]:
    """The dimensions of an HLO array shape, sorted: "f32[64,3,3,256]{3,2,1,0}" → (3, 3, 64, 256)."""
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    return tuple(sorted(int(d) for d in m[1].split(",") if d)) if m else ()


_JAX_KINDS = ((("max_pool", "reduce_window", "select_and_scatter", "avg_pool"), "pooling"),
              (("batchnorm", "batch_norm"), "BatchNorm"),
              (("erf", "gelu", "silu", "logistic", "relu", "tanh"), "activation"),
              (("softmax", "one_hot", "logsumexp", "cross_entropy", "dense", "head", "dot_general"), "head and loss"))


def _path_kind(path: str) -> str | None:
    for words, kind in _JAX_KINDS:
        if any(w in path for w in words):
            return kind
    return "activation" if path.endswith("/max") else None  # relu is jnp.maximum(x, 0)


def jax_category(name: str, op: dict[str, str] | None, kernel_dims: set[tuple[int, ...]],
                 inner: list[str] = ()) -> str | None:
    """The kind of the traced XLA op `name`, from its HLO instruction `op` (`profiling.hlo_instructions`) and, for
    a fusion, the source paths of the instructions it holds (`inner`, in HLO order: its root last); None for a
    control-flow op (conditional, while, call), whose inner ops are traced on their own.

    A convolution is forward under `jvp(...)`, backward under `transpose(jvp(...))`; XLA's CPU compiler builds
    weight-gradient convolutions without metadata, known by a result of a kernel's dimensions (`kernel_dims`,
    each sorted). oneDNN's convs are custom calls named by their direction. Any other op is classed by its own
    source path, else by the nearest of its fused instructions' to the root that names a kind (a GELU fusion's
    root is a multiply; the erfc before it names it); outside `jvp(...)` it is the optimizer's or the metrics'.
    """
    if op is None:
        return "other"
    opcode, path, target = op["opcode"], op["op_name"].lower(), op["target"].lower()
    if opcode in ("conditional", "while", "call"):
        return None
    if "weightgrad" in target or "weight_grad" in target:
        return "conv weight grads"
    if "inputgrad" in target or "input_grad" in target:
        return "conv input grads"
    if opcode == "convolution" or "conv" in target:
        if "transpose(" in path:
            return "conv input grads"
        if "jvp(" in path or "conv" in target:
            return "conv forward"
        return "conv weight grads" if shape_dims(op["shape"]) in kernel_dims else "other"
    if opcode in ("copy", "transpose") or re.match(r"(transpose|copy)[_.]", name):
        return "layout copies"
    paths = [p.lower() for p in (path, *reversed(inner)) if p]
    if not paths:
        return "other"  # no metadata to go by
    if "jvp(" not in paths[0]:  # outside the gradient: the optimizer's update, the metrics
        return "optimizer and metrics"
    return next((kind for p in paths if (kind := _path_kind(p))), "other")


def torch_category(lineage: list[str]) -> str:
    """The kind of a PyTorch profiler event from its name and its callers' (`lineage`, innermost first): the
    first that names one; "other" if none does."""
    for name in lineage:
        n = name.lower()
        for words, kind in (
                (("optimizer.step",), "optimizer and metrics"),
                (("convolution_backward", "convolutionbackward"), "conv backward"),
                (("conv",), "conv forward"),
                (("batch_norm", "batchnorm"), "BatchNorm"),
                (("gelu", "relu", "silu", "threshold_backward"), "activation"),
                (("max_pool", "maxpool", "avg_pool", "avgpool"), "pooling"),
                (("softmax", "nll_loss", "nllloss", "cross_entropy", "linear", "addmm", "aten::mm", "mmbackward"),
                 "head and loss"),
                (("aten::copy_", "aten::contiguous", "aten::clone", "aten::to"), "layout copies")):
            if any(w in n for w in words):
                return kind
    return "other"


def kernel_dims(params) -> set[tuple[int, ...]]:
    """The dimensions, sorted, of each conv kernel (4-d leaf) of `params`: what `jax_category` knows XLA's
    weight-gradient convs by."""
    import jax

    return {tuple(sorted(leaf.shape)) for leaf in jax.tree.leaves(params) if leaf.ndim == 4}


def jax_profile(run, steps: int, hlo_text: str, kernel_dims: set[tuple[int, ...]]):
    """ms per step by kind, and the longest ops as (ms per step, name, kind), from a trace of `steps` runs."""
    import jax

    from jaxnet import profiling

    instructions = profiling.hlo_instructions(hlo_text)
    inner = collections.defaultdict(list)  # computation → its instructions' source paths, in HLO order
    for op in instructions.values():
        inner[op["computation"]].append(op["op_name"])
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            for _ in range(steps):
                run()
        intervals = profiling.op_intervals(directory)
    kinds = {}
    for name, *_ in intervals:
        op = instructions.get(name)
        kinds[name] = jax_category(name, op, kernel_dims, inner[op["calls"]] if op and op["calls"] else [])
    ms = profiling.exclusive_ms([iv for iv in intervals if kinds[iv[0]] is not None])
    by_kind = collections.Counter()
    for name, t in ms.items():
        by_kind[kinds[name]] += t / steps
    longest = sorted(((t / steps, name, kinds[name]) for name, t in ms.items()), reverse=True)
    return by_kind, longest


def torch_profile(run, steps: int) -> collections.Counter:
    """ms per step by kind: each event's self CPU time, classed by `torch_category`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    by_kind = collections.Counter()
    for event in prof.events():
        lineage, e = [], event
        while e is not None:
            lineage.append(e.name)
            e = e.cpu_parent
        by_kind[torch_category(lineage)] += event.self_cpu_time_total / 1e3 / steps
    return by_kind


def table(jax_ms: dict[str, float], torch_ms: dict[str, float], jax_step_s: float, torch_step_s: float) -> str:
    """Markdown rows by kind (jaxnet's conv backward is its input and weight gradients), then the totals."""
    jax_rows = dict(jax_ms)
    jax_rows["conv backward"] = sum(jax_rows.pop(k, 0.0) for k in CONV_GRADS)
    jax_total, torch_total = sum(jax_rows.values()), sum(torch_ms.values())
    rows = ["| kind of op | jaxnet ms/step | jaxnet share | PyTorch ms/step | PyTorch share | PyTorch/jaxnet time |",
            "|" + " --- |" * 6]

    def row(label, j, t):
        ratio = f"{t / j:.2f}×" if j > 0 and t > 0 else "n/a"
        rows.append(f"| {label} | {j:.1f} | {j / jax_total:.0%} | {t:.1f} | {t / torch_total:.0%} | {ratio} |")

    for kind in ROWS:
        row(kind, jax_rows.get(kind, 0.0), torch_ms.get(kind, 0.0))
        if kind == "conv backward":
            rows.append(f"| ↳ jaxnet: input grads {jax_ms.get(CONV_GRADS[0], 0.0):.1f}, weight grads "
                        f"{jax_ms.get(CONV_GRADS[1], 0.0):.1f} | | | | | |")
    row("**all ops, traced**", jax_total, torch_total)
    rows.append(f"| **step, untraced (median)** | {jax_step_s * 1e3:.1f} | | {torch_step_s * 1e3:.1f} | | "
                f"{torch_step_s / jax_step_s:.2f}× |")
    return "\n".join(rows)


def main(argv=None) -> None:
    args = _parse(argv)
    from jaxnet import compiler

    compiler.set_cpu_conv(args.xla_cpu_conv)  # XLA reads its flags once, when JAX starts its backends
    compiler.set_host_memory("keep")

    try:
        import torch
    except ImportError:
        print("error: benchmarks.step_ops compares with PyTorch, which is not installed: pip install -e '.[bench]'",
              file=sys.stderr)
        raise SystemExit(2) from None
    import jax
    import jax.numpy as jnp

    from benchmarks import train_step
    from benchmarks.common import append_results
    from jaxnet.errors import JaxnetError

    torch.set_num_threads(args.torch_threads)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
    try:
        step, state, data = train_step.jax_step(args.model, dtype, args.conv_impl, "jaxnet", args.batch)
        hlo_text = step.compiled.lower(state, data).compile().as_text()
    except JaxnetError as e:  # an unknown conv impl, oneDNN missing or without this dtype here
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    batch = data["label"].shape[0]
    holder = {"state": state}

    def jax_run():
        holder["state"], metrics = step(holder["state"], data)
        jax.block_until_ready(metrics)

    torch_run = train_step.torch_runner(args.model, args.torch_mode, batch=batch)
    runs = (jax_run, torch_run)
    for _ in range(2):  # warm-up: compilation, allocators
        for run in runs:
            run()
    times = ([], [])
    for i in range(args.steps):  # A B, B A, ...
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            times[k].append(train_step.timed(runs[k]))
    jax_ms, longest = jax_profile(jax_run, args.traced_steps, hlo_text, kernel_dims(state.params))
    torch_ms = torch_profile(torch_run, args.traced_steps)
    jax_s, torch_s = statistics.median(times[0]), statistics.median(times[1])
    text = table(jax_ms, torch_ms, jax_s, torch_s)
    top = "\n".join(f"| {name} | {kind} | {t:.1f} |" for t, name, kind in longest[:10])
    text += "\n\njaxnet's longest ops (ms per step, each moment shared among the ops running then):\n\n" \
            "| HLO op | kind | ms/step |\n| --- | --- | --- |\n" + top
    notes = (f"{args.model} b{batch}, jaxnet conv impl {args.conv_impl}, dtype {args.dtype}, XLA CPU convs "
             f"{args.xla_cpu_conv}; PyTorch {torch.__version__} {args.torch_mode}, channels_last, "
             f"{args.torch_threads} threads. Both: SGD with momentum; {args.traced_steps} traced steps each after "
             f"warm-up, {args.steps} untraced steps each interleaved. jaxnet: XLA ops of a jax.profiler trace, "
             f"classed from the compiled HLO (opcode, metadata op_name; weight-gradient convs by their kernel-shaped "
             f"result), each moment shared among the ops running then. PyTorch: self CPU time per op, classed by "
             f"the op or its nearest classed caller (torch.profiler). 'traced' totals include the profilers' "
             f"overhead and leave out time when no op ran (dispatch, Python).")
    print(text)
    print(notes)
    if not args.no_record:
        append_results(f"Where the train step's time goes, jaxnet vs PyTorch ({args.model}, {args.dtype}, "
                       f"{args.conv_impl})", text, notes)


if __name__ == "__main__":
    main()
