"""Seeing the user's modules through FSDP wrappers, in plain torch: module names and ``torch.fx`` tracing.

FSDP1 (``FullyShardedDataParallel``) wraps layers in modules that add ``_fsdp_wrapped_module`` to names; FSDP2
(``fully_shard``) changes a layer's class but not its name. The metrics use these helpers to name and trace layers
whatever the strategy; :mod:`hildtools.sharding` (strategies, gathering parameters) builds on them.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

try:
    from torch.distributed.fsdp import (
        FlatParameter,
        FSDPModule,
        FullyShardedDataParallel,
    )
    from torch.distributed.tensor import DTensor

    FSDP1_TYPES: tuple[type, ...] = (FullyShardedDataParallel,)
    FSDP2_TYPES: tuple[type, ...] = (FSDPModule,)
    SHARDED_PARAMETER_TYPES: tuple[type, ...] = (DTensor, FlatParameter)
except ImportError:  # torch built without distributed support: nothing can be sharded
    FSDP1_TYPES = FSDP2_TYPES = SHARDED_PARAMETER_TYPES = ()

WRAPPER_PREFIX = "_fsdp_wrapped_module"


def clean_name(name: str) -> str:
    """A module or parameter name without FSDP1's ``_fsdp_wrapped_module`` components."""
    return ".".join(part for part in name.split(".") if part != WRAPPER_PREFIX)


def modules_by_name(model: nn.Module) -> dict[str, nn.Module]:
    """``{clean name: module}``; where an FSDP1 wrapper and the module it wraps share a clean name, the wrapped
    module (the user's layer) wins."""
    return {clean_name(name): module for name, module in model.named_modules()}


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
