"""Stochastic collapse: more gradient noise (larger lr, smaller batch) leaves fewer independent neurons.

Chen, Kunin, Yamamura & Ganguli (2023): neurons with identical incoming and outgoing weights stay identical under
SGD (a permutation-invariant set), and gradient noise makes such sets attractive, the more so the larger the noise.
Here a GELU student with 64 hidden neurons learns a 4-neuron GELU teacher on 256 Gaussian inputs in R^10 with SGD
(momentum 0.9) and fresh Gaussian label noise at every step (std 0.5, the paper's noise source in its toy
models), first for several learning rates at one batch size, then for several batch sizes at one learning rate.
InvariantSetMonitor reports the fraction of independent hidden neurons (groups of identical neurons count once;
normalised distance < 0.1, the paper's threshold).

Every run trains for the same time lr x steps (``--steps`` steps at ``--base-lr``): a larger lr takes fewer steps,
so the lr sweep compares equal distances travelled, not equal step counts. A control run without label noise at
the largest lr shows that the collapse comes from the noise.

Verdict: PASS when, for every seed, (1) at equal time the final independent fraction falls as the lr grows
(monotone, first > last), (2) at equal lr it falls as the batch shrinks, (3) the control without label noise keeps
>= 0.95 of its neurons independent, and (4) the noisiest run (largest lr at the base batch) has collapsed to
<= 0.8. ``--label-noise 0`` fails (1), (2) and (4).

    python examples/stochastic_collapse.py                   # 6 runs, time lr x steps = 0.05 x 4000; 51 s of CPU
    python examples/stochastic_collapse.py --seeds 3         # mean ± std over three seeds
    python examples/stochastic_collapse.py --label-noise 0   # no label noise: the noise, hence the collapse, fades
    python examples/stochastic_collapse.py --steps 20000 --width 256 --lrs 0.01 0.02 0.05 0.1
"""

from __future__ import annotations

import itertools
import math

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

from hildtools.callbacks import InvariantSetMonitor


def teacher_data(n=256, dim=10, teacher_width=4, seed=0):
    """Gaussian inputs; targets of a GELU teacher (weights N(0, 1/dim), output weights +-1)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator)
    w1 = torch.randn(teacher_width, dim, generator=generator) / math.sqrt(dim)
    w2 = torch.randn(teacher_width, generator=generator).sign()
    return x, (nn.functional.gelu(x @ w1.T) @ w2)[:, None]


class NoisyStudent(pl.LightningModule):
    """Linear(dim, width) - GELU - Linear(width, 1) on 0.5 x squared error to targets + label_noise x N(0, 1)."""

    def __init__(self, dim=10, width=64, lr=0.05, momentum=0.9, label_noise=0.5):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        noisy = y + self.hparams.label_noise * torch.randn_like(y)  # fresh label noise at every step
        loss = 0.5 * (self(x) - noisy).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


class History(pl.Callback):
    """At each measurement: step, clean train MSE and the monitor's values for the hidden layer ``net.0``."""

    def __init__(self, monitor: InvariantSetMonitor, data):
        self.monitor, self.data, self.rows = monitor, data, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.monitor.last_step != trainer.global_step or not self.monitor.last_metrics:
            return
        x, y = (t.to(pl_module.device) for t in self.data)
        with torch.no_grad():
            mse = float((pl_module(x) - y).pow(2).mean())
        metrics = self.monitor.last_metrics
        self.rows.append({
            "step": trainer.global_step, "train_mse": mse,
            "independent_fraction": metrics["collapse/net.0/independent_fraction"],
            "num_vanishing": metrics["collapse/net.0/num_vanishing"],
            "largest_group": metrics["collapse/net.0/largest_group"],
        })  # fmt: skip


