"""Argument checks shared by every package: each raises a ``ValueError`` that names the parameter and
says what is allowed, and returns the value (converted where that is safe: ``number`` gives a float).

Messages read ``"<name>=<value!r> must be ..."`` (or ``"... is not allowed; choose one of [...]"``) so
the CLI can print them as one line; ``what=`` words the allowed values where a caller has its own
phrasing (``what="in [0, 1)"``). Booleans are never accepted as numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = [
    "beta_pair", "choice", "fraction", "integer", "is_number", "known_options", "non_negative", "number", "positive",
    "rank", "tensor_fits", "tensors_fit",
]


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``, else a ValueError listing them."""
    options = list(choices)
    if value not in options:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {options}")
    return value


def known_options(options: Iterable[str], allowed: Iterable[str], where: str) -> None:
    """ValueError listing the ``options`` that are not ``allowed`` for ``where`` (e.g. "method 'lora'")."""
    allowed = sorted(allowed)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {where}; allowed options: {allowed}")


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"> {low}" if low_open else f">= {low}")
    if high is not None:
        parts.append(f"< {high}" if high_open else f"<= {high}")
    return " and ".join(parts)


def _fail(name: str, value: Any, what: str, optional: bool) -> ValueError:
    none = " or None" if optional else ""
    return ValueError(f"{name}={value!r} must be {what}{none}")


def number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
    what: str | None = None,
) -> Any:
    """``float(value)`` for a finite number within the bounds (``low_open``/``high_open`` exclude the
    bound itself); ``optional=True`` also lets ``None`` through."""
    if value is None and optional:
        return None
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bound = _bounds(low, high, low_open, high_open)
        raise _fail(name, value, what or ("a finite number " + bound).strip(), optional)
    return float(value)


def positive(name: str, value: Any, *, optional: bool = False) -> Any:
    """``float(value)`` for a finite number > 0 (``optional=True``: or ``None``)."""
    return number(name, value, 0.0, low_open=True, optional=optional, what="a positive number")


def non_negative(name: str, value: Any) -> float:
    """``float(value)`` for a finite number >= 0."""
    return number(name, value, 0.0, what="a number >= 0")


def integer(
    name: str,
    value: Any,
    low: int | None = None,
    high: int | None = None,
    *,
    optional: bool = False,
    what: str | None = None,
) -> Any:
    """``value`` for an int (not a bool) in ``[low, high]``; ``optional=True`` also lets ``None`` through."""
    if value is None and optional:
        return None
    ok = not isinstance(value, bool) and isinstance(value, int)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        bound = _bounds(low, high, False, False)
        raise _fail(name, value, what or ("an integer " + bound).strip(), optional)
    return value


def fraction(
    name: str,
    value: Any,
    *,
    allow_zero: bool = False,
    allow_one: bool = True,
    optional: bool = False,
    what: str | None = None,
) -> Any:
    """``float(value)`` for a number in (0, 1] (``allow_zero``: [0, 1]; ``allow_one=False``: < 1);
    ``optional=True`` also lets ``None`` through."""
    if value is None and optional:
        return None
    ok = is_number(value) and (value >= 0 if allow_zero else value > 0) and (value <= 1 if allow_one else value < 1)
    if not ok:
        interval = ("[" if allow_zero else "(") + "0, 1" + ("]" if allow_one else ")")
        raise _fail(name, value, what or f"a number in {interval}", optional)
    return float(value)


def beta_pair(name: str, value: Any) -> tuple[float, float]:
    """``(β₁, β₂)`` as floats for a pair of numbers in [0, 1) (Adam-style moment decay rates); the
    message names the element that fails (``betas[1]``)."""
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ValueError(f"{name}={value!r} must be a pair (beta1, beta2) with 0 <= beta < 1")
    return (number(f"{name}[0]", value[0], 0.0, 1.0, high_open=True),
            number(f"{name}[1]", value[1], 0.0, 1.0, high_open=True))


def rank(name: str, value: Any, limit: int | None = None, where: str = "") -> int:
    """``value`` for an integer rank in ``[1, limit]``; the message names the layer ``where`` it failed."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    if limit is not None and value > limit:
        at = f" of '{where}'" if where else ""
        raise ValueError(f"{name}={value} is larger than min(out_features, in_features)={limit}{at}; "
                         f"choose {name} <= {limit}")
    return value


def tensor_fits(name: str, value: Any, target: Any) -> None:
    """ValueError unless tensor ``value`` may be copied into tensor ``target`` as it is: the exact shape
    (no broadcasting), a floating dtype for a floating target (float→float casts only; an integer or
    bool tensor is refused) or the very dtype for any other target, and only finite values. The
    message names the tensor, what was expected and what was found."""
    import torch

    if not isinstance(value, torch.Tensor):
        raise ValueError(f"tensor '{name}': expected a tensor, found {type(value).__name__}")
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"tensor '{name}': expected shape {tuple(target.shape)}, found {tuple(value.shape)}")
    if target.is_floating_point():
        if not value.is_floating_point():
            raise ValueError(f"tensor '{name}': expected a floating dtype ({target.dtype}), found {value.dtype}")
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"tensor '{name}': expected finite values, found {bad} NaN/inf of {value.numel()}")
    elif value.dtype != target.dtype:
        raise ValueError(f"tensor '{name}': expected dtype {target.dtype}, found {value.dtype}")


def tensors_fit(saved: Any, live: Any, where: str, hint: str = "") -> None:
    """ValueError unless the mapping ``saved`` holds exactly the names of ``live`` and every tensor fits
    its live twin (:func:`tensor_fits`): the check every loader runs before it copies anything. The
    message names the source ``where`` (plus ``hint``) and the first names or tensor that fail."""
    missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or unexpected:
        raise ValueError(f"{where} does not match the model{hint}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, t in saved.items():
        try:
            tensor_fits(key, t, live[key])
        except ValueError as e:
            raise ValueError(f"{where} does not fit the model{hint}: {e}") from None
