"""Optimizers side by side: Lion vs Signum vs AdamW, and NGN's self-tuned step size vs SGD.

A small BatchNorm CNN on scikit-learn's digits (cross-entropy, batch 64) trained in Lightning with the drop-in
optimizers of ``hildtools.optimizers``:

1. Lion (Chen et al. 2023), Signum (Bernstein et al. 2018; Lion with beta1 = beta2) and torch's AdamW, with the
   Lion paper's rule of thumb: a sign method gets a ~10x smaller lr and a ~10x larger decoupled weight decay.
2. NGN (Orvieto & Xiao 2024): SGD whose step is gamma = sigma / (1 + sigma ||g||^2 / (2 f)) with f the minibatch
   loss. The step size tunes itself: here it starts far below sigma, warms up, then decays, with no schedule;
   at a sigma where SGD with lr = sigma diverges, NGN still trains. The fair baseline is SGD at its *best* lr over
   the same grid, not SGD at NGN's sigma.

Verdict: PASS when, for every seed, (1) Lion, Signum and AdamW each reach >= 95% validation accuracy, (2) NGN
reaches >= 90% at every sigma of the sweep (robust to its step size), and (3) NGN's worst sigma is within 2 points
of validation accuracy of SGD at its best lr on the same grid (robustness does not cost accuracy). The criteria
speak of this small problem only; claims about Lion vs AdamW at scale need the papers' settings.

    python examples/optimizers_compare.py                    # 9 runs of 10 epochs
    python examples/optimizers_compare.py --seeds 3          # mean ± std over three seeds
    python examples/optimizers_compare.py --sigmas 0.03 0.1 0.3 1 3 10 --epochs 30
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from digits import digits_loaders
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
from torch.nn import functional as F

from hildtools.optimizers import NGN, Lion, Signum

OPTIMIZERS = {
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
    "lion": lambda params, lr, wd: Lion(params, lr=lr, betas=(0.9, 0.99), weight_decay=wd),
    "signum": lambda params, lr, wd: Signum(params, lr=lr, momentum=0.9, weight_decay=wd),
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, weight_decay=wd),
    "ngn": lambda params, lr, wd: NGN(params, lr=lr, weight_decay=wd),
}


class DigitsBNCNN(pl.LightningModule):
    """Conv(1->16)-BN-ReLU-Conv(16->32)-BN-ReLU-Flatten-Linear(2048->10); logs NGN's step size when it is used."""

    def __init__(self, optimizer: str, lr: float, weight_decay: float):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 64, 10),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.hparams.optimizer == "ngn":
            self.log("ngn/gamma", self.optimizers().param_groups[0]["gamma"])

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        hp = self.hparams
        return OPTIMIZERS[hp.optimizer](self.parameters(), hp.lr, hp.weight_decay)


class History(pl.Callback):
    """Per step: the training loss and (NGN) gamma; per epoch: validation accuracy."""

    def __init__(self):
        self.losses, self.gammas, self.val_acc = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        if pl_module.hparams.optimizer == "ngn":
            self.gammas.append(float(pl_module.optimizers().param_groups[0]["gamma"]))

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val_acc.append(float(trainer.callback_metrics["val/acc"]))


def train_one(optimizer, lr, weight_decay, epochs, seed, out, use_wandb) -> History:
    pl.seed_everything(seed, verbose=False)
    train_loader, val_loader = digits_loaders(64, seed=seed)
    history = History()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="auto", devices=1, callbacks=[history], num_sanity_val_steps=0,
        logger=make_logger(out, f"{optimizer}_lr{lr:g}_seed{seed}", use_wandb), enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, log_every_n_steps=10,
    )  # fmt: skip
    trainer.fit(DigitsBNCNN(optimizer, lr, weight_decay), train_loader, val_loader)
    finish_wandb(use_wandb)
    return history


