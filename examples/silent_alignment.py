"""Silent alignment: from a small initialisation the NTK aligns with the task before the loss has moved.

A two-layer network f(x) = a^T phi(W x) (no biases, linear phi by default) starts from weights of size
``--init-scale`` and is trained by full-batch gradient descent on the squared loss, on whitened synthetic data
(x ~ N(0, I_d), whitened exactly so that X^T X / n = I) with a linear teacher y = x . beta, |beta| = 1.
NTKAlignmentMonitor measures the empirical NTK K_t on the training set every few steps.

Atanasov, Bordelon & Pehlevan (ICLR 2022) show that from small initialisation the kernel first rotates, while it
is still tiny and the loss sits on its plateau, and afterwards only grows in scale: the trained network is kernel
regression with its final kernel. For this linear network the final kernel is K ~ X X^T + y y^T, whose task
alignment <K, y y^T>/(|K| |y|^2) is 2/sqrt(d + 3) (from about 1/sqrt(d) at initialisation). The verdict reports the
step at which the task alignment has covered 90% of its rise and the loss there, the alignment with the final
kernel at that step, and the same for a run from the standard initialisation N(0, 1/fan_in) for contrast:
there the kernel starts near its final value and moves little.

Verdict: PASS when, for every seed, (1) from the small initialisation the task alignment rises by >= 0.1,
(2) it has covered 90% of that rise while the loss is still >= 90% of its initial value (the alignment is silent),
(3) for the linear network, the final task alignment is within 0.05 of 2/sqrt(d+3), and (4) from the standard
initialisation the kernel moves < 0.1 (relative change: the lazy control). A large initialisation
(``--init-scale 0.5``) fails (1) or (2).

    python examples/silent_alignment.py                  # ~20 s on a CPU
    python examples/silent_alignment.py --activation relu --teacher relu
    python examples/silent_alignment.py --n 2048 --dim 64 --width 1024 --steps 3000 --accelerator gpu
    python examples/silent_alignment.py --seeds 3        # mean ± std over three seeds
    python examples/silent_alignment.py --wandb          # curves and NTK spectra in W&B (offline)
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
from torch.utils.data import DataLoader, IterableDataset

from hildtools.callbacks import NTKAlignmentMonitor
from hildtools.metrics import kernel_alignment_between


def whitened_task(n: int, dim: int, teacher: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, I), whitened so that X^T X / n = I exactly; y = x . beta (``teacher="relu"``: centred relu)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator)
    values, vectors = torch.linalg.eigh(x.T @ x / n)
    x = x @ vectors @ torch.diag(values.rsqrt()) @ vectors.T
    beta = torch.randn(dim, generator=generator)
    y = x @ (beta / beta.norm())
    if teacher == "relu":
        y = torch.relu(y) - torch.relu(y).mean()
    return x, y


class FullBatches(IterableDataset):
    """The whole training set as one batch, ``steps`` times (full-batch gradient descent in one epoch)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: int):
        self.x, self.y, self.steps = x, y, steps

    def __iter__(self):
        return iter([(self.x, self.y)] * self.steps)


class TwoLayer(pl.LightningModule):
    """f(x) = a^T phi(W x); loss 0.5 x mean squared error; plain gradient descent.

    Weights N(0, init_scale^2), or with ``init_scale=None`` the standard N(0, 1/fan_in).
    """

    def __init__(self, dim: int, width: int, init_scale: float | None, activation: str, lr: float):
        super().__init__()
        self.hidden, self.readout = nn.Linear(dim, width, bias=False), nn.Linear(width, 1, bias=False)
        for weight in (self.hidden.weight, self.readout.weight):
            nn.init.normal_(weight, std=init_scale or weight.shape[1] ** -0.5)
        self.activation = {"linear": nn.Identity(), "relu": nn.ReLU(), "tanh": nn.Tanh()}[activation]
        self.lr = lr
        self.losses: dict[int, float] = {}

    def forward(self, x):
        return self.readout(self.activation(self.hidden(x))).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = 0.5 * (self(x) - y).pow(2).mean()
        self.losses[self.global_step] = loss.item()  # the loss of the weights after `global_step` updates
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class History(pl.Callback):
    """After each measurement: the step, the monitor's values and the kernel."""

    def __init__(self, monitor: NTKAlignmentMonitor):
        self.monitor, self.rows, self.kernels = monitor, [], []

    def record(self, trainer):
        if self.monitor.last_step == trainer.global_step and (
            not self.rows or self.rows[-1]["step"] < trainer.global_step
        ):
            self.rows.append({"step": trainer.global_step, **self.monitor.last_metrics})
            self.kernels.append(self.monitor.last_kernel.cpu())

    def on_train_start(self, trainer, pl_module):
        self.record(trainer)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.record(trainer)


def run(init_scale: float | None, args, name: str, seed: int) -> list[dict]:
    """Train once; returns one row per measurement with the loss at that step and the final-kernel alignment."""
    pl.seed_everything(seed, verbose=False)
    x, y = whitened_task(args.n, args.dim, args.teacher, seed)
    model = TwoLayer(args.dim, args.width, init_scale, args.activation, args.lr)
    monitor = NTKAlignmentMonitor(every_n_steps=args.every, probe_data=(x, y))
    history = History(monitor)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator=args.accelerator,
        devices=1,
        callbacks=[monitor, history],
        logger=make_logger(args.out, f"{name}_seed{seed}", args.wandb),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=args.every,
    )
    trainer.fit(model, DataLoader(FullBatches(x, y, args.steps + 1), batch_size=None))
    finish_wandb(args.wandb)
    final = history.kernels[-1]
    for row, kernel in zip(history.rows, history.kernels):
        row["loss"] = model.losses[row["step"]]
        row["final_alignment"] = float(kernel_alignment_between(kernel, final))
    return history.rows


