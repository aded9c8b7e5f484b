# ruff: noqa: B023  (the lambdas below are called at once, inside the iteration that binds their variables)
"""hildtools against curvlinops 3.0.1 (the strongest current peer), in one run, on CPU.

Usage::

    PYTHONPATH=. python benchmarks/bench_curvlinops.py --out benchmarks/results/curvlinops_cpu.md  # ~40 min, 1 thread
    PYTHONPATH=. python benchmarks/bench_curvlinops.py --sizes eos,1m --repeats 3   # (or pip install -e .)

Models (tanh MLPs, MSE with mean reduction, fp32, the same loss for both libraries):

* ``eos``: 64-48-48-10 on 500 digits-like examples after 600 steps of full-batch GD at lr 0.2 (edge of stability: top
  eigenvalues within a few percent), P = 5,962;
* ``1m``: 64-700-700-700-10, batch 256, after 20 GD steps, P = 1.03M;
* ``10m``: 64-2200-2200-2200-10, batch 64, after 5 GD steps, P = 9.85M.

Tasks: top-1 and top-5 eigenvalues at true relative error <= 1e-3 and <= 1e-6, and the trace at 1%.

* Both libraries start from the same vector (hildtools' seed-0 Gaussian, passed to ARPACK as ``v0``), so both build
  the same Krylov spaces and differ only in how they use and stop them; counts are deterministic.
* hildtools: ``hessian_eigenpairs(tol=...)``; "tuned" = the loosest tol in TOLS reaching the target (an oracle sweep);
  "untuned" = ``tol`` equal to the target, which the residual bound guarantees; "confirm=0" = tuned likewise
  without the confirmation steps (stopping at the first passed residual test, as ARPACK does).
* curvlinops: ``scipy.sparse.linalg.eigsh(H.to_scipy(), k, which="LA", tol, ncv, v0)`` on its
  ``HessianLinearOperator`` (``check_deterministic=False``); tuned over the same TOLS and ncv in {default
  max(2k+1, 20), 2k+2}: the configuration with the fewest products reaching the target.
* m*: the fewest Lanczos steps from that start vector reaching the target, a lower bound for both libraries.
* trace: XTrace in both (``hessian_trace(method="xtrace")`` and ``curvlinops.xtrace``), the fewest products in
  TRACE_COUNTS (or ``--trace-counts``) whose RMS relative error, pooled over both libraries' runs (``--trace-seeds``
  each), is <= 1%.

HVPs are counted at each library's own product (curvlinops: columns passed to its ``_matmat``). Times are medians
over ``--repeats`` interleaved repeats of the tuned configurations (graph/operator construction included).
Truth: top-6 eigenvalues of an fp64 copy of the model by hildtools' Lanczos at tol 1e-10. Trace truth: the dense
trace (``eos``), XTrace with 1000 products (``1m``, its standard error printed), or none (``10m``: the spread over
seeds, XTrace being unbiased).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import os
import platform
import statistics
import time

import curvlinops
import numpy as np
import scipy
import torch
from curvlinops import HessianLinearOperator
from scipy.sparse.linalg import ArpackNoConvergence, eigsh
from torch import nn

from hildtools.curvature import HessianOperator, hessian_eigenpairs, hessian_trace
from hildtools.curvature._random import gaussian_vector
from hildtools.curvature.lanczos import CONFIRM_FRACTION, LanczosProcess

TOLS = tuple(10.0 ** (-1 - i / 4) for i in range(25))  # 1e-1 to 1e-7, four per decade
TARGETS = (1e-3, 1e-6)
TRACE_TARGET = 0.01
TRACE_COUNTS = (20, 40, 60, 100, 160, 240)
TRACE_MAX = {"10m": 100}  # XTrace holds four size x count/2 blocks: 8 GB at 10M parameters and 100 products


def mlp(widths):
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def problem(size):
    g = torch.Generator().manual_seed(0)
    widths, n, steps, lr = {
        "eos": ((64, 48, 48, 10), 500, 600, 0.2),
        "1m": ((64, 700, 700, 700, 10), 256, 20, 0.05),
        "10m": ((64, 2200, 2200, 2200, 10), 64, 5, 0.02),
    }[size]
    centers = torch.randn(10, 64, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    x = centers[labels] + 0.5 * torch.randn(n, 64, generator=g)
    y = nn.functional.one_hot(labels, 10).float()
    torch.manual_seed(0)
    model = mlp(widths)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * ((model(x) - y) ** 2).sum(1).mean()).backward()
        optimizer.step()
    return model, (x, y)


def loss_fn(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def ours_top(model, batch, k, tol, confirm=CONFIRM_FRACTION):
    result = hessian_eigenpairs(model, loss_fn, batch, k=k, tol=tol, max_iter=400, confirm=confirm)
    return result.eigenvalues.numpy(), result.num_hvp


def start_vector(size):
    """The start vector of hildtools' Lanczos (seed 0), given to ARPACK too: both build the same Krylov spaces."""
    return gaussian_vector(size, torch.Generator().manual_seed(0), torch.device("cpu"), torch.float64).numpy()


