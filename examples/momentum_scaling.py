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
- a sweep over beta at each lr: the fastest 1 - beta*, and the exponent a of 1 - beta* ∝ lr^a it gives, fitted
  per label-noise seed (mean ± std), compared with the candidates 1/2, 2/3 and 1.

The scaled runs train with torch's SGD under MomentumScaling; the fixed and sweep runs use the same heavy-ball
update written out on one (runs x dim) tensor, so five learning rates x 11 betas x 3 seeds fit in a short run.

Verdict: PASS when, for every label-noise seed, (1) the scaled runs reach the target at every lr, (2) they reach it
sooner than the fixed beta at every lr below the largest, (3) at every lr the sweep's fastest beta is bracketed
(not at the grid's edge, both neighbours reached the target within the budget), and (4) the fitted exponent a is
closer to 2/3 than to 1/2 and to 1 (a in [7/12, 5/6]).

    python examples/momentum_scaling.py                      # 5 lrs x 11 betas x 3 seeds; 23 s of CPU
    python examples/momentum_scaling.py --seeds 5 --steps 20000 --sweep-points 13
"""

from __future__ import annotations

import math

import torch
from phenomena_common import (
    combine,
    mean_spread,
    parser_for,
    pyplot,
    report,
    save_figure,
)

from hildtools.optimizers import MomentumScaling


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

    def groups(self, lrs, betas) -> list[dict]:
        return [{"params": [u, v], "lr": lr, "momentum": beta} for u, v, lr, beta in zip(self.u, self.v, lrs, betas)]

    def weights(self) -> torch.Tensor:
        u, v = torch.stack(self.u), torch.stack(self.v)
        return u * u - v * v


class HeavyBall:
    """Many runs as rows of one (runs, dim) tensor: v <- beta v + g, w <- w - lr v (torch SGD, dampening 0)."""

    def __init__(self, lrs: list[float], betas: list[float], dim: int, init: float = 1.0):
        self.lr = torch.tensor(lrs, dtype=torch.float64)[:, None]
        self.beta = torch.tensor(betas, dtype=torch.float64)[:, None]
        self.u = torch.full((len(lrs), dim), init, dtype=torch.float64, requires_grad=True)
        self.v = torch.full((len(lrs), dim), init, dtype=torch.float64, requires_grad=True)
        self.buffers = [torch.zeros_like(self.u), torch.zeros_like(self.v)]

    def weights(self) -> torch.Tensor:
        return self.u * self.u - self.v * self.v

    @torch.no_grad()
    def step(self, grads) -> None:
        for parameter, buffer, grad in zip((self.u, self.v), self.buffers, grads):
            buffer.mul_(self.beta).add_(grad)
            parameter.sub_(self.lr * buffer)


def run(
    lrs=(0.01, 0.005, 0.0025, 0.00125, 0.000625),
    beta0=0.99,
    sweep_points=11,
    steps=12000,
    seeds=3,
    label_noise=0.5,
    target=0.1,
    every=50,
    seed=0,
    out="outputs/momentum_scaling",
    use_wandb=False,
) -> dict:
    """Train fixed-beta, scaled-beta and beta-sweep configurations, each with ``seeds`` label-noise streams.

    A run reaches the target at the first measurement with error < target, and counts only if its last error
    is still < 10 x target (runs that pass through the target while diverging do not count).

    Returns a dict with ``configs`` [(kind, lr, beta)], ``hits`` (per config, per noise seed: steps to the target
    or None), ``curves`` [(step, errors of the fixed and scaled runs)], ``lrs``, ``gaps``, ``scaled_betas``, ``C``.
    """
    x, y, w_star = sparse_regression(seed=seed)
    gaps = sweep_gaps(sweep_points)
    configs = [("fixed", lr, beta0) for lr in lrs] + [("sweep", lr, 1 - gap) for lr in lrs for gap in gaps]
    configs += [("scaled", lr, beta0) for lr in lrs]
    manual = [c for c in configs if c[0] != "scaled"]
    heavy_ball = HeavyBall(
        [lr for _, lr, _ in manual for _ in range(seeds)],
        [beta for _, _, beta in manual for _ in range(seeds)],
        x.shape[1],
    )
    runs = Runs(len(lrs) * seeds, x.shape[1])
    scaled = torch.optim.SGD(
        runs.groups([lr for lr in lrs for _ in range(seeds)], [beta0] * len(lrs) * seeds), lr=lrs[0]
    )
    scaling = MomentumScaling(scaled, lr0=lrs[0], beta0=beta0)  # 1 - beta = C lr^(2/3), set before every step
    noise_of_run = torch.arange(len(configs) * seeds) % seeds
    noise = torch.Generator().manual_seed(seed + 1)
    reached, curves = [None] * len(noise_of_run), []
    logger = WandbCurves(out) if use_wandb else None
    for step in range(1, steps + 1):
        streams = y + label_noise * torch.randn(seeds, len(y), generator=noise, dtype=torch.float64)
        weights = torch.cat([heavy_ball.weights(), runs.weights()])
        loss = 0.5 * (weights @ x.T - streams[noise_of_run]).pow(2).mean(1).sum()
        scaled.zero_grad()
        grads = torch.autograd.grad(loss, [heavy_ball.u, heavy_ball.v, *runs.u, *runs.v])
        for parameter, grad in zip([*runs.u, *runs.v], grads[2:]):
            parameter.grad = grad
        heavy_ball.step(grads[:2])
        scaled.step()
        if step % every == 0:
            with torch.no_grad():
                error = (torch.cat([heavy_ball.weights(), runs.weights()]) - w_star).pow(2).sum(1)
            curves.append(
                (
                    step,
                    error[[c * seeds + s for c, cfg in enumerate(configs) if cfg[0] != "sweep" for s in range(seeds)]],
                )
            )
            reached = [step if r is None and e < target else r for r, e in zip(reached, error.tolist())]
            if logger is not None:
                logger.log(
                    step,
                    {
                        f"{kind}/lr_{lr:g}/test_error": float(error[c * seeds])
                        for c, (kind, lr, _) in enumerate(configs)
                        if kind != "sweep"
                    },
                )
    settled = [r if e < 10 * target else None for r, e in zip(reached, error.tolist())]  # NaN: not settled
    result = {
        "configs": configs, "curves": curves, "lrs": list(lrs), "gaps": gaps, "C": scaling.C, "seeds": seeds,
        "hits": [settled[c * seeds:(c + 1) * seeds] for c in range(len(configs))],
        "scaled_betas": [scaled.param_groups[i * seeds]["momentum"] for i in range(len(lrs))],
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
        for (kind, lr, _), hits in zip(result["configs"], result["hits"]):
            if kind != "sweep":
                self.run.summary[f"{kind}/lr_{lr:g}/steps_to_target"] = -1 if hits[0] is None else hits[0]
        print(f"W&B offline run: {self.run.dir}  (upload with: wandb sync {self.run.dir.rsplit('/', 1)[0]})")
        self.wandb.finish()


def sweep_curve(result: dict, lr: float, s: int) -> list[tuple[float, float | None]]:
    """(1 - beta, steps to target or None) of the sweep at ``lr`` for noise seed ``s``, largest gap first."""
    return [
        (1 - beta, hits[s])
        for (kind, run_lr, beta), hits in zip(result["configs"], result["hits"])
        if kind == "sweep" and run_lr == lr
    ]


def fastest_gap(curve: list[tuple[float, float | None]]) -> tuple[float, float] | None:
    """(1 - beta*, steps) of the fastest sweep point, refined by a parabola through it and its two neighbours in
    (log gap, log steps) when both reached the target; None when no point did."""
    hits = [i for i, (_, steps) in enumerate(curve) if steps is not None]
    if not hits:
        return None
    i = min(hits, key=lambda j: curve[j][1])
    if 0 < i < len(curve) - 1 and curve[i - 1][1] is not None and curve[i + 1][1] is not None:
        (x0, y0), (x1, y1), (_x2, y2) = ((math.log(g), math.log(t)) for g, t in curve[i - 1 : i + 2])
        curvature = (y0 - 2 * y1 + y2) / ((x1 - x0) ** 2)
        if curvature > 0:  # even grid in log gap: vertex = x1 - h (y2 - y0) / (2 (y0 - 2 y1 + y2))
            return math.exp(x1 - (x1 - x0) * (y2 - y0) / (2 * (y0 - 2 * y1 + y2))), curve[i][1]
    return curve[i]


def bracketed(curve: list[tuple[float, float | None]]) -> bool:
    """The fastest point is inside the grid and both its neighbours reached the target."""
    hits = [i for i, (_, steps) in enumerate(curve) if steps is not None]
    if not hits:
        return False
    i = min(hits, key=lambda j: curve[j][1])
    return 0 < i < len(curve) - 1 and curve[i - 1][1] is not None and curve[i + 1][1] is not None


def fitted_exponent(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(y) on log(x), or None with fewer than two points."""
    if len(points) < 2:
        return None
    lx = [math.log(a) for a, _ in points]
    ly = [math.log(b) for _, b in points]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def hits_of(result: dict, kind: str, s: int) -> list[float | None]:
    return [hits[s] for (k, _, _), hits in zip(result["configs"], result["hits"]) if k == kind]


def summary(result: dict, s: int) -> dict:
    best = [(lr, b[0]) for lr in result["lrs"] if (b := fastest_gap(sweep_curve(result, lr, s))) is not None]
    return {
        "fixed": hits_of(result, "fixed", s),
        "scaled": hits_of(result, "scaled", s),
        "best": best,
        "exponent": fitted_exponent(best),
        "bracketed": [bracketed(sweep_curve(result, lr, s)) for lr in result["lrs"]],
    }


def criteria(result: dict, s: int) -> list[tuple[str, bool]]:
    m = summary(result, s)
    a = m["exponent"]
    faster = all(sc is not None and (f is None or f > sc) for f, sc in zip(m["fixed"][1:], m["scaled"][1:]))
    return [
        ("scaled beta reaches the target at every lr", None not in m["scaled"]),
        ("scaled beta reaches it sooner than the fixed beta at every smaller lr", faster),
        ("every lr's fastest beta is bracketed by the sweep within the budget", all(m["bracketed"])),
        ("fitted exponent closest to 2/3 among 1/2, 2/3, 1 (in [7/12, 5/6])", a is not None and 7 / 12 <= a <= 5 / 6),
    ]


def numbers(result: dict, beta0: float, steps: int, target: float) -> str:
    stats = [summary(result, s) for s in range(result["seeds"])]

    def column(key, i, fmt=".0f"):
        values = [m[key][i] for m in stats]
        missing = sum(v is None for v in values)
        return mean_spread(values, fmt) + (f" ({missing} not in {steps})" if missing else "")

    lrs = result["lrs"]
    gaps = ", ".join(mean_spread([dict(m["best"]).get(lr) for m in stats], ".2g") for lr in lrs)
    exponents = [m["exponent"] for m in stats]
    fitted = mean_spread(exponents, ".2f")
    return (
        f"steps to ||w-w*||^2 < {target:g} at lr {'/'.join(f'{lr:g}' for lr in lrs)}: fixed beta={beta0:g}: "
        f"{', '.join(column('fixed', i) for i in range(len(lrs)))}; scaled 1-beta ∝ lr^(2/3): "
        f"{', '.join(column('scaled', i) for i in range(len(lrs)))}; fastest 1-beta in the sweep {gaps} -> "
        f"1-beta* ∝ lr^a with a = {fitted} (candidates 1/2, 2/3, 1)"
    )


def plot(result: dict, beta0: float, out: str) -> str:
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
    colors, seeds = {}, result["seeds"]
    shown = [cfg for cfg in result["configs"] if cfg[0] != "sweep"]
    for c, (kind, lr, _) in enumerate(shown):
        errors = [float(e[c * seeds]) for _, e in result["curves"]]
        (line,) = axes[0].semilogy(
            [s for s, _ in result["curves"]],
            errors,
            ls="-" if kind == "scaled" else ":",
            color=colors.get(lr),
            label=f"{kind}, lr {lr:g}",
        )
        colors[lr] = line.get_color()
    axes[0].set(xlabel="step", ylabel="||w - w*||^2 (first seed)", title=f"fixed beta={beta0:g} (dotted) vs scaled")
    lrs = result["lrs"]
    for lr in lrs:
        points = [(gap, steps) for gap, steps in sweep_curve(result, lr, 0) if steps is not None]
        if points:
            axes[1].loglog(*zip(*points), "o-", color=colors[lr], label=f"lr {lr:g}")
    axes[1].set(xlabel="1 - beta", ylabel="steps to target (first seed)", title="beta sweep (missing: not reached)")
    axes[2].loglog(lrs, [1 - b for b in result["scaled_betas"]], "-", color="C0", label="MomentumScaling (2/3)")
    axes[2].loglog(lrs, [1 - beta0] * len(lrs), ":", color="C1", label=f"fixed beta={beta0:g}")
    for s in range(seeds):
        best = summary(result, s)["best"]
        if best:
            axes[2].loglog(*zip(*best), "ks", alpha=0.6, label="fastest in the sweep (each seed)" if s == 0 else None)
    axes[2].set(xlabel="lr", ylabel="1 - beta", title="momentum gap vs lr")
    for ax in axes:
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    figure.suptitle("label-noise SGD with heavy-ball momentum on sparse regression (w = u*u - v*v)")
    return save_figure(figure, out, "momentum_scaling.png")


def main(argv=None):
    parser = parser_for(__doc__, "outputs/momentum_scaling")
    parser.set_defaults(seeds=3)
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=[0.01, 0.005, 0.0025, 0.00125, 0.000625], help="largest first"
    )
    parser.add_argument("--beta0", type=float, default=0.99, help="beta at the largest lr (fixed runs and C)")
    parser.add_argument("--sweep-points", type=int, default=11, help="1-beta = 0.1 / sqrt(3)^i, i < this")
    parser.add_argument("--steps", type=int, default=12000, help="budget of every run")
    parser.add_argument("--label-noise", type=float, default=0.5, help="std of the fresh label noise")
    parser.add_argument("--target", type=float, default=0.1, help="test error ||w - w*||^2 to reach")
    args = parser.parse_args(argv)
    if args.tiny:
        args.lrs, args.sweep_points, args.steps, args.seeds = [0.01, 0.0025], 7, 3000, 1
    result = run(
        args.lrs,
        args.beta0,
        args.sweep_points,
        args.steps,
        args.seeds,
        args.label_noise,
        args.target,
        seed=args.seed,
        out=args.out,
        use_wandb=args.wandb,
    )
    path = plot(result, args.beta0, args.out)
    report(
        "momentum_scaling",
        combine([criteria(result, s) for s in range(args.seeds)]),
        numbers(result, args.beta0, args.steps, args.target),
        path,
        [args.seed + s for s in range(args.seeds)],
    )


if __name__ == "__main__":
    main()
