"""SAM vs SGD: sharpness-aware minimization leads to low-rank features (Andriushchenko et al. 2023).

The paper's minimal setting (its two-layer experiments): a ReLU teacher with 3 neurons on inputs on the unit sphere
in R^3, n = 20 training points, fitted by a two-layer ReLU student with 100 neurons (Gaussian init, std 0.3) with
batch size 1 and lr 0.1, by plain SGD or by SAM (``hildtools.optimizers.SAM`` around SGD) for the first half of
training and SGD after it. FeatureRankMonitor logs the feature rank of the hidden ReLU features on the training
inputs: the number of principal components holding 99.99% of the energy (the paper's threshold for these nets).
SAM leaves fewer active ReLUs and a lower feature rank, more so for larger rho.

Not everywhere at small scale: on digits (a 2 x 512 ReLU MLP, cross-entropy, SGD with momentum 0.9, lr 0.05,
batch 64, 60 epochs, seed 0; measured once in a plain loop, not by this script) SAM with rho 0.05-0.5 gave a *higher*
99% feature rank of the penultimate features than SGD (30-39 vs 22). The paper's image-classification results are
for ResNets on CIFAR-10/100 and Tiny ImageNet.

    python examples/sam_feature_rank.py                          # SGD, SAM rho 0.2 and 0.4; ~1 min on a CPU
    python examples/sam_feature_rank.py --rhos 0 0.1 0.2 0.3 0.4 0.6 --steps 20000   # the paper's sweep and length
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hildtools.callbacks import FeatureRankMonitor
from hildtools.optimizers import SAM
from hildtools.optimizers.sam import check_lightning_compat
from phenomena_common import finish_wandb, make_logger, parser_for, pyplot, report, save_figure


def on_sphere(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, dim, generator=generator)
    return x / x.norm(dim=1, keepdim=True)


def teacher_data(n=20, n_test=1000, dim=3, teacher_width=3, seed=0):
    """Inputs on the unit sphere; targets of a ReLU teacher (unit-norm rows, biases N(0,1), output weights +-1)."""
    generator = torch.Generator().manual_seed(seed)
    x, x_test = on_sphere(n, dim, generator), on_sphere(n_test, dim, generator)
    w1 = on_sphere(teacher_width, dim, generator)
    b1 = torch.randn(teacher_width, generator=generator)
    w2 = torch.randn(teacher_width, generator=generator).sign()
    b2 = torch.randn(1, generator=generator)

    def teacher(inputs):
        return (torch.relu(inputs @ w1.T + b1) @ w2 + b2)[:, None]

    return (x, teacher(x)), (x_test, teacher(x_test))


class TwoLayerStudent(pl.LightningModule):
    """Linear(dim, width) - ReLU - Linear(width, 1), all parameters N(0, init_std^2); mean squared error."""

    def __init__(self, dim=3, width=100, init_std=0.3, lr=0.1, rho=0.0):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, 1))
        with torch.no_grad():
            for parameter in self.net.parameters():
                parameter.normal_(0.0, init_std)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self(x) - y).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        if self.hparams.rho == 0:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return SAM(self.parameters(), torch.optim.SGD, rho=self.hparams.rho, lr=self.hparams.lr)

    def on_fit_start(self):
        check_lightning_compat(self.trainer)


class SwitchToBase(pl.Callback):
    """After ``at_step`` steps, train with SAM's base optimizer (same param groups and state): SGD from there on."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        if trainer.global_step >= self.at_step and isinstance(optimizer, SAM):
            trainer.optimizers = [optimizer.base_optimizer]


class History(pl.Callback):
    """At each measurement: step, train and test MSE, active ReLUs on the training inputs, and the feature rank."""

    def __init__(self, monitor: FeatureRankMonitor, train, test):
        self.monitor, self.train, self.test, self.rows = monitor, train, test, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.monitor.last_step != trainer.global_step or not self.monitor.last_metrics:
            return
        (x, y), (x_test, y_test) = ([t.to(pl_module.device) for t in pair] for pair in (self.train, self.test))
        with torch.no_grad():
            hidden = pl_module.net[1](pl_module.net[0](x))
            self.rows.append({
                "step": trainer.global_step,
                "train_mse": float((pl_module(x) - y).pow(2).mean()),
                "test_mse": float((pl_module(x_test) - y_test).pow(2).mean()),
                "active_relus": int((hidden > 0).any(0).sum()),
                "feature_rank": self.monitor.last_metrics["rank/net.2/pca_rank"],
            })  # fmt: skip


