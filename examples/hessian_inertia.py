"""Hessian inertia: the top-k Hessian eigenspace barely moves during training (Bao et al. 2023).

Trains a tanh MLP on scikit-learn's digits with SGD and logs, through HessianEigenMonitor, the top-k eigenvalues and
the subspace overlap ||U_t^T U_s||_F^2 / k of the top-k eigenspace against the previous (``overlap_prev``) and the
first (``overlap_init``) measurement. A random k-dimensional subspace would score k/P.

    python examples/hessian_inertia.py
    python examples/hessian_inertia.py --k 10 --epochs 30 --width 256
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
from torch import nn

from digits import digits_loaders
from hildtools.callbacks import HessianEigenMonitor


class DigitsMLP(pl.LightningModule):
    def __init__(self, width: int, lr: float):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Overlaps(pl.Callback):
    def __init__(self, monitor):
        self.monitor, self.rows = monitor, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        m = self.monitor.last_metrics
        if self.monitor.last_step == trainer.global_step and "hessian/overlap_prev" in m:
            self.rows.append((trainer.global_step, m["hessian/eig_0"], m["hessian/overlap_prev"],
                              m["hessian/overlap_init"]))


def run(k=5, epochs=10, width=64, lr=0.1, every_n_steps=25, probe_size=512, seed=0, out="outputs/hessian_inertia"):
    pl.seed_everything(seed, verbose=False)
    train, _ = digits_loaders(batch_size=64, seed=seed)
    monitor = HessianEigenMonitor(k=k, every_n_steps=every_n_steps, probe_size=probe_size)
    overlaps = Overlaps(monitor)
    model = DigitsMLP(width, lr)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="auto", devices=1, callbacks=[monitor, overlaps],
                         logger=pl.loggers.CSVLogger(out, name="inertia"), enable_checkpointing=False,
                         enable_model_summary=False)
    trainer.fit(model, train)
    num_params = sum(p.numel() for p in model.parameters())
    return overlaps.rows, k / num_params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--every-n-steps", type=int, default=25)
    parser.add_argument("--out", default="outputs/hessian_inertia")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (for the tests)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.epochs, args.width, args.every_n_steps = 1, 16, 8
    rows, baseline = run(args.k, args.epochs, args.width, args.lr, args.every_n_steps, out=args.out)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "hessian_inertia.png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    top.plot([r[0] for r in rows], [r[1] for r in rows])
    top.set(ylabel="top eigenvalue", title=f"top-{args.k} Hessian eigenspace")
    bottom.plot([r[0] for r in rows], [r[2] for r in rows], label="overlap with previous")
    bottom.plot([r[0] for r in rows], [r[3] for r in rows], label="overlap with first")
    bottom.axhline(baseline, color="k", ls=":", label=f"random k/P = {baseline:.1e}")
    bottom.set(xlabel="step", ylabel="subspace overlap", ylim=(0, 1.05))
    bottom.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    prev = torch.tensor([r[2] for r in rows])
    late = prev[len(prev) // 2:]
    print(f"VERDICT hessian_inertia: top-{args.k} eigenspace overlap between consecutive measurements "
          f"({args.every_n_steps} steps apart) median {float(late.median()):.3f} over the second half of training "
          f"(first half {float(prev[:len(prev) // 2].median()):.3f}); overlap with the first measurement "
          f"{rows[-1][3]:.3f} after {rows[-1][0]} steps (random baseline {baseline:.1e})")
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