def run(
    sign_lr=3e-4,
    adamw_lr=3e-3,
    sign_wd=0.1,
    adamw_wd=0.01,
    sigmas=(0.1, 1.0, 10.0),
    ngn_wd=0.01,
    sgd_wd=1e-3,
    epochs=10,
    seed=0,
    out="outputs/optimizers_compare",
    use_wandb=False,
) -> dict[tuple[str, float], History]:
    """Returns {(optimizer, lr): History} for AdamW, Lion, Signum, and NGN / SGD at every sigma."""
    configs = [("adamw", adamw_lr, adamw_wd), ("lion", sign_lr, sign_wd), ("signum", sign_lr, sign_wd)]
    configs += [(name, sigma, wd) for sigma in sigmas for name, wd in (("ngn", ngn_wd), ("sgd", sgd_wd))]
    return {(name, lr): train_one(name, lr, wd, epochs, seed, out, use_wandb) for name, lr, wd in configs}


def epoch_means(values: list[float], epochs: int) -> list[float]:
    per_epoch = len(values) // epochs
    return [sum(values[i * per_epoch : (i + 1) * per_epoch]) / per_epoch for i in range(epochs)]


def final_loss(history: History, epochs: int) -> float:
    return epoch_means(history.losses, epochs)[-1]


def describe_gamma(gammas: list[float], epochs: int, sigma: float) -> str:
    """Epoch-mean gamma: start, peak (epoch) and end; named warm-up / decay when they are clear (1.5x, 10%)."""
    means = epoch_means(gammas, epochs)
    peak = max(range(epochs), key=means.__getitem__)
    shape = []
    if peak > 0 and means[peak] > 1.5 * means[0]:
        shape.append("warm-up")
    if means[-1] < 0.9 * means[peak]:
        shape.append("decay")
    return (
        f"NGN sigma={sigma:g} step size {means[0]:.3g} (epoch 1) -> peak {means[peak]:.3g} (epoch {peak + 1}) "
        f"-> {means[-1]:.3g} (epoch {epochs}): {' then '.join(shape) or 'no clear warm-up or decay'}"
    )


def val_acc(history: History, epochs: int) -> float:
    """Final validation accuracy; 0 for a run that diverged or stayed near chance (train loss > 2, ln 10 = 2.30)."""
    loss = final_loss(history, epochs)
    return history.val_acc[-1] if math.isfinite(loss) and loss <= 2.0 else 0.0


def summary(results, sigmas, epochs) -> dict:
    out = {name: val_acc(results[(name, lr)], epochs) for name, lr in results if name in ("adamw", "lion", "signum")}
    out["ngn"] = {sigma: val_acc(results[("ngn", sigma)], epochs) for sigma in sigmas}
    out["sgd"] = {sigma: val_acc(results[("sgd", sigma)], epochs) for sigma in sigmas}
    out["sgd_best_lr"] = max(sigmas, key=out["sgd"].__getitem__)
    return out


def criteria(results, sigmas, epochs) -> list[tuple[str, bool]]:
    s = summary(results, sigmas, epochs)
    best_sgd = s["sgd"][s["sgd_best_lr"]]
    return [
        ("Lion, Signum and AdamW each reach >= 0.95 val acc", min(s["adamw"], s["lion"], s["signum"]) >= 0.95),
        ("NGN reaches >= 0.90 val acc at every sigma", min(s["ngn"].values()) >= 0.90),
        ("NGN's worst sigma within 0.02 val acc of SGD at its best lr", min(s["ngn"].values()) >= best_sgd - 0.02),
    ]


