"""Edge of stability: under full-batch training, sharpness rises to the optimizer's threshold and hovers there.

Full-batch gradient descent on a tanh MLP over scikit-learn's digits with a squared loss (Cohen et al. 2021):
sharpness (the top Hessian eigenvalue, logged by EdgeOfStabilityMonitor) climbs ("progressive sharpening") until
it reaches 2/lr and then hovers at it while the loss keeps falling non-monotonically. With heavy-ball momentum the
threshold is (2+2b)/lr; with Adam the preconditioned sharpness (the top eigenvalue of P^-1 H, P Adam's
preconditioner) meets (2+2b1)/((1-b1) lr) = 38/lr at b1 = 0.9 (Cohen et al. 2022).

Verdict: PASS when, for every lr and seed, (1) the first measured sharpness is below 0.8 x threshold (the run
starts away from the edge) and (2) the median of sharpness / threshold over the second half of the measurements
lies in [0.9, 1.2]. Two learning rates by default (GD): the plateau follows the threshold 2/lr, not a fixed value.
A run that never reaches the edge (e.g. ``--lrs 0.02``) fails (2).

    python examples/edge_of_stability.py                      # GD, lr 0.2 and 0.15; 34 s of CPU
    python examples/edge_of_stability.py --optimizer momentum # heavy ball 0.9, lr 0.25
    python examples/edge_of_stability.py --optimizer adam     # Adam, lr 0.01
    python examples/edge_of_stability.py --seeds 3            # three seeds: mean ± std
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from digits import digits_tensors
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

from hildtools.callbacks import EdgeOfStabilityMonitor

OPTIMIZERS = {
    "gd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999)),
}
DEFAULT_LRS = {"gd": [0.2, 0.15], "momentum": [0.25], "adam": [0.01]}  # momentum diverges at lr 0.4


class FullBatchMLP(pl.LightningModule):
    """tanh MLP 64-width-width-10 with loss 0.5 * mean over examples of the squared error summed over classes."""

    def __init__(self, optimizer: str, lr: float, width: int):
        super().__init__()
        self.optimizer_name, self.lr = optimizer, lr
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10)
        )

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
            self.rows.append(
                (
                    trainer.global_step,
                    float(outputs["loss"]),
                    self.monitor.last_metrics["eos/sharpness"],
                    self.monitor.last_metrics["eos/threshold"],
                )
            )


def run(
    optimizer: str = "gd",
    lr: float = 0.2,
    steps: int = 1000,
    n: int = 1000,
    width: int = 64,
    every_n_steps: int = 10,
    seed: int = 0,
    out: str = "outputs/edge_of_stability",
    use_wandb: bool = False,
) -> list[tuple]:
    """Train full-batch; returns rows (step, loss, sharpness, threshold) at each measurement."""
    pl.seed_everything(seed, verbose=False)
    images, labels = digits_tensors()
    data = TensorDataset(images[:n], labels[:n])
    monitor = EdgeOfStabilityMonitor(every_n_steps=every_n_steps, probe_data=data[:], measure_at_start=False)
    history = History(monitor)
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="auto",
        devices=1,
        callbacks=[monitor, history],
        logger=make_logger(out, f"{optimizer}_lr{lr:g}_seed{seed}", use_wandb),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=every_n_steps,
    )
    trainer.fit(FullBatchMLP(optimizer, lr, width), DataLoader(data, batch_size=n))
    finish_wandb(use_wandb)
    return history.rows


def ratios(rows: list[tuple]) -> tuple[float, float, int | None]:
    """First sharpness / threshold, its median over the second half of the measurements, and the first step at
    0.9 x threshold (None if never)."""
    values = torch.tensor([s / t for _, _, s, t in rows])
    reached = next((step for step, _, s, t in rows if s >= 0.9 * t), None)
    return float(values[0]), float(values[len(values) // 2 :].median()), reached


def criteria(rows: list[tuple], lr: float) -> list[tuple[str, bool]]:
    first, median, _ = ratios(rows)
    return [
        (f"lr {lr:g}: first sharpness below 0.8 x threshold", first < 0.8),
        (f"lr {lr:g}: median sharpness / threshold over the second half in [0.9, 1.2]", 0.9 <= median <= 1.2),
    ]


def numbers(runs: dict[float, list[list[tuple]]]) -> str:
    """runs: {lr: [rows of each seed]}."""
    parts = []
    for lr, seeds in runs.items():
        stats = [ratios(rows) for rows in seeds]
        reached = [r for _, _, r in stats if r is not None]
        parts.append(
            f"lr {lr:g} (threshold {seeds[0][-1][3]:.3g}): sharpness / threshold first "
            f"{mean_spread([s[0] for s in stats], '.2f')}, second-half median "
            f"{mean_spread([s[1] for s in stats], '.2f')}, 0.9 x threshold first reached at step "
            f"{mean_spread(reached, '.0f') if reached else 'never'}"
        )
    return "; ".join(parts)


def plot(runs: dict[float, list[list[tuple]]], optimizer: str, out: str) -> str:
    plt = pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 5.5), sharex=True, layout="constrained")
    name = "preconditioned sharpness" if optimizer == "adam" else "sharpness"
    threshold = {"gd": "2/lr", "momentum": "(2+2b)/lr", "adam": "38/lr"}[optimizer]
    for lr, seeds in runs.items():
        rows = seeds[0]
        steps = [r[0] for r in rows]
        (line,) = top.plot(steps, [r[1] for r in rows], label=f"lr {lr:g}")
        bottom.plot(steps, [r[2] for r in rows], color=line.get_color(), label=f"{name}, lr {lr:g}")
        bottom.axhline(rows[-1][3], color=line.get_color(), ls="--", lw=1, label=f"{threshold} = {rows[-1][3]:.3g}")
    top.set(ylabel="train loss", yscale="log", title=f"{optimizer}, full batch (first seed)")
    top.legend(fontsize="small")
    bottom.set(xlabel="step", ylabel=name)
    bottom.legend(fontsize="small")
    return save_figure(figure, out, f"eos_{optimizer}.png")


def main(argv=None):
    parser = parser_for(__doc__, "outputs/edge_of_stability")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="gd", help="gd, heavy ball 0.9, Adam")
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=None,
        help="learning rates; default per optimizer: "
        + ", ".join(f"{k} {' '.join(map(str, v))}" for k, v in DEFAULT_LRS.items()),
    )
    parser.add_argument("--steps", type=int, default=1000, help="full-batch steps")
    parser.add_argument("--n", type=int, default=1000, help="training examples (full batch)")
    parser.add_argument("--width", type=int, default=64, help="hidden units of both tanh layers")
    parser.add_argument("--every-n-steps", type=int, default=10, help="sharpness measurement interval")
    args = parser.parse_args(argv)
    lrs = args.lrs or DEFAULT_LRS[args.optimizer]
    if args.tiny:
        args.steps, args.n, args.width, args.every_n_steps = 300, 200, 32, 10
        lrs = args.lrs or lrs[:1]
    runs = {lr: [] for lr in lrs}
    per_seed = []
    for seed in seed_list(args):
        checks = []
        for lr in lrs:
            rows = run(
                args.optimizer, lr, args.steps, args.n, args.width, args.every_n_steps, seed, args.out, args.wandb
            )
            runs[lr].append(rows)
            checks += criteria(rows, lr)
        per_seed.append(checks)
    figure = plot(runs, args.optimizer, args.out)
    report(f"edge_of_stability[{args.optimizer}]", combine(per_seed), numbers(runs), figure, seed_list(args))


if __name__ == "__main__":
    main()
