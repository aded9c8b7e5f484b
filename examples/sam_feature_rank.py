"""SAM vs SGD: sharpness-aware minimization leads to low-rank features (Andriushchenko et al. 2023).

The paper's minimal setting (its two-layer experiments): a ReLU teacher with 3 neurons on inputs on the unit sphere
in R^3, n = 20 training points, fitted by a two-layer ReLU student with 100 neurons (Gaussian init, std 0.3) with
batch size 1 and lr 0.1, by plain SGD or by SAM (``hildtools.optimizers.SAM`` around SGD) for the first half of
training and SGD after it. FeatureRankMonitor logs the feature rank of the hidden ReLU features on the training
inputs: the number of principal components holding 99.99% of the energy (the paper's threshold for these nets).
The paper reports that SAM leaves fewer active ReLUs and a lower feature rank, more so for larger rho.

The example guards against the trivial explanation (a large rho at batch size 1 killing ReLUs at once, or a SAM
run that simply fits worse): the rank is measured from step 0 at log-spaced early steps, with small rho values, n
well above the ranks, and the comparison is also made at matched training loss.

Verdict: PASS when, for every SAM rho and seed, (1) the final feature rank is below SGD's, (2) the gap builds up
gradually: at step 10 it is under half the final gap, (3) SAM's final rank is below SGD's rank at the first
measurement where SGD's training MSE had fallen to SAM's final one (matched fit: SAM's final loss is higher, and
a worse fit alone could lower the rank), and (4) SGD's rank stays below n (not at the ceiling). Measured with the
defaults (seeds 0-2): rho = 0.2 meets (1)-(3) in 3 of 3 seeds, rho = 0.05 in 1 of 3, so the verdict is FAIL: the
paper's low-rank effect shows here at the larger rho, not at the small one.

Not everywhere at small scale: on digits (a 2 x 512 ReLU MLP, cross-entropy, SGD with momentum 0.9, lr 0.05,
batch 64, 60 epochs, seed 0; measured once in a plain loop, not by this script) SAM with rho 0.05-0.5 gave a *higher*
99% feature rank of the penultimate features than SGD (30-39 vs 22). The paper's image-classification results are
for ResNets on CIFAR-10/100 and Tiny ImageNet.

    python examples/sam_feature_rank.py                          # SGD, SAM rho 0.05 and 0.2, n = 50; 41-57 s of CPU
    python examples/sam_feature_rank.py --seeds 3                # mean ± std over three seeds
    python examples/sam_feature_rank.py --rhos 0 0.1 0.2 0.3 0.4 0.6 --n 20 --steps 20000   # the paper's sweep
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from phenomena_common import (
    combine,
    finish_wandb,
    make_logger,
    mean_spread,
    parser_for,
    pyplot,
    report,
    save_figure,
    seed_list,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hildtools.callbacks import FeatureRankMonitor
from hildtools.metrics import feature_rank
from hildtools.optimizers import SAM
from hildtools.optimizers.sam import check_lightning_compat


def on_sphere(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, dim, generator=generator)
    return x / x.norm(dim=1, keepdim=True)


def teacher_data(n=20, n_test=1000, dim=3, teacher_width=3, seed=0):
    """Inputs on the unit sphere; targets of a ReLU teacher (unit-norm rows, biases N(0,1), output weights +-1)."""
    generator = torch.Generator().manual_seed(seed)
    x, x_test = on_sphere(n, dim, generator), on_sphere(n_test, dim, generator)
    w1 = on_sphere(teacher_width, dim, generator)
    b1 = torch.randn(teacher_width, generator=generator)
    w2 = torch.randn(teacher_width, generator=generator).sign()
    b2 = torch.randn(1, generator=generator)

    def teacher(inputs):
        return (torch.relu(inputs @ w1.T + b1) @ w2 + b2)[:, None]

    return (x, teacher(x)), (x_test, teacher(x_test))


class TwoLayerStudent(pl.LightningModule):
    """Linear(dim, width) - ReLU - Linear(width, 1), all parameters N(0, init_std^2); mean squared error."""

    def __init__(self, dim=3, width=100, init_std=0.3, lr=0.1, rho=0.0):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, 1))
        with torch.no_grad():
            for parameter in self.net.parameters():
                parameter.normal_(0.0, init_std)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self(x) - y).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        if self.hparams.rho == 0:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return SAM(self.parameters(), torch.optim.SGD, rho=self.hparams.rho, lr=self.hparams.lr)

    def on_fit_start(self):
        check_lightning_compat(self.trainer)


class SwitchToBase(pl.Callback):
    """After ``at_step`` steps, train with SAM's base optimizer (same param groups and state): SGD from there on."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        if trainer.global_step >= self.at_step and isinstance(optimizer, SAM):
            trainer.optimizers = [optimizer.base_optimizer]


