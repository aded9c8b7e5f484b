"""Helpers shared by the optimizers: argument checks, path selection, grouped tensor lists, norms."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _default_to_fused_or_foreach

from hildtools.sharding import sharded_parameter_type


def check_number(name: str, value: object, low: float = 0.0, high: float = math.inf, high_open: bool = False) -> None:
    """Raise unless ``value`` is a real number in ``[low, high]`` (``[low, high)`` with ``high_open``).

    Raises:
        TypeError: ``value`` is not a real number (bools and strings are refused).
        ValueError: ``value`` is outside the range, or not finite.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must have one element, got shape {tuple(value.shape)}")
        number = float(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    upper = ")" if high_open else "]"
    inside = low <= number and (number < high if high_open else number <= high)
    if not (math.isfinite(number) and inside):
        raise ValueError(f"{name} must be in [{low}, {high}{upper}, got {value}")


def check_beta(name: str, value: object) -> None:
    """Raise unless ``value`` is a momentum-like coefficient in ``[0, 1)``."""
    check_number(name, value, 0.0, 1.0, high_open=True)


def check_betas(betas: object) -> None:
    """Raise unless ``betas`` is a pair of coefficients in ``[0, 1)``."""
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check_beta("betas[0]", betas[0])
    check_beta("betas[1]", betas[1])


def check_flag(name: str, value: object, optional: bool = False) -> None:
    """Raise unless ``value`` is a bool (or None when ``optional``)."""
    if not (isinstance(value, bool) or (optional and value is None)):
        kind = "a bool or None" if optional else "a bool"
        raise TypeError(f"{name} must be {kind}, got {value!r}")


def check_path_flags(maximize: object, foreach: object, fused: object = None) -> None:
    """Raise unless ``maximize`` is a bool and ``foreach``/``fused`` are bools or None, not both True."""
    check_flag("maximize", maximize)
    check_flag("foreach", foreach, optional=True)
    check_flag("fused", fused, optional=True)
    if foreach and fused:
        raise ValueError("foreach and fused cannot both be True")


def evaluate(closure: Callable[[], Tensor] | None) -> Tensor | None:
    """Call ``closure`` with gradients enabled (as torch optimizers do in ``step``); None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def zeros_state(state: dict, params: list[Tensor], key: str) -> list[Tensor]:
    """The ``key`` buffer of each parameter in the optimizer ``state``, created as zeros on first use."""
    for p in params:
        if key not in state[p]:
            state[p][key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return [state[p][key] for p in params]


def use_foreach(foreach: bool | None, params: list[Tensor]) -> bool:
    """Resolve ``foreach=None`` the way torch.optim does: multi-tensor kernels on CUDA, per-tensor elsewhere."""
    if foreach is None:
        return _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1]
    return foreach


def params_with_grad(group: dict) -> tuple[list[Tensor], list[Tensor]]:
    """Return the parameters of ``group`` that have a gradient, and their gradients.

    Raises:
        RuntimeError: a gradient is sparse.
    """
    params = [p for p in group["params"] if p.grad is not None]
    grads = [p.grad for p in params]
    if any(g.is_sparse for g in grads):
        raise RuntimeError("sparse gradients are not supported")
    return params, grads


def groups_with_grad(param_groups: list[dict]) -> list[tuple[dict, list[Tensor], list[Tensor]]]:
    """``(group, params, grads)`` for every param group with at least one gradient."""
    groups = [(group, *params_with_grad(group)) for group in param_groups]
    return [(group, params, grads) for group, params, grads in groups if params]


def by_device_and_dtype(*tensor_lists: list[Tensor]) -> Iterator[list[list[Tensor]]]:
    """Yield the aligned ``tensor_lists`` split into groups of one device and dtype (as foreach kernels need)."""
    grouped = Optimizer._group_tensors_by_device_and_dtype(list(tensor_lists))
    for lists, _ in grouped.values():
        yield lists


def accumulation_dtype(tensors: list[Tensor]) -> torch.dtype:
    """float64 when any tensor is float64, float32 otherwise (also for bf16/fp16 inputs)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def squared_norm(tensors: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Return sum_i ||t_i||^2 as a 0-dim tensor of ``dtype`` on ``device``, without a host sync."""
    total = torch.zeros((), dtype=dtype, device=device)
    for (group,) in by_device_and_dtype(tensors):
        norms = torch._foreach_norm(group, 2, dtype=dtype)
        total = total + torch.stack(norms).square().sum().to(device, non_blocking=True)
    return total


def keep_if(flag: Tensor, tensors: list[Tensor]) -> None:
    """Leave ``tensors`` as they are when ``flag`` is true and set them to exactly 0 when it is false.

    Multiplying by 0 would leave NaN and inf entries behind, so the bit patterns are multiplied
    by 1 or 0 instead (one multi-tensor kernel, no host sync).
    """
    for (group,) in by_device_and_dtype(tensors):
        int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[group[0].element_size()]
        torch._foreach_mul_([t.view(int_dtype) for t in group], flag.to(group[0].device, int_dtype))


def scalar(value: float | Tensor, like: Tensor) -> Tensor:
    """A 0-dim tensor holding ``value`` on ``like``'s device, in float32 (float64 for float64 ``like``)."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(value, Tensor):
        return value.to(like.device, dtype)
    return torch.full((), value, dtype=dtype, device=like.device)


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)`` once per function (static shapes, one graph).

    Compiled steps receive every hyper-parameter as a 0-dim tensor, so LR schedules and momentum
    schedules reuse the graph instead of recompiling.
    """
    return torch.compile(fn, fullgraph=True, dynamic=False)


def check_unsharded(name: str, optimizer: Optimizer) -> None:
    """Raise for FSDP-sharded parameters (:func:`hildtools.sharding.sharded_parameter_type`), whose local gradient
    is a shard: a step that needs the whole gradient's norm would use the shard's."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            kind = sharded_parameter_type(p)
            if kind is not None:
                raise ValueError(
                    f"{name} does not support FSDP-sharded parameters ({kind}): its step uses the norm of the whole "
                    "gradient, and each rank holds a shard. Use DDP, or Lion/Signum, which are elementwise."
                )