def numbers(runs, sigmas, epochs) -> str:
    stats = [summary(results, sigmas, epochs) for results in runs]
    lrs = {name: lr for name, lr in runs[0] if name in ("adamw", "lion", "signum")}
    sign = ", ".join(f"{name} (lr {lrs[name]:g}) {mean_spread([s[name] for s in stats], '.3f')}" for name in lrs)
    ngn = ", ".join(f"{sigma:g}: {mean_spread([s['ngn'][sigma] for s in stats], '.3f')}" for sigma in sigmas)
    sgd = ", ".join(f"{sigma:g}: {mean_spread([s['sgd'][sigma] for s in stats], '.3f')}" for sigma in sigmas)
    best = ", ".join(f"{s['sgd_best_lr']:g}" for s in stats)
    gamma = describe_gamma(runs[0][("ngn", max(sigmas))].gammas, epochs, max(sigmas))
    return (
        f"val acc after {epochs} epochs (0 = did not train): {sign}; NGN by sigma {ngn}; SGD by lr {sgd} (best lr "
        f"per seed {best}); first seed: {gamma}"
    )


def plot(results, sigmas, epochs, out) -> str:
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    epoch_axis = range(1, epochs + 1)
    for (name, lr), history in results.items():
        if name in ("adamw", "lion", "signum"):
            axes[0].semilogy(epoch_axis, epoch_means(history.losses, epochs), label=f"{name} lr {lr:g}")
    for sigma in sigmas:
        gammas = results[("ngn", sigma)].gammas
        (line,) = axes[1].semilogy(gammas, lw=0.5, alpha=0.4)
        steps_per_epoch = len(gammas) // epochs
        axes[1].semilogy(
            [steps_per_epoch * (e - 0.5) for e in epoch_axis],
            epoch_means(gammas, epochs),
            color=line.get_color(),
            label=f"NGN gamma, sigma {sigma:g}",
        )
        axes[1].axhline(sigma, color=line.get_color(), ls="--", lw=1)
        for name, style in (("ngn", "-"), ("sgd", ":")):
            axes[2].semilogy(
                epoch_axis,
                epoch_means(results[(name, sigma)].losses, epochs),
                ls=style,
                color=line.get_color(),
                label=f"{name.upper()} {'sigma' if name == 'ngn' else 'lr'} {sigma:g}",
            )
    axes[0].set(xlabel="epoch", ylabel="train loss (epoch mean)", title="Lion vs Signum vs AdamW")
    axes[1].set(xlabel="step", ylabel="step size gamma", title="NGN's self-tuned step (dashed: sigma)")
    axes[2].set(xlabel="epoch", ylabel="train loss (epoch mean)", title="NGN (sigma) vs SGD (lr) on one grid")
    axes[2].set_ylim(top=10)  # a diverging SGD run would stretch the axis over many decades
    for ax in axes:
        ax.legend(fontsize="small")
    figure.suptitle("drop-in optimizers on digits (BatchNorm CNN, batch 64; first seed)")
    return save_figure(figure, out, "optimizers_compare.png")


def main(argv=None):
    parser = parser_for(__doc__, "outputs/optimizers_compare")
    parser.add_argument("--sign-lr", type=float, default=3e-4, help="lr of Lion and Signum")
    parser.add_argument("--adamw-lr", type=float, default=3e-3, help="lr of AdamW")
    parser.add_argument("--sign-wd", type=float, default=0.1, help="decoupled weight decay of Lion and Signum")
    parser.add_argument("--adamw-wd", type=float, default=0.01, help="weight decay of AdamW")
    parser.add_argument(
        "--sigmas", type=float, nargs="+", default=[0.1, 1.0, 10.0], help="NGN's sigma grid, also SGD's lr grid"
    )
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run")
    args = parser.parse_args(argv)
    if args.tiny:
        args.epochs, args.sigmas = 1, [0.1, 10.0]
    runs = [
        run(
            args.sign_lr,
            args.adamw_lr,
            args.sign_wd,
            args.adamw_wd,
            args.sigmas,
            epochs=args.epochs,
            seed=seed,
            out=args.out,
            use_wandb=args.wandb,
        )
        for seed in seed_list(args)
    ]
    path = plot(runs[0], args.sigmas, args.epochs, args.out)
    report(
        "optimizers_compare",
        combine([criteria(results, args.sigmas, args.epochs) for results in runs]),
        numbers(runs, args.sigmas, args.epochs),
        path,
        seed_list(args),
    )


if __name__ == "__main__":
    main()
