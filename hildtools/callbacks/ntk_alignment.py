"""NTKAlignmentMonitor: how the empirical NTK of a fixed probe batch moves and aligns with the task during training.

Measured every ``every_n_steps`` optimizer steps (or ``every_n_epochs`` epochs) on a probe set drawn once at fit
start (under DDP, rank 0's probe set is broadcast so every rank measures the same kernel): the model runs in probe
mode (eval mode, dropout off, BatchNorm per ``bn_mode``; nothing of training touched) and
:func:`hildtools.metrics.empirical_ntk` computes the kernel K_t of the module's forward on the probe inputs (its
output, or its ``logits``), its chunks split over the ranks. Default convention ``output="auto"``: the exact sum
over outputs up to 16 per example, else the seeded projection (language models: positions x vocabulary).
``method="sketch"`` estimates the kernel from forward passes only (:mod:`hildtools.metrics.ntk_sketch`); it is the
one that runs under FSDP (FSDP1 and FSDP2): every rank perturbs its own parameter shards in place, runs the model's
own forward (which gathers them) on rank 0's probe set and restores the shards bitwise, so every rank gets the same
kernel and the full parameter vector is never formed; the target-alignment numerators then come from the sketch
too (elsewhere they are exact, from backward passes). The first kernel (at step 0 by default) is kept as
K_0 in the callback state, so a resumed run continues the same curves. Logged under ``ntk/``:

- ``target_alignment``: ``<K_t, Y Y^T>_F / (||K_t||_F ||Y Y^T||_F)`` with the probe targets (labels one-hot),
  the uncentered task alignment of the silent-alignment paper; ``target_alignment_centered``: the same after
  centring kernel and targets over the examples (Cortes et al. 2012). Skipped, with one message, when the probe has
  no targets (or targets that are not labels/float targets);
- ``init_alignment``: ``<K_t, K_0>_F / (||K_t||_F ||K_0||_F)``; ``relative_change``: ``||K_t - K_0||_F / ||K_0||_F``;
- ``trace``: ``tr(K_t)`` (the kernel's scale); ``effective_rank``: exp(entropy) of K_t's normalised eigenvalues.

The latest kernel is kept as ``last_kernel`` (fp64, on the model's device). With W&B (or ``figures=True``): the
kernel's eigenvalues, normalised by the largest, as a picture. A kernel with
NaN/inf entries skips the measurement with a warning. Conventions: :mod:`hildtools.metrics.ntk` and
:mod:`hildtools.metrics.kernel`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from hildtools._checks import check_choice
from hildtools.batches import batch_size, map_tensors
from hildtools.callbacks._features import check_figures, wants_figures
from hildtools.callbacks._monitor import Monitor, SkipMeasurement
from hildtools.distributed import all_reduce_mean, is_distributed, unwrap
from hildtools.logging import log_figure, new_figure
from hildtools.metrics.kernel import (
    kernel_alignment,
    kernel_alignment_between,
    kernel_effective_rank,
    kernel_eigenvalues,
    relative_change,
    target_alignment_numerator,
)
from hildtools.metrics.ntk import (
    PRODUCT_DTYPES,
    as_outputs,
    check_ntk_args,
    empirical_ntk,
    kernel_from_sketch,
    resolve_output,
    selection_matrix,
)
from hildtools.metrics.ntk_sketch import SKETCH_DIM, sketched_jacobian_in_place
from hildtools.sharding import FSDP2_TYPES, forward_module, sharding


class NTKAlignmentMonitor(Monitor):
    """Track the empirical NTK's alignment with the task and with its initial value (Atanasov et al. 2022).

    Args:
        every_n_steps / every_n_epochs: the schedule (exactly one; default every 100 steps).
        probe_size: probe examples drawn from the train dataloader (default 256; the kernel is probe_size^2).
        output: the output convention of :func:`hildtools.metrics.empirical_ntk`: ``"auto"`` (default: the exact
            ``"sum"`` over outputs up to 16 outputs per example, the seeded ``"projection"`` beyond, e.g. for a
            language model's positions x vocabulary), ``"sum"``, ``"mean"``, ``"index"``, ``"projection"`` or
            ``"full"``.
        output_index: the output for ``output="index"``.
        method: ``"exact"`` (default) or ``"sketch"``: the unbiased kernel sketch from ``2 x sketch_dim`` forward
            passes (no backward through the model for the kernel; see :mod:`hildtools.metrics.ntk_sketch`); the
            target alignments then use the exact numerator ``<K, Y Y^T> = sum ||J^T Y_b||^2`` (backward passes,
            :func:`hildtools.metrics.target_alignment_numerator`) over the sketch's ``||K~||_F``.
        chunk_size: (exact) Jacobian rows computed at once (bounds memory; default: the rows fitting 1 GiB).
        sketch_dim: (sketch) the number of random directions (default 256).
        seed: seeds the ``"projection"`` vector and the sketch.
        params: names of the parameters (relative to the LightningModule) whose tangent kernel is measured;
            default: every parameter with ``requires_grad``.
        product_dtype: ``torch.float64`` (default) or ``torch.float32`` (faster) Jacobian products; see
            :func:`hildtools.metrics.empirical_ntk`.
        figures: ``None`` (spectrum picture only with W&B), ``True`` or ``False``.
        **kwargs: ``probe_data``, ``unpack``, ``bn_mode``, ``measure_at_start``; see
            :class:`hildtools.callbacks._monitor.Monitor` (no ``loss_fn``: the kernel needs no loss).

    Raises:
        ValueError: an argument out of range (named), or ``params`` naming no parameter of the model at fit start.

    Example::

        trainer = Trainer(callbacks=[NTKAlignmentMonitor(every_n_steps=50, probe_size=128)])
    """

    namespace = "ntk"

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        probe_size: int = 256,
        output: str = "auto",
        output_index: int | None = None,
        method: str = "exact",
        chunk_size: int | None = None,
        sketch_dim: int | None = None,
        seed: int = 0,
        params: Sequence[str] | None = None,
        product_dtype: torch.dtype = torch.float64,
        figures: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if "loss_fn" in kwargs:
            raise TypeError("NTKAlignmentMonitor measures the model's outputs, not a loss: loss_fn is not used")
        check_ntk_args(output, output_index, chunk_size, sketch_dim, seed, method)
        check_choice("product_dtype", product_dtype, PRODUCT_DTYPES)
        check_figures(figures)
        if params is not None and (isinstance(params, str) or not all(isinstance(p, str) for p in params)):
            raise ValueError(f"params must be None or a sequence of parameter names, got {params!r}")
        if every_n_steps is None and every_n_epochs is None:
            every_n_steps = 100
        super().__init__(every_n_steps=every_n_steps, every_n_epochs=every_n_epochs, probe_size=probe_size, **kwargs)
        self.ntk_options = {"output": output, "output_index": output_index, "method": method, "chunk_size": chunk_size,
                            "sketch_dim": sketch_dim, "seed": seed, "product_dtype": product_dtype}  # fmt: skip
        self.params = None if params is None else list(params)
        self.runs_under_fsdp = method == "sketch"  # forward passes only: FSDP gathers the shards as in training
        self.figures = figures
        self.initial_kernel: Tensor | None = None
        self.last_kernel: Tensor | None = None
        self._warned_targets = False

    def on_fit_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if sharding(trainer) is not None and self.params is not None:
            raise ValueError("params: a parameter subset is not supported under FSDP; leave params=None")
        if self.params is not None:
            named = dict(unwrap(pl_module).named_parameters())
            unknown = [name for name in self.params if name not in named]
            if unknown:
                raise ValueError(f"params: {unknown} are not parameters of the model; some names: {list(named)[:8]}")
        if is_distributed():  # every rank measures rank 0's probe set, so the kernel chunks can be shared out
            shared = [map_tensors(lambda t: t.detach().cpu(), self.probe.batch)]
            torch.distributed.broadcast_object_list(shared, src=0)
            self.probe.batch = shared[0]
            self.probe.prepare(trainer, pl_module)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, module: Any, batch: Any) -> dict:
        inputs, targets = self.probe.unpack(batch)
        sharded = sharding(trainer) is not None
        if sharded:
            kernel = self.sharded_sketch(forward_module(trainer, module), inputs)
        else:
            kernel = empirical_ntk(module, inputs, params=self.params, distributed=True, **self.ntk_options)
        if not torch.isfinite(kernel).all():  # identical on every rank after the all-reduce
            raise SkipMeasurement("the NTK contains NaN/inf")
        self.last_kernel = kernel
        if self.initial_kernel is None:
            self.initial_kernel = kernel.clone()
        initial = self.initial_kernel.to(kernel.device)
        if initial.shape != kernel.shape:
            raise SkipMeasurement(f"the kernel's shape {tuple(kernel.shape)} differs from K_0's {tuple(initial.shape)}")
        metrics = {
            "trace": torch.trace(kernel),
            "effective_rank": kernel_effective_rank(kernel),
            "init_alignment": kernel_alignment_between(kernel, initial),
            "relative_change": relative_change(kernel, initial),
            **self.target_alignments(kernel, targets, None if sharded else module, inputs),
        }
        if wants_figures(self.figures, trainer):
            self.log_spectrum(trainer, kernel)
        return {name: value for name, value in metrics.items() if torch.isfinite(value)}  # NaN: undefined alignment

    def sharded_sketch(self, model: Any, inputs: Any) -> Tensor:
        """The forward-only sketch under FSDP: every rank perturbs its shards in place and runs the model's own
        forward on the same probe batch (rank 0's), so every rank gets the same kernel."""
        n = batch_size(inputs)
        fsdp2 = [m for m in model.modules() if FSDP2_TYPES and isinstance(m, FSDP2_TYPES)]

        def reshard() -> None:  # FSDP2 keeps the root's parameters unsharded after a forward: shard them again
            for m in fsdp2:
                m.reshard()

        args, kwargs = ((), inputs) if isinstance(inputs, Mapping) else (
            tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,), {})  # fmt: skip
        with torch.no_grad():
            first = as_outputs(model(*args, **kwargs), n)
        options = self.ntk_options
        output = resolve_output(options["output"], options["output_index"], first.shape[-1])
        selection = selection_matrix(output, options["output_index"], options["seed"], first)

        def outputs() -> Tensor:
            out = as_outputs(model(*args, **kwargs), n)
            reshard()
            return out if selection is None else out @ selection

        reshard()

        world = torch.distributed.get_world_size()
        sketched = sketched_jacobian_in_place(
            outputs, [p for p in model.parameters() if p.requires_grad], options["sketch_dim"] or SKETCH_DIM,
            options["seed"], torch.distributed.get_rank(), lambda tensor: all_reduce_mean(tensor) * world,
        )  # fmt: skip
        return kernel_from_sketch(sketched, output, first.shape[-1])

    def target_alignments(self, kernel: Tensor, targets: Any, module: Any, inputs: Any) -> dict[str, Tensor]:
        """Uncentered and centered alignment with the probe targets; ``{}`` (one message) when there are none.
        For a sketched kernel the numerators ``<K, T>`` are computed exactly, without the kernel (``module=None``,
        under FSDP: from the sketch)."""
        reason = "the probe batch has no targets" if targets is None else None
        if reason is None:
            try:
                alignments = {}
                for name, centered in (("target_alignment", False), ("target_alignment_centered", True)):
                    numerator = None
                    if self.ntk_options["method"] == "sketch" and module is not None:
                        options = {key: self.ntk_options[key] for key in ("output", "output_index", "seed")}
                        numerator = target_alignment_numerator(
                            module, inputs, targets, centered=centered, params=self.params, **options
                        )
                    alignments[name] = kernel_alignment(kernel, targets, centered=centered, numerator=numerator)
                return alignments
            except (TypeError, ValueError) as error:
                reason = f"the probe targets are not usable ({error})"
        if not self._warned_targets:
            rank_zero_warn(f"NTKAlignmentMonitor: {reason}; ntk/target_alignment is not logged, the other metrics are")
            self._warned_targets = True
        return {}

    def log_spectrum(self, trainer: pl.Trainer, kernel: Tensor) -> None:
        figure_axes = new_figure(figsize=(5, 3))
        values = kernel_eigenvalues(kernel)
        if figure_axes is None or values[0] <= 0:
            return
        figure, axes = figure_axes
        normalised = (values / values[0]).clamp_min(1e-16).cpu().numpy()
        axes.semilogy(range(1, len(normalised) + 1), normalised)
        axes.set(xlabel="index k", ylabel="lambda_k / lambda_1", title=f"NTK spectrum, step {trainer.global_step}")
        log_figure(trainer, "ntk/spectrum", figure)

    def extra_state_dict(self) -> dict:
        return {} if self.initial_kernel is None else {"initial_kernel": self.initial_kernel.detach().cpu()}

    def load_extra_state_dict(self, state: dict) -> None:
        self.initial_kernel = state.get("initial_kernel")
