"""Neural collapse: training past zero error collapses each class to its mean, in the last and intermediate layers.

A ReLU MLP (64 -> width x depth -> 10) is trained with SGD, momentum and weight decay on scikit-learn's digits far
past zero training error (the "terminal phase", Papyan, Han & Donoho 2020), with the squared loss by default
(neural collapse under MSE: Han, Papyan & Donoho 2022). NeuralCollapseMonitor measures, on the
whole training set every few epochs, the features entering each hidden Linear layer and the classifier:

- NC1 = Tr(Sigma_W Sigma_B^+)/C, within-class over between-class variability (-> 0 under collapse);
- NC2: class means (centred) become equinorm and equiangular, cosines -> -1/(C-1) (a simplex ETF);
- NC3: classifier rows align with the class means; NC4: the model agrees with the nearest-class-mean rule.

Intermediate layers collapse too, less the shallower they are (Parker et al., HiLD 2023). The verdict reports NC1
at the first measurement, when the training error first reaches zero and at the end, per layer, and says per layer
whether NC1 kept falling after zero error (by >= 1.5x) or stayed flat.

Verdict: PASS when, for every seed, (1) last-layer NC1 falls >= 2x over training, (2) the training error reaches 0,
(3) last-layer NC1 falls by >= 1.5x more after zero error (the terminal phase), (4) the class means move towards
the simplex ETF after zero error: nc2_max_angle = mean over pairs of |cos + 1/(C-1)| (0 for the ETF) falls, and
(5) the nearest-class-mean rule agrees with the network on >= 99% of the training set (NC4). A run that does not
train (``--lr 0``) fails (1) and (2).

Measured at this size (seed 0): with the squared loss NC1 keeps falling after zero error in every layer; with
cross-entropy (``--loss ce``, constant lr) it reaches its minimum near zero error and then creeps back up, so the
terminal-phase collapse does not show there without a longer, decaying-lr schedule.

    python examples/neural_collapse.py                       # 39 s of CPU
    python examples/neural_collapse.py --seeds 3             # mean ± std over three seeds
    python examples/neural_collapse.py --loss ce             # cross-entropy (see the note above)
    python examples/neural_collapse.py --epochs 1000 --width 512 --depth 6   # longer terminal phase, on a GPU
    python examples/neural_collapse.py --wandb               # class-mean cosine heatmaps in W&B (offline)
"""

from __future__ import annotations

import itertools

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

from hildtools.callbacks import NeuralCollapseMonitor


class DigitsMLP(pl.LightningModule):
    """ReLU MLP with hidden layers ``hidden.0, hidden.1, ...`` and a linear ``classifier``.

    ``loss="mse"``: 0.5 x squared error to the one-hot target, summed over classes, averaged over examples.
    """

    def __init__(self, width: int, depth: int, lr: float, weight_decay: float, loss: str):
        super().__init__()
        self.save_hyperparameters()
        sizes = [64] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.classifier = nn.Linear(width, 10)

    def forward(self, x):
        h = x.flatten(1)
        for layer in self.hidden:
            h = F.relu(layer(h))
        return self.classifier(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        if self.hparams.loss == "ce":
            loss = F.cross_entropy(logits, y)
        else:
            loss = 0.5 * (logits - F.one_hot(y, 10).to(logits.dtype)).pow(2).sum(1).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay
        )


class History(pl.Callback):
    """After each measurement: epoch, training error on the probe set, and the monitor's values."""

    def __init__(self, monitor: NeuralCollapseMonitor, images: torch.Tensor, labels: torch.Tensor):
        self.monitor, self.images, self.labels, self.rows = monitor, images, labels, []

    def on_train_epoch_end(self, trainer, pl_module):
        if self.monitor.last_step != trainer.global_step or not self.monitor.last_metrics:
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            predictions = pl_module(self.images.to(pl_module.device)).argmax(1).cpu()
        pl_module.train(was_training)
        error = float((predictions != self.labels).float().mean())
        self.rows.append({"epoch": trainer.current_epoch + 1, "train_error": error, **self.monitor.last_metrics})


def layer_names(depth: int) -> list[str]:
    """The inputs of ``hidden.1 .. hidden.{depth-1}`` (outputs of hidden layers 1..depth-1) and of the classifier."""
    return [f"hidden.{i}" for i in range(1, depth)] + ["classifier"]


def run(
    epochs=300,
    width=128,
    depth=4,
    lr=0.05,
    weight_decay=5e-4,
    loss="mse",
    batch_size=64,
    every_n_epochs=5,
    seed=0,
    out="outputs/neural_collapse",
    use_wandb=False,
) -> list[dict]:
    """Train; returns one row per measurement: epoch, train_error and the ``nc/<layer>/<measure>`` values."""
    pl.seed_everything(seed, verbose=False)
    train_loader, _ = digits_loaders(batch_size, seed=seed)
    images, labels = train_loader.dataset.tensors
    monitor = NeuralCollapseMonitor(
        num_classes=10, layers=layer_names(depth), every_n_epochs=every_n_epochs, probe_data=(images, labels)
    )
    history = History(monitor, images, labels)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        callbacks=[monitor, history],
        logger=make_logger(out, f"neural_collapse_seed{seed}", use_wandb),
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    trainer.fit(DigitsMLP(width, depth, lr, weight_decay, loss), train_loader)
    return history.rows