def peer_operator(model, batch):
    operator = HessianLinearOperator(model, nn.MSELoss(), list(model.parameters()), [batch], check_deterministic=False)
    counter = [0]
    matmat = operator._matmat

    def counted(matrix):
        counter[0] += matrix[0].shape[-1] if isinstance(matrix, list) else matrix.shape[-1]
        return matmat(matrix)

    operator._matmat = counted
    return operator, counter


def peer_top(model, batch, k, tol, ncv):
    operator, counter = peer_operator(model, batch)
    scipy_operator = operator.to_scipy()
    v0 = start_vector(scipy_operator.shape[0])
    values = eigsh(scipy_operator, k=k, which="LA", tol=tol, ncv=ncv, v0=v0, return_eigenvectors=False)
    return np.sort(values)[::-1].astype(np.float64), counter[0]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def error(values, truth, k):
    return float(np.max(np.abs(values[:k] - truth[:k]) / np.abs(truth[:k])))


def tune(run, target, truth, k, configs):
    """The configuration with the fewest products whose true error is <= target: (config, hvps, error). ``configs``
    is a list of sweeps, each from the loosest tolerance to the tightest; a sweep stops at its first success."""
    best = None
    for sweep in configs:
        for config in sweep:
            try:
                values, hvps = run(config)
            except (ArpackNoConvergence, RuntimeError) as exc:
                print(f"    {config}: failed ({type(exc).__name__})")
                continue
            err = error(values, truth, k)
            if err <= target:
                if best is None or hvps < best[1]:
                    best = (config, hvps, err)
                break
    return best


def fewest_steps(model, batch, k, target, truth, most=400):
    """m*: the fewest Lanczos steps from the shared start vector whose top-k Ritz values are within ``target`` of the
    truth. A lower bound for both libraries: restarted ARPACK's basis after m products spans a subspace of the same
    Krylov space, whose Ritz values are no closer (they lie below the eigenvalues and rise with the subspace)."""
    operator = HessianOperator(model, loss_fn, batch)
    start = torch.from_numpy(start_vector(operator.size))
    process = LanczosProcess(operator.matvec, start, dtype=operator.dtype)
    while process.length < most:
        process.step()
        theta = torch.linalg.eigvalsh(process.tridiagonal()).flip(0).numpy()
        if len(theta) >= k and error(theta, truth, k) <= target:
            return process.length
    return None


