"""InvariantSetMonitor: stochastic collapse of neurons to invariant sets, from the weights, during training.

Measured every ``every_n_steps`` optimizer steps (or ``every_n_epochs`` epochs) with
:func:`hildtools.metrics.invariant_sets` on the unwrapped model: data-free, identical on every rank, nothing of
training touched. Under FSDP the parameters are gathered whole on every rank for the measurement
(:func:`hildtools.sharding.full_parameters`) and resharded after it. Logged under ``collapse/<layer>/`` for every
Linear/Conv layer with a known consumer: ``independent_fraction``, ``num_vanishing``, ``num_identical_groups`` and
``largest_group``. Layers that cannot be analysed (residual adds, the output layer, untraceable models) are listed
once, with the reason, at the first measurement. With W&B: a histogram of each neuron's nearest-neighbour distance
(threshold-free; a peak near 0 shows collapse).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from hildtools.callbacks._features import check_figures, wants_figures
from hildtools.callbacks._monitor import ScheduledMonitor, default_schedule
from hildtools.distributed import unwrap
from hildtools.logging import log_figure, new_figure
from hildtools.metrics.invariant_sets import (
    LayerInvariantSets,
    check_invariant_set_args,
    invariant_sets,
)
from hildtools.sharding import full_parameters


class InvariantSetMonitor(ScheduledMonitor):
    """Track vanishing and identical neurons (Chen, Kunin, Yamamura & Ganguli 2023) per layer.

    Args:
        layers: names of the Linear/Conv layers to report, or ``None`` for every analysable one.
        vanish_threshold: ``||w_i|| / max_j ||w_j||`` below which a neuron is vanishing (paper: 0.1).
        identical_threshold: ``2||w_i - w_j||^2 / (||w_i||^2 + ||w_j||^2)`` below which two neurons are
            identical (paper: 0.1).
        chunk_size: neurons per distance block (memory ~ 16 * chunk_size * vector length bytes).
        every_n_steps / every_n_epochs: the schedule (exactly one; default every epoch).
        figures: ``None`` (pictures only with W&B), ``True`` or ``False``.
        measure_at_start: also measure once before the first update.

    Raises:
        ValueError: bad thresholds, ``chunk_size`` or schedule; at the first measurement, a name in ``layers``
            that is not an analysable layer (the message lists the analysable ones and the skipped ones).

    Example::

        trainer = Trainer(callbacks=[InvariantSetMonitor(every_n_steps=500)])
    """

    namespace = "collapse"
    runs_under_fsdp = True

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        *,
        vanish_threshold: float = 0.1,
        identical_threshold: float = 0.1,
        chunk_size: int = 256,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        figures: bool | None = None,
        measure_at_start: bool = True,
    ) -> None:
        check_invariant_set_args(vanish_threshold, identical_threshold, chunk_size)
        check_figures(figures)
        every_n_steps, every_n_epochs = default_schedule(every_n_steps, every_n_epochs, epochs=1)
        super().__init__(every_n_steps=every_n_steps, every_n_epochs=every_n_epochs, measure_at_start=measure_at_start)
        self.layers = [layers] if isinstance(layers, str) else layers
        self.vanish_threshold, self.identical_threshold = vanish_threshold, identical_threshold
        self.chunk_size = chunk_size
        self.figures = figures
        self.reported_skips = False

    def key_fields(self) -> dict:
        return {"layers": self.layers}

    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        module = unwrap(pl_module)  # weights only: no probe data, nothing of training touched
        with full_parameters(trainer, module):
            report = invariant_sets(module, self.vanish_threshold, self.identical_threshold, self.chunk_size)
        if self.layers is not None:
            unknown = [name for name in self.layers if name not in report.layers]
            if unknown:
                raise ValueError(
                    f"InvariantSetMonitor: layers {unknown} cannot be analysed; analysable: {sorted(report.layers)};"
                    f" skipped: {report.skipped}"
                )
        if not self.reported_skips and report.skipped:
            lines = "\n".join(f"  {name}: {reason}" for name, reason in report.skipped.items())
            rank_zero_info(f"InvariantSetMonitor: layers not analysed:\n{lines}")
            self.reported_skips = True
        layers = [report.layers[name] for name in self.layers or report.layers]
        if wants_figures(self.figures, trainer):
            self.log_histogram(trainer, layers)
        return {f"{layer.name}/{key}": value for layer in layers for key, value in _scalars(layer).items()}

    def log_histogram(self, trainer: pl.Trainer, layers: list[LayerInvariantSets]) -> None:
        figure_axes = new_figure(figsize=(5.5, 3), layout="constrained")
        if figure_axes is None:
            return
        figure, axes = figure_axes
        for layer in layers:
            distances = layer.nearest_distance[torch.isfinite(layer.nearest_distance)].clamp_min(1e-8).log10()
            if len(distances):
                axes.hist(distances.cpu().numpy(), bins=40, histtype="step", label=layer.name)
        axes.axvline(
            math.log10(self.identical_threshold),
            color="k",
            linestyle="--",
            label=f"identical below {self.identical_threshold:g}",
        )
        axes.set(
            xlabel="log10 normalised distance to the nearest neuron",
            ylabel="neurons",
            title=f"distance of each neuron to its nearest twin, step {trainer.global_step}",
        )
        axes.legend(fontsize="x-small")
        log_figure(trainer, "collapse/nearest_distance", figure)


def _scalars(layer: LayerInvariantSets) -> dict[str, float]:
    return {
        "independent_fraction": layer.independent_fraction,
        "num_vanishing": layer.num_vanishing,
        "num_identical_groups": layer.num_identical_groups,
        "largest_group": max(layer.group_sizes, default=1),
    }