def alignment_time(rows: list[dict], fraction: float = 0.9) -> dict:
    """The first measurement at which the task alignment has covered ``fraction`` of its rise over training."""
    first, last = rows[0]["ntk/target_alignment"], rows[-1]["ntk/target_alignment"]
    return next(row for row in rows if row["ntk/target_alignment"] - first >= fraction * (last - first))


def summary(small: list[dict], lazy: list[dict]) -> dict:
    aligned = alignment_time(small)
    return {
        "start": small[0]["ntk/target_alignment"],
        "end": small[-1]["ntk/target_alignment"],
        "aligned_step": aligned["step"],
        "loss_at_alignment": aligned["loss"] / small[0]["loss"],
        "final_at_alignment": aligned["final_alignment"],
        "half_step": next((r["step"] for r in small if r["loss"] <= 0.5 * small[0]["loss"]), None),
        "final_loss": small[-1]["loss"] / small[0]["loss"],
        "lazy_start": lazy[0]["ntk/target_alignment"],
        "lazy_end": lazy[-1]["ntk/target_alignment"],
        "lazy_change": lazy[-1]["ntk/relative_change"],
        "lazy_loss": lazy[-1]["loss"] / lazy[0]["loss"],
    }


def criteria(small: list[dict], lazy: list[dict], args) -> list[tuple[str, bool]]:
    s = summary(small, lazy)
    checks = [
        ("small init: task alignment rises by >= 0.1", s["end"] - s["start"] >= 0.1),
        ("small init: 90% of the rise while the loss is >= 90% of its initial value", s["loss_at_alignment"] >= 0.9),
    ]
    if args.activation == "linear":
        theory = 2 / (args.dim + 3) ** 0.5
        checks.append(
            (
                f"small init: final task alignment within 0.05 of 2/sqrt(d+3) = {theory:.3f}",
                abs(s["end"] - theory) <= 0.05,
            )
        )
    checks.append(("standard init: kernel relative change < 0.1", s["lazy_change"] < 0.1))
    return checks


def numbers(pairs: list[tuple[list[dict], list[dict]]]) -> str:
    stats = [summary(small, lazy) for small, lazy in pairs]

    def of(key, fmt=".3f"):
        return mean_spread([s[key] for s in stats], fmt)

    return (
        f"small init: task alignment {of('start')} -> {of('end')}; 90% of the rise by step {of('aligned_step', '.0f')}"
        f", where the loss is {of('loss_at_alignment')} of its initial value and the kernel's alignment with "
        f"its final value is {of('final_at_alignment')}; loss halves at step {of('half_step', '.0f')}; final "
        f"loss {of('final_loss', '.2e')} of initial. Standard init: alignment {of('lazy_start')} -> "
        f"{of('lazy_end')}, kernel moves {of('lazy_change')} (relative), final loss {of('lazy_loss', '.2e')}"
    )


def plot(small: list[dict], lazy: list[dict], out: str) -> str:
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    for rows, style, label in ((small, "-", "small init"), (lazy, "--", "standard init")):
        steps = [row["step"] for row in rows]
        axes[0].plot(steps, [row["ntk/target_alignment"] for row in rows], style, label=f"task alignment, {label}")
        axes[0].plot(steps, [row["final_alignment"] for row in rows], style, label=f"A(K_t, K_final), {label}")
        axes[1].plot(steps, [row["loss"] / rows[0]["loss"] for row in rows], style, label=label)
        axes[2].semilogy(steps, [row["ntk/trace"] for row in rows], style, label=label)
    axes[0].axvline(alignment_time(small)["step"], color="gray", ls=":", lw=1)
    axes[0].set(xlabel="step", ylabel="alignment", title="kernel alignment")
    axes[1].set(xlabel="step", ylabel="loss / initial loss", title="training loss")
    axes[2].set(xlabel="step", ylabel="tr K", title="kernel scale")
    for ax in axes:
        ax.legend(fontsize="small", loc="center right")
    figure.suptitle("silent alignment, first seed (dotted: 90% of the alignment rise, small init)")
    return save_figure(figure, out, "silent_alignment.png")


def parse_args(argv=None):
    parser = parser_for(__doc__, "outputs/silent_alignment")
    parser.add_argument("--n", type=int, default=256, help="training examples (the NTK probe is all of them)")
    parser.add_argument("--dim", type=int, default=8, help="input dimension d")
    parser.add_argument("--width", type=int, default=64, help="hidden units")
    parser.add_argument(
        "--activation", choices=["linear", "relu", "tanh"], default="linear", help="hidden nonlinearity phi"
    )
    parser.add_argument("--teacher", choices=["linear", "relu"], default="linear", help="teacher of the targets")
    parser.add_argument("--init-scale", type=float, default=1e-3, help="std of the weights (small: rich regime)")
    parser.add_argument("--lr", type=float, default=0.05, help="gradient-descent lr")
    parser.add_argument("--steps", type=int, default=400, help="full-batch steps")
    parser.add_argument("--every", type=int, default=5, help="measure the NTK every this many steps")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu, auto")
    args = parser.parse_args(argv)
    if args.tiny:
        args.n, args.steps, args.every = 64, 150, 10
    return args


def main(argv=None):
    args = parse_args(argv)
    pairs = [
        (
            run(args.init_scale, args, "silent_alignment_small_init", seed),
            run(None, args, "silent_alignment_standard_init", seed),
        )
        for seed in seed_list(args)
    ]
    report(
        "silent_alignment",
        combine([criteria(small, lazy, args) for small, lazy in pairs]),
        numbers(pairs),
        plot(*pairs[0], args.out),
        seed_list(args),
    )


if __name__ == "__main__":
    main()
