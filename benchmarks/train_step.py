"""jaxnet vs PyTorch train steps on this machine, interleaved in one run, plus the peak FLOP/s for MFU.

Each model is defined for both frameworks here (same layers and shapes). After warm-up (compilation
excluded and reported apart), steps alternate A B B A ...; the table gives median step times, img/s, the
median of the per-pair time ratios (PyTorch / jaxnet: > 1 means jaxnet is faster), and MFU: on a CPU against the
GEMM peak in the step's dtype measured beside each pair of steps, on a GPU (both frameworks on it) against the datasheet's peak
of its kind in the step's dtype (`common.PEAK_FLOPS`). Several conv impls make one jaxnet runner each, and several PyTorch
modes (eager, `torch.compile`, each in fp32 or under bf16 autocast) one PyTorch runner each, all in the same
rotation; each jaxnet row is compared with PyTorch's best mode, the one of lowest median. Needs the `bench` extra
(PyTorch).

    python -m benchmarks.train_step [--models resnet18,fastnet,plain32,plain256] [--steps 5]
        [--xla-cpu-conv eigen|ynnpack] [--host-memory keep|system] [--conv-impl auto[,onednn,...]]
        [--norm jaxnet|flax] [--dtype float32|bfloat16] [--torch-modes eager,compile[,eager-bf16,compile-bf16]]
        [--torch-threads 2] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

from jaxnet.cli import positive

TORCH_MODES = ("eager", "compile", "eager-bf16", "compile-bf16")


def _torch_modes(text: str) -> tuple[str, ...]:
    modes = tuple(text.split(","))
    if bad := [m for m in modes if m not in TORCH_MODES]:
        raise argparse.ArgumentTypeError(f"unknown PyTorch mode(s) {', '.join(bad)}; valid: {', '.join(TORCH_MODES)}")
    return modes


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,fastnet,plain32,plain256")
    p.add_argument("--steps", type=positive(int), default=5,
                   help="timed steps per framework and model (≥ 5 for a median)")
    p.add_argument("--xla-cpu-conv", default="eigen", choices=("eigen", "ynnpack"))
    p.add_argument("--host-memory", default="keep", choices=("keep", "system"),
                   help="malloc's settings for the process, both frameworks (jaxnet.compiler.set_host_memory; "
                        "default: %(default)s, as jaxnet's experiment)")
    p.add_argument("--conv-impl", default="auto",
                   help="jaxnet conv impl(s) of the models, comma-separated (default: %(default)s)")
    p.add_argument("--norm", default="jaxnet", choices=("jaxnet", "flax"),
                   help="BatchNorm of the jaxnet models: jaxnet.layers.BatchNorm or flax.linen.BatchNorm")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype of the jaxnet models (bfloat16: fp32 params, bf16 compute)")
    p.add_argument("--torch-modes", type=_torch_modes, default=None,
                   help="PyTorch runners to compare with, comma-separated, of: " + ", ".join(TORCH_MODES)
                   + " (default: eager,compile; with --dtype bfloat16 all four: PyTorch's best of fp32 and bf16)")
    p.add_argument("--torch-threads", type=positive(int), default=os.cpu_count())
    p.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = p.parse_args()
    if args.torch_modes is None:
        args.torch_modes = TORCH_MODES if args.dtype == "bfloat16" else TORCH_MODES[:2]
    return args


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # XLA reads its flags once, when JAX starts its backends
    from jaxnet import compiler

    compiler.set_cpu_conv(ARGS.xla_cpu_conv)
    compiler.set_host_memory(ARGS.host_memory)

import flax.linen  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import append_results, published_peak  # noqa: E402
from jaxnet import layers, models, parallel, profiling, train  # noqa: E402

# benchmark name → (jaxnet.models registry name, batch)
JAX_MODELS = {"resnet18": ("resnet18", 256), "fastnet": ("fastnet", 512), "plain32": ("plain", 32),
              "plain256": ("plain", 256)}


def torch_model(name: str):
    """The same architectures in PyTorch (NCHW modules, run channels_last)."""
    import torch
    from torch import nn

    def conv_bn(cin, cout, stride=1, k=3):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]

    class Basic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(*conv_bn(cin, cout, stride), nn.ReLU(), *conv_bn(cout, cout))
            self.proj = nn.Sequential(*conv_bn(cin, cout, stride, 1)) if stride != 1 or cin != cout else nn.Identity()

        def forward(self, x):
            return torch.relu(self.body(x) + self.proj(x))

    class GroupFast(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2),
                                     nn.BatchNorm2d(cout), nn.GELU(), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                                     nn.BatchNorm2d(cout), nn.GELU())

        def forward(self, x):
            return self.net(x)

    match name:
        case "resnet18":
            layers, cin = [*conv_bn(3, 64), nn.ReLU()], 64
            for i, width in enumerate((64, 128, 256, 512)):
                for j in range(2):
                    layers.append(Basic(cin, width, 2 if i > 0 and j == 0 else 1))
                    cin = width
            return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))
        case "fastnet":
            return nn.Sequential(nn.Conv2d(3, 24, 2, bias=True), nn.GELU(), GroupFast(24, 64), GroupFast(64, 256),
                                 GroupFast(256, 256), nn.MaxPool2d(3), nn.Flatten(), nn.Linear(256, 10, bias=False))
        case _:
            layers, cin = [], 3
            for width in (64, 64, 128, 256):
                layers += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
                cin = width
            return nn.Sequential(*layers, nn.Conv2d(256, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))


def jax_step(name: str, dtype, conv_impl: str, norm: str, batch: int | None = None):
    """The jitted train step of `name` (SGD with momentum), its first state and a batch of random images (of
    the model's size in `JAX_MODELS` unless `batch` is given)."""
    registered, default_batch = JAX_MODELS[name]
    batch = batch or default_batch
    model = models.get(registered, num_classes=10, dtype=dtype, conv=partial(layers.Conv, impl=conv_impl),
                       norm={"jaxnet": layers.BatchNorm, "flax": flax.linen.BatchNorm}[norm])
    state = train.create_train_state(model, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                     optax.sgd(0.01, momentum=0.9))
    rng = np.random.default_rng(0)
    data = jax.device_put({"image": rng.normal(size=(batch, 32, 32, 3)).astype(np.float32),
                           "label": rng.integers(0, 10, batch).astype(np.int32)})
    return parallel.jit_train_step(), state, data


def jax_runner(name: str, dtype, conv_impl: str, norm: str):
    step, state, data = jax_step(name, dtype, conv_impl, norm)
    batch = data["label"].shape[0]
    stats = profiling.compile_stats(step.compiled, state, data)  # jit reuses this compilation at the first call
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], data)
        jax.block_until_ready(metrics)

    return run, batch, stats


