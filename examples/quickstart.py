"""Quickstart: a small CNN on scikit-learn's digits with hildtools' monitors attached.

Runs on the CPU in about a minute (uses the GPU when there is one), logs to Weights & Biases in offline mode when
wandb is installed (no account, no network; online once you have run `wandb login` and pass --wandb-online),
otherwise to CSV files, and ends by printing where the run and its figures are.

    python examples/quickstart.py            # defaults
    python examples/quickstart.py --help
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

from digits import digits_loaders
from hildtools.callbacks import EdgeOfStabilityMonitor, HessianEigenMonitor


class DigitsCNN(pl.LightningModule):
    """Conv(1->16)-ReLU-Conv(16->32)-ReLU-pool-Linear(32->64)-ReLU-Linear(64->10), trained with SGD."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.9):
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(),
        )
        self.classifier = nn.Linear(64, 10)

    def forward(self, x):
        return self.classifier(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def make_logger(args):
    try:
        import wandb  # noqa: F401
    except ImportError:
        return pl.loggers.CSVLogger(args.out, name="quickstart")
    mode = "online" if args.wandb_online else "offline"
    return pl.loggers.WandbLogger(project="hildtools-quickstart", save_dir=args.out, mode=mode)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--every-n-steps", type=int, default=25, help="measurement interval of the monitors")
    parser.add_argument("--probe-size", type=int, default=256)
    parser.add_argument("--out", default="outputs/quickstart", help="folder for logs and figures")
    parser.add_argument("--wandb-online", action="store_true", help="log online (after `wandb login`)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    os.makedirs(args.out, exist_ok=True)
    train_loader, val_loader = digits_loaders(args.batch_size, seed=args.seed)
    monitors = [
        HessianEigenMonitor(k=3, every_n_steps=4 * args.every_n_steps, probe_size=args.probe_size, density=True),
        EdgeOfStabilityMonitor(every_n_steps=args.every_n_steps, probe_size=args.probe_size),
    ]
    logger = make_logger(args)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="auto", devices=1, logger=logger, callbacks=list(monitors),
        default_root_dir=args.out, log_every_n_steps=5, enable_checkpointing=False,
    )
    trainer.fit(DigitsCNN(args.lr), train_loader, val_loader)

    print("\nLast measurements:")
    for monitor in monitors:
        for key, value in monitor.last_metrics.items():
            print(f"  {key:28s} {value:.4g}")
    print(f"\nLogs: {trainer.log_dir or args.out}")
    if isinstance(logger, pl.loggers.WandbLogger):
        print(f"W&B offline run: {logger.experiment.dir}\n  view it with: wandb sync {os.path.dirname(logger.experiment.dir)}")
        logger.experiment.finish()
    else:
        print(f"Figures: {os.path.join(trainer.log_dir, 'figures')}")


if __name__ == "__main__":
    main()
