"""Momentum scaling: with 1 - beta ∝ lr^(2/3), SGD with label noise keeps its speed as the lr shrinks.

Cowsik, Can & Glorioso ("Flatter, faster", arXiv:2210.16400): with label noise, SGD first reaches the manifold of
interpolating solutions, then drifts slowly along it towards flatter ones. Heavy-ball momentum speeds up the drift,
most when its relaxation time 1/(1 - beta) matches the drift time, which gives 1 - beta = C lr^(2/3).

The problem: sparse regression with a quadratically parameterized linear model w = u*u - v*v (a diagonal linear
network; n = 40 samples in R^100, a 5-sparse target, u = v = 1 at the start), full-batch gradients with fresh label
noise (std 0.5) at every step, heavy ball v <- beta v + g, w <- w - lr v (torch SGD, dampening 0). Label noise drives
w along the interpolating manifold to the sparse target (without it, ||w - w*||^2 stays near 10); we count
the steps until ||w - w*||^2 < 0.1 (and still < 1 at the end), for every lr:

- a fixed beta (0.99, close to the sweep's best at the largest lr) vs ``MomentumScaling`` from
  ``hildtools.optimizers``, keeping 1 - beta = C lr^(2/3) with C set by the same beta at the largest lr;
- a sweep over beta at each lr: the fastest 1 - beta, and the exponent a of 1 - beta* ∝ lr^a it gives.

Every configuration runs with 3 label-noise streams (the same 3 for all; steps averaged); all runs train together
in one plain-torch loop (one param group per run), ~1 min on a CPU.

    python examples/momentum_scaling.py
    python examples/momentum_scaling.py --lrs 0.01 0.005 0.0025 0.00125 0.000625 0.0003 --sweep-points 13 --steps 20000
"""

from __future__ import annotations

import math

import torch

from hildtools.optimizers import MomentumScaling
from phenomena_common import parser_for, pyplot, report, save_figure


