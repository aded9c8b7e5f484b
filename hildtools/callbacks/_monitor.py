"""The shared shape of every hildtools monitor: a schedule, a measurement, a log; and, for most, a probe.

:class:`ScheduledMonitor` decides when to measure, times each measurement, logs under ``<namespace>/`` (with the
wall time of the measurement as ``<namespace>/seconds``) and round-trips its state through checkpoints (tensors and
primitives only, so ``weights_only=True`` loading works). Non-finite values are dropped with a warning (nothing NaN
is logged); a measurement that cannot run raises :class:`SkipMeasurement`. A monitor that reads only the weights
subclasses it directly and implements :meth:`ScheduledMonitor.collect`.

:class:`Monitor` adds the probe: it draws and keeps the probe set and runs :meth:`Monitor.measure` inside
:meth:`hildtools.probe.Probe.session` (no side effects on training).
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from hildtools._checks import check_schedule
from hildtools.distributed import all_reduce_max, is_distributed
from hildtools.logging import log_metrics, to_float
from hildtools.probe import LossFn, Probe, Unpack, module_device
from hildtools.sharding import sharding, unsupported_strategy

FSDP_MONITORS = (
    "NeuralCollapseMonitor",
    "FeatureRankMonitor",
    "InvariantSetMonitor",
    "HessianEigenMonitor",
    "EdgeOfStabilityMonitor",
    "NTKAlignmentMonitor(method='sketch')",
)


class SkipMeasurement(Exception):
    """Raised inside a measurement to skip it with a warning (e.g. a NaN probe loss)."""


def default_schedule(
    every_n_steps: int | None, every_n_epochs: int | None, *, steps: int | None = None, epochs: int | None = None
) -> tuple[int | None, int | None]:
    """The schedule given, or the monitor's default (``steps`` or ``epochs``) when neither argument is given."""
    if every_n_steps is None and every_n_epochs is None:
        return steps, epochs
    return every_n_steps, every_n_epochs


class ScheduledMonitor(Callback):
    """Base class: schedule + measure + log, for monitors that need no probe data (e.g. weights only).

    Args:
        every_n_steps: measure after every ``every_n_steps`` optimizer steps (exclusive with ``every_n_epochs``).
        every_n_epochs: measure at the end of every ``every_n_epochs`` training epochs.
        measure_at_start: also measure once when training starts (step 0), before any update.

    Raises:
        ValueError: for an invalid schedule, naming the argument.
    """

    namespace = "monitor"
    runs_under_fsdp = False  # True for monitors that need only forward passes or weights (see hildtools.sharding)

    def __init__(
        self, *, every_n_steps: int | None = None, every_n_epochs: int | None = None, measure_at_start: bool = True
    ) -> None:
        check_schedule(every_n_steps, every_n_epochs)
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.measure_at_start = measure_at_start
        self.last_step = -1
        self.last_metrics: dict[str, float] = {}

    # -- to implement ---------------------------------------------------------------------------------------------
    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        """Return ``{name: scalar}`` (logged as ``<namespace>/<name>``); called on every rank."""
        raise NotImplementedError

    def extra_state_dict(self) -> dict:
        """Subclass state to checkpoint (tensors and primitives only)."""
        return {}

    def load_extra_state_dict(self, state: dict) -> None:
        """Restore what :meth:`extra_state_dict` returned."""

    def on_fit_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hook for subclass checks at fit start, before the first measurement."""

    def key_fields(self) -> dict:
        """Constructor arguments that tell two monitors of one class apart in a checkpoint (e.g. ``k``, layers)."""
        return {}

    # -- Lightning hooks ------------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        """``ClassName{constructor arguments}``: the format of Lightning's own callbacks, so that two monitors of
        one class with different settings keep separate checkpoint entries."""
        fields = {"every_n_steps": self.every_n_steps, "every_n_epochs": self.every_n_epochs, **self.key_fields()}
        return f"{type(self).__qualname__}{fields!r}"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name, strategy = type(self).__name__, type(trainer.strategy).__name__
        reason = unsupported_strategy(trainer)
        if reason is not None:
            raise RuntimeError(f"{name}: {reason}. Use strategy='ddp' (or a single device) for runs you diagnose.")
        if sharding(trainer) is not None and not self.runs_under_fsdp:
            raise RuntimeError(
                f"{name} does not support {strategy}: it differentiates through the model (double backward or "
                "per-example Jacobians), which sharded parameters do not allow. Under FSDP only "
                f"{', '.join(FSDP_MONITORS)} run; use strategy='ddp' (or a single device) for this one."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_fit_setup(trainer, pl_module)
        if self.measure_at_start and trainer.global_step == 0 and self.last_step < 0:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > self.last_step and step % self.every_n_steps == 0:
            self.run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.run(trainer, pl_module)

    # -- measuring ------------------------------------------------------------------------------------------------
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Measure now (on every rank), log, and return the logged values, also kept in ``last_metrics``;
        ``{}`` when the measurement is skipped. ``<namespace>/seconds`` is the measurement's wall time (under
        torch.distributed the slowest rank's, so every rank holds the same value)."""
        self.last_step = trainer.global_step
        self.last_metrics = {}
        start = time.perf_counter()
        try:
            metrics = self.collect(trainer, pl_module)
        except SkipMeasurement as reason:
            rank_zero_warn(f"{type(self).__name__}: measurement at step {trainer.global_step} skipped: {reason}")
            return {}
        values = {f"{self.namespace}/{name}": to_float(value) for name, value in metrics.items()}  # waits for them
        seconds = self.elapsed(pl_module, start)
        bad = sorted(key for key, value in values.items() if not math.isfinite(value))
        if bad:  # e.g. nc1 = inf while all class means coincide: the other values are still good
            rank_zero_warn(f"{type(self).__name__}: at step {trainer.global_step} not logged (non-finite): {bad}")
            values = {key: value for key, value in values.items() if key not in bad}
        if values:  # nothing measured (e.g. no analysable layer): nothing logged, not even the time
            values[f"{self.namespace}/seconds"] = seconds
        self.last_metrics = log_metrics(trainer, values)
        return self.last_metrics

    @staticmethod
    def elapsed(pl_module: pl.LightningModule, start: float) -> float:
        """Seconds since ``start``; under torch.distributed the largest over the ranks (one collective, on the
        model's device, where the process group's backend works)."""
        microseconds = round((time.perf_counter() - start) * 1e6)
        if is_distributed():
            microseconds = all_reduce_max(microseconds, module_device(pl_module))
        return microseconds / 1e6

    # -- checkpointing --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"last_step": self.last_step, **self.extra_state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        self.last_step = state.pop("last_step", -1)
        self.load_extra_state_dict(state)


