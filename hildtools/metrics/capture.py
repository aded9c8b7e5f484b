"""Capture the features of named modules with forward hooks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Self  # a torch dependency; typing.Self needs Python 3.11

from hildtools._checks import check_choice, check_optional_int
from hildtools.sharding import modules_by_name

CAPTURES = ("input", "output")
POOLS = ("avg", "flatten", "none")


def check_capture_args(capture: Any, pool: Any, projection_dim: Any, pools: tuple = POOLS) -> None:
    """Raise ValueError for a ``capture``, ``pool`` (one of ``pools``) or ``projection_dim`` outside the accepted
    values."""
    check_choice("capture", capture, CAPTURES)
    check_choice("pool", pool, pools)
    check_optional_int("projection_dim", projection_dim, 1)


def default_layer(model: nn.Module) -> str:
    """The classifier or language-model head: the output embeddings of a Hugging Face model inside ``model``
    (``get_output_embeddings()``, e.g. GPT-2's ``lm_head``) when it is an ``nn.Linear``, else the last
    ``nn.Linear`` in ``model.named_modules()`` order."""
    modules = modules_by_name(model)
    names = {id(module): name for name, module in modules.items()}
    for module in modules.values():
        head = module.get_output_embeddings() if callable(getattr(module, "get_output_embeddings", None)) else None
        if isinstance(head, nn.Linear) and id(head) in names:
            return names[id(head)]
    linears = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError("no nn.Linear found in the model: pass `layers` (module names) explicitly")
    return linears[-1]


class FeatureCapture:
    """Record the input or output of named modules, as (N, D) rows, during forward passes.

    Use it as a context manager: hooks are registered on entry and always removed on exit, also
    when the forward pass raises. Each forward call appends its rows, so ``features[name]`` holds
    the examples of all calls inside the block, in call order. Captured tensors are detached and
    upcast to at least fp32.

    Rows: a tensor with more than two dimensions is pooled. For ``nn.Linear`` modules the feature
    dimension is the last one; for every other module it is dim 1 (conv layout ``N, C, *spatial``).
    ``pool="avg"`` (default) averages over the remaining dimensions (global average pooling: D = C
    for conv maps); ``pool="flatten"`` keeps them (D = C * H * W, the SAM feature-rank setting);
    ``pool="none"`` keeps the captured shape, e.g. (N, T, D) per-token features of a Linear layer's input.
    With ``projection_dim=k`` and D > k, rows are multiplied by a fixed Gaussian matrix with
    N(0, 1/k) entries drawn from a private generator seeded with ``seed`` (the same matrix at every
    call and on every rank; distances are preserved up to O(1/sqrt(k)) relative error).

    Args:
        model: the module to hook.
        layers: a module name (as in ``named_modules()``, FSDP1 wrapper components removed: see
            :func:`hildtools.sharding.clean_name`), a sequence of names, or ``None`` for the last ``nn.Linear``
            (see :func:`default_layer`).
        capture: ``"input"`` (first positional argument; default: the classifier's input, i.e.
            the penultimate features) or ``"output"``.
        pool: ``"avg"``, ``"flatten"`` or ``"none"``.
        projection_dim: optional positive bound on the feature dimension.
        seed: seed of the projection matrices.

    Raises:
        ValueError: for an unknown layer name (the message lists the available names) or bad
            ``capture``/``pool``/``projection_dim``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> with FeatureCapture(net) as capture:
        ...     _ = net(torch.randn(5, 4))
        >>> capture.features["2"].shape
        torch.Size([5, 8])
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] | None = None,
        capture: str = "input",
        pool: str = "avg",
        projection_dim: int | None = None,
        seed: int = 0,
    ) -> None:
        check_capture_args(capture, pool, projection_dim)
        modules = modules_by_name(model)
        names = [default_layer(model)] if layers is None else [layers] if isinstance(layers, str) else list(layers)
        if not names:
            raise ValueError("`layers` must name at least one module")
        unknown = [name for name in names if name not in modules]
        if unknown:
            available = ", ".join(repr(name) for name in modules if name)
            raise ValueError(f"unknown layer name(s) {unknown}; available modules: {available}")
        self.layers = names
        self.capture, self.pool, self.projection_dim, self.seed = capture, pool, projection_dim, seed
        self._modules = {name: modules[name] for name in names}
        self._rows: dict[str, list[Tensor]] = {name: [] for name in names}
        self._projections: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> Self:
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name, module)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str, module: nn.Module):
        channels_last = isinstance(module, nn.Linear)

        def hook(_: nn.Module, args: tuple, output: Any) -> None:
            value = (args[0] if args else None) if self.capture == "input" else output
            if isinstance(value, (tuple, list)) and value:
                value = value[0]
            if not isinstance(value, Tensor) or value.dim() < 2:
                raise TypeError(f"layer {name!r}: the captured {self.capture} is not a batched tensor")
            self._rows[name].append(self._to_rows(name, value.detach(), channels_last))

        return hook

    def _to_rows(self, name: str, value: Tensor, channels_last: bool) -> Tensor:
        value = value.to(torch.promote_types(value.dtype, torch.float32))
        if value.dim() > 2 and self.pool != "none":
            if channels_last:
                value = value.flatten(1, -2).mean(1) if self.pool == "avg" else value.flatten(1)
            else:
                value = value.flatten(2).mean(2) if self.pool == "avg" else value.flatten(1)
        dim = -1 if channels_last or value.dim() == 2 else 1  # the feature dimension
        if self.projection_dim is not None and value.shape[dim] > self.projection_dim:
            projection = self._projection(name, value.shape[dim]).to(value.device, value.dtype)
            value = (value.movedim(dim, -1) @ projection).movedim(-1, dim)
        return value

    def _projection(self, name: str, num_features: int) -> Tensor:
        if name not in self._projections:
            generator = torch.Generator().manual_seed(self.seed)
            matrix = torch.randn(num_features, self.projection_dim, generator=generator) / self.projection_dim**0.5
            self._projections[name] = matrix
        return self._projections[name]

    @property
    def missing(self) -> list[str]:
        """Layers with no captured rows (not called since the last :meth:`clear`)."""
        return [name for name, rows in self._rows.items() if not rows]

    @property
    def features(self) -> dict[str, Tensor]:
        """Captured rows per layer name, concatenated over the forward calls."""
        return {name: torch.cat(rows) for name, rows in self._rows.items() if rows}

    def clear(self) -> None:
        """Forget the captured rows (the projection matrices are kept)."""
        for rows in self._rows.values():
            rows.clear()
