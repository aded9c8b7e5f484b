"""Token-level neural collapse: cost of one NeuralCollapseMonitor measurement on a tiny GPT-2, and the memory and
time of NeuralCollapse at a GPT-2 vocabulary (C = 50,257, D = 768).

Run from the repository root: ``OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/bench_token_collapse.py``; results go
to ``benchmarks/results/token_collapse_cpu.md`` by hand.
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
import transformers
from torch.nn import functional as F

from hildtools.callbacks import NeuralCollapseMonitor
from hildtools.metrics import NeuralCollapse
from hildtools.metrics.neural_collapse import shift_labels


class TinyGPT2(pl.LightningModule):
    def __init__(self):
        super().__init__()
        config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=256, n_positions=64)
        self.model = transformers.GPT2LMHeadModel(config)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0])[:, :-1].flatten(0, 1), batch[0][:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class TimedMonitor(NeuralCollapseMonitor):
    seconds: list[float] = []

    def measure(self, *args):
        start = time.perf_counter()
        result = super().measure(*args)
        self.seconds.append(time.perf_counter() - start)
        return result


def monitor_on_gpt2(repeats=5):
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (64, 32))
    module = TinyGPT2()
    monitor = TimedMonitor(num_classes=256, every_n_steps=1, probe_data=(tokens, tokens), batch_size=64)
    pl.Trainer(
        max_steps=repeats,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=16))
    module.eval()
    forwards = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            module(tokens)
        forwards.append(time.perf_counter() - start)
    measure = sorted(monitor.seconds[1:])[len(monitor.seconds[1:]) // 2]
    forward = sorted(forwards)[repeats // 2]
    print(
        f"GPT-2 (2 layers, D=64, C=256), 64 x 32 positions: one measurement {measure:.3f} s, "
        f"one forward over the probe {forward:.3f} s, ratio {measure / forward:.1f}"
    )


def vocabulary_sized(num_classes=50257, dim=768, sequences=8, length=256, chunk=2):
    torch.manual_seed(0)
    labels = torch.randint(0, num_classes, (sequences, length))
    hidden = torch.randn(sequences, length, dim)
    metric = NeuralCollapse(num_classes, dim, ignore_index=-100)
    targets = shift_labels(labels)
    start = time.perf_counter()
    for second in (False, True):
        for rows in range(0, sequences, chunk):
            metric.update(hidden[rows : rows + chunk], targets[rows : rows + chunk])
        if not second:
            metric.start_second_pass()
    updates = time.perf_counter() - start
    start = time.perf_counter()
    result = metric.compute()
    compute = time.perf_counter() - start
    state = sum(t.numel() * t.element_size() for t in metric.metric_state.values())
    buffers = sum(t.numel() * t.element_size() for t in metric.buffers())
    print(
        f"C={num_classes}, D={dim}, {sequences * length} positions ({int(result['num_classes_present'])} classes"
        f" present): 2 passes {updates:.2f} s, compute {compute:.2f} s; states {state / 2**20:.0f} MiB, reference"
        f" buffers {buffers / 2**20:.0f} MiB (a C x C fp64 scatter would be {num_classes**2 * 8 / 2**30:.1f} GiB)"
    )


if __name__ == "__main__":
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    monitor_on_gpt2()
    vocabulary_sized()
