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


def check_fraction(name: str, value: Any) -> float:
    """``value`` as a float if it is a number in the open interval (0, 1), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def check_optional_int(name: str, value: Any, minimum: int) -> int | None:
    """``value`` if it is None or an integer >= ``minimum``, else a ValueError naming ``name``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{name} must be None or an integer >= {minimum}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is True or False, else a TypeError naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


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
