"""Shared part of the monitors that measure the features of named layers on the probe set."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from hildtools._checks import check_int
from hildtools.batches import batch_size as num_examples
from hildtools.batches import map_tensors
from hildtools.callbacks._monitor import Monitor, SkipMeasurement
from hildtools.distributed import all_finite, all_reduce_max, unwrap
from hildtools.metrics.capture import FeatureCapture, check_capture_args
from hildtools.sharding import forward_module, sharding


def wants_figures(figures: bool | None, trainer: pl.Trainer) -> bool:
    """``figures=None``: pictures only when a W&B logger is attached; True/False: always/never."""
    if figures is None:
        return any(isinstance(logger, WandbLogger) for logger in trainer.loggers)
    return figures


def check_figures(figures: Any) -> None:
    if figures is not None and not isinstance(figures, bool):  # not `in (None, True, False)`: 0 == False
        raise ValueError(f"figures must be None (only with W&B), True or False, got {figures!r}")


class FeatureMonitor(Monitor):
    """A :class:`Monitor` that runs the model on the probe inputs and captures named layers' features.

    Under FSDP the forward runs on every rank through the sharded model (FSDP gathers each layer's parameters);
    ranks with fewer probe chunks run extra, uncaptured forwards so that every rank joins every gather.

    Args:
        layers: module names (relative to the LightningModule), or ``None`` for the last ``nn.Linear``.
        capture, pool, projection_dim: see :class:`hildtools.metrics.FeatureCapture`.
        batch_size: probe examples per forward pass (bounds activation memory), >= 1.
        figures: ``None`` (pictures only with a W&B logger), ``True`` (also PNG files) or ``False``.
        **kwargs: the shared :class:`Monitor` arguments.
    """

    runs_under_fsdp = True

    def __init__(
        self,
        *,
        layers: str | Sequence[str] | None = None,
        capture: str = "input",
        pool: str = "avg",
        projection_dim: int | None = None,
        batch_size: int = 256,
        figures: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_capture_args(capture, pool, projection_dim, pools=("avg", "flatten"))
        check_figures(figures)
        check_int("batch_size", batch_size, 1)
        self.layers = [layers] if isinstance(layers, str) else layers
        self.capture, self.pool, self.projection_dim = capture, pool, projection_dim
        self.batch_size = batch_size
        self.figures = figures

    def key_fields(self) -> dict:
        return {"layers": self.layers, "capture": self.capture}

    def feature_capture(self, module: torch.nn.Module, pool: str | None = None) -> FeatureCapture:
        return FeatureCapture(module, self.layers, self.capture, pool or self.pool, self.projection_dim)

    def on_fit_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.feature_capture(unwrap(pl_module))  # unknown layer names fail here, before training

    def probe_chunks(
        self, trainer: pl.Trainer, module: torch.nn.Module, batch: Any, capture: FeatureCapture
    ) -> Iterator[tuple[Any, Tensor | None]]:
        """Forward the probe inputs ``batch_size`` examples at a time with ``capture``'s hooks on; after each
        chunk yield its targets and the model's output tensor (``.logits`` of a Hugging Face output; None if
        there is none). ``capture`` then holds the features so far: clear it after each chunk to stream.
        Nothing is checked for NaN/inf here (no collective per chunk: ranks may hold different numbers)."""
        inputs, targets = self.probe.unpack(batch)
        model = forward_module(trainer, module)
        convert = trainer.precision_plugin.convert_input  # e.g. bf16 inputs for a bf16-true model, as in training
        starts = range(0, num_examples(inputs), self.batch_size)
        padding = self.padding_forwards(trainer, len(starts))
        for start in starts:
            rows = slice(start, start + self.batch_size)
            with capture, torch.no_grad():
                output = _call(model, convert(map_tensors(lambda t, rows=rows: t[rows], inputs)))
            if capture.missing:
                raise ValueError(
                    f"{type(self).__name__}: layers {capture.missing} were not called by the model's forward"
                )
            yield map_tensors(lambda t, rows=rows: t[rows], targets), _output_tensor(output)
        with torch.no_grad():
            for _ in range(padding):
                _call(model, convert(map_tensors(lambda t: t[: self.batch_size], inputs)))

    def probe_features(
        self, trainer: pl.Trainer, module: torch.nn.Module, batch: Any
    ) -> tuple[FeatureCapture, Any, Tensor | None]:
        """Forward the whole probe set; returns the capture (all rows), the targets and the stacked outputs.

        Raises :class:`SkipMeasurement` when a captured feature is NaN/inf on any rank.
        """
        capture = self.feature_capture(module)
        outputs = [output for _, output in self.probe_chunks(trainer, module, batch, capture)]
        for name, features in capture.features.items():
            if not all_finite(features):
                raise SkipMeasurement(f"features of layer {name!r} contain NaN/inf")
        stacked = torch.cat(outputs) if outputs and all(isinstance(out, Tensor) for out in outputs) else None
        return capture, self.probe.unpack(batch)[1], stacked

    def padding_forwards(self, trainer: pl.Trainer, num_chunks: int) -> int:
        """Under FSDP: the extra forwards this rank runs so every rank runs as many as the rank with most chunks.
        A rank without probe examples cannot join, so then every rank skips (no hang)."""
        if sharding(trainer) is None:
            return 0
        device = trainer.strategy.root_device  # where the process group's backend takes tensors
        if all_reduce_max(-num_chunks, device) == 0:
            raise SkipMeasurement("a rank has no probe examples; under FSDP every rank must run the forward")
        return all_reduce_max(num_chunks, device) - num_chunks


def _call(model: torch.nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def _output_tensor(output: Any) -> Tensor | None:
    """The model's output tensor: itself, or the ``logits`` of a Hugging Face ``ModelOutput`` or dict."""
    if isinstance(output, Mapping):
        output = output.get("logits")
    return output if isinstance(output, Tensor) else None
