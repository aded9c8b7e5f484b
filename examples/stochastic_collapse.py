"""Stochastic collapse: more gradient noise (larger lr, smaller batch) leaves fewer independent neurons.

Chen, Kunin, Yamamura & Ganguli (2023): neurons with identical incoming and outgoing weights stay identical under
SGD (a permutation-invariant set), and gradient noise makes such sets attractive, the more so the larger the noise.
Here a GELU student with 64 hidden neurons learns a 4-neuron GELU teacher on 256 Gaussian inputs in R^10 with SGD
(momentum 0.9) and fresh Gaussian label noise at every step (std 0.5, the paper's noise source in its toy
models), first for several learning rates at one batch size, then for several batch sizes at one learning rate.
InvariantSetMonitor reports the fraction of independent hidden neurons (groups of identical neurons count once;
normalised distance < 0.1, the paper's threshold).

    python examples/stochastic_collapse.py                   # 5 runs of 4000 steps, ~1.5 min on a CPU
    python examples/stochastic_collapse.py --label-noise 0   # no label noise: the noise, hence the collapse, fades
    python examples/stochastic_collapse.py --steps 20000 --width 256 --lrs 0.01 0.02 0.05 0.1
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hildtools.callbacks import InvariantSetMonitor
from phenomena_common import finish_wandb, make_logger, parser_for, pyplot, report, save_figure


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


def train_one(lr, batch_size, data, steps, width, label_noise, every_n_steps, seed, out, use_wandb) -> list[dict]:
    pl.seed_everything(seed, verbose=False)
    monitor = InvariantSetMonitor(every_n_steps=every_n_steps)
    history = History(monitor, data)
    loader = DataLoader(TensorDataset(*data), batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    trainer = pl.Trainer(
        max_steps=steps, max_epochs=-1, accelerator="auto", devices=1, callbacks=[monitor, history],
        logger=make_logger(out, f"lr{lr:g}_batch{batch_size}", use_wandb), enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, log_every_n_steps=every_n_steps,
    )  # fmt: skip
    trainer.fit(NoisyStudent(data[0].shape[1], width, lr, label_noise=label_noise), loader)
    finish_wandb(use_wandb)
    return history.rows


def run(lrs=(0.02, 0.05, 0.1), batch_sizes=(128, 32, 8), base_lr=0.05, base_batch=32, steps=4000, width=64,
        label_noise=0.5, every_n_steps=250, seed=0, out="outputs/stochastic_collapse", use_wandb=False):
    """Runs every lr at ``base_batch`` and every batch size at ``base_lr``; returns {(lr, batch): rows}."""
    data = teacher_data(seed=seed)
    configs = [(lr, base_batch) for lr in lrs] + [(base_lr, batch) for batch in batch_sizes]
    results = {}
    for lr, batch in dict.fromkeys(configs):
        results[(lr, batch)] = train_one(lr, batch, data, steps, width, label_noise, every_n_steps, seed, out,
                                         use_wandb)
    return results


def final_fraction(rows: list[dict]) -> float | None:
    """Independent fraction at the end, or None when the run diverged (non-finite train MSE)."""
    last = rows[-1] if rows else None
    return None if last is None or not math.isfinite(last["train_mse"]) else last["independent_fraction"]


def describe(results, keys, name, order_text) -> str:
    values = [final_fraction(results[key]) for key in keys]
    listed = ", ".join("diverged" if v is None else f"{v:.2f}" for v in values)
    finite = [v for v in values if v is not None]
    falls = len(finite) > 1 and all(a >= b for a, b in zip(finite, finite[1:])) and finite[0] > finite[-1]
    trend = "falls as " + order_text if falls else "no monotone fall"
    return f"{name} {listed} ({trend})"


def verdict(results, lrs, batch_sizes, base_lr, base_batch) -> str:
    steps = next(iter(results.values()))[-1]["step"]
    by_lr = describe(results, [(lr, base_batch) for lr in lrs],
                     f"lr {'/'.join(f'{lr:g}' for lr in lrs)} at batch {base_batch}:", "lr grows")
    by_batch = describe(results, [(base_lr, b) for b in batch_sizes],
                        f"batch {'/'.join(str(b) for b in batch_sizes)} at lr {base_lr:g}:", "batch shrinks")
    return f"independent fraction of the hidden neurons after {steps} steps: {by_lr}; {by_batch}"


def plot(results, lrs, batch_sizes, base_lr, base_batch, out) -> str:
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    for lr in lrs:
        rows = results[(lr, base_batch)]
        axes[0].plot([r["step"] for r in rows], [r["independent_fraction"] for r in rows], label=f"lr {lr:g}")
    for batch in batch_sizes:
        rows = results[(base_lr, batch)]
        axes[1].plot([r["step"] for r in rows], [r["independent_fraction"] for r in rows], label=f"batch {batch}")
    for (lr, batch), rows in results.items():
        fraction = final_fraction(rows)
        if fraction is not None:
            axes[2].scatter(lr / batch, fraction, color="k")
            axes[2].annotate(f"{lr:g}/{batch}", (lr / batch, fraction), fontsize="x-small",
                             textcoords="offset points", xytext=(3, 3))
    axes[0].set(title=f"learning rate (batch {base_batch})")
    axes[1].set(title=f"batch size (lr {base_lr:g})")
    for ax in axes[:2]:
        ax.set(xlabel="step", ylabel="independent fraction", ylim=(0, 1.05))
        ax.legend(fontsize="small")
    axes[2].set(xscale="log", xlabel="noise scale lr / batch", ylabel="final independent fraction",
                ylim=(0, 1.05), title="all runs")
    axes[2].xaxis.set_minor_formatter(plt.NullFormatter())
    figure.suptitle("stochastic collapse of a 64-neuron GELU student (label noise, SGD with momentum)")
    return save_figure(figure, out, "stochastic_collapse.png")


def main(argv=None):
    parser = parser_for(__doc__, "outputs/stochastic_collapse")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.02, 0.05, 0.1], help="swept at --base-batch")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 32, 8], help="swept at --base-lr")
    parser.add_argument("--base-lr", type=float, default=0.05)
    parser.add_argument("--base-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--width", type=int, default=64, help="student hidden neurons")
    parser.add_argument("--label-noise", type=float, default=0.5, help="std of the fresh label noise")
    parser.add_argument("--every-n-steps", type=int, default=250)
    args = parser.parse_args(argv)
    if args.tiny:
        args.lrs, args.batch_sizes, args.steps, args.every_n_steps = [0.02, 0.1], [32], 40, 20
    results = run(args.lrs, args.batch_sizes, args.base_lr, args.base_batch, args.steps, args.width,
                  args.label_noise, args.every_n_steps, args.seed, args.out, args.wandb)
    path = plot(results, args.lrs, args.batch_sizes, args.base_lr, args.base_batch, args.out)
    report("stochastic_collapse", verdict(results, args.lrs, args.batch_sizes, args.base_lr, args.base_batch), path)


if __name__ == "__main__":
    main()