def run(rhos=(0.0, 0.2, 0.4), steps=6000, sam_fraction=0.5, n=20, width=100, lr=0.1, threshold=0.9999,
        every_n_steps=200, seed=0, out="outputs/sam_feature_rank", use_wandb=False) -> dict[float, list[dict]]:
    """One run per rho (0 = SGD); returns {rho: rows} with the History columns."""
    train, test = teacher_data(n, seed=seed)
    results = {}
    for rho in rhos:
        pl.seed_everything(seed, verbose=False)
        monitor = FeatureRankMonitor(threshold=threshold, every_n_steps=every_n_steps, probe_data=train)
        history = History(monitor, train, test)
        loader = DataLoader(TensorDataset(*train), batch_size=1, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        trainer = pl.Trainer(
            max_steps=steps, max_epochs=-1, accelerator="auto", devices=1,
            callbacks=[SwitchToBase(int(sam_fraction * steps)), monitor, history],
            logger=make_logger(out, f"rho_{rho:g}", use_wandb), enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=False, log_every_n_steps=every_n_steps,
        )  # fmt: skip
        trainer.fit(TwoLayerStudent(width=width, lr=lr, rho=rho), loader)
        finish_wandb(use_wandb)
        results[rho] = history.rows
    return results


def verdict(results: dict[float, list[dict]], threshold: float) -> str:
    def label(rho):
        return "SGD" if rho == 0 else f"SAM rho={rho:g}"

    last = {rho: rows[-1] for rho, rows in results.items()}
    ranks = ", ".join(f"{label(rho)} {row['feature_rank']:.0f}" for rho, row in last.items())
    active = ", ".join(f"{row['active_relus']}" for row in last.values())
    test = ", ".join(f"{row['test_mse']:.2g}" for row in last.values())
    sgd = last.get(0.0)
    if sgd is None:
        finding = "no SGD run to compare with"
    else:
        lower = [rho for rho, row in last.items() if rho > 0 and row["feature_rank"] < sgd["feature_rank"]]
        sam_runs = [rho for rho in last if rho > 0]
        finding = (f"SAM lower than SGD in {len(lower)} of {len(sam_runs)} runs"
                   + (", as in Andriushchenko et al. 2023" if lower and len(lower) == len(sam_runs) else ""))
    step = next(iter(last.values()))["step"]
    return (f"feature rank at {100 * threshold:g}% energy after {step} steps: {ranks} ({finding}); "
            f"active ReLUs {active} of the hidden layer; test MSE {test}")


def plot(results: dict[float, list[dict]], threshold: float, sam_step: int, out: str) -> str:
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    for rho, rows in results.items():
        label = "SGD" if rho == 0 else f"SAM rho={rho:g}"
        steps = [row["step"] for row in rows]
        axes[0].plot(steps, [row["feature_rank"] for row in rows], label=label)
        axes[1].plot(steps, [row["active_relus"] for row in rows], label=label)
        axes[2].semilogy(steps, [row["train_mse"] for row in rows], label=f"{label} train")
        axes[2].semilogy(steps, [row["test_mse"] for row in rows], ls="--", color=axes[2].lines[-1].get_color(),
                         label=f"{label} test")
    axes[0].set(xlabel="step", ylabel=f"PCs for {100 * threshold:g}% energy", title="feature rank (training inputs)")
    axes[1].set(xlabel="step", ylabel="ReLUs active on some input", title="active neurons")
    axes[2].set(xlabel="step", ylabel="MSE", title="loss")
    for ax in axes:
        ax.axvline(sam_step, color="gray", ls=":", lw=1)
        ax.legend(fontsize="small")
    figure.suptitle("two-layer ReLU student of a 3-neuron teacher (dotted: SAM switched to SGD)")
    return save_figure(figure, out, "sam_feature_rank.png")


def main(argv=None):
    parser = parser_for(__doc__, "outputs/sam_feature_rank")
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.0, 0.2, 0.4], help="0 is plain SGD")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--sam-fraction", type=float, default=0.5, help="fraction of the steps taken with SAM")
    parser.add_argument("--n", type=int, default=20, help="training points")
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threshold", type=float, default=0.9999, help="energy fraction of the feature rank")
    parser.add_argument("--every-n-steps", type=int, default=200)
    args = parser.parse_args(argv)
    if args.tiny:
        args.rhos, args.steps, args.every_n_steps = [0.0, 0.2], 60, 20
    results = run(args.rhos, args.steps, args.sam_fraction, args.n, args.width, args.lr, args.threshold,
                  args.every_n_steps, args.seed, args.out, args.wandb)
    path = plot(results, args.threshold, int(args.sam_fraction * args.steps), args.out)
    report("sam_feature_rank", verdict(results, args.threshold), path)


if __name__ == "__main__":
    main()
