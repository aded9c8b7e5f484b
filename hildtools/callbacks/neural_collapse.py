"""NeuralCollapseMonitor: neural-collapse measures of chosen layers on a fixed probe set during training.

Measured every ``every_n_steps`` optimizer steps (or ``every_n_epochs`` epochs) on a probe set drawn once at fit
start: the model runs on the probe inputs (no grad, eval mode, nothing of training touched), the features of each
layer are captured (default: the input of the last ``nn.Linear``, i.e. the penultimate features) and
:class:`hildtools.metrics.NeuralCollapse` makes its two passes over them (exact NC1 and NC4), synchronised across
ranks under DDP. Logged under ``nc/<layer>/``: ``nc1``, ``nc2_equinorm``, ``nc2_equiangular``, ``nc2_max_angle``,
``cdnv``, ``num_classes_present``, ``nc4`` (NCC vs the model's argmax when the model returns (N, C) scores) and,
for the input of a Linear layer with C outputs, ``nc3`` and ``nc2_equinorm_weights``. With W&B: a heatmap of the
cosines between centred class means per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from hildtools._checks import check_int
from hildtools.callbacks._features import FeatureMonitor, wants_figures
from hildtools.logging import log_figure, new_figure
from hildtools.metrics.neural_collapse import NeuralCollapse
from hildtools.sharding import full_parameters, modules_by_name


class NeuralCollapseMonitor(FeatureMonitor):
    """Track neural collapse (Papyan, Han & Donoho 2020) of the penultimate or intermediate layers.

    Args:
        num_classes: number of classes C (>= 2); labels come from ``unpack(batch)[1]``.
        layers: module names relative to the LightningModule, or ``None`` for the last ``nn.Linear``.
        capture: ``"input"`` (default) or ``"output"`` of each named module.
        pool: ``"avg"`` (global average pooling of conv maps, default) or ``"flatten"``.
        projection_dim: optional seeded random projection bounding the feature dimension.
        every_n_steps / every_n_epochs: the schedule (exactly one; default every epoch).
        probe_size: probe examples drawn from the train dataloader (default 1024: NC needs many per class).
        batch_size: probe examples per forward pass.
        figures: ``None`` (pictures only with W&B), ``True`` or ``False``.
        **kwargs: ``probe_data``, ``unpack``, ``bn_mode``, ``measure_at_start``; see
            :class:`hildtools.callbacks._monitor.Monitor`.

    Raises:
        ValueError: ``num_classes < 2`` or an invalid shared argument; an unknown layer name at fit start
            (listing the available names); labels outside [0, C) at measurement time.

    Example::

        trainer = Trainer(callbacks=[NeuralCollapseMonitor(num_classes=10, layers=["layer3", "fc"])])
    """

    namespace = "nc"

    def __init__(
        self,
        num_classes: int,
        layers: str | Sequence[str] | None = None,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        probe_size: int = 1024,
        **kwargs: Any,
    ) -> None:
        check_int("num_classes", num_classes, 2)
        if every_n_steps is None and every_n_epochs is None:
            every_n_epochs = 1
        super().__init__(
            layers=layers, every_n_steps=every_n_steps, every_n_epochs=every_n_epochs, probe_size=probe_size,
            **kwargs,
        )  # fmt: skip
        self.num_classes = num_classes

    def classifier_weight(self, trainer: pl.Trainer, module: nn.Module, name: str) -> Tensor | None:
        """The weight of a Linear layer whose input is captured and that has C outputs (for NC3), gathered whole
        under FSDP."""
        layer = modules_by_name(module)[name]
        if self.capture == "input" and isinstance(layer, nn.Linear) and layer.out_features == self.num_classes:
            with full_parameters(trainer, module):
                return layer.weight.detach().clone()
        return None

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, module: Any, batch: Any) -> dict:
        capture, labels, outputs = self.probe_features(trainer, module, batch)
        if not isinstance(labels, Tensor):
            raise ValueError("NeuralCollapseMonitor needs class labels: unpack(batch) must return (inputs, labels)")
        predictions = outputs if outputs is not None and outputs.shape == (len(labels), self.num_classes) else None
        metrics = {}
        for name, features in capture.features.items():
            weight = self.classifier_weight(trainer, module, name)
            collapse = NeuralCollapse(self.num_classes, features.shape[1], weight).to(features.device)
            collapse.update(features, labels, predictions)
            collapse.start_second_pass()
            collapse.update(features, labels, predictions)
            metrics.update({f"{name}/{key}": value for key, value in collapse.compute().items()})
            if wants_figures(self.figures, trainer):
                self.log_heatmap(trainer, name, collapse.reference_means[collapse.reference_present])
        return metrics

    def log_heatmap(self, trainer: pl.Trainer, name: str, means: Tensor) -> None:
        figure_axes = new_figure(figsize=(4.5, 3.8), layout="constrained")
        if figure_axes is None:
            return
        figure, axes = figure_axes
        centred = means - means.mean(0)
        unit = centred / centred.norm(dim=1, keepdim=True).clamp_min(torch.finfo(centred.dtype).tiny)
        image = axes.imshow((unit @ unit.T).cpu().numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
        figure.colorbar(image, ax=axes)
        axes.set(xlabel="class", ylabel="class", title=f"{name}: class-mean cosines\nstep {trainer.global_step}")
        log_figure(trainer, f"nc/{name}/class_mean_cosines", figure)
