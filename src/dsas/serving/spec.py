"""What the operator and the requests say: `DSAS_STEERERS` and the per-request `extra_args` keys.

Pure Python (no torch, no vLLM): the API server validates every request with it before the request reaches the
engine, so a bad steerer name or strength is an error returned to that client, never a silently unsteered
answer and never an exception inside the engine loop."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEY_STEERER = "dsas_steerer"
KEY_STRENGTH = "dsas_strength"
_KEYS = (KEY_STEERER, KEY_STRENGTH)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_steerers(value: str) -> dict[str, Path]:
    """`"tox=runs/tox,pear=runs/pear"` -> {"tox": Path("runs/tox"), ...}; ValueError naming the bad entry.

    Only folders written by `Steerer.save` are accepted: tensors (safetensors) and JSON, nothing executable."""
    out: dict[str, Path] = {}
    for item in (x.strip() for x in value.split(",")):
        if not item:
            continue
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"DSAS_STEERERS entry {item!r} is not name=path (e.g. 'tox=runs/tox').")
        if not _NAME.match(name):
            raise ValueError(f"DSAS_STEERERS name {name!r}: use letters, digits, '_', '-', '.' only.")
        if name in out:
            raise ValueError(f"DSAS_STEERERS names {name!r} twice.")
        out[name] = Path(path).expanduser()
    if not out:
        raise ValueError("DSAS_STEERERS is set but names no steerer; expected e.g. 'tox=runs/tox'.")
    return out


@dataclass(frozen=True)
class RequestSteering:
    """One request's steering: which operator-loaded steerer, at which strength (lam)."""

    steerer: str
    strength: float


def parse_request(
    extra_args: dict[str, Any] | None, names: list[str] | tuple[str, ...]
) -> RequestSteering | None:
    """A request's `extra_args` -> its steering, None when it asks for none; ValueError naming the fix otherwise.

    `dsas_strength` defaults to 1.0 and must be a finite number (JSON number, not a string or a bool);
    `dsas_strength` without `dsas_steerer` and misspelt `dsas_*` keys are errors rather than ignored."""
    args = extra_args or {}
    unknown = sorted(k for k in args if isinstance(k, str) and k.startswith("dsas_") and k not in _KEYS)
    if unknown:
        raise ValueError(f"Unknown steering argument(s) {unknown}; dsas reads {list(_KEYS)}.")
    if KEY_STEERER not in args:
        if KEY_STRENGTH in args:
            raise ValueError(
                f"'{KEY_STRENGTH}' was given without '{KEY_STEERER}': name one of {list(names)}."
            )
        return None
    name = args[KEY_STEERER]
    if not isinstance(name, str) or name not in names:
        loaded = ", ".join(repr(n) for n in names) or "none"
        raise ValueError(
            f"Unknown steerer {name!r} in '{KEY_STEERER}'; this server has {loaded} "
            "(the operator loads steerers with DSAS_STEERERS or `dsas serve --steerer name=path`)."
        )
    raw = args.get(KEY_STRENGTH, 1.0)
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise ValueError(f"'{KEY_STRENGTH}' must be a finite number (e.g. 2.0), got {raw!r}.")
    return RequestSteering(name, float(raw))