def measurement_steps(steps: int, every_n_steps: int) -> set[int]:
    """Step 0, log-spaced early steps 1, 2, 5, 10, 20, 50, ... and every ``every_n_steps``."""
    early = {m * 10**e for e in range(6) for m in (1, 2, 5)}
    return {0} | {s for s in early if s <= steps} | set(range(every_n_steps, steps + 1, every_n_steps))


class History(pl.Callback):
    """At step 0 and each of ``steps``: train and test MSE, active ReLUs on the training inputs, and the feature
    rank (``hildtools.metrics.feature_rank`` of the hidden ReLU features on the training inputs)."""

    def __init__(self, steps: set[int], threshold: float, train, test):
        self.steps, self.threshold, self.train, self.test, self.rows = steps, threshold, train, test, []

    def record(self, trainer, pl_module):
        (x, y), (x_test, y_test) = ([t.to(pl_module.device) for t in pair] for pair in (self.train, self.test))
        with torch.no_grad():
            hidden = pl_module.net[1](pl_module.net[0](x))
            self.rows.append({
                "step": trainer.global_step,
                "train_mse": float((pl_module(x) - y).pow(2).mean()),
                "test_mse": float((pl_module(x_test) - y_test).pow(2).mean()),
                "active_relus": int((hidden > 0).any(0).sum()),
                "feature_rank": float(feature_rank(hidden, self.threshold)["pca_rank"]),
            })  # fmt: skip

    def on_train_start(self, trainer, pl_module):
        self.record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step in self.steps:
            self.record(trainer, pl_module)


