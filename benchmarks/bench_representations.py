"""Cost of the representation diagnostics: NeuralCollapse, feature rank, invariant sets.

Usage::

    python benchmarks/bench_representations.py [--device cuda] [--only nc,rank,collapse] [--quick]

1. NeuralCollapse: two ``update`` passes (+ ``start_second_pass``) and ``compute`` on the penultimate features of
   a probe set, against the forward pass over the same probe set that produced them (target: <= 5%); the
   metric's state size against storing the features (O(C x D) vs O(N x D)).
2. Feature rank of 10,240 x 8,192 features: :func:`hildtools.metrics.feature_rank` (fp64 Gram + eigvalsh)
   against a plain ``torch.linalg.svd`` and ``torch.linalg.svdvals`` of the same fp32 matrix (target >= 3x).
3. :func:`hildtools.metrics.invariant_sets` on a 4,096-neuron layer (Linear 4096 -> 4096 -> 4096): time and peak
   extra memory (target <= 64 MB), measured in a fresh subprocess (peak resident set size after a reset of the
   peak counter on Linux CPUs, ``torch.cuda.max_memory_allocated`` on CUDA).

Prints a Markdown report (copy it to ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time

import lightning
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F

from hildtools.metrics import FeatureCapture, NeuralCollapse, feature_rank, invariant_sets


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 3) -> float:
    """Median wall time (s) of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR ResNet-18 (widths 64-512, 11M parameters, 0.56 GFLOP per 32x32 image)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        widths, layers, cin = (64, 128, 256, 512), [], 64
        for i, width in enumerate(widths):
            layers += [BasicBlock(cin, width, 1 if i == 0 else 2), BasicBlock(width, width, 1)]
            cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def bench_neural_collapse(device: torch.device, quick: bool) -> list[str]:
    num_classes = 10
    probe = 256 if quick else 512
    cases = {
        "CIFAR ResNet-18, 32x32 inputs": (ResNet18(num_classes), torch.randn(probe, 3, 32, 32)),
        "MLP 784-512-512-10 (cheap forward: worst case)": (
            nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, num_classes)),
            torch.randn(probe, 784),
        ),
    }
    lines = [
        f"### NeuralCollapse update vs the probe forward pass (N = {probe}, C = {num_classes}, D = 512)",
        "",
        "| model | forward with capture (s) | 2 x update + start_second_pass (s) | compute (s) "
        "| update / forward | (update + compute) / forward |",
        "|---|---|---|---|---|---|",
    ]
    labels = torch.arange(num_classes).repeat(probe // num_classes + 1)[:probe].to(device)
    for name, (model, inputs) in cases.items():
        model, inputs = model.to(device).eval(), inputs.to(device)
        holder = {}

        def forward():
            with FeatureCapture(model) as capture, torch.no_grad():
                holder["logits"] = model(inputs)
            holder["features"] = capture.features[capture.layers[0]]

        def updates():
            metric = NeuralCollapse(num_classes, 512, compute_with_cache=False).to(device)
            metric.update(holder["features"], labels, holder["logits"])
            metric.start_second_pass()
            metric.update(holder["features"], labels, holder["logits"])
            holder["metric"] = metric

        t_forward = timed(forward, device)
        t_update = timed(updates, device)
        t_compute = timed(lambda: holder["metric"].compute(), device)
        lines.append(
            f"| {name} | {t_forward:.4f} | {t_update:.4f} | {t_compute:.4f} | {100 * t_update / t_forward:.2f}% "
            f"| {100 * (t_update + t_compute) / t_forward:.2f}% |"
        )
    lines += ["", "State memory of `NeuralCollapse` (fp64) against keeping the features (fp32):", ""]
    lines += ["| C | D | metric state | features of N = 50,000 |", "|---|---|---|---|"]
    for c, d in ((10, 512), (100, 2048), (1000, 2048)):
        metric = NeuralCollapse(c, d)
        metric.update(torch.randn(2 * c, d), torch.arange(c).repeat(2))
        metric.start_second_pass()
        state = sum(t.numel() * t.element_size() for t in (*metric.metric_state.values(), metric.reference_means))
        lines.append(f"| {c} | {d} | {state / 2**20:.2f} MiB | {50_000 * d * 4 / 2**20:.0f} MiB |")
    return lines + [""]


def bench_feature_rank(device: torch.device, quick: bool) -> list[str]:
    n, d = (2048, 1024) if quick else (10_240, 8_192)
    generator = torch.Generator().manual_seed(0)
    spectrum = torch.exp(-torch.arange(d, dtype=torch.float32) / 200)  # decaying spectrum: realistic features
    features = (torch.randn(n, d, generator=generator) * spectrum).to(device)
    rows = [f"### Feature rank of {n:,} x {d:,} fp32 features", ""]
    rows += ["| method | time (s) | ratio to ours |", "|---|---|---|"]
    results = {}

    def once(fn):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        return time.perf_counter() - start, out

    results["hildtools feature_rank (fp64 Gram + eigvalsh)"], ours = once(lambda: feature_rank(features))
    results["torch.linalg.svd (full_matrices=True, fp32)"], _ = once(lambda: torch.linalg.svd(features))
    results["torch.linalg.svdvals (fp32)"], svals = once(lambda: torch.linalg.svdvals(features))
    ours_time = results["hildtools feature_rank (fp64 Gram + eigvalsh)"]
    for name, seconds in results.items():
        rows.append(f"| {name} | {seconds:.2f} | {seconds / ours_time:.2f}x |")
    rows += ["", f"pca_rank {ours['pca_rank'].item():.0f}, effective_rank {ours['effective_rank'].item():.1f}, "
             f"stable_rank {ours['stable_rank'].item():.2f} (row-centred).", ""]  # fmt: skip
    return rows


def resident_mb(field: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field))


