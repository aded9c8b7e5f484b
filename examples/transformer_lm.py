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

    python examples/transformer_lm.py               # lr 1e-3 and 5e-4, 300 steps each; ~1 min on a quiet 2-core CPU
    python examples/transformer_lm.py --seeds 3     # mean and spread over seeds 0, 1, 2
    python examples/transformer_lm.py --tiny        # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
from pathlib import Path

import lightning.pytorch as pl
import torch
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
    steps: int = 300,
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


def verdict(runs: dict[float, list[tuple]], nc1: list[tuple]) -> tuple[bool, list[str]]:
    """PASS/FAIL against criteria 1-4 of the module docstring, from the EoS rows of each learning rate and the NC1
    history of the larger one; returns (passed, one line per criterion)."""
    lines, passed = [], True
    for lr, rows in runs.items():
        first = rows[0][2] / rows[0][3]
        median_ratio, _ = plateau(rows)
        ok_start, ok_plateau = first < 0.8, 0.8 <= median_ratio <= 1.25
        passed &= ok_start and ok_plateau
        lines.append(
            f"lr {lr:g}: first measurement {first:.2f} x threshold (< 0.8: {ok_start}); second-half median "
            f"{median_ratio:.2f} x threshold 38/lr = {rows[0][3]:.4g} (in [0.8, 1.25]: {ok_plateau})"
        )
    (lr_a, rows_a), (lr_b, rows_b) = sorted(runs.items())[:2]
    scaling = (plateau(rows_a)[1] / plateau(rows_b)[1]) / (lr_b / lr_a)
    ok_scaling = 0.75 <= scaling <= 1.25
    passed &= ok_scaling
    lines.append(
        f"plateau ratio between lr {lr_a:g} and {lr_b:g} is {scaling:.2f} x the 1/lr prediction "
        f"(in [0.75, 1.25]: {ok_scaling})"
    )
    ok_collapse = nc1[-1][1] < 0.5 * nc1[0][1]
    passed &= ok_collapse
    lines.append(
        f"token-level NC1 went from {nc1[0][1]:.3g} (step 0) to {nc1[-1][1]:.3g} (step {nc1[-1][0]}) at lr "
        f"{lr_b:g} (below half: {ok_collapse})"
    )
    return passed, lines


def plot(runs: dict[float, list[tuple]], nc1: list[tuple], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom, collapse) = plt.subplots(3, 1, figsize=(6, 7.5), sharex=True)
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
    collapse.set(xlabel="step", ylabel="token-level NC1", yscale="log")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", type=float, nargs=2, default=[1e-3, 5e-4], help="two Adam learning rates")
    parser.add_argument("--steps", type=int, default=300, help="full-batch steps per learning rate")
    parser.add_argument("--num-sequences", type=int, default=128, help="training sequences (the full batch)")
    parser.add_argument("--length", type=int, default=32, help="bytes per sequence")
    parser.add_argument("--every-n-steps", type=int, default=10, help="steps between sharpness measurements")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds (seed, seed+1, ...)")
    parser.add_argument("--out", default="outputs/transformer_lm", help="folder for the figure")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run (for the tests)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.num_sequences, args.lrs = 200, 64, [2e-3, 1e-3]
    results = []
    for seed in range(args.seed, args.seed + args.seeds):
        histories = {
            lr: run(lr, args.steps, args.num_sequences, args.length, args.every_n_steps, seed) for lr in args.lrs
        }
        runs = {lr: history.rows for lr, history in histories.items()}
        nc1 = histories[max(args.lrs)].nc1
        passed, lines = verdict(runs, nc1)
        results.append(passed)
        print(f"seed {seed}: " + ("PASS" if passed else "FAIL"))
        for line in lines:
            print("  " + line)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "transformer_lm.png")
    plot(runs, nc1, path)
    print(f"VERDICT transformer_lm: {'PASS' if all(results) else 'FAIL'} ({sum(results)} of {len(results)} seeds)")
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
