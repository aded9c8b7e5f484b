"""Argument checks shared across hildtools (monitors, metrics, curvature and optimizers): a ValueError naming the
argument and the accepted range, or a TypeError naming it for a value of the wrong kind."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an integer >= ``minimum``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_positive(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number > 0, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    """``value`` if it is one of ``choices``, else a ValueError naming ``name``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_optional_int(name: str, value: Any, minimum: int) -> int | None:
    """``value`` if it is None or an integer >= ``minimum``, else a ValueError naming ``name``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{name} must be None or an integer >= {minimum}, got {value!r}")
    return value


def check_fraction(name: str, value: Any) -> float:
    """``value`` as a float if it is a number in the open interval (0, 1), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def check_schedule(every_n_steps: Any, every_n_epochs: Any) -> None:
    """A monitor's schedule: exactly one of ``every_n_steps`` and ``every_n_epochs``, an integer >= 1."""
    check_optional_int("every_n_steps", every_n_steps, 1)
    check_optional_int("every_n_epochs", every_n_epochs, 1)
    if (every_n_steps is None) == (every_n_epochs is None):
        raise ValueError("give exactly one of every_n_steps and every_n_epochs")


def check_matrix(name: str, value: Any) -> Any:
    """``value`` if it is a 2-D tensor (rows are examples), else a ValueError naming ``name``."""
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        raise ValueError(f"{name} must be a (N, D) tensor, got {getattr(value, 'shape', type(value))}")
    return value


def check_number(
    name: str, value: Any, low: float = 0.0, high: float = math.inf, *, open_low: bool = False, open_high: bool = False
) -> None:
    """Raise unless ``value`` is a finite real number (or one-element tensor) in the interval from ``low`` to ``high``.

    The ends are closed unless ``open_low`` / ``open_high``. Bools and strings are refused.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is outside the interval, or not finite.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must have one element, got shape {tuple(value.shape)}")
        number = float(value)  # construction time only, never in a step
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    above = low < number if open_low else low <= number
    below = number < high if open_high else number <= high
    if not (math.isfinite(number) and above and below):
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")


def check_beta(name: str, value: Any) -> None:
    """Raise unless ``value`` is a momentum-like coefficient in ``[0, 1)``."""
    check_number(name, value, 0.0, 1.0, open_high=True)


def check_betas(betas: Any) -> None:
    """Raise unless ``betas`` is a pair of coefficients in ``[0, 1)``."""
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check_beta("betas[0]", betas[0])
    check_beta("betas[1]", betas[1])


def check_flag(name: str, value: Any, optional: bool = False) -> bool | None:
    """``value`` if it is a bool (or None when ``optional``), else a TypeError naming ``name``."""
    if not (isinstance(value, bool) or (optional and value is None)):
        kind = "a bool or None" if optional else "a bool"
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    return value


def check_path_flags(maximize: Any, foreach: Any, compiled: Any = False) -> None:
    """Raise unless ``maximize`` and ``compiled`` are bools and ``foreach`` a bool or None, not with ``compiled``."""
    check_flag("maximize", maximize)
    check_flag("foreach", foreach, optional=True)
    check_flag("compiled", compiled)
    if foreach and compiled:
        raise ValueError("foreach and compiled cannot both be True (the compiled step is a multi-tensor step)")


def check_shape(name: str, value: Any, shape: tuple) -> Any:
    """``value`` if it is a tensor of exactly ``shape``, else a ValueError naming ``name``."""
    if not hasattr(value, "shape") or tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)}, got {getattr(value, 'shape', value)!r}")
    return value


def check_ignore_index(value: Any, num_classes: int) -> int | None:
    """``ignore_index``: None or an integer that is not a class index in [0, num_classes)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or 0 <= value < num_classes):
        raise ValueError(f"ignore_index must be None or an integer outside [0, {num_classes}), got {value!r}")
    return value