def invariant_sets_child(device_name: str, width: int, chunk_size: int) -> None:
    """Runs in a subprocess: prints JSON with the time and peak extra memory of invariant_sets.

    After a warm-up call, free heap is returned to the OS (``malloc_trim``) and the peak-RSS counter is reset
    (``/proc/self/clear_refs``); the extra memory is the new peak minus the resident size before the call.
    """
    device = torch.device(device_name)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))
    model = model.to(device)
    invariant_sets(model, chunk_size=chunk_size)  # warm-up: libraries, kernels and thread buffers are loaded
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before = resident_mb("VmRSS")
    start = time.perf_counter()
    report = invariant_sets(model, chunk_size=chunk_size)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else resident_mb("VmHWM")
    layer = report.layers["0"]
    print(json.dumps({"seconds": seconds, "extra_mb": peak - before, "independent": layer.num_independent}))


def bench_invariant_sets(device: torch.device, quick: bool) -> list[str]:
    width = 1024 if quick else 4096
    rows = [
        f"### invariant_sets on a {width:,}-neuron layer (Linear {width} -> {width} -> {width}, vectors of "
        f"{2 * width + 1:,} entries)",
        "",
        "| chunk_size | time (s, after a warm-up call) | peak extra memory (MB) |",
        "|---|---|---|",
    ]
    for chunk_size in (128, 256, 512):
        command = [sys.executable, __file__, "--child", str(device), str(width), str(chunk_size)]
        result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        rows.append(f"| {chunk_size}{' (default)' if chunk_size == 256 else ''} | {result['seconds']:.2f} "
                    f"| {result['extra_mb']:.1f} |")  # fmt: skip
    weights_mb = (2 * width * width) * 4 / 2**20
    return rows + ["", f"(The two weight matrices themselves take {weights_mb:.0f} MB and are not counted.)", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default="nc,rank,collapse")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test of the script)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        invariant_sets_child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    device = torch.device(args.device)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    lines = [
        f"## Representation diagnostics benchmark ({datetime.date.today()})",
        "",
        f"device: {device} ({name}), torch threads {torch.get_num_threads()}; torch {torch.__version__}, "
        f"torchmetrics {torchmetrics.__version__}, lightning {lightning.__version__}, Python "
        f"{platform.python_version()}",
        "",
    ]
    sections = {"nc": bench_neural_collapse, "rank": bench_feature_rank, "collapse": bench_invariant_sets}
    for key in args.only.split(","):
        lines += sections[key](device, args.quick)
        print("\n".join(lines), flush=True)
        lines = []


if __name__ == "__main__":
    main()
