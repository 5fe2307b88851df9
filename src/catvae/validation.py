"""Checks of configuration values, raised before training with a message that names the key, the value and
what is allowed. One wording for every config group."""

from __future__ import annotations


def check_choice(key: str, value: object, allowed: tuple) -> None:
    """Raise unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")


def check_integer(key: str, value: object, minimum: int = 1) -> int:
    """Raise unless ``value`` is an integer (not a bool) >= ``minimum``; returns it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def check_sizes(key: str, values: object) -> list[int]:
    """Raise unless ``values`` is a list of integers >= 1 (layer widths); returns it as a plain list."""
    values = list(values)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{key} must be positive integers, got {values!r}")
    return values