def run(
    rhos=(0.0, 0.05, 0.2),
    steps=6000,
    sam_fraction=0.5,
    n=50,
    width=100,
    lr=0.1,
    threshold=0.9999,
    every_n_steps=200,
    seed=0,
    out="outputs/sam_feature_rank",
    use_wandb=False,
) -> dict[float, list[dict]]:
    """One run per rho (0 = SGD); returns {rho: rows} with the History columns."""
    train, test = teacher_data(n, seed=seed)
    results = {}
    for rho in rhos:
        pl.seed_everything(seed, verbose=False)
        monitor = FeatureRankMonitor(threshold=threshold, every_n_steps=every_n_steps, probe_data=train)
        history = History(measurement_steps(steps, every_n_steps), threshold, train, test)
        loader = DataLoader(
            TensorDataset(*train), batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
        trainer = pl.Trainer(
            max_steps=steps, max_epochs=-1, accelerator="auto", devices=1,
            callbacks=[SwitchToBase(int(sam_fraction * steps)), monitor, history],
            logger=make_logger(out, f"rho_{rho:g}_seed{seed}", use_wandb), enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=False, log_every_n_steps=every_n_steps,
        )  # fmt: skip
        trainer.fit(TwoLayerStudent(width=width, lr=lr, rho=rho), loader)
        finish_wandb(use_wandb)
        results[rho] = history.rows
    return results


def label(rho: float) -> str:
    return "SGD" if rho == 0 else f"SAM rho={rho:g}"


def at_step(rows: list[dict], step: int) -> dict:
    return next(row for row in rows if row["step"] >= step)


def matched_rank(sgd: list[dict], loss: float) -> float | None:
    """SGD's feature rank at its first measurement with training MSE <= ``loss`` (None if never)."""
    return next((row["feature_rank"] for row in sgd if row["train_mse"] <= loss), None)


def criteria(results: dict[float, list[dict]], n: int) -> list[tuple[str, bool]]:
    sgd = results[0.0]
    checks = []
    for rho, rows in results.items():
        if rho == 0:
            continue
        gap, early = (
            sgd[-1]["feature_rank"] - rows[-1]["feature_rank"],
            (at_step(sgd, 10)["feature_rank"] - at_step(rows, 10)["feature_rank"]),
        )
        checks += [
            (f"{label(rho)}: final feature rank below SGD's", gap > 0),
            (f"{label(rho)}: at step 10 the gap is under half the final gap", gap > 0 and early < gap / 2),
            (
                f"{label(rho)}: rank below SGD's at matched training loss",
                (matched := matched_rank(sgd, rows[-1]["train_mse"])) is not None
                and rows[-1]["feature_rank"] < matched,
            ),
        ]
    checks.append((f"SGD's final rank below n = {n}", sgd[-1]["feature_rank"] < n))
    return checks


def numbers(runs: list[dict[float, list[dict]]], threshold: float) -> str:
    rhos = list(runs[0])
    step = runs[0][rhos[0]][-1]["step"]

    def of(rho, key, fmt=".3g", where=-1):
        return mean_spread(
            [results[rho][where][key] if where == -1 else at_step(results[rho], where)[key] for results in runs], fmt
        )

    ranks = ", ".join(
        f"{label(rho)} {of(rho, 'feature_rank', '.1f', 0)} -> {of(rho, 'feature_rank', '.1f', 10)} "
        f"-> {of(rho, 'feature_rank', '.1f')}"
        for rho in rhos
    )
    matched = ", ".join(
        f"{label(rho)} {of(rho, 'feature_rank', '.1f')} vs SGD "
        f"{mean_spread([matched_rank(r[0.0], r[rho][-1]['train_mse']) for r in runs], '.1f')}"
        for rho in rhos
        if rho > 0
    )
    return (
        f"feature rank at {100 * threshold:g}% energy at steps 0 -> 10 -> {step}: {ranks}; at matched training "
        f"loss (SGD's first measurement at SAM's final train MSE): {matched}; active ReLUs "
        f"{', '.join(of(rho, 'active_relus', '.0f') for rho in rhos)}; train MSE "
        f"{', '.join(of(rho, 'train_mse', '.2g') for rho in rhos)}; test MSE "
        f"{', '.join(of(rho, 'test_mse', '.2g') for rho in rhos)}"
    )


def plot(results: dict[float, list[dict]], threshold: float, sam_step: int, out: str) -> str:
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    for rho, rows in results.items():
        label = "SGD" if rho == 0 else f"SAM rho={rho:g}"
        steps = [max(row["step"], 0.5) for row in rows]  # step 0 drawn at 0.5 on the log axis
        axes[0].plot(steps, [row["feature_rank"] for row in rows], label=label)
        axes[1].plot(steps, [row["active_relus"] for row in rows], label=label)
        axes[2].semilogy(steps, [row["train_mse"] for row in rows], label=f"{label} train")
        axes[2].semilogy(
            steps,
            [row["test_mse"] for row in rows],
            ls="--",
            color=axes[2].lines[-1].get_color(),
            label=f"{label} test",
        )
    axes[0].set(
        xlabel="step (step 0 at 0.5)",
        ylabel=f"PCs for {100 * threshold:g}% energy",
        title="feature rank (training inputs)",
    )
    axes[1].set(xlabel="step", ylabel="ReLUs active on some input", title="active neurons")
    axes[2].set(xlabel="step", ylabel="MSE", title="loss")
    for ax in axes:
        ax.set_xscale("log")
        ax.axvline(sam_step, color="gray", ls=":", lw=1)
        ax.legend(fontsize="small")
    figure.suptitle("two-layer ReLU student of a 3-neuron teacher, first seed (dotted: SAM switched to SGD)")
    return save_figure(figure, out, "sam_feature_rank.png")


def main(argv=None):
    parser = parser_for(__doc__, "outputs/sam_feature_rank")
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.0, 0.05, 0.2], help="0 is plain SGD (needed)")
    parser.add_argument("--steps", type=int, default=6000, help="steps of batch size 1")
    parser.add_argument("--sam-fraction", type=float, default=0.5, help="fraction of the steps taken with SAM")
    parser.add_argument("--n", type=int, default=50, help="training points")
    parser.add_argument("--width", type=int, default=100, help="student hidden neurons")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD lr (also SAM's base lr)")
    parser.add_argument("--threshold", type=float, default=0.9999, help="energy fraction of the feature rank")
    parser.add_argument("--every-n-steps", type=int, default=200, help="measurement interval after the early steps")
    args = parser.parse_args(argv)
    if 0.0 not in args.rhos:
        args.rhos = [0.0, *args.rhos]
    if args.tiny:
        args.rhos, args.steps, args.every_n_steps = [0.0, 0.2], 200, 50
    runs = [
        run(
            args.rhos,
            args.steps,
            args.sam_fraction,
            args.n,
            args.width,
            args.lr,
            args.threshold,
            args.every_n_steps,
            seed,
            args.out,
            args.wandb,
        )
        for seed in seed_list(args)
    ]
    path = plot(runs[0], args.threshold, int(args.sam_fraction * args.steps), args.out)
    report(
        "sam_feature_rank",
        combine([criteria(results, args.n) for results in runs]),
        numbers(runs, args.threshold),
        path,
        seed_list(args),
    )


if __name__ == "__main__":
    main()