def trace_sweep(model, batch, reference, seeds, counts):
    """The fewest products in ``counts`` at which XTrace's RMS relative error, pooled over both libraries' runs
    (the same algorithm, so the same error distribution), is <= TRACE_TARGET; both run at each count, interleaved
    per seed. Returns ``(count, pooled RMS, {name: (RMS, median seconds)})`` or None. Without a reference the error
    is the spread over all runs (XTrace is unbiased)."""
    for count in counts:
        estimates, seconds = {"ours": [], "peer": []}, {"ours": [], "peer": []}
        for seed in range(seeds):
            est, t = timed(lambda: hessian_trace(model, loss_fn, batch, num_samples=count, seed=seed).estimate)
            estimates["ours"].append(est)
            seconds["ours"].append(t)
            torch.manual_seed(seed)
            est, t = timed(lambda: curvlinops.xtrace(peer_operator(model, batch)[0], count).item())
            estimates["peer"].append(est)
            seconds["peer"].append(t)
        pooled = np.array(estimates["ours"] + estimates["peer"])
        center = pooled.mean() if reference is None else reference

        def rms(values):
            return float(np.sqrt(np.mean((np.array(values) - center) ** 2)) / abs(center))

        per_library = {name: (rms(values), statistics.median(seconds[name])) for name, values in estimates.items()}
        print(f"    trace at {count}: pooled RMS {rms(pooled):.2%}, {per_library}", flush=True)
        if rms(pooled) <= TRACE_TARGET:
            return count, rms(pooled), per_library
    return None


