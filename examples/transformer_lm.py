"""Adaptive edge of stability and token-level neural collapse in a tiny GPT-2 trained on Python's own source code.

A 2-layer GPT-2 (random weights, built from a config; byte-level, vocabulary 256) learns to predict the next byte
of the source files of Python's standard library (shipped with every Python: no download). Under full-batch Adam
the preconditioned sharpness ``lambda_1(P^-1/2 H P^-1/2)`` (P the diagonal Adam divides by, logged by
``EdgeOfStabilityMonitor`` as ``eos/sharpness``) rises to Adam's stability threshold ``(2 + 2 b1) / ((1 - b1) lr)
= 38 / lr`` and hovers there (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability").
Meanwhile ``NeuralCollapseMonitor`` measures token-level collapse of the last hidden states (the input of the LM
head; every position is a sample of the class of the byte it predicts; Wu & Papyan 2024, "Linguistic Collapse"):
NC1, the within-class variability relative to the between-class spread, falls as the model learns.

PASS criteria, each computed from the run (for every learning rate):
  1. the first measurement is below 0.8 x threshold (the edge is reached, not started at);
  2. the median of sharpness / threshold over the second half of training lies in [0.8, 1.25];
and across the two learning rates
  3. the plateau follows 38/lr: the ratio of the second-half median sharpnesses is within 25% of the inverse ratio
     of the learning rates (a threshold-independent plateau would fail this);
  4. token-level NC1 at the end of the larger learning rate's run is below half its value at initialisation.

    python examples/transformer_lm.py               # lr 1e-3 and 5e-4, 500 steps each; ~3 CPU minutes
    python examples/transformer_lm.py --seeds 3     # mean ± std over seeds 0, 1, 2
    python examples/transformer_lm.py --tiny        # seconds; used by the tests
"""

from __future__ import annotations

import glob
import os
import statistics
from pathlib import Path

import lightning.pytorch as pl
import torch
from phenomena_common import combine, mean_spread, parser_for, pyplot, report, require, save_figure, seed_list
from torch.utils.data import DataLoader

from hildtools.callbacks import EdgeOfStabilityMonitor, NeuralCollapseMonitor

BETA1 = 0.9


def stdlib_bytes(num_sequences: int, length: int) -> torch.Tensor:
    """(num_sequences, length) int64 bytes of the standard library's ``json`` and ``email`` packages, in order."""
    root = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(root, "json", "*.py")) + glob.glob(os.path.join(root, "email", "*.py")))
    text = b"".join(Path(path).read_bytes() for path in files)
    if len(text) < num_sequences * length:
        raise ValueError(f"num_sequences * length = {num_sequences * length} exceeds the {len(text)} bytes of text")
    return torch.tensor(list(text[: num_sequences * length]), dtype=torch.int64).view(num_sequences, length)


class TinyGPT2(pl.LightningModule):
    """GPT-2 (2 layers, 2 heads, width 32, no dropout) with full-batch Adam; the loss is HF's shifted cross entropy."""

    def __init__(self, lr: float, length: int):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            n_layer=2,
            n_head=2,
            n_embd=32,
            vocab_size=256,
            n_positions=length,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        self.lr, self.model = lr, GPT2LMHeadModel(config)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, betas=(BETA1, 0.999))


