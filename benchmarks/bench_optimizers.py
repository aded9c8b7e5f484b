"""Optimizer step time and state memory: hildtools vs lion-pytorch, pytorch-optimizer and torch, in one run.

A "model" is ~100 parameter tensors (weight matrices of varied shapes and their biases) with fixed
random gradients; we time ``step()`` alone (no forward/backward). All optimizers share one parameter
set and are timed interleaved, round by round, so background load hits them alike; the figure is the
median over rounds. SAM is timed as ``first_step() + second_step()`` (everything but its two
forward/backward passes) and compared with its base optimizer's step.

    python benchmarks/bench_optimizers.py                       # CPU, 10M parameters
    python benchmarks/bench_optimizers.py --sizes 10e6 100e6 --device cuda --compiled
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable

import torch
from lion_pytorch import Lion as LionPytorch
from lion_pytorch.foreach import Lion as LionPytorchForeach
from pytorch_optimizer import SAM as PeerSAM
from pytorch_optimizer import Lion as PeerLion

import hildtools
from hildtools.optimizers import NGN, SAM, Lion, Signum


def make_params(total: float, n_layers: int, device: str, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """``n_layers`` weight matrices (aspect ratios 1:1 to 1:4) and biases, ~``total`` numbers in all."""
    g = torch.Generator().manual_seed(0)
    params = []
    per_layer = total / n_layers
    for i in range(n_layers):
        ratio = 1 + (i % 4)
        rows = max(1, int((per_layer / ratio) ** 0.5))
        for shape in ((rows, rows * ratio), (rows,)):
            p = torch.nn.Parameter(torch.randn(shape, generator=g).to(device, dtype) * 0.02)
            p.grad = torch.randn(shape, generator=g).to(device, dtype) * 1e-3
            params.append(p)
    return params


def candidates(params, device: str, compiled: bool) -> dict[str, tuple[torch.optim.Optimizer, Callable[[], None]]]:
    """Map a display name to (optimizer, the call that is timed)."""
    loss = torch.tensor(0.7, device=device)
    on_cuda = device.startswith("cuda")
    opts: dict[str, tuple[torch.optim.Optimizer, Callable[[], None]]] = {}

    def add(name, opt, call=None):
        opts[name] = (opt, call or opt.step)

    add("torch AdamW (foreach)", torch.optim.AdamW(params, lr=1e-3, foreach=True))
    add("torch AdamW (fused)", torch.optim.AdamW(params, lr=1e-3, fused=True))
    add("torch SGD momentum (foreach)", torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True))
    add("torch SGD momentum (single)", torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=False))
    add("lion-pytorch Lion", LionPytorch(params, lr=1e-4, weight_decay=0.1))
    add("lion-pytorch foreach Lion", LionPytorchForeach(params, lr=1e-4, weight_decay=0.1))
    add("pytorch-optimizer Lion (foreach)", PeerLion(params, lr=1e-4, weight_decay=0.1, foreach=True))
    add("hildtools Lion (single)", Lion(params, lr=1e-4, weight_decay=0.1, foreach=False))
    add("hildtools Lion (foreach)", Lion(params, lr=1e-4, weight_decay=0.1, foreach=True))
    add("hildtools Signum (single)", Signum(params, lr=1e-4, weight_decay=0.1, foreach=False))
    add("hildtools Signum (foreach)", Signum(params, lr=1e-4, weight_decay=0.1, foreach=True))
    if compiled:
        add("hildtools Lion (compiled)", Lion(params, lr=1e-4, weight_decay=0.1, compiled=True))
        add("hildtools Signum (compiled)", Signum(params, lr=1e-4, weight_decay=0.1, compiled=True))
    for name, foreach in (("single", False), ("foreach", True)):
        ngn = NGN(params, lr=0.1, foreach=foreach)
        add(f"hildtools NGN ({name})", ngn, lambda ngn=ngn: ngn.step(loss=loss))
        ngn_m = NGN(params, lr=0.1, momentum=0.9, foreach=foreach)
        add(f"hildtools NGN-M ({name})", ngn_m, lambda ngn_m=ngn_m: ngn_m.step(loss=loss))
    for name, foreach in (("single", False), ("foreach", True)):
        sam = SAM(params, torch.optim.SGD, lr=1e-3, momentum=0.9, foreach=foreach)
        add(
            f"hildtools SAM(SGD) first+second step ({name})", sam, lambda sam=sam: (sam.first_step(), sam.second_step())
        )
    peer_sam = PeerSAM(params, torch.optim.SGD, lr=1e-3, momentum=0.9, foreach=True)
    add(
        "pytorch-optimizer SAM(SGD) first+second step",
        peer_sam,
        lambda: (peer_sam.first_step(), peer_sam.second_step()),
    )
    if not on_cuda:  # the fused AdamW kernel exists on CPU too, but say so if it is missing
        try:
            torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
        except RuntimeError:
            del opts["torch AdamW (fused)"]
    return opts


def state_bytes_per_parameter(opt: torch.optim.Optimizer, n_numbers: int) -> float:
    """Bytes of persistent optimizer tensors per parameter (SAM: its state plus its weight copy)."""
    tensors = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    if isinstance(opt, SAM):
        tensors += list(opt._backups.values())  # SAM's one weight copy, kept outside `state`
    return sum(t.numel() * t.element_size() for t in tensors if t.numel() > 1) / n_numbers


def timed(call: Callable[[], None], device: str) -> float:
    """Wall time of one call, synchronising CUDA before and after."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(total: float, args) -> list[str]:
    """Time every candidate on one parameter set; return markdown lines."""
    dtype = getattr(torch, args.dtype)
    params = make_params(total, args.layers, args.device, dtype)
    n_numbers = sum(p.numel() for p in params)
    opts = candidates(params, args.device, args.compiled)
    compile_s = {}
    for name, (_, call) in opts.items():  # warm-up: state allocation, compilation
        compile_s[name] = timed(call, args.device)
        for _ in range(args.warmup - 1):
            call()
    times = {name: [] for name in opts}
    for _ in range(args.rounds):
        for name, (_, call) in opts.items():
            times[name].append(timed(call, args.device))
    median = {name: statistics.median(t) for name, t in times.items()}
    spread = {name: (min(t), max(t)) for name, t in times.items()}

    adamw = median["torch AdamW (foreach)"]
    sgd = median["torch SGD momentum (foreach)"]
    lion_peer = median["lion-pytorch Lion"]
    lines = [
        f"### {n_numbers / 1e6:.1f}M parameters in {len(params)} tensors ({args.dtype}, {args.device})",
        "",
        "| optimizer | step ms (median) | min-max ms | / AdamW foreach | / SGD momentum | / lion-pytorch "
        "| state bytes/param |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (opt, _) in opts.items():
        lo, hi = spread[name]
        lines.append(
            f"| {name} | {1e3 * median[name]:.2f} | {1e3 * lo:.1f}-{1e3 * hi:.1f} | {median[name] / adamw:.2f} "
            f"| {median[name] / sgd:.2f} | {median[name] / lion_peer:.2f} "
            f"| {state_bytes_per_parameter(opt, n_numbers):.1f} |"
        )
    lines += ["", "Targets of the issue (ratios of medians, same kernel path on both sides where it matters):"]
    best_lion = min(v for k, v in median.items() if k.startswith("hildtools Lion"))
    best_signum = min(v for k, v in median.items() if k.startswith("hildtools Signum"))
    for name, value in (("Lion", best_lion), ("Signum", best_signum)):
        lines.append(
            f"- {name} (fastest path) / AdamW foreach = {value / adamw:.2f}, / lion-pytorch = {value / lion_peer:.2f} "
            f"(target <= 1)"
        )
    for path in ("single", "foreach"):
        sgd_path = median[f"torch SGD momentum ({path})"]
        sam_path = median[f"hildtools SAM(SGD) first+second step ({path})"]
        ngn = median[f"hildtools NGN ({path})"]
        lines.append(f"- NGN ({path}) / SGD momentum ({path}) = {ngn / sgd_path:.2f} (target <= 1.3)")
        lines.append(
            f"- SAM ({path}): first+second step = {sam_path / sgd_path:.2f}x the base SGD step, i.e. perturb + restore "
            f"= {(sam_path - sgd_path) / sgd_path:.2f}x (target <= 1.3)"
        )
    peer_sam = median["pytorch-optimizer SAM(SGD) first+second step"] / median["torch SGD momentum (foreach)"]
    lines.append(f"- pytorch-optimizer SAM first+second step = {peer_sam:.2f}x the SGD (foreach) step")
    compiled = {k: v for k, v in compile_s.items() if "compiled" in k}
    if compiled:
        lines.append(
            "First call (compilation) of the compiled paths: "
            + ", ".join(f"{k}: {v:.1f} s" for k, v in compiled.items())
        )
    return lines


def main() -> None:
    """Parse the command line and print one table per model size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[10e6], help="total parameter counts")
    parser.add_argument("--layers", type=int, default=50, help="weight matrices (plus as many biases)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compiled", action="store_true", help="also time the torch.compile'd Lion/Signum paths")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"date: {datetime.date.today()}  device: {args.device} ({device_name}), {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, hildtools {hildtools.__version__}, python {platform.python_version()}")
    for total in args.sizes:
        print("\n".join(["", *bench(total, args)]), flush=True)


if __name__ == "__main__":
    main()
