"""NeuralCollapseMonitor: neural-collapse measures of chosen layers on a fixed probe set during training.

Measured every ``every_n_steps`` optimizer steps (or ``every_n_epochs`` epochs) on a probe set drawn once at fit
start: the model runs on the probe inputs (no grad, eval mode, nothing of training touched), the features of each
layer are captured (default: the input of the classifier or language-model head, i.e. the penultimate features) and
:class:`hildtools.metrics.NeuralCollapse` makes its two passes over them (exact NC1 and NC4), synchronised across
ranks under DDP. Logged under ``nc/<layer>/``: ``nc1``, ``nc2_equinorm``, ``nc2_equiangular``, ``nc2_max_angle``,
``cdnv``, ``num_classes_present``, ``nc4`` (NCC vs the model's argmax when the model returns class scores) and,
for the input of a Linear layer with C outputs, ``nc3`` and ``nc2_equinorm_weights``. With W&B: a heatmap of the
cosines between centred class means per layer (up to 256 classes).

Per-token labels (N, T) switch to token-level collapse (Wu & Papyan 2024, "Linguistic Collapse"): every position
is a sample, of the class of the token it predicts, and the probe is streamed (the forward runs once per pass and
only one chunk of positions is held at a time).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from hildtools._checks import check_flag, check_ignore_index, check_int
from hildtools.callbacks._features import FeatureMonitor, wants_figures
from hildtools.callbacks._monitor import SkipMeasurement, default_schedule
from hildtools.distributed import all_finite
from hildtools.logging import log_figure, new_figure
from hildtools.metrics.capture import FeatureCapture
from hildtools.metrics.neural_collapse import NeuralCollapse, shift_labels
from hildtools.sharding import full_parameters, modules_by_name

MAX_HEATMAP_CLASSES = 256


class NeuralCollapseMonitor(FeatureMonitor):
    """Track neural collapse (Papyan, Han & Donoho 2020) of the penultimate or intermediate layers, per example or
    per token.

    Labels come from ``unpack(batch)[1]``:

    - (N,): one class per example (classifiers); features of (N, T, D) token maps are average-pooled (``pool``).
    - (N, T): one class per token (language models). Every position t of every sequence is a sample, with the
      features of that position (the captured layer's (N, T, D) tensor, not pooled). With ``shift_labels=True``
      (default) the class of position t is ``labels[t + 1]``, the token it predicts: Hugging Face causal LMs take
      ``labels = input_ids`` and shift inside the model. Use ``shift_labels=False`` when the labels are already
      aligned with the positions (token classification, or a model that does not shift). Positions labelled
      ``ignore_index`` (-100, Hugging Face's padding label) and, when shifting, the last position are left out.
      Memory O(C x D) for the class statistics, whatever the number of positions (C = vocabulary size).

    Which layer: by default the input of the model's output head: for a Hugging Face model inside the
    LightningModule the module its ``get_output_embeddings()`` returns (``lm_head`` of GPT-2 and Llama, i.e. the
    final hidden states after the last norm), else the last ``nn.Linear`` (a classifier's input).

    Args:
        num_classes: number of classes C (>= 2); the vocabulary size for token-level collapse.
        layers: module names relative to the LightningModule, or ``None`` for the output head (see above).
        shift_labels: per-token labels only: the class of position t is ``labels[t + 1]`` (default True).
        ignore_index: per-token labels only: the label of positions to leave out (default -100).
        capture: ``"input"`` (default) or ``"output"`` of each named module.
        pool: ``"avg"`` (global average pooling of conv maps and token maps, default) or ``"flatten"``; per-token
            labels keep the positions.
        projection_dim: optional seeded random projection bounding the feature dimension.
        every_n_steps / every_n_epochs: the schedule (exactly one; default every epoch).
        probe_size: probe examples drawn from the train dataloader (default 1024: NC needs many per class).
        batch_size: probe examples per forward pass (bounds the positions held at a time).
        figures: ``None`` (pictures only with W&B), ``True`` or ``False``.
        **kwargs: ``probe_data``, ``unpack``, ``bn_mode``, ``measure_at_start``; see
            :class:`hildtools.callbacks._monitor.Monitor`.

    Raises:
        ValueError: ``num_classes < 2``, an ``ignore_index`` in [0, C) or an invalid shared argument; an unknown
            layer name at fit start (listing the available names); labels outside [0, C) at measurement time.
        TypeError: ``shift_labels`` not a bool.

    Example::

        trainer = Trainer(callbacks=[NeuralCollapseMonitor(num_classes=10, layers=["layer3", "fc"])])
        trainer = Trainer(callbacks=[NeuralCollapseMonitor(num_classes=tokenizer.vocab_size)])  # a causal LM
    """

    namespace = "nc"

    def __init__(
        self,
        num_classes: int,
        layers: str | Sequence[str] | None = None,
        *,
        shift_labels: bool = True,
        ignore_index: int = -100,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        probe_size: int = 1024,
        **kwargs: Any,
    ) -> None:
        check_int("num_classes", num_classes, 2)
        check_flag("shift_labels", shift_labels)
        check_ignore_index(ignore_index, num_classes)
        every_n_steps, every_n_epochs = default_schedule(every_n_steps, every_n_epochs, epochs=1)
        super().__init__(
            layers=layers, every_n_steps=every_n_steps, every_n_epochs=every_n_epochs, probe_size=probe_size,
            **kwargs,
        )  # fmt: skip
        self.num_classes = num_classes
        self.shift_labels, self.ignore_index = shift_labels, ignore_index

    def classifier_weight(self, trainer: pl.Trainer, module: nn.Module, name: str) -> Tensor | None:
        """The weight of a Linear layer whose input is captured and that has C outputs (for NC3), gathered whole
        under FSDP."""
        layer = modules_by_name(module)[name]
        if self.capture == "input" and isinstance(layer, nn.Linear) and layer.out_features == self.num_classes:
            with full_parameters(trainer, module):
                return layer.weight.detach().clone()
        return None

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, module: Any, batch: Any) -> dict:
        labels = self.probe.unpack(batch)[1]
        if not isinstance(labels, Tensor) or labels.dim() not in (1, 2):
            raise ValueError(
                "NeuralCollapseMonitor needs class labels: unpack(batch) must return (inputs, labels) with labels of"
                f" shape (N,) (one class per example) or (N, T) (one per token), got {getattr(labels, 'shape', labels)}"
            )
        tokens = labels.dim() == 2
        capture = self.feature_capture(module, "none" if tokens else None)
        weights = {name: self.classifier_weight(trainer, module, name) for name in capture.layers}
        # token level: the forward runs again in the second pass (positions are never all held); else one forward
        chunks = self.labelled_chunks(trainer, module, batch, capture, tokens)
        passes = (chunks, self.labelled_chunks(trainer, module, batch, capture, tokens)) if tokens else (
            itertools.repeat(list(chunks), 2))  # fmt: skip
        collapses: dict[str, NeuralCollapse] = {}
        for second, chunk_iterator in enumerate(passes):
            for features, chunk_labels, predictions in chunk_iterator:
                for name, value in features.items():
                    if name not in collapses:
                        ignore = self.ignore_index if tokens else None
                        collapses[name] = NeuralCollapse(
                            self.num_classes, value.shape[-1], weights[name], ignore_index=ignore
                        ).to(value.device)
                    collapses[name].update(value, chunk_labels.to(value.device), predictions)
            if not second:
                for name, collapse in collapses.items():  # one collective per layer, in the same order on all ranks
                    if not all_finite(torch.where(collapse.nonfinite > 0, torch.inf, 0.0)):
                        raise SkipMeasurement(f"features of layer {name!r} contain NaN/inf")
                    collapse.start_second_pass()
        metrics = {}
        for name, collapse in collapses.items():
            metrics.update({f"{name}/{key}": value for key, value in collapse.compute().items()})
            present = collapse.reference_present
            if wants_figures(self.figures, trainer) and int(present.sum()) <= MAX_HEATMAP_CLASSES:
                self.log_heatmap(trainer, name, collapse.reference_means[present])
        return metrics

    def labelled_chunks(
        self, trainer: pl.Trainer, module: nn.Module, batch: Any, capture: FeatureCapture, tokens: bool
    ) -> Iterator[tuple[dict[str, Tensor], Tensor, Tensor | None]]:
        """Per probe chunk: the captured features ``{layer: (b, D) or (b, T, D)}``, the chunk's classes (shifted
        for next-token prediction) and the model's class scores (or None)."""
        for targets, outputs in self.probe_chunks(trainer, module, batch, capture):
            features = capture.features
            capture.clear()
            if tokens and self.shift_labels:
                targets = shift_labels(targets, self.ignore_index)
            scores = outputs is not None and tuple(outputs.shape) == (*targets.shape, self.num_classes)
            yield features, targets, outputs if scores else None

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
