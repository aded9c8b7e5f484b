"""Batches as data: unpacking into model inputs and targets, and mapping, measuring, joining and slicing nested
tuple/list/dict batches of tensors. Torch only; used by the probe, the callbacks and the math layers alike.

Unpacking convention (:func:`default_unpack`), for ``(inputs, targets)``:

* a tensor: ``(batch, None)``;
* a tuple/list ``(x, y, ...)``: ``(x, y)`` (``y`` is ``None`` for a 1-tuple);
* a dict (Hugging Face style): the targets are the entry under the first of :data:`TARGET_KEYS` present (or
  ``None``); the inputs are every *other* entry, as a dict of the same type, which the model receives as keyword
  arguments (``model(**inputs)``): ``input_ids``, ``attention_mask``, ``token_type_ids``, ``pixel_values``,
  ``position_ids``, ... all reach it, as in training. A dict whose only input is under ``x``, ``input`` or
  ``inputs`` gives that value, passed positionally.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

TARGET_KEYS = ("labels", "label", "y", "target", "targets")
POSITIONAL_KEYS = ("x", "input", "inputs")


def default_unpack(batch: Any) -> tuple:
    """``(inputs, targets)`` of a tensor, a ``(x, y, ...)`` tuple/list or a dict batch (see the module docstring).

    Every target key is left out of the inputs, so a model that computes its own loss from ``labels`` returns
    plain outputs (logits) when called on the inputs.
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        targets = next((batch[k] for k in TARGET_KEYS if k in batch), None)
        inputs = type(batch)((k, v) for k, v in batch.items() if k not in TARGET_KEYS)
        if not inputs:
            raise ValueError(f"unpack: the batch holds only targets (keys {sorted(batch)}); pass `unpack=`")
        if len(inputs) == 1 and next(iter(inputs)) in POSITIONAL_KEYS:
            return next(iter(inputs.values())), targets
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
