"""Overhead of the monitors on the quickstart's training run (digits CNN, SAM), measured in one process.

Trains the quickstart model for the same number of steps with: no monitor; EdgeOfStabilityMonitor at its defaults
(every 25 steps, probe 256); each monitor alone at the quickstart's settings; all six together. Repeats are
interleaved so that machine load affects every configuration alike; the median wall time is reported.

    python benchmarks/bench_monitor_overhead.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from digits import digits_loaders  # noqa: E402
from quickstart import DigitsCNN  # noqa: E402

from hildtools.callbacks import (  # noqa: E402
    EdgeOfStabilityMonitor,
    FeatureRankMonitor,
    HessianEigenMonitor,
    InvariantSetMonitor,
    NeuralCollapseMonitor,
    NTKAlignmentMonitor,
)

LAYERS = ["features.5", "classifier"]
QUICKSTART = {  # the quickstart's settings (every_n_steps=25, probe_size=256)
    "hessian (k=3, every 100, density)": lambda: HessianEigenMonitor(k=3, every_n_steps=100, density=True),
    "eos (every 25, probe 64)": lambda: EdgeOfStabilityMonitor(every_n_steps=25),
    "ntk (every 100, probe 128)": lambda: NTKAlignmentMonitor(every_n_steps=100, probe_size=128, figures=True),
    "neural collapse (every epoch)": lambda: NeuralCollapseMonitor(
        10, LAYERS, every_n_epochs=1, probe_size=1024, figures=True
    ),
    "feature rank (every epoch)": lambda: FeatureRankMonitor(
        layers=LAYERS, every_n_epochs=1, probe_size=1024, figures=True
    ),
    "invariant sets (every epoch)": lambda: InvariantSetMonitor(every_n_epochs=1, figures=True),
}


def configurations() -> dict:
    configs = {
        "no monitor": lambda: [],
        "eos at its defaults (every 100, probe 64)": lambda: [EdgeOfStabilityMonitor()],
    }
    configs.update({name: (lambda make=make: [make()]) for name, make in QUICKSTART.items()})
    configs["all six (quickstart)"] = lambda: [make() for make in QUICKSTART.values()]
    return configs


def train_seconds(make_callbacks, epochs: int, out: str) -> float:
    pl.seed_everything(0, verbose=False)
    train, _ = digits_loaders(64)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        callbacks=make_callbacks(),
        logger=pl.loggers.CSVLogger(out),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = DigitsCNN()
    start = time.perf_counter()
    trainer.fit(model, train)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="outputs/bench_overhead")
    args = parser.parse_args(argv)
    configs = configurations()
    times = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, make in configs.items():
            times[name].append(train_seconds(make, args.epochs, args.out))
    base = statistics.median(times["no monitor"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(
        f"device: {device}; torch {torch.__version__}; lightning {pl.__version__}; python {platform.python_version()}"
    )
    steps = args.epochs * len(digits_loaders(64)[0])
    print(f"{args.epochs} epochs of the quickstart model ({steps} steps), median of {args.repeats} interleaved runs\n")
    print("| configuration | seconds | overhead |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {100 * (median / base - 1):+.0f}% |")


if __name__ == "__main__":
    main()