class TokenDataset(torch.utils.data.Dataset):
    """Hugging Face style examples ``{"input_ids": x, "labels": x}`` (the model shifts the labels itself)."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


class History(pl.Callback):
    """Keeps (step, loss, sharpness, threshold) at each EoS measurement and (step, NC1) at each NC measurement."""

    def __init__(self, eos: EdgeOfStabilityMonitor, collapse: NeuralCollapseMonitor):
        self.eos, self.collapse, self.rows, self.nc1 = eos, collapse, [], []

    def on_train_start(self, trainer, pl_module):
        self.record_nc1(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = self.eos.last_metrics
        if self.eos.last_step == trainer.global_step and "eos/threshold" in metrics:
            self.rows.append(
                (trainer.global_step, float(outputs["loss"]), metrics["eos/sharpness"], metrics["eos/threshold"])
            )
        self.record_nc1(trainer)

    def record_nc1(self, trainer):
        value = next((v for k, v in self.collapse.last_metrics.items() if k.endswith("/nc1")), None)
        if self.collapse.last_step == trainer.global_step and value is not None:
            self.nc1.append((trainer.global_step, value))


def run(
    lr: float = 1e-3,
    steps: int = 500,
    num_sequences: int = 128,
    length: int = 32,
    every_n_steps: int = 10,
    seed: int = 0,
) -> History:
    """Train full-batch; returns the history: rows (step, loss, preconditioned sharpness, threshold 38/lr) and
    (step, token-level NC1) at the start and every ``steps // 3`` steps."""
    pl.seed_everything(seed, verbose=False)
    tokens = stdlib_bytes(num_sequences, length)
    data, probe = TokenDataset(tokens), {"input_ids": tokens, "labels": tokens}
    eos = EdgeOfStabilityMonitor(every_n_steps=every_n_steps, probe_data=probe)
    collapse = NeuralCollapseMonitor(num_classes=256, every_n_steps=steps // 3, probe_data=probe, measure_at_start=True)
    history = History(eos, collapse)
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="auto",
        devices=1,
        callbacks=[eos, collapse, history],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(TinyGPT2(lr, length), DataLoader(data, batch_size=num_sequences))
    return history


def plateau(rows: list[tuple]) -> tuple[float, float]:
    """Median sharpness / threshold and median sharpness over the second half of the measurements."""
    tail = rows[len(rows) // 2 :]
    return statistics.median(s / t for _, _, s, t in tail), statistics.median(s for _, _, s, _ in tail)


def summary(runs: dict[float, list[tuple]], nc1: list[tuple]) -> dict:
    """The numbers the criteria judge: per lr the first ratio and the second-half median ratio, the plateau ratio
    between the two lrs relative to the 1/lr prediction, and NC1 at the end relative to the start (larger lr)."""
    (lr_a, rows_a), (lr_b, rows_b) = sorted(runs.items())[:2]
    return {
        "first": {lr: rows[0][2] / rows[0][3] for lr, rows in runs.items()},
        "median": {lr: plateau(rows)[0] for lr, rows in runs.items()},
        "scaling": (plateau(rows_a)[1] / plateau(rows_b)[1]) / (lr_b / lr_a),
        "nc1_ratio": nc1[-1][1] / nc1[0][1],
    }


def criteria(runs: dict[float, list[tuple]], nc1: list[tuple]) -> list[tuple[str, bool]]:
    """Criteria 1-4 of the module docstring, from the EoS rows of each lr and the NC1 history of the larger one."""
    numbers = summary(runs, nc1)
    checks = []
    for lr in runs:
        checks += [
            (f"lr {lr:g}: first sharpness below 0.8 x 38/lr", numbers["first"][lr] < 0.8),
            (f"lr {lr:g}: median sharpness / (38/lr) over the second half in [0.8, 1.25]",
             0.8 <= numbers["median"][lr] <= 1.25),
        ]  # fmt: skip
    checks += [
        ("the plateau follows 38/lr: plateau ratio within [0.75, 1.25] x the inverse lr ratio",
         0.75 <= numbers["scaling"] <= 1.25),
        ("token-level NC1 at the end below half its value at initialisation (larger lr)", numbers["nc1_ratio"] < 0.5),
    ]  # fmt: skip
    return checks


def numbers_text(summaries: list[dict]) -> str:
    """The headline numbers as mean ± std over seeds."""
    lrs = list(summaries[0]["first"])
    parts = [
        f"lr {lr:g}: sharpness / (38/lr) first {mean_spread([s['first'][lr] for s in summaries], '.2f')}, "
        f"second-half median {mean_spread([s['median'][lr] for s in summaries], '.2f')}"
        for lr in lrs
    ]
    parts.append(f"plateau ratio / (1/lr prediction) {mean_spread([s['scaling'] for s in summaries], '.2f')}")
    parts.append(f"NC1 end / start {mean_spread([s['nc1_ratio'] for s in summaries], '.2f')}")
    return "; ".join(parts)


def plot(runs: dict[float, list[tuple]], nc1: list[tuple], out: str) -> str:
    plt = pyplot()
    figure, (top, bottom, collapse) = plt.subplots(3, 1, figsize=(6, 7.5), sharex=True, layout="constrained")
    for (lr, rows), color in zip(sorted(runs.items()), ["C0", "C1", "C2"]):
        steps = [r[0] for r in rows]
        top.plot(steps, [r[1] for r in rows], color=color, label=f"lr {lr:g}")
        bottom.plot(steps, [r[2] for r in rows], color=color, label=f"lr {lr:g}")
        bottom.axhline(rows[0][3], color=color, ls="--", lw=1, label=f"38/lr = {rows[0][3]:.3g}")
    top.set(ylabel="train loss (nats/byte)", yscale="log", title="tiny GPT-2, full-batch Adam, stdlib source bytes")
    top.legend()
    bottom.set(ylabel="preconditioned sharpness", yscale="log")
    bottom.legend(fontsize=8, ncol=2)
    collapse.plot([s for s, _ in nc1], [v for _, v in nc1], "o-", color="C1")
    collapse.set(xlabel="step", ylabel="token-level NC1 (larger lr)", yscale="log")
    return save_figure(figure, out, "transformer_lm.png")


def main(argv=None):
    parser = parser_for(__doc__, "outputs/transformer_lm")
    parser.add_argument("--lrs", type=float, nargs=2, default=[1e-3, 5e-4], help="two Adam learning rates")
    parser.add_argument("--steps", type=int, default=500, help="full-batch steps per learning rate")
    parser.add_argument("--num-sequences", type=int, default=128, help="training sequences (the full batch)")
    parser.add_argument("--length", type=int, default=32, help="bytes per sequence")
    parser.add_argument("--every-n-steps", type=int, default=10, help="steps between sharpness measurements")
    args = parser.parse_args(argv)
    require("transformers", "transformers")
    if args.tiny:
        args.steps, args.num_sequences, args.lrs = 200, 64, [2e-3, 1e-3]
    per_seed, summaries = [], []
    for seed in seed_list(args):
        histories = {
            lr: run(lr, args.steps, args.num_sequences, args.length, args.every_n_steps, seed) for lr in args.lrs
        }
        runs = {lr: history.rows for lr, history in histories.items()}
        nc1 = histories[max(args.lrs)].nc1
        per_seed.append(criteria(runs, nc1))
        summaries.append(summary(runs, nc1))
    figure = plot(runs, nc1, args.out)
    report("transformer_lm", combine(per_seed), numbers_text(summaries), figure, seed_list(args))


if __name__ == "__main__":
    main()