def torch_runner(name: str, mode: str, device: str = "cpu", batch: int | None = None):
    """One PyTorch train step of `name` in `mode` on `device` ("cpu" or "cuda"): eager or `torch.compile`d
    (compiled at its first call), fp32 or under bf16 autocast; on CUDA it waits for the GPU before returning.
    The batch is the model's in `JAX_MODELS` unless `batch` is given."""
    import torch

    batch = batch or JAX_MODELS[name][1]
    bf16 = mode.endswith("-bf16")
    model = torch_model(name).to(device, memory_format=torch.channels_last)
    forward = torch.compile(model) if mode.startswith("compile") else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(forward(x), y)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def step_flops(name: str, dtype, norm: str, impls: list[str], stats: list[dict]) -> float:
    """The FLOPs of one train step of `name`, the same math for every impl: XLA's count of it (`stats`, one per
    impl), which leaves out oneDNN's convs — FFI calls it cannot see, in "onednn" and in "auto" where oneDNN is
    installed — so from an XLA-conv step if only those ran."""
    counted = [s["flops"] for impl, s in zip(impls, stats) if impl not in ("onednn", "auto")]
    return max(counted) if counted else jax_runner(name, dtype, "xla", norm)[2]["flops"]


def gemm_runners(dtype: str, n: int = 2048, probe: int = 256) -> tuple[dict, int]:
    """n×n @ n×n products of JAX and of PyTorch in `dtype` ("float32" or "bfloat16") by name, and their FLOPs:
    the machine's GEMM peak in that dtype is the faster (in bfloat16 PyTorch's oneDNN uses AMX where the CPU has
    it, XLA does not). A framework whose `probe`² product runs over 4× slower than the other's is left out: it
    cannot be the faster, and its n² product can take a minute (PyTorch's bfloat16 on a CPU without native bf16:
    1.4 GFLOP/s against XLA's 105 on a 2-core AMD EPYC, 2026-12-01)."""
    import torch

    def runners(size):
        a, t = jnp.ones((size, size), dtype), torch.ones(size, size, dtype=getattr(torch, dtype))
        f = jax.jit(lambda a: a @ a)
        f(a).block_until_ready()
        return {"JAX": lambda: f(a).block_until_ready(), "PyTorch": lambda: t @ t}

    kept = within({name: min(timed(g), timed(g)) for name, g in runners(probe).items()}, 4.0)
    return {name: g for name, g in runners(n).items() if name in kept}, 2 * n ** 3


def within(times: dict[str, float], factor: float) -> list[str]:
    """The names in `times` whose time is at most `factor` × the least."""
    return [name for name, t in times.items() if t <= factor * min(times.values())]


def gemm_peak(gemms: dict, flops: int) -> float:
    """FLOP/s of the faster of `gemms` now (each timed twice, the best kept)."""
    return flops / min(timed(g) for g in [*gemms.values(), *gemms.values()])


