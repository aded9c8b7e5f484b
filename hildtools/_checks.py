"""Argument checks shared across hildtools: a ValueError naming the argument and the accepted range."""

from __future__ import annotations

import math
from typing import Any


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
    import torch

    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        raise ValueError(f"{name} must be a (N, D) tensor, got {getattr(value, 'shape', type(value))}")
    return value
