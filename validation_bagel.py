"""Argument checks shared by BAGEL's public entry points (generation, processor, config, training
forward): one way to refuse a bad input where it enters, before any work or memory is spent on it.

Every error names the argument, shows the value it got, says what is allowed and, where there is
one, the fix: `TypeError` for a value of the wrong kind, `ValueError` for a value out of range.
Booleans are never taken for numbers (`True` is an `int` to Python, never a step count here), and
numbers must be finite (a NaN guidance scale compares False with every bound and would pass).
"""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Iterable

import torch

#: What `torch.Generator.manual_seed` accepts.
SEED_RANGE = (-(2**63), 2**64 - 1)


def _shown(value: Any) -> str:
    """The value as an error message shows it: its repr (shortened) and, for non-builtins, its type."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    if len(text) > 80:
        text = text[:60] + "..." + text[-12:]
    kind = type(value)
    return text if kind.__module__ == "builtins" else f"{text} ({kind.__module__}.{kind.__qualname__})"


def _fail(kind: type[Exception], name: str, value: Any, allowed: str, fix: str = "") -> Exception:
    message = f"{name} must be {allowed}, got {_shown(value)}."
    return kind(f"{message} {fix}" if fix else message)


def _bounds(minimum, maximum, open_min: bool = False, open_max: bool = False) -> str:
    low = None if minimum is None else f"{'>' if open_min else '>='} {minimum}"
    high = None if maximum is None else f"{'<' if open_max else '<='} {maximum}"
    return " and ".join(b for b in (low, high) if b)


def check_bool(name: str, value: Any, fix: str = "") -> bool:
    """`value` as a bool: True or False (numpy bools too), not 'no', 1 or None."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise _fail(TypeError, name, value, "True or False", fix)


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None, fix: str = "") -> int:
    """`value` as an int within [minimum, maximum] (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(TypeError, name, value, "an integer", fix)
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if maximum is None:
            allowed = f"at least {minimum}"
        elif minimum is None:
            allowed = f"at most {maximum}"
        else:
            allowed = f"between {minimum} and {maximum}"
        raise _fail(ValueError, name, value, allowed, fix)
    return value


def check_number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    open_min: bool = False,
    open_max: bool = False,
    fix: str = "",
) -> float:
    """`value` as a finite float within the bounds (open or closed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(TypeError, name, value, "a number", fix)
    value = float(value)
    bounds = _bounds(minimum, maximum, open_min, open_max)
    allowed = "a finite number" + (f" {bounds}" if bounds else "")
    if not math.isfinite(value):
        raise _fail(ValueError, name, value, allowed, fix)
    too_low = minimum is not None and (value <= minimum if open_min else value < minimum)
    too_high = maximum is not None and (value >= maximum if open_max else value > maximum)
    if too_low or too_high:
        raise _fail(ValueError, name, value, allowed, fix)
    return value


def check_choice(name: str, value: Any, choices: Iterable[str], fix: str = "") -> str:
    choices = tuple(choices)
    allowed = "one of " + ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise _fail(TypeError, name, value, allowed, fix)
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        raise _fail(ValueError, name, value, allowed, fix or (f"Did you mean {close[0]!r}?" if close else ""))
    return value


def check_interval(name: str, value: Any, lowest: float = 0.0, highest: float = 1.0) -> tuple[float, float]:
    """A pair (lo, hi) of finite numbers with lowest <= lo <= hi <= highest."""
    allowed = f"a pair (lo, hi) of numbers with {lowest} <= lo <= hi <= {highest}"
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _fail(TypeError, name, value, allowed)
    try:
        lo, hi = (check_number(f"{name}[{i}]", v, lowest, highest) for i, v in enumerate(value))
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name} must be {allowed}, got {_shown(value)} ({err})") from None
    if lo > hi:
        raise _fail(ValueError, name, value, allowed, "Put the smaller bound first.")
    return lo, hi


def check_seeds(name: str, seed: Any, count: int) -> list[int] | None:
    """One seed per request: None, one int (request i then uses seed + i) or a list of `count` ints,
    each within what `torch.Generator.manual_seed` takes."""
    if seed is None:
        return None
    lo, hi = SEED_RANGE
    allowed = f"an integer in [{lo}, {hi}] or a list of such integers (one per request)"

    def one(label: str, value: Any, top: int = hi) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _fail(TypeError, label, value, allowed)
        if not lo <= int(value) <= top:
            raise _fail(ValueError, label, value, allowed, "Use a smaller seed, e.g. seed % 2**32.")
        return int(value)

    if isinstance(seed, (list, tuple)):
        if len(seed) != count:
            raise ValueError(f"{name} has {len(seed)} seeds for {count} requests; give one per request.")
        return [one(f"{name}[{i}]", s) for i, s in enumerate(seed)]
    base = one(name, seed, hi - (count - 1))
    return [base + i for i in range(count)]


def check_keywords(where: str, given: Iterable[str], allowed: Iterable[str], fix: str = "") -> None:
    """Refuse keyword arguments `where` does not take, naming each with its closest valid name."""
    allowed = sorted(set(allowed))
    unknown = [key for key in given if key not in allowed]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, allowed, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(f"{where} got unexpected keyword argument(s) {', '.join(hints)}. {fix}".rstrip())


def check_tensor(
    name: str,
    value: Any,
    dims: int | None = None,
    integer: bool | None = None,
    rows: int | None = None,
    columns: int | None = None,
    fix: str = "",
) -> torch.Tensor:
    """A tensor with `dims` dimensions, an integer or floating dtype, and `rows` x `columns`."""
    shape = "" if dims is None else f" with {dims} dimension{'s' if dims != 1 else ''}"
    kind = {None: "", True: " of integers (e.g. torch.long)", False: " of floating point"}[integer]
    if not isinstance(value, torch.Tensor):
        raise _fail(TypeError, name, value, f"a torch.Tensor{shape}{kind}", fix)
    if dims is not None and value.dim() != dims:
        raise _fail(ValueError, name, value, f"a tensor{shape}", fix)
    if integer is not None and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool) == integer:
        raise _fail(TypeError, name, value, f"a tensor{kind}", fix)
    if rows is not None and value.shape[0] != rows:
        raise _fail(ValueError, name, value, f"a tensor of {rows} rows", fix)
    if columns is not None and (value.dim() < 2 or value.shape[1] != columns):
        raise _fail(ValueError, name, value, f"a tensor of {columns} columns", fix)
    return value


def check_int_list(name: str, value: Any, minimum: int | None = None, fix: str = "") -> list[int]:
    """A list (or tuple, or 1-D integer tensor) of ints, each at least `minimum`."""
    if isinstance(value, torch.Tensor) and value.dim() == 1 and not value.dtype.is_floating_point:
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise _fail(TypeError, name, value, "a list of integers", fix)
    return [check_int(f"{name}[{i}]", v, minimum, fix=fix) for i, v in enumerate(value)]
