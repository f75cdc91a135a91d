"""The peer: the CIFAR-10 speed record's recipe (airbench94_muon, Jordan 2024) in PyTorch eager, on the CPU
or an NVIDIA GPU, on the same images jaxnet's experiment draws (`jaxnet.experiment.load_splits`, the same seed
and subsets).

Written from the published recipe: the whitened FastNet (GELU, BatchNorm without scale, momentum 0.6, eps
1e-12; dirac-initialised 3×3 convs; head × 1/256 with unit-std weights), Muon (Nesterov momentum 0.6, 3
Newton–Schulz steps in bf16, filters renormalised to √(out channels) each step) on the conv filters, Nesterov
SGD (0.85) on biases and head with coupled decay, a summed loss with label smoothing 0.2, batch 2000 for 8
epochs with the rate falling linearly to 0, the whitening bias trained for 3 epochs; alternating flips and
±2-pixel reflect-padded translations; test with TTA level 2 (mirror + 1-pixel translations, 6 views).
Times as the record does: `train_seconds` is whitening init + training, without data loading or
per-epoch evaluation (the record's per-epoch test pass is skipped); `wall_seconds` is the whole process.
`--dtype bfloat16` runs the net's forward passes (training and test) under `torch.autocast("cpu",
torch.bfloat16)` — the record runs its net in half precision on GPUs; on CPUs with AMX or AVX-512 BF16 this is
PyTorch's fast mode (oneDNN) — with parameters, optimizer and whitening in float32. `--device cuda` runs it all
on the GPU (`--dtype bfloat16` autocasts there alike; cuDNN's autotuner on; the clock read after a
synchronisation); the record itself also compiles the net (`torch.compile`, minutes of autotuning) and times
after a warm-up run, which this peer does not: its `train_seconds` include cuDNN's first-call autotuning.

    python -m benchmarks.torch_record --data-dir D --summary out.json [--seed 0] [--epochs 8]
        [--batch-size 2000] [--train-subset N] [--test-subset N] [--threads N] [--dtype float32|bfloat16]
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

T0 = time.perf_counter()

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _net(torch, nn):
    F = nn.functional

    class BatchNorm(nn.BatchNorm2d):
        def __init__(self, features):
            super().__init__(features, eps=1e-12, momentum=0.4)  # PyTorch's momentum: weight of the new value
            self.weight.requires_grad = False

    class Conv(nn.Conv2d):
        def __init__(self, cin, cout):
            super().__init__(cin, cout, kernel_size=3, padding="same", bias=False)

        def reset_parameters(self):
            super().reset_parameters()
            torch.nn.init.dirac_(self.weight.data[:self.weight.size(1)])

    def group(cin, cout):
        return nn.Sequential(Conv(cin, cout), nn.MaxPool2d(2), BatchNorm(cout), nn.GELU(),
                             Conv(cout, cout), BatchNorm(cout), nn.GELU())

    class Net(nn.Module):
        def __init__(self, widths=(64, 256, 256)):
            super().__init__()
            self.whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
            self.whiten.weight.requires_grad = False
            self.layers = nn.Sequential(nn.GELU(), group(24, widths[0]), group(widths[0], widths[1]),
                                        group(widths[1], widths[2]), nn.MaxPool2d(3))
            self.head = nn.Linear(widths[2], 10, bias=False)
            with torch.no_grad():
                self.head.weight /= self.head.weight.std()

        def init_whiten(self, images, eps=5e-4):
            c, (h, w) = images.shape[1], self.whiten.weight.shape[2:]
            patches = images.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c, h, w).float()
            flat = patches.view(len(patches), -1)
            eigenvalues, eigenvectors = torch.linalg.eigh(flat.T @ flat / len(flat), UPLO="U")
            scaled = eigenvectors.T.reshape(-1, c, h, w) / torch.sqrt(eigenvalues.view(-1, 1, 1, 1) + eps)
            self.whiten.weight.data[:] = torch.cat((scaled, -scaled))

        def forward(self, x, whiten_bias_grad=True):
            b = self.whiten.bias
            x = self.layers(F.conv2d(x, self.whiten.weight, b if whiten_bias_grad else b.detach()))
            x = x.view(len(x), -1)
            return self.head(x) / x.size(-1)

    return Net


def _orthogonalize(torch, g, steps=3, eps=1e-7):
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    x /= x.norm() + eps
    tall = g.size(0) > g.size(1)
    x = x.T if tall else x
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def _muon_step(torch, params, buffers, lr, momentum=0.6):
    with torch.no_grad():
        for p in params:
            buf = buffers.setdefault(p, torch.zeros_like(p))
            buf.mul_(momentum).add_(p.grad)
            g = p.grad.add(buf, alpha=momentum)
            p.mul_(len(p) ** 0.5 / p.norm())
            p.add_(_orthogonalize(torch, g.reshape(len(g), -1)).view(g.shape).to(p.dtype), alpha=-lr)


def _crop(torch, padded, size, generator):
    r = (padded.size(-1) - size) // 2
    shifts = torch.randint(-r, r + 1, (len(padded), 2), generator=generator).to(padded.device)
    rows = torch.empty((len(padded), 3, size, padded.size(-1)), dtype=padded.dtype, device=padded.device)
    for s in range(-r, r + 1):
        mask = shifts[:, 0] == s
        rows[mask] = padded[mask, :, r + s:r + s + size, :]
    out = torch.empty((len(padded), 3, size, size), dtype=padded.dtype, device=padded.device)
    for s in range(-r, r + 1):
        mask = shifts[:, 1] == s
        out[mask] = rows[mask, :, :, r + s:r + s + size]
    return out


def _tta_logits(torch, net, images, batch):
    F = torch.nn.functional

    def mirror(x):
        return 0.5 * net(x) + 0.5 * net(x.flip(-1))

    outs = []
    with torch.no_grad():
        for x in images.split(batch):
            padded = F.pad(x, (1,) * 4, "reflect")
            translated = 0.5 * (mirror(padded[:, :, 0:32, 0:32]) + mirror(padded[:, :, 2:34, 2:34]))
            outs.append(0.5 * mirror(x) + 0.5 * translated)
    return torch.cat(outs)


def _plain_logits(torch, net, images, batch):
    with torch.no_grad():
        return torch.cat([net(x) for x in images.split(batch)])


def run(args) -> dict:
    import torch
    from torch import nn

    from jaxnet import configs
    from jaxnet import experiment

    device = torch.device(args.device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def clock():  # GPU work is asynchronous: read the clock once it is done
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    config = configs.override(configs.get_config("muon"), [f"train_subset={args.train_subset}",
                                                           f"test_subset={args.test_subset}"])
    train_set, _, test_set = experiment.load_splits(config, args.data_dir, args.seed)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (MEAN, STD))

    def tensor(split):
        x = torch.from_numpy(split["image"]).to(device).permute(0, 3, 1, 2).float() / 255
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last), torch.from_numpy(
            split["label"]).to(device).long()

    train_x, train_y = tensor(train_set)
    test_x, test_y = tensor(test_set)
    net = _net(torch, nn)().to(device, memory_format=torch.channels_last)
    batch = args.batch_size
    steps_per_epoch = len(train_x) // batch
    total = math.ceil(args.epochs * steps_per_epoch)
    whiten_steps = math.ceil(3 * steps_per_epoch)
    wd = 2e-6 * batch
    norm_biases = [p for n, p in net.named_parameters() if "layers" in n and p.ndim == 1 and p.requires_grad]
    groups = [dict(params=[net.whiten.bias], lr=0.053, weight_decay=wd / 0.053),
              dict(params=norm_biases, lr=0.053, weight_decay=wd / 0.053),
              dict(params=[net.head.weight], lr=0.67, weight_decay=wd / 0.67)]
    sgd = torch.optim.SGD(groups, momentum=0.85, nesterov=True)
    for g in sgd.param_groups:
        g["initial_lr"] = g["lr"]
    filters = [p for p in net.parameters() if p.ndim == 4 and p.requires_grad]
    buffers: dict = {}

    t_train = clock()
    net.init_whiten(train_x[:5000])
    mirrored = (torch.rand(len(train_x), generator=generator) < 0.5).to(device)  # half the images mirrored once, then
    padded = torch.nn.functional.pad(torch.where(mirrored.view(-1, 1, 1, 1), train_x.flip(-1), train_x), (2,) * 4,
                                     "reflect")  # every image mirrored every other epoch
    step = 0
    net.train()
    for epoch in range(math.ceil(total / steps_per_epoch)):
        source = padded if epoch % 2 == 0 else padded.flip(-1)
        order = torch.randperm(len(train_x), generator=generator).to(device)
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            x = _crop(torch, source[idx], 32, generator).contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = net(x, whiten_bias_grad=step < whiten_steps)
            loss = nn.functional.cross_entropy(logits.float(), train_y[idx], label_smoothing=0.2, reduction="sum")
            loss.backward()
            sgd.param_groups[0]["lr"] = 0.053 * (1 - step / whiten_steps)
            for g in sgd.param_groups[1:]:
                g["lr"] = g["initial_lr"] * (1 - step / total)
            sgd.step()
            _muon_step(torch, filters, buffers, 0.24 * (1 - step / total))
            net.zero_grad(set_to_none=True)
            step += 1
            if step >= total:
                break
    train_seconds = clock() - t_train
    net.eval()
    with autocast():
        plain = (_plain_logits(torch, net, test_x, 2000).argmax(1) == test_y).float().mean().item()
        tta = (_tta_logits(torch, net, test_x, 2000).argmax(1) == test_y).float().mean().item()
    return {"peer": "torch_record (airbench94_muon)", "seed": args.seed, "test_accuracy": plain,
            "test_accuracy_tta": tta, "steps": step, "train_seconds": train_seconds,
            "images_per_second": step * batch / train_seconds, "wall_seconds": time.perf_counter() - T0,
            "torch": torch.__version__, "threads": args.threads, "dtype": args.dtype,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def unavailable(device: str) -> str | None:
    """Why the peer cannot run on `device` here (no PyTorch, or no GPU that it sees), or None if it can."""
    try:
        import torch
    except ImportError:
        return "the peer needs PyTorch: pip install -e '.[bench]'"
    if device == "cuda" and not torch.cuda.is_available():
        return f"the peer's device is cuda, but this PyTorch ({torch.__version__}) sees no CUDA GPU"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.torch_record", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="local CIFAR-10, as the experiment's --data-dir")
    p.add_argument("--summary", required=True, help="where to write the run's summary (JSON)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=8.0)
    p.add_argument("--batch-size", type=int, default=2000)
    p.add_argument("--train-subset", type=int, default=0, help="use only this many train images (0 = all)")
    p.add_argument("--test-subset", type=int, default=0, help="use only this many test images (0 = all)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the net's compute dtype (bfloat16: under torch.autocast; parameters stay float32)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where it runs (default: %(default)s)")
    args = p.parse_args(argv)
    problem = unavailable(args.device)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # jaxnet reads the images: its JAX must not claim the GPU's memory
    summary = run(args)
    with open(args.summary, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"test accuracy {summary['test_accuracy']:.4f} (TTA: {summary['test_accuracy_tta']:.4f}); "
          f"{summary['train_seconds']:.0f} s training, {summary['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