def compare(jax_times: list[float], torch_times: dict[str, list[float]], peaks: list[float], flops: float) -> dict:
    """One jaxnet runner against PyTorch's best mode (lowest median), from times taken in the same rounds.

    ratio: median over rounds of PyTorch's time / jaxnet's (> 1: jaxnet faster); MFU: median over rounds of the
    step's FLOP/s over the peak of its round, for both (the same FLOPs: the same architecture); None without a peak.
    """
    best = min(torch_times, key=lambda m: statistics.median(torch_times[m]))
    tt = torch_times[best]
    return {"jax_s": statistics.median(jax_times), "torch_mode": best, "torch_s": statistics.median(tt),
            "ratio": statistics.median(t / j for j, t in zip(jax_times, tt)),
            "jax_mfu": statistics.median(flops / j / p for j, p in zip(jax_times, peaks)) if all(peaks) else None,
            "torch_mfu": statistics.median(flops / t / p for t, p in zip(tt, peaks)) if all(peaks) else None}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    import torch

    args = ARGS
    torch.set_num_threads(args.torch_threads)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: JAX runs on a GPU but this PyTorch has no CUDA: the comparison would be unfair")
    if device == "cuda":  # the datasheet's peak of this GPU in the step's dtype (None: no MFU)
        peak_now = partial(published_peak, jax.devices()[0].device_kind, args.dtype)
    else:
        gemms, gemm_flops = gemm_runners(args.dtype)
        peak_now = partial(gemm_peak, gemms, gemm_flops)
    impls, modes = args.conv_impl.split(","), args.torch_modes
    rows = ["| model | batch | jaxnet conv impl | jaxnet ms | PyTorch ms by mode | PyTorch best | jaxnet img/s | "
            "PyTorch best img/s | PyTorch best/jaxnet time (paired median) | jaxnet compile s | "
            "jaxnet 1st step / steady | peak GFLOP/s | jaxnet MFU | PyTorch best MFU |",
            "|" + " --- |" * 14]
    for name in args.models.split(","):
        if name not in JAX_MODELS:
            raise SystemExit(f"error: unknown model {name!r}; valid: {', '.join(JAX_MODELS)}")
        jax_runs = [jax_runner(name, dtype, impl, args.norm) for impl in impls]
        batch = jax_runs[0][1]
        flops = step_flops(name, dtype, args.norm, impls, [stats for *_, stats in jax_runs])
        firsts = [timed(run) for run, *_ in jax_runs]  # the first steps (compiled above)
        runs = [run for run, *_ in jax_runs] + [torch_runner(name, mode, device) for mode in modes]
        for _ in range(2):  # warm-up (torch.compile compiles here)
            for fn in runs:
                fn()
        times, peaks = [[] for _ in runs], []
        for i in range(args.steps):  # A B G, B A G, ...: G measures the GEMM peak at the same moment
            for k in (range(len(runs)) if i % 2 == 0 else reversed(range(len(runs)))):
                times[k].append(timed(runs[k]))
            peaks.append(peak_now())
        torch_times = dict(zip(modes, times[len(impls):]))
        peak_text = f"{statistics.median(peaks) / 1e9:.0f}" if all(peaks) else "n/a"
        by_mode = " · ".join(f"{m} {statistics.median(t) * 1e3:.0f}" for m, t in torch_times.items())
        for impl, (_, _, stats), jt, first in zip(impls, jax_runs, times, firsts):
            c = compare(jt, torch_times, peaks, flops)
            jm, tm = c["jax_s"], c["torch_s"]
            mfus = f"{c['jax_mfu']:.0%} | {c['torch_mfu']:.0%}" if flops and c["jax_mfu"] else "n/a | n/a"
            compile_s = stats["lower_s"] + stats["compile_s"]
            rows.append(f"| {name} | {batch} | {impl} | {jm * 1e3:.0f} | {by_mode} | {c['torch_mode']} | "
                        f"{batch / jm:.0f} | {batch / tm:.0f} | {c['ratio']:.2f}× | {compile_s:.1f} | "
                        f"{first / jm:.2f} | {peak_text} | {mfus} |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    peak_note = (f"peak: the datasheet's for {jax.devices()[0].device_kind} in {args.dtype} (benchmarks/common.py)"
                 if device == "cuda" else f"peak: {args.dtype} 2048² GEMMs of {' and '.join(gemms)} after each "
                                          "round of steps, the faster (median shown; a framework whose 256² GEMM "
                                          "ran over 4× slower than the other's is left out)")
    notes = (f"Both frameworks on {device}; {peak_note}; MFU is the median over rounds of the step's FLOP/s over the peak of its round, for PyTorch "
             f"with the jaxnet step's FLOPs (the same architecture). jaxnet dtype {args.dtype}; XLA CPU convs: "
             f"{args.xla_cpu_conv}; host memory (malloc, both frameworks): {args.host_memory}; jaxnet conv impls: "
             f"{args.conv_impl}; BatchNorm: {args.norm}; PyTorch "
             f"{torch.__version__}, channels_last, {args.torch_threads} threads, modes {','.join(modes)} (compile: "
             f"`torch.compile` of the model, default backend; -bf16: under bf16 autocast); PyTorch best = the mode "
             f"of lowest median, against which the ratio is paired. FLOPs from XLA's cost analysis of the jaxnet "
             f"step, the largest over the impls (it does not see inside oneDNN's FFI calls); compile s = lower + "
             f"compile of the step (no persistent cache); 1st step = the first call after it.")
    print(table)
    print(notes)
    if not args.no_record:
        append_results(f"Train step, jaxnet vs PyTorch ({args.dtype}, {args.xla_cpu_conv})", table, notes)


if __name__ == "__main__":
    main()
