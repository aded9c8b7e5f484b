"""Gradient-only Hessian-vector products (finite differences) against double backward: cost and accuracy.

Usage::

    python benchmarks/bench_finite_difference.py                 # CPU, about two minutes
    python benchmarks/bench_finite_difference.py --device cuda --width 512 --out benchmarks/results/x.md

Problems:

* ``mlp``: a tanh MLP (64-w-w-10) on scikit-learn's digits, cross-entropy, after 200 full-batch GD steps;
* ``attention``: one causal self-attention layer (SDPA, 4 heads) with a tanh MLP head on random tokens,
  cross-entropy on a 10-class label; double backward runs on SDPA's math kernel, finite differences on the
  default (fused) kernel as in training.

Measured per problem:

(a) cost of one product relative to one forward + backward (``torch.autograd.grad`` of the loss) on the same batch:
    finite differences with Richardson extrapolation (4 gradients), plain central differences (2 gradients),
    double backward through a graph built once (plus that graph's one-off construction);
(b) accuracy: relative error of the top-3 eigenvalues (Lanczos, ``tol=1e-6``) against an fp64 truth (double
    backward on an fp64 copy, ``tol=1e-10``), for fp32 weights and for bf16 weights (differentiated in fp32, truth
    at the bf16-rounded weights), and the relative error of one product on a random direction.

Prints a Markdown report (``--out FILE`` also writes it; the recorded run is
``benchmarks/results/finite_difference_cpu.md``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import time

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hildtools.curvature import HessianOperator, hessian_eigenpairs
from hildtools.curvature.lanczos import lanczos

FUSED_FIRST = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
"""SDPA's kernels with the fused ones allowed (as in training by default)."""


def cross_entropy(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def digits_mlp(width, device):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32, device=device)
    y = torch.tensor(y, device=device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10)).to(
        device
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(200):
        optimizer.zero_grad()
        cross_entropy(model, (x, y)).backward()
        optimizer.step()
    return model, (x, y)


class AttentionClassifier(nn.Module):
    def __init__(self, width, heads=4, vocab=32):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.head = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))

    def forward(self, tokens):
        h = self.embed(tokens)
        b, t, w = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(attended.transpose(1, 2).reshape(b, t, w))
        return self.head(h.mean(1))


def attention(width, device):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 32, (256, 64), generator=g).to(device)
    labels = torch.randint(0, 10, (256,), generator=g).to(device)
    return AttentionClassifier(width // 2).to(device), (tokens, labels)


PROBLEMS = {"mlp": digits_mlp, "attention": attention}


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def costs(model, batch, repeats):
    params = [p for p in model.parameters() if p.requires_grad]
    gradient = timed(lambda: torch.autograd.grad(cross_entropy(model, batch), params), repeats)
    v = torch.randn(sum(p.numel() for p in params), device=params[0].device)
    rows = {}
    for name, kwargs in (
        ("finite differences, extrapolated (4 gradients)", {"hvp": "finite_difference"}),
        ("finite differences, plain (2 gradients)", {"hvp": "finite_difference", "extrapolate": False}),
    ):
        operator = HessianOperator(model, cross_entropy, batch, **kwargs)
        rows[name] = timed(lambda operator=operator: operator.matvec(v), repeats) / gradient
    with sdpa_kernel([SDPBackend.MATH]):
        exact = HessianOperator(model, cross_entropy, batch, hvp="autograd")
        rows["double backward, one product (math SDPA kernel)"] = timed(lambda: exact.matvec(v), repeats) / gradient
        rows["double backward, graph construction (once per measurement)"] = (
            timed(lambda: HessianOperator(model, cross_entropy, batch, hvp="autograd"), repeats) / gradient
        )
    return gradient, rows


def accuracy(model, batch, dtype):
    model = copy.deepcopy(model).to(dtype)
    truth_model = copy.deepcopy(model).double()
    truth_batch = tuple(t.double() if t.is_floating_point() else t for t in batch)
    with sdpa_kernel([SDPBackend.MATH]):
        truth = hessian_eigenpairs(truth_model, cross_entropy, truth_batch, k=3, tol=1e-10, hvp="autograd")
        exact_op = HessianOperator(truth_model, cross_entropy, truth_batch, hvp="autograd")
    v = torch.randn(exact_op.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact_product = exact_op.matvec(v.to(exact_op.device)).cpu()
    rows = {}
    for name, kwargs, math in (
        ("finite differences, extrapolated", {"hvp": "finite_difference"}, False),
        ("finite differences, plain", {"hvp": "finite_difference", "extrapolate": False}, False),
        ("double backward (fp32)", {"hvp": "autograd"}, True),
    ):
        with sdpa_kernel([SDPBackend.MATH] if math else FUSED_FIRST):
            operator = HessianOperator(model, cross_entropy, batch, **kwargs)
            values = lanczos(
                operator.matvec, operator.size, 3, tol=1e-6, device=operator.device, dtype=operator.dtype
            ).eigenvalues
            product = operator.matvec(v.to(operator.device)).double().cpu()
        errors = ((values - truth.eigenvalues).abs() / truth.eigenvalues.abs()).tolist()
        rows[name] = (max(errors), ((product - exact_product).norm() / exact_product.norm()).item())
    return truth.eigenvalues.tolist(), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setting = (
        f"{datetime.date.today()}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{args.threads} torch thread(s), width {args.width}."
    )
    lines = [f"# Finite-difference Hessian-vector products ({args.device})", "", setting, ""]
    for name, build in PROBLEMS.items():
        model, batch = build(args.width, args.device)
        size = sum(p.numel() for p in model.parameters())
        gradient, cost_rows = costs(model, batch, args.repeats)
        lines += [
            f"## {name} (P = {size}, batch {len(batch[1])})",
            "",
            f"One forward + backward: {gradient * 1e3:.1f} ms.",
            "",
            "| product | time / (forward + backward) |",
            "|---|---|",
        ]
        lines += [f"| {row} | {ratio:.2f} |" for row, ratio in cost_rows.items()]
        for dtype in (torch.float32, torch.bfloat16):
            truth, rows = accuracy(model, batch, dtype)
            weights = str(dtype).removeprefix("torch.")
            top = ", ".join(f"{t:.5g}" for t in truth)
            lines += [
                "",
                f"Accuracy, {weights} weights (top-3 truth {top}):",
                "",
                "| method | max relative error, top-3 eigenvalues | relative error of one product |",
                "|---|---|---|",
            ]
            lines += [f"| {row} | {eig:.1e} | {hvp:.1e} |" for row, (eig, hvp) in rows.items()]
        lines.append("")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
