"""Diagnostics to any Lightning logger: scalars to every logger, pictures to W&B or to PNG files.

Scalars go through ``logger.log_metrics`` (CSV, TensorBoard, W&B alike) at Lightning's own row index, so they line
up with what ``self.log`` writes for the same batch. Pictures (matplotlib figures) are saved as PNG files under
``<log_dir>/figures/`` and, when a ``WandbLogger`` is attached, also logged as ``wandb.Image``. Neither ``wandb`` nor
``matplotlib`` is required: without matplotlib, :func:`new_figure` returns ``None`` and callers skip the picture.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor


def log_step(trainer: Any) -> int:
    """The step index Lightning itself logs under (``_batches_that_stepped``), or ``global_step``."""
    try:
        return int(trainer.fit_loop.epoch_loop._batches_that_stepped)
    except AttributeError:
        return int(trainer.global_step)


def to_float(value: Any) -> float:
    return float(value.detach().float().cpu()) if isinstance(value, Tensor) else float(value)


def log_metrics(trainer: Any, metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
    """Send scalars to every logger of ``trainer`` (loggers act on rank zero only). Returns them as floats."""
    values = {key: to_float(value) for key, value in metrics.items()}
    step = log_step(trainer) if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)
    return values


_warned_no_matplotlib = False


def new_figure(**kwargs: Any) -> Any:
    """A matplotlib ``(figure, axes)`` on the Agg backend, or ``None`` when matplotlib is not installed."""
    global _warned_no_matplotlib
    try:
        from matplotlib.figure import Figure
    except ImportError:
        if not _warned_no_matplotlib:
            rank_zero_info("hildtools: matplotlib is not installed; diagnostic pictures are skipped.")
            _warned_no_matplotlib = True
        return None
    figure = Figure(**kwargs)
    return figure, figure.subplots()


def figure_dir(trainer: Any) -> str:
    return os.path.join(trainer.log_dir or trainer.default_root_dir, "figures")


def log_figure(trainer: Any, key: str, figure: Any, step: int | None = None) -> str | None:
    """A matplotlib figure to ``<log_dir>/figures/<key>_<step>.png`` and, with W&B, to the run as an image.

    Returns the file path (``None`` on ranks other than zero, which write nothing).
    """
    step = log_step(trainer) if step is None else step
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[figure], step=step)
    if not trainer.is_global_zero:
        return None
    path = os.path.join(figure_dir(trainer), f"{key.replace('/', '_')}_{step:07d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return path
