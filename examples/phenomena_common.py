"""Plumbing shared by the phenomenon examples: common flags, the logger, the figure backend and the verdict line."""

from __future__ import annotations

import argparse
import os


def parser_for(doc: str, out: str) -> argparse.ArgumentParser:
    """An argparse parser with the module docstring as description and the flags every example has."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=out, help="folder for logs and the figure (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (for the tests)")
    parser.add_argument("--wandb", action="store_true", help="log to Weights & Biases, offline (sync later)")
    return parser


def make_logger(out: str, name: str, use_wandb: bool):
    """A Lightning ``WandbLogger`` in offline mode (``--wandb``) or a ``CSVLogger`` under ``out``."""
    import lightning.pytorch as pl

    if use_wandb:
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
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

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


def report(name: str, verdict: str, figure_path: str) -> None:
    """The two lines the tests parse: ``VERDICT <name>: <numbers>`` and ``figure: <path>``."""
    print(f"VERDICT {name}: {verdict}")
    print(f"figure: {figure_path}")
