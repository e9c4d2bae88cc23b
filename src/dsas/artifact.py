"""Artifacts: `dsas_config.json` (everything but tensors) + `dsas_steerer.safetensors` (tensors). No pickle.

The two files form one steerer, so they are written and checked as a pair: the JSON records the sha256 of the
tensor file and of its own content (`integrity`), and a save never leaves a folder that loads as a mix of two
steerers, even when killed at any instant:

1. the new tensors go to a hidden side file named by their hash (`.dsas-pending-<sha256>.safetensors`);
2. the new JSON replaces the old one (one atomic rename): from here on a load follows the recorded hash to the
   side file while the main tensor file still holds the old tensors;
3. the side file replaces the main tensor file (one atomic rename).

A load therefore sees the old pair before step 2 and the new pair after it. The next save finishes an
interrupted step 3 and removes stray temporary files. Artifacts written by earlier versions carry no
`integrity` record and load as before, with the payload checks that need no record (finite values, one width
per site, tensors only for listed sites).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

SCHEMA_VERSION = 1
CONFIG_NAME = "dsas_config.json"
TENSORS_NAME = "dsas_steerer.safetensors"
INTEGRITY_KEY = "integrity"
_TMP_PREFIX = ".dsas-"
_PENDING = ".dsas-pending-{}.safetensors"
VOLATILE_KEYS = frozenset({"fit_seconds", "stats"})
"""Bookkeeping that differs between identical refits (timings, diagnostics): left out of `content_hash`."""
# A residual-stream site (a block, or the attention / MLP module of a block): its width is the model's width.
_RESIDUAL_SITE = re.compile(r"\.\d+(\.[A-Za-z_]+)?$")


class ArtifactError(ValueError):
    """A damaged, edited or inconsistent artifact; the message names the file."""


def write_artifact(path: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write both files into `path` (created if needed) so that a load sees the old pair or the new one."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory: pass a directory path to save into.")
    out.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    for k, v in flat.items():
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{k} holds NaN or inf: refusing to save a steerer that cannot steer.")
    cfg = json.loads(json.dumps({"schema_version": SCHEMA_VERSION, **config}, default=_json_default))
    cfg.pop(INTEGRITY_KEY, None)
    _finish_interrupted_save(out)
    tmp = _tmp_path(out, ".safetensors")
    # Serialised here and written by us: safetensors' save_file leaves its own temporary file when killed.
    tmp.write_bytes(save(flat, metadata={"format": "pt", "schema_version": str(SCHEMA_VERSION)}))
    _fsync(tmp)
    digest = _sha256_file(tmp)
    pending = out / _PENDING.format(digest)
    os.replace(tmp, pending)
    cfg[INTEGRITY_KEY] = {"tensors_sha256": digest, "config_sha256": _config_digest(cfg)}
    tmp = _tmp_path(out, ".json")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=False), encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, out / CONFIG_NAME)  # the switch: from here on a load sees the new steerer
    _fsync_dir(out)
    os.replace(pending, out / TENSORS_NAME)
    _fsync_dir(out)
    return out


def read_artifact(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check a steerer folder; a damaged, edited or mixed pair is an error naming the file."""
    p = Path(path)
    cfg_path, ten_path = p / CONFIG_NAME, p / TENSORS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(_not_a_steerer(p))
    cfg = _read_config(cfg_path)
    integrity = cfg.pop(INTEGRITY_KEY, None)
    if integrity is None:  # written by an earlier version: nothing recorded to check against
        if not ten_path.is_file():
            raise FileNotFoundError(_not_a_steerer(p))
        source = ten_path
    else:
        source = _checked_tensor_file(p, cfg_path, cfg, integrity)
    try:
        tensors = load_file(str(source))
    except Exception as err:  # safetensors raises its own error type for a damaged header
        raise ArtifactError(
            f"{ten_path} cannot be read ({err}); the file is damaged. Save the steerer again."
        ) from None
    _check_payload(cfg, tensors, p)
    return cfg, tensors


