"""Helpers shared by the optimizers: path selection, grouped tensor lists, complex views, norms.

Only public torch APIs: the foreach default and the device/dtype grouping that torch.optim keeps
private (``_default_to_fused_or_foreach``, ``_group_tensors_by_device_and_dtype``) are written out here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from hildtools.sharding import sharded_parameter_type

FOREACH_DEVICES = ("cuda", "xpu")  # where torch.optim defaults to multi-tensor kernels


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
    """Resolve ``foreach=None`` the way torch.optim does: multi-tensor kernels when every parameter is a
    plain tensor on CUDA (or XPU), per-tensor elsewhere (CPU, tensor subclasses such as DTensor)."""
    if foreach is None:
        return all(type(p) in (Tensor, nn.Parameter) and p.device.type in FOREACH_DEVICES for p in params)
    return foreach


def backfill(optimizer: Optimizer, **defaults: object) -> None:
    """Give every param group the ``defaults`` it lacks (state dicts saved before a flag existed), as
    torch.optim's ``__setstate__`` does."""
    for group in optimizer.param_groups:
        for key, value in defaults.items():
            group.setdefault(key, value)


def real_views(tensors: list[Tensor]) -> list[Tensor]:
    """``torch.view_as_real`` of the complex tensors, the others as they are: torch.optim's convention,
    a complex parameter is optimised as the pair of its real and imaginary parts."""
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


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
    """Yield the aligned ``tensor_lists`` split into groups of one device and dtype (as foreach kernels need),
    keyed by the first list's tensors, in order of first appearance."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensor_lists[0]):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    for indices in groups.values():
        yield [[tensors[i] for i in indices] for tensors in tensor_lists]


def accumulation_dtype(tensors: list[Tensor]) -> torch.dtype:
    """float64 when any tensor is float64 (or complex128), float32 otherwise (also for bf16/fp16 inputs)."""
    return torch.float64 if any(t.dtype in (torch.float64, torch.complex128) for t in tensors) else torch.float32


def squared_norm(tensors: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Return sum_i ||t_i||^2 as a 0-dim tensor of ``dtype`` on ``device``, without a host sync
    (``|z|^2`` summed for complex tensors)."""
    total = torch.zeros((), dtype=dtype, device=device)
    for (group,) in by_device_and_dtype(real_views(tensors)):
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
def compile_once(fn: Callable) -> Callable:
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
