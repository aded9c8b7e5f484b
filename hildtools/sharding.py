"""Sharded models (FSDP): how the monitors that need no double backward see them whole.

Two kinds of fully sharded data parallelism are supported:

- ``"fsdp"``: Lightning's ``FSDPStrategy`` (``torch.distributed.fsdp.FullyShardedDataParallel``, "FSDP1"). The
  LightningModule sits inside a root wrapper and auto-wrapped layers inside their own wrappers, which add
  ``_fsdp_wrapped_module`` to module names; :func:`clean_name` removes it, so names match the unwrapped model.
- ``"fsdp2"``: Lightning's ``ModelParallelStrategy`` with ``tensor_parallel_size=1`` and ``fully_shard`` applied in
  ``configure_model`` ("FSDP2"); parameters are sharded ``DTensor``s, module names are unchanged.

Everything here that gathers parameters is a collective: call it on every rank, in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import fx, nn

try:
    from torch.distributed.fsdp import FlatParameter, FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    FSDP1_TYPES: tuple[type, ...] = (FullyShardedDataParallel,)
    FSDP2_TYPES: tuple[type, ...] = (FSDPModule,)
    SHARDED_PARAMETER_TYPES: tuple[type, ...] = (DTensor, FlatParameter)
except ImportError:  # torch built without distributed support: nothing can be sharded
    FSDP1_TYPES = FSDP2_TYPES = SHARDED_PARAMETER_TYPES = ()

WRAPPER_PREFIX = "_fsdp_wrapped_module"


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


def clean_name(name: str) -> str:
    """A module or parameter name without FSDP1's ``_fsdp_wrapped_module`` components."""
    return ".".join(part for part in name.split(".") if part != WRAPPER_PREFIX)


def modules_by_name(model: nn.Module) -> dict[str, nn.Module]:
    """``{clean name: module}``; where an FSDP1 wrapper and the module it wraps share a clean name, the wrapped
    module (the user's layer) wins."""
    return {clean_name(name): module for name, module in model.named_modules()}


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


class UnwrappingTracer(fx.Tracer):
    """``torch.fx`` tracer that sees through FSDP: FSDP1 wrappers are traced as the module they wrap, FSDP2 layers
    as their original class, and no module hooks run (FSDP's gathering hooks cannot take symbolic inputs).
    Node targets keep the raw names (with ``_fsdp_wrapped_module``)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, FSDP1_TYPES):
            return False
        cls = next(c for c in type(m).__mro__ if not (FSDP2_TYPES and issubclass(c, FSDP2_TYPES)))
        return cls.__module__.startswith(("torch.nn", "torch.ao.nn")) and not issubclass(cls, nn.Sequential)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if isinstance(m, FSDP1_TYPES):
            inner = m.module
            return self.call_module(inner, inner.forward, args, kwargs)
        return super().call_module(m, m.forward, args, kwargs)