def summary(rows: list[dict], depth: int) -> dict:
    """NC values at the first measurement, at the first with zero training error (None if never) and at the end."""
    first, last = rows[0], rows[-1]
    zero = next((row for row in rows if row["train_error"] == 0), None)
    result = {
        "zero_epoch": None if zero is None else zero["epoch"],
        "last_error": last["train_error"],
        "nc4": last["nc/classifier/nc4"],
        "etf_end": last["nc/classifier/nc2_max_angle"],
        "etf_zero": None if zero is None else zero["nc/classifier/nc2_max_angle"],
    }
    for name in layer_names(depth):
        key = f"nc/{name}/nc1"
        result[f"{name}/first"], result[f"{name}/end"] = first[key], last[key]
        result[f"{name}/zero"] = None if zero is None else zero[key]
        result[f"{name}/after_zero"] = None if zero is None else zero[key] / last[key]
    return result


def criteria(rows: list[dict], depth: int) -> list[tuple[str, bool]]:
    s = summary(rows, depth)
    reached = s["zero_epoch"] is not None
    return [
        ("last-layer NC1 falls >= 2x over training", s["classifier/first"] >= 2 * s["classifier/end"]),
        ("training error reaches 0", reached),
        ("last-layer NC1 falls >= 1.5x after zero training error", reached and s["classifier/after_zero"] >= 1.5),
        (
            "last-layer nc2_max_angle (0 for a simplex ETF) falls after zero training error",
            reached and s["etf_end"] < s["etf_zero"],
        ),
        ("NC4: nearest-class-mean rule disagrees on <= 1% at the end", s["nc4"] <= 0.01),
    ]


def numbers(runs: list[list[dict]], depth: int) -> str:
    stats = [summary(rows, depth) for rows in runs]

    def of(key, fmt=".3g"):
        return mean_spread([s[key] for s in stats], fmt)

    zero = [s["zero_epoch"] for s in stats]
    if None in zero:
        return (
            f"training error did not reach 0 in {sum(z is None for z in zero)} of {len(zero)} seeds (last "
            f"error {of('last_error', '.4f')}); last-layer NC1 {of('classifier/first')} -> {of('classifier/end')}"
        )
    layers = []
    for name in layer_names(depth):
        after = [s[f"{name}/after_zero"] for s in stats]
        wording = "keeps falling" if min(after) >= 1.5 else "flat" if max(after) < 1.1 else "falls a little"
        layers.append(
            f"{name} {of(f'{name}/first')} -> {of(f'{name}/zero')} -> {of(f'{name}/end')} "
            f"({of(f'{name}/after_zero', '.2f')}x after zero error: {wording})"
        )
    return (
        f"train error 0 from epoch {of('zero_epoch', '.0f')}; NC1 at first measurement -> zero error -> end, by "
        f"layer input: {'; '.join(layers)}; last layer nc2_max_angle {of('etf_zero')} -> {of('etf_end')} "
        f"(simplex ETF: 0), NC4 mismatch {of('nc4', '.3f')}"
    )


def plot(rows: list[dict], depth: int, out: str) -> str:
    plt = pyplot()
    epochs = [row["epoch"] for row in rows]
    zero = next((row["epoch"] for row in rows if row["train_error"] == 0), None)
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    for name in layer_names(depth):
        axes[0].semilogy(epochs, [row[f"nc/{name}/nc1"] for row in rows], label=f"input of {name}")
        axes[1].plot(epochs, [row[f"nc/{name}/nc2_max_angle"] for row in rows], label=f"input of {name}")
    axes[0].set(xlabel="epoch", ylabel="NC1 = Tr(Sw Sb+)/C", title="within-class variability")
    axes[1].axhline(0, color="k", lw=1)
    axes[1].set(xlabel="epoch", ylabel="mean |cos + 1/(C-1)|", title="NC2: distance to the simplex ETF (0, solid)")
    for key, label in (
        ("nc2_equinorm", "NC2 equinorm (CoV)"),
        ("nc3", "NC3 self-duality"),
        ("nc4", "NC4 NCC mismatch"),
    ):
        axes[2].plot(epochs, [row[f"nc/classifier/{key}"] for row in rows], label=label)
    axes[2].plot(epochs, [row["train_error"] for row in rows], "k:", label="train error")
    axes[2].set(xlabel="epoch", title="last layer")
    for ax in axes:
        if zero is not None:
            ax.axvline(zero, color="gray", ls="--", lw=1)
        ax.legend(fontsize="small")
    figure.suptitle("neural collapse on digits, first seed (dashed: training error reaches 0)")
    return save_figure(figure, out, "neural_collapse.png")


def main(argv=None):
    parser = parser_for(__doc__, "outputs/neural_collapse")
    parser.add_argument("--epochs", type=int, default=300, help="epochs of SGD")
    parser.add_argument("--width", type=int, default=128, help="hidden units per layer")
    parser.add_argument("--depth", type=int, default=4, help="hidden layers (>= 1)")
    parser.add_argument("--loss", choices=["mse", "ce"], default="mse", help="squared loss or cross-entropy")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD lr (momentum 0.9, constant)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    parser.add_argument("--batch-size", type=int, default=64, help="minibatch size")
    parser.add_argument("--every-n-epochs", type=int, default=5, help="measurement interval")
    args = parser.parse_args(argv)
    if args.tiny:
        args.epochs, args.width, args.depth, args.every_n_epochs = 4, 32, 2, 1
    runs = []
    for seed in seed_list(args):
        runs.append(
            run(
                args.epochs,
                args.width,
                args.depth,
                args.lr,
                args.weight_decay,
                args.loss,
                args.batch_size,
                args.every_n_epochs,
                seed,
                args.out,
                args.wandb,
            )
        )
        finish_wandb(args.wandb)
    figure = plot(runs[0], args.depth, args.out)
    report(
        "neural_collapse",
        combine([criteria(rows, args.depth) for rows in runs]),
        numbers(runs, args.depth),
        figure,
        seed_list(args),
    )


if __name__ == "__main__":
    main()