class Monitor(ScheduledMonitor):
    """Base class: schedule + probe + measure + log.

    Args:
        every_n_steps: measure after every ``every_n_steps`` optimizer steps (exclusive with ``every_n_epochs``).
        every_n_epochs: measure at the end of every ``every_n_epochs`` training epochs.
        probe_size: examples drawn once from the train dataloader at fit start when ``probe_data`` is None.
        probe_data: a fixed batch (tuple/list/dict of tensors) or an iterable of batches (e.g. a DataLoader).
        loss_fn: ``loss_fn(module, batch) -> scalar``; default: the module's ``training_step``, logging silenced.
        unpack: ``unpack(batch) -> (inputs, targets)``; default: ``batch[0], batch[1]``.
        bn_mode: ``"eval"`` (BatchNorm running statistics) or ``"train"`` (probe-batch statistics).
        measure_at_start: also measure once when training starts (step 0), before any update.

    Raises:
        ValueError: for an invalid schedule, ``probe_size`` or ``bn_mode``, naming the argument.
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        probe_size: int = 256,
        probe_data: Any = None,
        loss_fn: LossFn | None = None,
        unpack: Unpack | None = None,
        bn_mode: str = "eval",
        measure_at_start: bool = True,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, every_n_epochs=every_n_epochs, measure_at_start=measure_at_start)
        self.probe = Probe(probe_data, probe_size, loss_fn, unpack, bn_mode)

    # -- to implement ---------------------------------------------------------------------------------------------
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, module: Any, batch: Any) -> dict:
        """Return ``{name: scalar}`` (logged as ``<namespace>/<name>``). Runs inside the probe session."""
        raise NotImplementedError

    def on_fit_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hook for subclass checks once the probe batch is fixed (e.g. that double backward works)."""

    # -- the probe ------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.probe.prepare(trainer, pl_module)
        super().on_train_start(trainer, pl_module)

    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        """:meth:`measure` on the probe batch, inside the probe session."""
        batch = self.probe.prepare(trainer, pl_module)
        with self.probe.session(pl_module) as module:
            return self.measure(trainer, pl_module, module, self.probe.prepare_batch(batch))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "probe": self.probe.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        self.probe.load_state_dict(state.pop("probe", {}))
        super().load_state_dict(state)