def train_one(lr, batch_size, data, steps, width, label_noise, measurements, seed, out, use_wandb) -> list[dict]:
    pl.seed_everything(seed, verbose=False)
    every_n_steps = max(1, steps // measurements)
    monitor = InvariantSetMonitor(every_n_steps=every_n_steps)
    history = History(monitor, data)
    loader = DataLoader(
        TensorDataset(*data),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    trainer = pl.Trainer(
        max_steps=steps, max_epochs=-1, accelerator="auto", devices=1, callbacks=[monitor, history],
        logger=make_logger(out, f"lr{lr:g}_batch{batch_size}_noise{label_noise:g}_seed{seed}", use_wandb),
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        log_every_n_steps=every_n_steps,
    )  # fmt: skip
    trainer.fit(NoisyStudent(data[0].shape[1], width, lr, label_noise=label_noise), loader)
    finish_wandb(use_wandb)
    for row in history.rows:
        row["time"] = lr * row["step"]
    return history.rows


def run(
    lrs=(0.025, 0.05, 0.1),
    batch_sizes=(128, 32, 8),
    base_lr=0.05,
    base_batch=32,
    steps=4000,
    width=64,
    label_noise=0.5,
    measurements=16,
    seed=0,
    out="outputs/stochastic_collapse",
    use_wandb=False,
):
    """Runs every lr at ``base_batch`` and every batch size at ``base_lr``, each for time ``base_lr x steps``, and
    the largest lr at ``base_batch`` without label noise; returns {(lr, batch, label_noise): rows}."""
    data = teacher_data(seed=seed)
    configs = [(lr, base_batch, label_noise) for lr in lrs] + [(base_lr, batch, label_noise) for batch in batch_sizes]
    configs.append((max(lrs), base_batch, 0.0))
    results = {}
    for lr, batch, noise in dict.fromkeys(configs):
        results[(lr, batch, noise)] = train_one(
            lr, batch, data, round(steps * base_lr / lr), width, noise, measurements, seed, out, use_wandb
        )
    return results


def final_fraction(rows: list[dict]) -> float | None:
    """Independent fraction at the end, or None when the run diverged (non-finite train MSE)."""
    last = rows[-1] if rows else None
    return None if last is None or not math.isfinite(last["train_mse"]) else last["independent_fraction"]


def falls(values: list[float | None]) -> bool:
    finite = [v for v in values if v is not None]
    monotone = all(a >= b for a, b in itertools.pairwise(finite))
    return len(finite) == len(values) > 1 and monotone and finite[0] > finite[-1]


def criteria(results, lrs, batch_sizes, base_lr, base_batch, label_noise) -> list[tuple[str, bool]]:
    by_lr = [final_fraction(results[(lr, base_batch, label_noise)]) for lr in lrs]
    by_batch = [final_fraction(results[(base_lr, b, label_noise)]) for b in batch_sizes]
    control = final_fraction(results[(max(lrs), base_batch, 0.0)])
    noisiest = final_fraction(results[(max(lrs), base_batch, label_noise)])
    return [
        ("at equal time lr x steps, the independent fraction falls as the lr grows", falls(by_lr)),
        ("at equal lr, it falls as the batch shrinks", falls(by_batch)),
        ("control without label noise (largest lr) keeps >= 0.95", control is not None and control >= 0.95),
        ("the noisiest run (largest lr, base batch) collapses to <= 0.8", noisiest is not None and noisiest <= 0.8),
    ]


def numbers(runs, lrs, batch_sizes, base_lr, base_batch, label_noise) -> str:
    def of(key):
        values = [final_fraction(results[key]) for results in runs]
        return "diverged" if None in values else mean_spread(values, ".2f")

    time = runs[0][(base_lr, base_batch, label_noise)][-1]["time"]
    by_lr = ", ".join(of((lr, base_batch, label_noise)) for lr in lrs)
    by_batch = ", ".join(of((base_lr, b, label_noise)) for b in batch_sizes)
    return (
        f"independent fraction of the hidden neurons at time lr x steps = {time:g}: lr "
        f"{'/'.join(f'{lr:g}' for lr in lrs)} at batch {base_batch}: {by_lr}; batch "
        f"{'/'.join(str(b) for b in batch_sizes)} at lr {base_lr:g}: {by_batch}; no label noise at lr "
        f"{max(lrs):g}: {of((max(lrs), base_batch, 0.0))}"
    )


def plot(results, lrs, batch_sizes, base_lr, base_batch, label_noise, out) -> str:
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    for lr in lrs:
        rows = results[(lr, base_batch, label_noise)]
        axes[0].plot([r["time"] for r in rows], [r["independent_fraction"] for r in rows], label=f"lr {lr:g}")
    control = results[(max(lrs), base_batch, 0.0)]
    axes[0].plot(
        [r["time"] for r in control],
        [r["independent_fraction"] for r in control],
        "k--",
        label=f"lr {max(lrs):g}, no label noise",
    )
    for batch in batch_sizes:
        rows = results[(base_lr, batch, label_noise)]
        axes[1].plot([r["time"] for r in rows], [r["independent_fraction"] for r in rows], label=f"batch {batch}")
    for (lr, batch, noise), rows in results.items():
        fraction = final_fraction(rows)
        if fraction is not None and noise == label_noise:
            axes[2].scatter(lr / batch, fraction, color="k")
            axes[2].annotate(
                f"{lr:g}/{batch}", (lr / batch, fraction), fontsize="x-small", textcoords="offset points", xytext=(3, 3)
            )
    axes[0].set(title=f"learning rate (batch {base_batch})")
    axes[1].set(title=f"batch size (lr {base_lr:g})")
    for ax in axes[:2]:
        ax.set(xlabel="time lr x step", ylabel="independent fraction", ylim=(0, 1.05))
        ax.legend(fontsize="small")
    axes[2].set(
        xscale="log",
        xlabel="noise scale lr / batch",
        ylabel="final independent fraction",
        ylim=(0, 1.05),
        title="all label-noise runs",
    )
    axes[2].xaxis.set_minor_formatter(plt.NullFormatter())
    figure.suptitle("stochastic collapse of a GELU student (label noise, SGD with momentum; first seed)")
    return save_figure(figure, out, "stochastic_collapse.png")


def main(argv=None):
    parser = parser_for(__doc__, "outputs/stochastic_collapse")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.025, 0.05, 0.1], help="swept at --base-batch")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 32, 8], help="swept at --base-lr")
    parser.add_argument("--base-lr", type=float, default=0.05, help="lr of the batch sweep")
    parser.add_argument("--base-batch", type=int, default=32, help="batch of the lr sweep")
    parser.add_argument(
        "--steps", type=int, default=4000, help="steps at --base-lr; every run trains for time base_lr x steps"
    )
    parser.add_argument("--width", type=int, default=64, help="student hidden neurons")
    parser.add_argument("--label-noise", type=float, default=0.5, help="std of the fresh label noise")
    parser.add_argument("--measurements", type=int, default=16, help="measurements per run")
    args = parser.parse_args(argv)
    if args.tiny:
        args.lrs, args.batch_sizes, args.base_lr, args.steps, args.measurements = [0.05, 0.2], [128, 32], 0.1, 800, 8
    runs = [
        run(
            args.lrs,
            args.batch_sizes,
            args.base_lr,
            args.base_batch,
            args.steps,
            args.width,
            args.label_noise,
            args.measurements,
            seed,
            args.out,
            args.wandb,
        )
        for seed in seed_list(args)
    ]
    keys = (args.lrs, args.batch_sizes, args.base_lr, args.base_batch, args.label_noise)
    figure = plot(runs[0], *keys, args.out)
    report(
        "stochastic_collapse",
        combine([criteria(results, *keys) for results in runs]),
        numbers(runs, *keys),
        figure,
        seed_list(args),
    )


if __name__ == "__main__":
    main()
