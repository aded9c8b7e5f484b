"""Sharded models (FSDP): how the monitors that need no double backward see them whole.

Two kinds of fully sharded data parallelism are supported:

- ``"fsdp"``: Lightning's ``FSDPStrategy`` (``torch.distributed.fsdp.FullyShardedDataParallel``, "FSDP1"). The
  LightningModule sits inside a root wrapper and auto-wrapped layers inside their own wrappers, which add
  ``_fsdp_wrapped_module`` to module names; :func:`hildtools.unwrapping.clean_name` removes it, so names match the
  unwrapped model.
- ``"fsdp2"``: Lightning's ``ModelParallelStrategy`` with ``tensor_parallel_size=1`` and ``fully_shard`` applied in
  ``configure_model`` ("FSDP2"); parameters are sharded ``DTensor``s, module names are unchanged.

The torch-only part (names, tracing through wrappers) is :mod:`hildtools.unwrapping`, which the metrics use.
Everything here that gathers parameters is a collective: call it on every rank, in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from hildtools.unwrapping import (
    FSDP1_TYPES,
    FSDP2_TYPES,
    SHARDED_PARAMETER_TYPES,
    UnwrappingTracer,
    clean_name,
    modules_by_name,
)

__all__ = [  # the names and the tracer live in hildtools.unwrapping (torch only); re-exported here
    "UnwrappingTracer",
    "clean_name",
    "forward_module",
    "full_parameters",
    "local_tensor",
    "model_sharding",
    "modules_by_name",
    "redirected_loss",
    "reshard",
    "sharded_parameter_type",
    "sharding",
    "unsupported_strategy",
]


def sharding(trainer: Any) -> str | None:
    """``"fsdp"``, ``"fsdp2"`` or ``None`` (not sharded) for the trainer's strategy; tensor parallelism and
    DeepSpeed are reported by :func:`unsupported_strategy`."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, FSDPStrategy):
        return "fsdp"
    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp2"
    return None


def unsupported_strategy(trainer: Any) -> str | None:
    """Why no monitor can run under the trainer's strategy, or ``None``."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

    strategy = getattr(trainer, "strategy", None)
    name = type(strategy).__name__
    if isinstance(strategy, DeepSpeedStrategy):
        return f"{name} is not supported (its sharded parameters and engine-owned forward are not handled)"
    if isinstance(strategy, ModelParallelStrategy) and strategy.device_mesh["tensor_parallel"].size() > 1:
        return (
            f"{name} with tensor parallelism (tensor_parallel_size > 1) is not supported: layers are split across "
            "ranks, so features and weights are not whole on any rank; use tensor_parallel_size=1 (pure FSDP2)"
        )
    return None


def sharded_parameter_type(parameter: Any) -> str | None:
    """``"DTensor"`` (FSDP2) or ``"FlatParameter"`` (FSDP1 without ``use_orig_params``) for a sharded parameter,
    else ``None``. FSDP1 with ``use_orig_params=True`` shows plain tensors: not detectable here."""
    kind = next((t for t in SHARDED_PARAMETER_TYPES if isinstance(parameter, t)), None)
    return kind.__name__ if kind is not None else None


def model_sharding(model: nn.Module) -> str | None:
    """``"fsdp"`` when some submodule of ``model`` is an FSDP1 wrapper, ``"fsdp2"`` when one is ``fully_shard``-ed,
    else ``None``: decided from the model alone, for code that has no trainer (the curvature functions)."""
    for kind, types in (("fsdp", FSDP1_TYPES), ("fsdp2", FSDP2_TYPES)):
        if types and any(isinstance(m, types) for m in model.modules()):
            return kind
    return None


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module of ``model`` back in its sharded state (a forward without backward leaves the root's
    parameters gathered, and registered in place of the shards)."""
    for m in model.modules():
        if FSDP2_TYPES and isinstance(m, FSDP2_TYPES):
            m.reshard()


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's part of a parameter or gradient, as a plain tensor sharing its storage (in-place changes reach
    the parameter): the local shard of a ``DTensor`` (FSDP2); FSDP1's parameters already are their local shards."""
    with torch.no_grad():
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # DTensor
    return tensor.detach()


def redirected_loss(
    module: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor]
) -> Callable[[nn.Module, Any], Tensor]:
    """``loss(root, batch)``: ``loss_fn(module, batch)`` run as the forward of ``root``, the FSDP1 wrapper around
    ``module``, so that the wrapper gathers its own parameters around it (as Lightning runs ``training_step``)."""

    def restore(saved: Any) -> None:
        if saved is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = saved

    def loss(root: nn.Module, batch: Any) -> Tensor:
        saved = module.__dict__.get("forward")  # usually None: forward is the class's method

        def forward(*args: Any, **kwargs: Any) -> Tensor:
            restore(saved)  # the loss calls the real forward
            return loss_fn(module, batch)

        module.forward = forward
        try:
            return root()
        finally:
            restore(saved)

    return loss


def forward_module(trainer: Any, module: nn.Module) -> nn.Module:
    """The module to call for a forward pass of ``module`` (the LightningModule): under FSDP1 its root wrapper,
    whose forward gathers the root's own parameters; otherwise ``module`` itself."""
    root = getattr(getattr(trainer, "strategy", None), "model", None)
    return root if isinstance(root, FSDP1_TYPES) else module


@contextlib.contextmanager
def full_parameters(trainer: Any, module: nn.Module) -> Iterator[None]:
    """Inside: every parameter of ``module`` is whole (unsharded, original shape) on every rank; resharded on exit.

    FSDP1: ``summon_full_params(writeback=False)`` on the root wrapper; FSDP2: ``unshard()``/``reshard()`` of every
    ``fully_shard``-ed submodule. Not sharded: nothing happens. Memory: the full parameters, once, on every rank.
    """
    kind = sharding(trainer)
    if kind == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
            yield
    elif kind == "fsdp2":
        sharded = [m for m in module.modules() if isinstance(m, FSDP2_TYPES)]
        for m in sharded:
            m.unshard()
        try:
            yield
        finally:
            for m in sharded:
                m.reshard()
    else:
        yield
