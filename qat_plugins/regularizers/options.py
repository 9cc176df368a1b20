"""Constructor-option checks shared by the regularizers; errors carry the option's name."""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["OptionError", "check_number", "check_int", "check_bool", "check_choice", "check_names"]


class OptionError(ValueError):
    """A bad constructor option; ``option`` names it (the config registry prefixes the field path)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if isinstance(value, (str, bool)) or value is None else repr(value)


def check_number(option: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A real, finite number in ``[low, high]`` (open ends with ``*_open``); bools and strings rejected."""
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    rng = " and ".join(x for x in (lo, hi) if x)
    want = f"must be a finite number{' ' + rng if rng else ''}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(option, f"{want}, got {_describe(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise OptionError(option, f"{want}, got {value}")
    if low is not None and (v < low or (low_open and v == low)):
        raise OptionError(option, f"{want}, got {value}")
    if high is not None and (v > high or (high_open and v == high)):
        raise OptionError(option, f"{want}, got {value}")
    return v


def check_int(option: str, value: Any, *, low: int | None = None) -> int:
    """An ``int`` (not a bool, not a float) ``>= low``."""
    want = "must be an integer" + (f" >= {low}" if low is not None else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(option, f"{want}, got {_describe(value)}")
    if low is not None and value < low:
        raise OptionError(option, f"{want}, got {value}")
    return int(value)


def check_bool(option: str, value: Any) -> bool:
    """``True`` or ``False`` (no 0/1, no strings)."""
    if not isinstance(value, bool):
        raise OptionError(option, f"must be true or false, got {_describe(value)}")
    return value


def check_choice(option: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise OptionError(option, f"must be one of {list(choices)}, got {_describe(value)}")
    return value


def check_names(option: str, value: Any, *, allow_none: bool = True, non_empty: bool = False) -> list[str] | None:
    """A list of module names (``None`` allowed unless ``allow_none=False``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(x, str) for x in value):
        raise OptionError(option, f"must be a list of module names, e.g. ['layer1', 'layer2'], got {value!r}")
    if non_empty and not value:
        raise OptionError(option, "must be a non-empty list of module names, e.g. ['layer1', 'layer2']")
    return list(value)
