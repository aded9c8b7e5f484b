"""Quickstart: a small CNN on scikit-learn's digits, trained with SAM, with all six hildtools monitors attached.

Runs on the CPU in about a minute (uses the GPU when there is one), logs to Weights & Biases in offline mode when
wandb is installed (no account, no network; online once you have run `wandb login` and pass --wandb-online),
otherwise to CSV files, saves the monitors' pictures as PNG files, and ends by printing where the run and its
figures are.

    python examples/quickstart.py            # defaults
    python examples/quickstart.py --help
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
from digits import digits_loaders
from phenomena_common import EXTRA_HINT, HelpFormatter
from torch import nn
from torch.nn import functional as F

from hildtools.callbacks import (
    EdgeOfStabilityMonitor,
    FeatureRankMonitor,
    HessianEigenMonitor,
    InvariantSetMonitor,
    NeuralCollapseMonitor,
    NTKAlignmentMonitor,
)
from hildtools.optimizers import SAM
from hildtools.optimizers.sam import check_lightning_compat


class DigitsCNN(pl.LightningModule):
    """Conv(1->16)-ReLU-Conv(16->32)-ReLU-maxpool-Linear(512->64)-ReLU-Linear(64->10), trained with SAM over SGD."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.9, rho: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(512, 64),
            nn.ReLU(),
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
        return SAM(
            self.parameters(), torch.optim.SGD, rho=self.hparams.rho, lr=self.hparams.lr, momentum=self.hparams.momentum
        )

    def on_fit_start(self):
        check_lightning_compat(self.trainer)  # refuses settings SAM cannot run correctly under; hands it the model


HEADLINES = [
    "hessian/eig_0",
    "hessian/overlap_init",
    "eos/sharpness",
    "eos/threshold",
    "eos/ratio",
    "ntk/target_alignment",
    "ntk/relative_change",
    "nc/classifier/nc1",
    "nc/features.5/nc1",
    "rank/classifier/pca_rank",
    "rank/features.5/pca_rank",
    "collapse/features.6/independent_fraction",
]


def make_logger(args):
    try:
        import wandb  # noqa: F401
    except ImportError:
        return pl.loggers.CSVLogger(args.out, name="quickstart")
    mode = "online" if args.wandb_online else "offline"
    return pl.loggers.WandbLogger(project="hildtools-quickstart", save_dir=args.out, mode=mode)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--epochs", type=int, default=5, help="training epochs")
    parser.add_argument("--lr", type=float, default=0.05, help="lr of SAM's base SGD (momentum 0.9, rho 0.05)")
    parser.add_argument("--batch-size", type=int, default=64, help="minibatch size")
    parser.add_argument("--every-n-steps", type=int, default=25, help="measurement interval of the monitors")
    parser.add_argument("--probe-size", type=int, default=256, help="probe examples of the Hessian monitor")
    parser.add_argument("--out", default="outputs/quickstart", help="folder for logs and figures")
    parser.add_argument("--wandb-online", action="store_true", help="log online (after `wandb login`)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split, initialisation and SAM")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (for the tests)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.epochs, args.every_n_steps, args.probe_size = 1, 5, 64

    pl.seed_everything(args.seed, verbose=False)
    os.makedirs(args.out, exist_ok=True)
    train_loader, val_loader = digits_loaders(args.batch_size, seed=args.seed)
    every, size = args.every_n_steps, args.probe_size
    layers = ["features.5", "classifier"]  # an intermediate layer (input of the first Linear) and the last one
    monitors = [
        HessianEigenMonitor(k=3, every_n_steps=4 * every, probe_size=size, density=True),
        EdgeOfStabilityMonitor(every_n_steps=every),  # its default probe (64 examples) keeps it cheap
        NTKAlignmentMonitor(every_n_steps=4 * every, probe_size=min(size, 128), figures=True),
        NeuralCollapseMonitor(num_classes=10, layers=layers, every_n_epochs=1, probe_size=4 * size, figures=True),
        FeatureRankMonitor(layers=layers, every_n_epochs=1, probe_size=4 * size, figures=True),
        InvariantSetMonitor(every_n_epochs=1, figures=True),
    ]
    logger = make_logger(args)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        logger=logger,
        callbacks=list(monitors),
        default_root_dir=args.out,
        log_every_n_steps=5,
        enable_checkpointing=False,
        limit_train_batches=10 if args.tiny else None,
        limit_val_batches=2 if args.tiny else None,
    )
    trainer.fit(DigitsCNN(args.lr), train_loader, val_loader)

    print("\nLast measurements (all of them are in the logs):")
    for key in HEADLINES:
        values = [m.last_metrics[key] for m in monitors if key in m.last_metrics]
        print(f"  {key:42s} {values[0]:.4g}" if values else f"  {key:42s} (not measured)")
    figures = os.path.join(trainer.log_dir, "figures")
    if os.path.isdir(figures) and any(name.endswith(".png") for name in os.listdir(figures)):
        print(f"\nFigures (PNG): {figures}")
    else:
        print(f"\nNo figures written (they need matplotlib: {EXTRA_HINT})")
    if isinstance(logger, pl.loggers.WandbLogger):
        run_dir = os.path.dirname(logger.experiment.dir)
        logger.experiment.finish()
        print(f"W&B run ({'online' if args.wandb_online else 'offline'}): {run_dir}")
        if not args.wandb_online:
            print(f"  upload and view it with: wandb sync {run_dir}")
    else:
        print(f"CSV logs: {trainer.log_dir}")


if __name__ == "__main__":
    main()
