"""FeatureRankMonitor: rank of chosen layers' features on a fixed probe set during training.

Measured every ``every_n_steps`` optimizer steps (or ``every_n_epochs`` epochs) on a probe set drawn once at fit
start: the model runs on the probe inputs (no grad, eval mode, nothing of training touched), the features of each
layer are captured (default: the input of the last ``nn.Linear``) and :class:`hildtools.metrics.FeatureRank`
measures them (features gathered from every rank under DDP). Logged under ``rank/<layer>/``: ``pca_rank`` (the
number of principal components reaching ``threshold`` of the energy, SAM paper's definition and row centering by
default), ``effective_rank`` and ``stable_rank``. With W&B: the normalised singular value spectrum per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

from hildtools.callbacks._features import FeatureMonitor, wants_figures
from hildtools.callbacks._monitor import default_schedule
from hildtools.logging import log_figure, new_figure
from hildtools.metrics.feature_rank import FeatureRank, check_rank_args


class FeatureRankMonitor(FeatureMonitor):
    """Track the feature rank (Andriushchenko et al. 2023), effective rank and stable rank of layers.

    Args:
        layers: module names relative to the LightningModule, or ``None`` for the last ``nn.Linear``.
        threshold: energy fraction in (0, 1) for ``pca_rank`` (0.99 in the SAM paper).
        center: ``"row"`` (SAM code, default), ``"column"`` (PCA) or ``None``.
        capture: ``"input"`` (default) or ``"output"`` of each named module.
        pool: ``"avg"`` (default) or ``"flatten"`` (the SAM paper's setting for conv blocks: D = C*H*W).
        projection_dim: optional seeded random projection bounding the feature dimension.
        every_n_steps / every_n_epochs: the schedule (exactly one; default every epoch).
        probe_size: probe examples (default 1024; the SAM paper used 10,240). The rank is at most
            min(probe_size, feature dimension).
        batch_size: probe examples per forward pass.
        figures: ``None`` (pictures only with W&B), ``True`` or ``False``.
        **kwargs: ``probe_data``, ``unpack``, ``bn_mode``, ``measure_at_start``; see
            :class:`hildtools.callbacks._monitor.Monitor`.

    Raises:
        ValueError: bad ``threshold``/``center`` or shared arguments; an unknown layer name at fit start.

    Example::

        trainer = Trainer(callbacks=[FeatureRankMonitor(layers=["layer3", "layer4"], pool="flatten")])
    """

    namespace = "rank"

    def __init__(
        self,
        layers: str | Sequence[str] | None = None,
        *,
        threshold: float = 0.99,
        center: str | None = "row",
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        probe_size: int = 1024,
        **kwargs: Any,
    ) -> None:
        check_rank_args(threshold, center)
        every_n_steps, every_n_epochs = default_schedule(every_n_steps, every_n_epochs, epochs=1)
        super().__init__(
            layers=layers, every_n_steps=every_n_steps, every_n_epochs=every_n_epochs, probe_size=probe_size,
            **kwargs,
        )  # fmt: skip
        self.threshold, self.center = threshold, center

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, module: Any, batch: Any) -> dict:
        capture, _, _ = self.probe_features(trainer, module, batch)
        metrics = {}
        for name, features in capture.features.items():
            rank = FeatureRank(self.threshold, self.center).to(features.device)
            rank.update(features)
            measures = rank.compute()
            metrics.update({f"{name}/{key}": value for key, value in measures.items()})
            if wants_figures(self.figures, trainer) and "pca_rank" in measures:
                self.log_spectrum(trainer, name, rank.spectrum, int(measures["pca_rank"]))
        return metrics

    def log_spectrum(self, trainer: pl.Trainer, name: str, eigenvalues: Any, pca_rank: int) -> None:
        """Normalised singular values above 1e-7 (rounding noise below), with ``pca_rank`` marked."""
        figure_axes = new_figure(figsize=(5, 3), layout="constrained")
        if figure_axes is None or eigenvalues[0] <= 0:
            return
        figure, axes = figure_axes
        singular = (eigenvalues / eigenvalues[0]).clamp_min(0).sqrt().cpu()
        singular = singular[singular > 1e-7].numpy()
        axes.semilogy(range(1, len(singular) + 1), singular)
        axes.axvline(pca_rank, color="C3", linestyle="--", label=f"pca_rank {pca_rank} ({self.threshold:g} energy)")
        axes.legend(fontsize="x-small")
        axes.set(xlabel="index k", ylabel="s_k / s_1", title=f"{name}: singular values, step {trainer.global_step}")
        log_figure(trainer, f"rank/{name}/spectrum", figure)