def sparse_regression(n=40, dim=100, sparsity=5, seed=0):
    """Gaussian inputs (n, dim) in fp64, targets of w* = (1, ..., 1, 0, ..., 0) with ``sparsity`` ones."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    w_star = torch.zeros(dim, dtype=torch.float64)
    w_star[:sparsity] = 1.0
    return x, x @ w_star, w_star


def sweep_gaps(points: int) -> list[float]:
    """1 - beta on a geometric grid from 0.1 down by factors of sqrt(3)."""
    return [0.1 * 3 ** (-i / 2) for i in range(points)]


class Runs:
    """Independent copies of the model (u, v), one param group each, trained together under one summed loss."""

    def __init__(self, count: int, dim: int, init: float = 1.0):
        def leaf():
            return torch.full((dim,), init, dtype=torch.float64, requires_grad=True)

        self.u = [leaf() for _ in range(count)]
        self.v = [leaf() for _ in range(count)]

    def groups(self, indices, lrs, betas) -> list[dict]:
        return [{"params": [self.u[i], self.v[i]], "lr": lr, "momentum": beta}
                for i, lr, beta in zip(indices, lrs, betas)]

    def weights(self) -> torch.Tensor:
        u, v = torch.stack(self.u), torch.stack(self.v)
        return u * u - v * v


def run(lrs=(0.01, 0.0025, 0.000625), beta0=0.99, sweep_points=11, steps=8000, seeds=3, label_noise=0.5,
        target=0.1, every=50, seed=0, out="outputs/momentum_scaling", use_wandb=False) -> dict:
    """Train fixed-beta, scaled-beta and beta-sweep configurations, each with ``seeds`` label-noise streams.

    A run reaches the target at the first measurement with error < target, and counts only if its last error
    is still < 10 x target (runs that pass through the target while diverging do not count).

    Returns a dict with ``configs`` [(kind, lr, beta)], ``steps`` (per config: mean steps to the target over the
    noise seeds, None when a seed did not reach it), ``curves`` [(step, errors of every run)], ``lrs``, ``gaps``,
    ``scaled_betas`` and ``C``. Run ``c * seeds + s`` is configuration c with noise stream s.
    """
    x, y, w_star = sparse_regression(seed=seed)
    gaps = sweep_gaps(sweep_points)
    configs = [("fixed", lr, beta0) for lr in lrs] + [("scaled", lr, beta0) for lr in lrs]
    configs += [("sweep", lr, 1 - gap) for lr in lrs for gap in gaps]
    runs = Runs(len(configs) * seeds, x.shape[1])
    members = {kind: [c * seeds + s for c, config in enumerate(configs) if config[0] == kind for s in range(seeds)]
               for kind in ("fixed", "scaled", "sweep")}

    def optimizer(indices):
        return torch.optim.SGD(runs.groups(indices, [configs[i // seeds][1] for i in indices],
                                           [configs[i // seeds][2] for i in indices]), lr=lrs[0])

    heavy_ball, scaled = optimizer(members["fixed"] + members["sweep"]), optimizer(members["scaled"])
    scaling = MomentumScaling(scaled, lr0=lrs[0], beta0=beta0)  # 1 - beta = C lr^(2/3), set before every step
    noise_of_run = torch.arange(len(configs) * seeds) % seeds
    noise = torch.Generator().manual_seed(seed + 1)
    reached, curves = [None] * len(noise_of_run), []
    logger = WandbCurves(out) if use_wandb else None
    for step in range(1, steps + 1):
        streams = y + label_noise * torch.randn(seeds, len(y), generator=noise, dtype=torch.float64)
        loss = 0.5 * (runs.weights() @ x.T - streams[noise_of_run]).pow(2).mean(1).sum()
        heavy_ball.zero_grad()
        scaled.zero_grad()
        loss.backward()
        heavy_ball.step()
        scaled.step()
        if step % every == 0:
            with torch.no_grad():
                error = (runs.weights() - w_star).pow(2).sum(1)
            curves.append((step, error))
            reached = [step if r is None and e < target else r for r, e in zip(reached, error.tolist())]
            if logger is not None:
                logger.log(step, {f"{kind}/lr_{lr:g}/test_error": float(error[c * seeds])
                                  for c, (kind, lr, _) in enumerate(configs) if kind != "sweep"})
    settled = [r if e < 10 * target else None for r, e in zip(reached, curves[-1][1].tolist())]  # NaN: not settled
    per_config = [settled[c * seeds:(c + 1) * seeds] for c in range(len(configs))]
    result = {
        "configs": configs, "curves": curves, "lrs": list(lrs), "gaps": gaps, "C": scaling.C, "seeds": seeds,
        "steps": [None if None in hits else sum(hits) / seeds for hits in per_config],
        "scaled_betas": [scaled.param_groups[i]["momentum"] for i in range(0, len(members["scaled"]), seeds)],
    }  # fmt: skip
    if logger is not None:
        logger.finish(result)
    return result


class WandbCurves:
    """``--wandb``: test errors of the fixed and scaled runs (first noise seed) and steps-to-target, offline."""

    def __init__(self, out: str):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project="hildtools-examples", name="momentum_scaling", dir=out, mode="offline")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"step": step, **values})

    def finish(self, result: dict) -> None:
        for (kind, lr, _), steps in zip(result["configs"], result["steps"]):
            if kind != "sweep":
                self.run.summary[f"{kind}/lr_{lr:g}/steps_to_target"] = -1 if steps is None else steps
        print(f"W&B offline run: {self.run.dir}  (upload with: wandb sync {self.run.dir.rsplit('/', 1)[0]})")
        self.wandb.finish()


def sweep_curve(result: dict, lr: float) -> list[tuple[float, float | None]]:
    """(1 - beta, mean steps to target or None) of the sweep at ``lr``, largest gap first."""
    return [(1 - beta, steps) for (kind, run_lr, beta), steps in zip(result["configs"], result["steps"])
            if kind == "sweep" and run_lr == lr]


def fastest_gap(curve: list[tuple[float, float | None]]) -> tuple[float, float] | None:
    """(1 - beta*, steps) of the fastest sweep point, refined by a parabola through it and its two neighbours in
    (log gap, log steps) when both reached the target; None when no point did."""
    hits = [i for i, (_, steps) in enumerate(curve) if steps is not None]
    if not hits:
        return None
    i = min(hits, key=lambda j: curve[j][1])
    if 0 < i < len(curve) - 1 and curve[i - 1][1] is not None and curve[i + 1][1] is not None:
        (x0, y0), (x1, y1), (x2, y2) = ((math.log(g), math.log(t)) for g, t in curve[i - 1:i + 2])
        curvature = (y0 - 2 * y1 + y2) / ((x1 - x0) ** 2)
        if curvature > 0:  # even grid in log gap: vertex = x1 - h (y2 - y0) / (2 (y0 - 2 y1 + y2))
            return math.exp(x1 - (x1 - x0) * (y2 - y0) / (2 * (y0 - 2 * y1 + y2))), curve[i][1]
    return curve[i]


def fitted_exponent(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(y) on log(x), or None with fewer than two points."""
    if len(points) < 2:
        return None
    lx = [math.log(a) for a, _ in points]
    ly = [math.log(b) for _, b in points]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def steps_of(result: dict, kind: str) -> list[float | None]:
    return [steps for (k, _, _), steps in zip(result["configs"], result["steps"]) if k == kind]


