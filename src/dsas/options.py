"""Type checks for the option dataclasses, so a wrong type fails at construction with the field's name.

Without them a `pca_dim="5"` or `batch_size=2.0` reaches sklearn or torch and fails there, far from the option
that caused it, and a `temperature=nan` fits and saves a steerer that silently does nothing. Each config calls
`check_fields(self)` first thing in its `__post_init__`; range checks stay with the config.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union

ALLOW_NONFINITE = "allow_nonfinite"
"""Field metadata key: `field(default=..., metadata={ALLOW_NONFINITE: True})` lets a float field be inf / NaN."""


class OptionError(ValueError, TypeError):
    """An option of the wrong type or value. Both a ValueError (what callers catch for bad input) and a TypeError
    (what a wrong type usually raises)."""


def check_fields(obj: Any) -> None:
    """Check every field of the dataclass instance `obj` against its annotation; raise OptionError naming
    `ClassName.field`, what was given and the fix.

    Understood: int, float (an int is accepted; NaN / inf refused unless the field's metadata allows them), bool
    (not 0 / 1), str, Literal[...], `X | None` and other unions, tuple[X, ...] / tuple[X, Y] / list[X] /
    Sequence[X] (a list or a tuple of such items, not a string), dict / Mapping; numpy scalars count as numbers.
    Other annotations (Any, nested configs, callables) are not checked."""
    cls = type(obj)
    hints = _hints(cls)
    for f in dataclasses.fields(obj):
        hint = hints.get(f.name)
        if hint is None:
            continue
        value = getattr(obj, f.name)
        where = f"{cls.__name__}.{f.name}"
        problem = _problem(value, hint, bool(f.metadata.get(ALLOW_NONFINITE)))
        if problem is not None:
            raise OptionError(
                f"{where} {problem}, got {value!r} ({type(value).__name__}).{_fix(f.name, value, hint)}"
            )


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (strings under `from __future__ import annotations`), cached per
    class."""
    if cls not in _HINTS:
        _HINTS[cls] = _resolve_hints(cls)
    return _HINTS[cls]


def _resolve_hints(cls: type) -> dict[str, Any]:
    """A field whose annotation cannot be resolved is left unchecked, the others still are."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # one unresolvable name must not disable the other fields' checks
        ns = vars(sys.modules.get(cls.__module__, typing))
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            try:
                out[f.name] = (
                    eval(f.type, ns) if isinstance(f.type, str) else f.type
                )  # what get_type_hints does, field by field
            except Exception:
                continue
        return out


def _problem(value: Any, hint: Any, nonfinite: bool) -> str | None:
    """Why `value` does not fit `hint`, as "must be ..." text; None if it fits or the hint is not understood."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return None
    if origin is Union or origin is types.UnionType:
        problems = [_problem(value, a, nonfinite) for a in args]
        found = [p for p in problems if p is not None]
        if len(found) < len(problems):
            return None
        # `X | None`: keep what was wrong inside X (e.g. which item of a list).
        arms = [p for a, p in zip(args, found, strict=True) if a is not type(None)]
        detail = arms[0].partition(" (item ")[2] if len(arms) == 1 else ""
        return "must be " + " or ".join(_describe(a) for a in args) + (f" (item {detail}" if detail else "")
    if hint is type(None):
        return None if value is None else "must be None"
    if origin is Literal:
        # `True == 1`: compare types too, so Literal[1] does not take True.
        ok = any(value == a and type(value) is type(a) for a in args)
        return None if ok else "must be one of " + ", ".join(repr(a) for a in args)
    if hint is bool:
        return None if isinstance(value, bool) else "must be True or False"
    if hint is int:
        return (
            None if isinstance(value, numbers.Integral) and not isinstance(value, bool) else "must be an int"
        )
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return "must be a number"
        if not nonfinite and not math.isfinite(value):
            return "must be a finite number"
        return None
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    if origin in (tuple, list, Sequence) or hint in (tuple, list):
        return _sequence_problem(value, hint, origin or hint, args, nonfinite)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return None if isinstance(value, Mapping) else "must be a dict"
    return None


def _sequence_problem(
    value: Any, hint: Any, origin: Any, args: tuple[Any, ...], nonfinite: bool
) -> str | None:
    # A list for a tuple field (or the other way round) is fine: what matters is that it is a sequence of the
    # right items, not a string or a scalar.
    if not isinstance(value, list | tuple):
        return f"must be {_describe(hint)}"
    seq = typing.cast(Sequence[Any], value)
    if not args:
        return None
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(seq) != len(args):
            return f"must be {_describe(hint)}"
        items = list(zip(args, seq, strict=True))
    else:
        items = [(args[0], v) for v in seq]
    for i, (a, v) in enumerate(items):
        p = _problem(v, a, nonfinite)
        if p is not None:
            return f"must be {_describe(hint)} (item {i} {p})"
    return None


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    names: dict[Any, str] = {int: "an int", float: "a number", bool: "True or False", str: "a string"}
    if hint in names:
        return names[hint]
    if hint is type(None):
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in args)
    if origin in (tuple, list, Sequence) or hint in (tuple, list):
        what = {tuple: "a tuple", list: "a list"}.get(origin or hint, "a list")
        if not args:
            return what
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"{what} of ({', '.join(_describe(a) for a in args)})"
        return f"{what} of {_plural(args[0])}"
    return getattr(hint, "__name__", str(hint))


def _plural(hint: Any) -> str:
    text = _describe(hint)
    return {"an int": "ints", "a number": "numbers", "a string": "strings"}.get(text, text)


def _fix(name: str, value: Any, hint: Any) -> str:
    """A concrete suggestion when one is obvious: the string "5" for an int field, a near-miss of a choice."""
    accepts: Callable[[Any], bool] = lambda v: _problem(v, hint, False) is None  # noqa: E731
    if isinstance(value, str):
        for convert in (int, float):
            try:
                parsed = convert(value)
            except ValueError:
                continue
            if accepts(parsed):
                return f" Pass {name}={parsed!r} (a number, not a string)."
        choices = [
            a
            for h in (hint, *typing.get_args(hint))
            if typing.get_origin(h) is Literal
            for a in typing.get_args(h)
        ]
        strs = [c for c in choices if isinstance(c, str)]
        close = [c for c in strs if c.lower() == value.strip().lower()] or difflib.get_close_matches(
            value, strs, n=1
        )
        if close:
            return f" Did you mean {name}={close[0]!r}?"
        if value.lower() in ("true", "false") and accepts(value.lower() == "true"):
            return f" Pass {name}={value.lower() == 'true'} (a bool, not a string)."
    if isinstance(value, float) and value.is_integer() and accepts(int(value)):
        return f" Pass {name}={int(value)}."
    if isinstance(value, bool) and not accepts(value):
        return f" Pass a number, e.g. {name}={int(value)}." if accepts(int(value)) else ""
    if isinstance(value, float) and not math.isfinite(value):
        return f" Pass a finite value for {name}."
    return ""
