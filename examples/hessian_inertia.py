"""Hessian inertia: the top-k Hessian eigenspace turns early in training, then barely moves (Bao et al. 2023).

Trains a tanh MLP on scikit-learn's digits with SGD; HessianEigenMonitor measures the top-k eigenpairs on a probe
batch every few steps. The example compares the eigenspaces with the subspace overlap ||U_t^T U_s||_F^2 / k (1 for
the same subspace, about k/P for random ones) at three separations: consecutive measurements, the middle of
training against its end, and the first measurement against the end.

Verdict: PASS when, for every seed, (1) consecutive measurements overlap with median >= 0.9 over the second half of
training, (2) the subspace at the middle measurement still overlaps the final one >= 0.7 (inertia over half the
run, not only between nearby steps: a trivial random-subspace null k/P would be met by any run), and (3) the
subspace did move early: the final overlap with the first measurement is < 0.5 (so high overlaps are not an
eigensolver stuck on its warm start or a model that does not train; ``--lr 0`` fails this one).

    python examples/hessian_inertia.py                  # 10 epochs, top-5 every 25 steps
    python examples/hessian_inertia.py --seeds 3        # mean ± std over three seeds
    python examples/hessian_inertia.py --k 10 --epochs 30 --width 256
"""

from __future__ import annotations

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

from hildtools.callbacks import HessianEigenMonitor
from hildtools.curvature.subspace import subspace_overlap


class DigitsMLP(pl.LightningModule):
    def __init__(self, width: int, lr: float):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Eigenspaces(pl.Callback):
    """At each measurement: step, top eigenvalue, the monitor's overlap_prev, and a copy of the eigenvectors."""

    def __init__(self, monitor):
        self.monitor, self.rows, self.vectors = monitor, [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        m = self.monitor.last_metrics
        if self.monitor.last_step == trainer.global_step and "hessian/eig_0" in m:
            self.rows.append(
                {
                    "step": trainer.global_step,
                    "eig_0": m["hessian/eig_0"],
                    "overlap_prev": m.get("hessian/overlap_prev"),
                }
            )
            self.vectors.append(self.monitor.vectors.detach().cpu().clone())


def run(
    k=5,
    epochs=10,
    width=64,
    lr=0.1,
    every_n_steps=25,
    probe_size=512,
    seed=0,
    out="outputs/hessian_inertia",
    use_wandb=False,
):
    """Train once; returns (rows, k/P). Each row also holds ``overlap_final`` (with the last measurement) and
    ``overlap_first`` (with the first)."""
    pl.seed_everything(seed, verbose=False)
    train, _ = digits_loaders(batch_size=64, seed=seed)
    monitor = HessianEigenMonitor(k=k, every_n_steps=every_n_steps, probe_size=probe_size)
    spaces = Eigenspaces(monitor)
    model = DigitsMLP(width, lr)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        callbacks=[monitor, spaces],
        logger=make_logger(out, f"inertia_seed{seed}", use_wandb),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, train)
    finish_wandb(use_wandb)
    for row, vectors in zip(spaces.rows, spaces.vectors):
        row["overlap_final"] = subspace_overlap(vectors, spaces.vectors[-1])
        row["overlap_first"] = subspace_overlap(vectors, spaces.vectors[0])
    return spaces.rows, k / sum(p.numel() for p in model.parameters())


def summary(rows: list[dict]) -> dict:
    consecutive = torch.tensor([r["overlap_prev"] for r in rows[1:]])
    half = len(consecutive) // 2
    return {
        "late": float(consecutive[half:].median()),
        "early": float(consecutive[:half].median()),
        "middle_to_end": rows[len(rows) // 2]["overlap_final"],
        "first_to_end": rows[-1]["overlap_first"],
        "middle_step": rows[len(rows) // 2]["step"],
        "last_step": rows[-1]["step"],
    }


def criteria(rows: list[dict]) -> list[tuple[str, bool]]:
    s = summary(rows)
    return [
        ("median consecutive overlap over the second half >= 0.9", s["late"] >= 0.9),
        ("overlap of the middle measurement with the final one >= 0.7", s["middle_to_end"] >= 0.7),
        ("the subspace moved early: final overlap with the first measurement < 0.5", s["first_to_end"] < 0.5),
    ]


def numbers(runs: list[list[dict]], k: int, every: int, baseline: float) -> str:
    stats = [summary(rows) for rows in runs]

    def of(key):
        return mean_spread([s[key] for s in stats], ".3f")

    return (
        f"top-{k} eigenspace overlap between consecutive measurements ({every} steps apart): median {of('late')} "
        f"over the second half (first half {of('early')}); middle (step {stats[0]['middle_step']}) to end "
        f"(step {stats[0]['last_step']}) {of('middle_to_end')}; first to end {of('first_to_end')}; "
        f"random subspaces k/P = {baseline:.1e}"
    )


def plot(rows: list[dict], k: int, baseline: float, out: str) -> str:
    plt = pyplot()
    steps = [r["step"] for r in rows]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 5.5), sharex=True, layout="constrained")
    top.plot(steps, [r["eig_0"] for r in rows])
    top.set(ylabel="top Hessian eigenvalue", title=f"top-{k} Hessian eigenspace, tanh MLP on digits (first seed)")
    bottom.plot(steps[1:], [r["overlap_prev"] for r in rows[1:]], label="with the previous measurement")
    bottom.plot(steps, [r["overlap_final"] for r in rows], label="with the final measurement")
    bottom.plot(steps, [r["overlap_first"] for r in rows], label="with the first measurement")
    bottom.axhline(baseline, color="k", ls=":", label=f"random subspaces k/P = {baseline:.1e}")
    bottom.set(xlabel="step", ylabel="subspace overlap", ylim=(-0.02, 1.05))
    bottom.legend(fontsize="small")
    return save_figure(figure, out, "hessian_inertia.png")


def main(argv=None):
    parser = parser_for(__doc__, "outputs/hessian_inertia")
    parser.add_argument("--k", type=int, default=5, help="eigenpairs")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of SGD, batch 64")
    parser.add_argument("--width", type=int, default=64, help="hidden units")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument("--every-n-steps", type=int, default=25, help="measurement interval")
    parser.add_argument("--probe-size", type=int, default=512, help="examples in the Hessian's probe batch")
    args = parser.parse_args(argv)
    if args.tiny:
        args.epochs, args.width, args.every_n_steps, args.probe_size = 4, 16, 10, 256
    runs, baseline = [], None
    for seed in seed_list(args):
        rows, baseline = run(
            args.k, args.epochs, args.width, args.lr, args.every_n_steps, args.probe_size, seed, args.out, args.wandb
        )
        runs.append(rows)
    figure = plot(runs[0], args.k, baseline, args.out)
    report(
        "hessian_inertia",
        combine([criteria(rows) for rows in runs]),
        numbers(runs, args.k, args.every_n_steps, baseline),
        figure,
        seed_list(args),
    )


if __name__ == "__main__":
    main()
