"""Edge of stability: under full-batch training, sharpness rises to the optimizer's threshold and hovers there.

Full-batch gradient descent on a tanh MLP over scikit-learn's digits with a squared loss (Cohen et al. 2021):
sharpness (the top Hessian eigenvalue, logged by EdgeOfStabilityMonitor) climbs ("progressive sharpening") until
it reaches 2/lr and then hovers at it while the loss keeps falling non-monotonically. With heavy-ball momentum the
threshold is (2+2b)/lr; with Adam the preconditioned sharpness meets (2+2b1)/((1-b1) lr) = 38/lr at b1 = 0.9.

    python examples/edge_of_stability.py                      # GD, lr 0.2
    python examples/edge_of_stability.py --optimizer momentum --lr 0.25
    python examples/edge_of_stability.py --optimizer adam --lr 0.01
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from digits import digits_tensors
from hildtools.callbacks import EdgeOfStabilityMonitor

OPTIMIZERS = {
    "gd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999)),
}


class FullBatchMLP(pl.LightningModule):
    """tanh MLP 64-width-width-10 with loss 0.5 * mean over examples of the squared error summed over classes."""

    def __init__(self, optimizer: str, lr: float, width: int):
        super().__init__()
        self.optimizer_name, self.lr = optimizer, lr
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = 0.5 * (self.net(x) - nn.functional.one_hot(y, 10).float()).pow(2).sum(1).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return OPTIMIZERS[self.optimizer_name](self.parameters(), self.lr)


class History(pl.Callback):
    """Keeps the monitor's measurements and the loss, step by step."""

    def __init__(self, monitor: EdgeOfStabilityMonitor):
        self.monitor, self.rows = monitor, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.monitor.last_step == trainer.global_step and self.monitor.last_metrics:
            self.rows.append((trainer.global_step, float(outputs["loss"]), self.monitor.last_metrics["eos/sharpness"],
                              self.monitor.last_metrics["eos/threshold"]))


def run(optimizer: str = "gd", lr: float = 0.2, steps: int = 1500, n: int = 1000, width: int = 64,
        every_n_steps: int = 10, seed: int = 0, out: str = "outputs/edge_of_stability") -> list[tuple]:
    """Train full-batch; returns rows (step, loss, sharpness, threshold) at each measurement."""
    pl.seed_everything(seed, verbose=False)
    images, labels = digits_tensors()
    data = TensorDataset(images[:n], labels[:n])
    monitor = EdgeOfStabilityMonitor(every_n_steps=every_n_steps, probe_data=data[:], measure_at_start=False)
    history = History(monitor)
    trainer = pl.Trainer(
        max_steps=steps, max_epochs=-1, accelerator="auto", devices=1, callbacks=[monitor, history],
        logger=pl.loggers.CSVLogger(out, name=optimizer), enable_checkpointing=False, enable_model_summary=False,
        log_every_n_steps=every_n_steps,
    )
    trainer.fit(FullBatchMLP(optimizer, lr, width), DataLoader(data, batch_size=n))
    return history.rows


def verdict(rows: list[tuple]) -> tuple[str, float, float]:
    """Median sharpness/threshold over the last 60% of measurements, and the first step at 0.9 x threshold."""
    ratios = torch.tensor([s / t for _, _, s, t in rows])
    tail = ratios[int(0.4 * len(ratios)):]
    reached = next((step for step, _, s, t in rows if s >= 0.9 * t), None)
    median = float(tail.median())
    text = (f"sharpness hovered at {median:.2f} x threshold over the last 60% of steps "
            f"(first reached 0.9 x threshold at step {reached}; threshold {rows[-1][3]:.3g})")
    return text, median, float(ratios.max())


def plot(rows: list[tuple], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r[0] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    top.plot(steps, [r[1] for r in rows])
    top.set(ylabel="train loss", yscale="log", title=title)
    bottom.plot(steps, [r[2] for r in rows], label="sharpness")
    bottom.axhline(rows[-1][3], color="k", ls="--", label="threshold")
    bottom.set(xlabel="step", ylabel="sharpness")
    bottom.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="gd")
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--n", type=int, default=1000, help="training examples (full batch)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--every-n-steps", type=int, default=10)
    parser.add_argument("--out", default="outputs/edge_of_stability")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (for the tests)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.n, args.width, args.every_n_steps = 40, 200, 16, 10
    rows = run(args.optimizer, args.lr, args.steps, args.n, args.width, args.every_n_steps, out=args.out)
    text, _, _ = verdict(rows)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"eos_{args.optimizer}.png")
    plot(rows, path, f"{args.optimizer}, lr={args.lr}")
    print(f"VERDICT edge_of_stability[{args.optimizer}]: {text}")
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
