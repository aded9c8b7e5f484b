"""Batches as data: unpacking into model inputs and targets, and mapping, measuring, joining and slicing nested
tuple/list/dict batches of tensors. Torch only; used by the probe, the callbacks and the math layers alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor


def default_unpack(batch: Any) -> tuple:
    """``(inputs, targets)`` from a ``(x, y, ...)`` tuple/list, a ``{"x"/"input", "y"/"label"/"target"}`` dict,
    or a bare tensor (targets ``None``)."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        inputs = next((batch[k] for k in ("x", "input", "inputs", "input_ids") if k in batch), None)
        targets = next((batch[k] for k in ("y", "label", "labels", "target", "targets") if k in batch), None)
        if inputs is None:
            raise ValueError(f"unpack: cannot find the inputs among the batch keys {sorted(batch)}; pass `unpack=`")
        return inputs, targets
    if isinstance(batch, (tuple, list)) and len(batch) >= 1:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"unpack: unsupported batch type {type(batch).__name__}; pass `unpack=`")


def map_tensors(fn: Callable[[Tensor], Tensor], batch: Any) -> Any:
    """Apply ``fn`` to every tensor of a nested tuple/list/dict batch."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)((k, map_tensors(fn, v)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(fn, v) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(fn, v) for v in batch)
    return batch


def batch_size(batch: Any) -> int:
    """Leading dimension of the first tensor found in the batch."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else 1
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        size = batch_size(item)
        if size:
            return size
    return 0


def concat_batches(batches: list) -> Any:
    """Concatenate same-structured batches along dim 0 (non-tensor leaves keep the first batch's value)."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(batches) if first.dim() else first
    if isinstance(first, Mapping):
        return type(first)((k, concat_batches([b[k] for b in batches])) for k in first)
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(concat_batches(list(parts)) for parts in zip(*batches)))
    if isinstance(first, (tuple, list)):
        return type(first)(concat_batches(list(parts)) for parts in zip(*batches))
    return first


def slice_batch(batch: Any, n: int) -> Any:
    """The first ``n`` examples of every tensor with a leading dimension."""
    return map_tensors(lambda t: t[:n] if t.dim() else t, batch)