def hvp_cost(model, batch, repeats):
    params = list(model.parameters())
    operator = HessianOperator(model, loss_fn, batch)
    peer, _ = peer_operator(model, batch)
    vector = torch.randn(operator.size)
    jobs = {
        "forward+backward": lambda: torch.autograd.grad(loss_fn(model, batch), params),
        "hildtools HVP (graph reused)": lambda: operator.matvec(vector),
        "hildtools operator construction (graph, hvp='auto' check)": lambda: HessianOperator(model, loss_fn, batch),
        "curvlinops HVP": lambda: peer @ vector,
    }
    samples = {name: [] for name in jobs}
    for job in jobs.values():
        job()
    for _ in range(repeats):
        for name, job in jobs.items():
            samples[name].append(timed(job)[1])
    return {name: statistics.median(values) for name, values in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="eos,1m,10m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trace-seeds", type=int, default=10)
    parser.add_argument("--trace-counts", default=",".join(map(str, TRACE_COUNTS)), help="product counts to sweep")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: comparable across machines and loads
    header = (
        f"Date {datetime.date.today()}; {os.cpu_count()}-core CPU, no GPU, load average {os.getloadavg()[0]:.1f} at "
        f"the start ({torch.get_num_threads()} torch thread); torch {torch.__version__}; "
        f"curvlinops {getattr(curvlinops, '__version__', '3.0.1')}; scipy {scipy.__version__}; "
        f"Python {platform.python_version()}. Command: `python benchmarks/bench_curvlinops.py --sizes {args.sizes} "
        f"--repeats {args.repeats} --trace-seeds {args.trace_seeds} --trace-counts {args.trace_counts}`."
    )
    lines = [header, ""]
    for size in args.sizes.split(","):
        model, batch = problem(size)
        count = sum(p.numel() for p in model.parameters())
        truth = hessian_eigenpairs(
            copy.deepcopy(model).double(), loss_fn, tuple(t.double() for t in batch), k=6, tol=1e-10, max_iter=400
        ).eigenvalues.numpy()
        lines += [
            f"## `{size}`: P = {count:,}, batch {len(batch[0])}",
            "",
            f"Truth top-6: {', '.join(f'{v:.6g}' for v in truth)} (lambda2/lambda1 = {truth[1] / truth[0]:.4f})",
            "",
            (
                "| task | m* | hildtools tuned: tol, HVPs, error | hildtools at tol = target: HVPs, error | "
                "curvlinops tuned: (tol, ncv), HVPs, error | HVPs peer/ours | median time ours (s) | "
                "median time peer (s) | time peer/ours | hildtools confirm=0 tuned: tol, HVPs, error | "
                "HVPs peer/ours (confirm=0) | median time ours confirm=0 (s) | time peer/ours (confirm=0) |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        print(lines[-4], flush=True)
        for k in (1, 5):
            ncvs = (None, 2 * k + 2)
            for target in TARGETS:
                ours = tune(lambda tol: ours_top(model, batch, k, tol), target, truth, k, [TOLS])
                bare = tune(lambda tol: ours_top(model, batch, k, tol, confirm=0), target, truth, k, [TOLS])
                plain_values, plain_hvps = ours_top(model, batch, k, target)
                peer = tune(
                    lambda c: peer_top(model, batch, k, *c), target, truth, k, [[(t, n) for t in TOLS] for n in ncvs]
                )
                lower = fewest_steps(model, batch, k, target, truth)
                if ours is None or peer is None or bare is None:
                    lines.append(f"| top-{k} at {target:g} | {lower} | {ours} | {plain_hvps} | {peer} | {bare} |")
                    continue
                times = {"ours": [], "peer": [], "bare": []}
                for _ in range(args.repeats):  # interleaved
                    times["ours"].append(timed(lambda: ours_top(model, batch, k, ours[0]))[1])
                    times["peer"].append(timed(lambda: peer_top(model, batch, k, *peer[0]))[1])
                    times["bare"].append(timed(lambda: ours_top(model, batch, k, bare[0], confirm=0))[1])
                t_ours, t_peer, t_bare = (statistics.median(times[name]) for name in ("ours", "peer", "bare"))
                lines.append(
                    f"| top-{k} at {target:g} | {lower} | {ours[0]:.2g}, {ours[1]}, {ours[2]:.1e} | {plain_hvps}, "
                    f"{error(plain_values, truth, k):.1e} | ({peer[0][0]:.2g}, {peer[0][1] or 'default'}), {peer[1]}, "
                    f"{peer[2]:.1e} | {peer[1] / ours[1]:.2f}x | {t_ours:.3f} | {t_peer:.3f} | "
                    f"**{t_peer / t_ours:.2f}x** | {bare[0]:.2g}, {bare[1]}, {bare[2]:.1e} | "
                    f"{peer[1] / bare[1]:.2f}x | {t_bare:.3f} | **{t_peer / t_bare:.2f}x** |"
                )
                print(lines[-1], flush=True)
        # trace
        if size == "eos":
            operator = HessianOperator(copy.deepcopy(model).double(), loss_fn, tuple(t.double() for t in batch))
            dense = operator.matmat(torch.eye(operator.size, dtype=torch.float64))
            reference, reference_note = torch.trace(dense).item(), "dense trace"
        elif size == "1m":
            big = hessian_trace(model, loss_fn, batch, num_samples=1000, seed=99)
            reference = big.estimate
            reference_note = f"XTrace with 1000 products (standard error {big.standard_error / abs(reference):.2%})"
        else:
            reference, reference_note = None, "none: the error is the spread over the seeds"
        most = TRACE_MAX.get(size, TRACE_COUNTS[-1])
        counts = [c for c in map(int, args.trace_counts.split(",")) if c <= most]
        found = trace_sweep(model, batch, reference, args.trace_seeds, counts)
        if found is None:
            trace_line = f"Trace at {TRACE_TARGET:.0%}: not reached within {most} products ({reference_note})."
        else:
            count, pooled, per_library = found
            (rms_ours, t_ours), (rms_peer, t_peer) = per_library["ours"], per_library["peer"]
            trace_line = (
                f"Trace at {TRACE_TARGET:.0%} (XTrace in both; reference: {reference_note}): {count} products reach "
                f"{pooled:.2%} RMS relative error over both libraries' {2 * args.trace_seeds} runs (hildtools "
                f"{rms_ours:.2%}, curvlinops {rms_peer:.2%}); median time hildtools {t_ours:.3f} s, curvlinops "
                f"{t_peer:.3f} s: **HVPs equal, time peer/ours {t_peer / t_ours:.2f}x**."
            )
        lines += ["", trace_line, ""]
        print(lines[-2], flush=True)
        costs = hvp_cost(model, batch, 7)
        base = costs["forward+backward"]
        lines += ["| operation | median time (ms) | / forward+backward |", "|---|---|---|"]
        lines += [f"| {name} | {t * 1e3:.2f} | {t / base:.2f}x |" for name, t in costs.items()]
        lines.append("")
        print("\n".join(lines[-7:]), flush=True)
    lines.append(f"Load average at the end: {os.getloadavg()[0]:.1f}.")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(report)


if __name__ == "__main__":
    main()