def _check_payload(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Reject what would steer wrongly without an error later: NaN/inf values, tensors of unlisted sites, a
    site whose tensors disagree in width or differ from the model's width (residual sites)."""
    where, cfg_path = folder / TENSORS_NAME, folder / CONFIG_NAME
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ArtifactError(
                f"{where}: {k} holds NaN or inf; the file is damaged. Save the steerer again."
            )
    rows = cfg.get("sites")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
        return  # not a Steerer layout: Steerer.load reports what is missing
    listed = {r["name"]: r for r in rows}
    widths: dict[str, tuple[str, int]] = {}
    for k in sorted(tensors):
        site, _, part = k.rpartition("/")
        if not part.startswith(("map.", "gate.")):
            continue  # not per-site (e.g. a prompt-level condition's direction)
        if site not in listed:
            raise ArtifactError(
                f"{where}: tensor {k} belongs to site {site!r}, which is not listed in {cfg_path.name}; "
                "the two files do not belong together."
            )
        n = int(tensors[k].shape[-1]) if tensors[k].dim() else 1
        if site in widths and widths[site][1] != n:
            first, m = widths[site]
            raise ArtifactError(f"{where}: {k} has {n} values; {first} of the same site has {m}.")
        widths.setdefault(site, (k, n))
    hidden = (cfg.get("fingerprint") or {}).get("hidden_size")
    for name, row in listed.items():
        if name not in widths:
            raise ArtifactError(f"{where} holds no tensors for site {name!r} listed in {CONFIG_NAME}.")
        k, n = widths[name]
        residual = row.get("kind") in ("attn", "mlp", "block") and _RESIDUAL_SITE.search(name)
        if isinstance(hidden, int) and residual and ":" not in name and n != hidden:
            raise ArtifactError(
                f"{where}: {k} has {n} values; site {name} of this model is {hidden} wide "
                f"(hidden_size in {CONFIG_NAME})."
            )
        gate = row.get("gate") or {}
        for field in ("b", "mult"):
            value = gate.get(field)
            if isinstance(value, float) and math.isnan(value):
                raise ArtifactError(f"{cfg_path}: site {name} has gate {field} = NaN; the file is damaged.")


def content_hash(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of what a steerer does: its tensors (names, shapes, float32 bytes) and its canonical JSON config,
    without the integrity record and the bookkeeping in `VOLATILE_KEYS`. Equal for a steerer and its reload,
    and for two identical refits; different as soon as one value differs."""
    h = hashlib.sha256()
    clean = _drop_keys({k: v for k, v in config.items() if k != INTEGRITY_KEY}, VOLATILE_KEYS)
    h.update(_canonical(clean).encode())
    for k in sorted(tensors):
        v = tensors[k].detach().to("cpu", torch.float32).contiguous()
        h.update(f"\0{k}\0{tuple(v.shape)}\0".encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def _read_config(cfg_path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(
            f"{cfg_path} is not valid JSON ({err}); the file is damaged or was cut short. Save the steerer again."
        ) from None
    if not isinstance(cfg, dict):
        raise ArtifactError(
            f"{cfg_path} must hold a JSON object; the file is damaged. Save the steerer again."
        )
    version = cfg.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{cfg_path} has schema_version {version!r}; this dsas reads version {SCHEMA_VERSION}. "
            "Refit the steerer with this version of dsas."
        )
    return cfg


def _checked_tensor_file(folder: Path, cfg_path: Path, cfg: dict[str, Any], integrity: Any) -> Path:
    """The file holding the tensors the JSON was saved with: the main file, or the side file of a save that
    was interrupted after its switch."""
    ok = isinstance(integrity, dict) and all(
        isinstance(integrity.get(k), str) for k in ("tensors_sha256", "config_sha256")
    )
    if not ok or integrity["config_sha256"] != _config_digest(cfg):
        raise ArtifactError(
            f"{cfg_path} was changed after it was saved: its content no longer matches the checksum recorded in "
            f'it. Save the steerer again; if you edited the file on purpose, delete its "{INTEGRITY_KEY}" entry '
            "to load it unchecked."
        )
    want = integrity["tensors_sha256"]
    ten_path = folder / TENSORS_NAME
    for candidate in (ten_path, folder / _PENDING.format(want)):
        if candidate.is_file() and _sha256_file(candidate) == want:
            return candidate
    if not ten_path.is_file():
        raise FileNotFoundError(_not_a_steerer(folder))
    raise ArtifactError(
        f"{ten_path} does not match the sha256 recorded in {CONFIG_NAME} ({want[:12]}...): the file was damaged, "
        "replaced or comes from another save. Save the steerer again."
    )


def _finish_interrupted_save(out: Path) -> None:
    """Complete step 3 of a save that was killed after its switch, then delete every stray temporary file."""
    cfg_path = out / CONFIG_NAME
    with contextlib.suppress(OSError, ValueError):
        integrity = json.loads(cfg_path.read_text(encoding="utf-8")).get(INTEGRITY_KEY) or {}
        want = integrity.get("tensors_sha256")
        pending = out / _PENDING.format(want)
        if isinstance(want, str) and pending.is_file() and _sha256_file(pending) == want:
            os.replace(pending, out / TENSORS_NAME)
    for stray in _strays(out):
        with contextlib.suppress(FileNotFoundError):
            stray.unlink()


def _strays(out: Path) -> Iterable[Path]:
    yield from out.glob(f"{_TMP_PREFIX}*")
    # Left by earlier versions: their own temporary files, and safetensors' save_file's (".tmp" + 6 characters).
    yield from out.glob("tmp*.tmp")
    yield from out.glob(".tmp??????")


def _tmp_path(out: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(dir=out, prefix=f"{_TMP_PREFIX}tmp-", suffix=suffix)
    os.close(fd)
    return Path(name)


def _config_digest(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(
        _canonical({k: v for k, v in cfg.items() if k != INTEGRITY_KEY}).encode()
    ).hexdigest()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _drop_keys(obj: Any, keys: frozenset[str]) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_keys(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list | tuple):
        return [_drop_keys(v, keys) for v in obj]
    return obj


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make the renames durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _not_a_steerer(p: Path) -> str:
    return f"{p} is not a dsas steerer: expected {CONFIG_NAME} and {TENSORS_NAME} in it (written by Steerer.save)."


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"cannot store {type(o).__name__} in {CONFIG_NAME}")


def check_fingerprint(expected: dict[str, Any], actual: dict[str, Any], check_weights: bool = True) -> None:
    """Refuse a model other than the one a steerer was fitted on, saying what differs.

    Site names are matched through wrapper prefixes (PEFT, torch.compile, DDP). With `check_weights`, the weight
    signature must match too (same checkpoint, any dtype); pass False to steer a fine-tuned variant on purpose.
    Steerers saved before signatures existed carry none and skip that check."""
    from dsas.sites import compare_weight_signatures, resolve_name

    diffs = []
    for key in ("architecture", "model_type", "hidden_size", "num_layers"):
        e, a = expected.get(key), actual.get(key)
        if e is not None and a is not None and e != a:
            diffs.append(f"{key}: fitted on {e!r}, this model has {a!r}")
    es, as_ = expected.get("shape") or {}, actual.get("shape") or {}
    for key in sorted(set(es) & set(as_)):
        if es[key] != as_[key]:
            diffs.append(f"{key}: fitted on {es[key]!r}, this model has {as_[key]!r}")
    names = actual.get("module_names", set())
    missing = [s for s in expected.get("sites", []) if resolve_name(s.split(":")[0], names) is None]
    if missing:
        diffs.append(f"sites missing from this model: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if diffs:
        raise ValueError(
            "This steerer was fitted on a different model (" + "; ".join(diffs) + "). "
            "Load the model it was fitted on, or refit with dsas.fit on this one."
        )
    ew, aw = expected.get("weights"), actual.get("weights")
    if check_weights and isinstance(ew, dict) and isinstance(aw, dict):
        why = compare_weight_signatures(ew, aw)
        if why is not None:
            raise ValueError(
                f"This steerer was fitted on a different model: same shape, other weights ({why}). Load the "
                "checkpoint it was fitted on, refit with dsas.fit on this one, or pass check_weights=False to "
                "steer a fine-tuned variant of it on purpose."
            )
