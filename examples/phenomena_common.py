"""Plumbing shared by the examples: common flags, the logger, the figure backend, seeds and the PASS/FAIL verdict.

Times in the examples' docstrings are CPU seconds (user time, one thread) of the default run, measured on the
shared 2-core development machine.

A verdict is a list of criteria, each a fixed description and whether the run met it. With several seeds a
criterion passes only when every seed meets it; the headline numbers are printed as mean ± standard deviation
over the seeds (``mean (1 seed)`` with one).
"""

from __future__ import annotations

import argparse
import os
import statistics

EXTRA_HINT = 'pip install -e ".[examples]"'


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring verbatim, and every flag's default after its help."""


def require(module: str, package: str):
    """Import ``module`` or exit with one line naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"this example needs {package}, which is not installed: {EXTRA_HINT}") from None


def parser_for(doc: str, out: str) -> argparse.ArgumentParser:
    """An argparse parser with the module docstring as description and the flags every example has."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    parser.add_argument("--out", default=out, help="folder for logs and the figure")
    parser.add_argument("--seed", type=int, default=0, help="first seed (data, initialisation and noise)")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds: --seed, --seed + 1, ...")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (for the tests)")
    parser.add_argument("--wandb", action="store_true", help="log to Weights & Biases, offline (sync later)")
    return parser


def seed_list(args) -> list[int]:
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    return list(range(args.seed, args.seed + args.seeds))


def make_logger(out: str, name: str, use_wandb: bool):
    """A Lightning ``WandbLogger`` in offline mode (``--wandb``) or a ``CSVLogger`` under ``out``."""
    import lightning.pytorch as pl

    if use_wandb:
        require("wandb", "wandb")
        return pl.loggers.WandbLogger(project="hildtools-examples", name=name, save_dir=out, mode="offline")
    return pl.loggers.CSVLogger(out, name=name)


def finish_wandb(use_wandb: bool) -> None:
    """Close the W&B run (offline runs are then ready for ``wandb sync``)."""
    if use_wandb:
        import wandb

        if wandb.run is not None:
            print(f"W&B offline run: {wandb.run.dir}  (upload with: wandb sync {os.path.dirname(wandb.run.dir)})")
        wandb.finish()


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (exits with an install hint without matplotlib)."""
    matplotlib = require("matplotlib", "matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, out: str, filename: str) -> str:
    """Save as PNG (dpi 100) under ``out`` and close; returns the path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, filename)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    pyplot().close(figure)
    return path


def mean_spread(values, fmt: str = ".3g") -> str:
    """``mean ± std`` over seeds (sample std), the value alone for one seed, ``n/a`` when none."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def combine(per_seed: list[list[tuple[str, bool]]]) -> list[tuple[str, bool]]:
    """Criteria of several seeds -> one list: a criterion passes when every seed meets it (k/N shown)."""
    if len(per_seed) == 1:
        return per_seed[0]
    combined = []
    for i, (text, _) in enumerate(per_seed[0]):
        met = sum(criteria[i][1] for criteria in per_seed)
        combined.append((f"{text} ({met}/{len(per_seed)} seeds)", met == len(per_seed)))
    return combined


def report(
    name: str, criteria: list[tuple[str, bool]], numbers: str, figure_path: str | None, seeds: list[int]
) -> bool:
    """Prints ``VERDICT <name>: PASS|FAIL (<met>/<all> criteria, <seeds>); <numbers>``, one ``[PASS]``/``[FAIL]``
    line per criterion and ``figure: <path>``; returns whether every criterion passed."""
    passed = all(ok for _, ok in criteria)
    met = sum(ok for _, ok in criteria)
    which = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}, mean ± std"
    print(f"VERDICT {name}: {'PASS' if passed else 'FAIL'} ({met}/{len(criteria)} criteria, {which}); {numbers}")
    for text, ok in criteria:
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}")
    if figure_path:
        print(f"figure: {figure_path}")
    return passed