def verdict(result: dict, beta0: float, steps: int, target: float) -> str:
    def listed(values):
        return ", ".join(f"not in {steps}" if v is None else f"{v:.0f}" for v in values)

    lrs = "/".join(f"{lr:g}" for lr in result["lrs"])
    best = [(lr, b) for lr in result["lrs"] if (b := fastest_gap(sweep_curve(result, lr))) is not None]
    exponent = fitted_exponent([(lr, gap) for lr, (gap, _) in best])
    fixed, scaled = steps_of(result, "fixed"), steps_of(result, "scaled")
    faster = sum(1 for f, s in zip(fixed[1:], scaled[1:]) if s is not None and (f is None or f > s))
    sweep = ("no sweep run reached the target" if exponent is None else
             f"fastest 1-beta in the sweep {', '.join(f'{gap:.2g}' for _, (gap, _) in best)} -> "
             f"1-beta* ∝ lr^{exponent:.2f} (paper: 2/3)")
    return (f"mean steps to ||w-w*||^2 < {target:g} over {result['seeds']} noise seeds at lr {lrs}: "
            f"fixed beta={beta0:g}: {listed(fixed)}; scaled 1-beta ∝ lr^(2/3): {listed(scaled)} "
            f"(scaled faster at {faster} of {len(fixed) - 1} smaller lrs); {sweep}")


def plot(result: dict, beta0: float, out: str) -> str:
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
    colors, seeds = {}, result["seeds"]
    for c, (kind, lr, _) in enumerate(result["configs"]):
        if kind != "sweep":
            errors = [float(e[c * seeds]) for _, e in result["curves"]]
            line, = axes[0].semilogy([s for s, _ in result["curves"]], errors, ls="-" if kind == "scaled" else ":",
                                     color=colors.get(lr), label=f"{kind}, lr {lr:g}")
            colors[lr] = line.get_color()
    axes[0].set(xlabel="step", ylabel="||w - w*||^2 (first seed)", title=f"fixed beta={beta0:g} (dotted) vs scaled")
    best = []
    for lr in result["lrs"]:
        points = [(gap, steps) for gap, steps in sweep_curve(result, lr) if steps is not None]
        if points:
            axes[1].loglog(*zip(*points), "o-", color=colors[lr], label=f"lr {lr:g}")
        fastest = fastest_gap(sweep_curve(result, lr))
        if fastest is not None:
            best.append((lr, fastest[0]))
    axes[1].set(xlabel="1 - beta", ylabel="mean steps to target", title="beta sweep (missing: not reached)")
    lrs = result["lrs"]
    axes[2].loglog(lrs, [1 - b for b in result["scaled_betas"]], "-", color="C0", label="MomentumScaling (2/3)")
    axes[2].loglog(lrs, [1 - beta0] * len(lrs), ":", color="C1", label=f"fixed beta={beta0:g}")
    if best:
        axes[2].loglog(*zip(*best), "ks", label="fastest in the sweep")
    axes[2].set(xlabel="lr", ylabel="1 - beta", title="momentum gap vs lr")
    for ax in axes:
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    figure.suptitle("label-noise SGD with heavy-ball momentum on sparse regression (w = u*u - v*v)")
    return save_figure(figure, out, "momentum_scaling.png")


def main(argv=None):
    parser = parser_for(__doc__, "outputs/momentum_scaling")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.0025, 0.000625], help="largest first")
    parser.add_argument("--beta0", type=float, default=0.99, help="beta at the largest lr (fixed runs and C)")
    parser.add_argument("--sweep-points", type=int, default=11, help="1-beta = 0.1 / sqrt(3)^i, i < this")
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--seeds", type=int, default=3, help="label-noise streams per configuration")
    parser.add_argument("--label-noise", type=float, default=0.5)
    parser.add_argument("--target", type=float, default=0.1, help="test error ||w - w*||^2 to reach")
    args = parser.parse_args(argv)
    if args.tiny:
        args.lrs, args.sweep_points, args.steps, args.seeds = [0.01, 0.0025], 3, 300, 1
    result = run(args.lrs, args.beta0, args.sweep_points, args.steps, args.seeds, args.label_noise, args.target,
                 seed=args.seed, out=args.out, use_wandb=args.wandb)
    path = plot(result, args.beta0, args.out)
    report("momentum_scaling", verdict(result, args.beta0, args.steps, args.target), path)


if __name__ == "__main__":
    main()
