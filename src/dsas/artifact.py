"""Artifacts: `dsas_config.json` (everything but tensors) + `dsas_steerer.safetensors` (tensors). No pickle."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

SCHEMA_VERSION = 1
CONFIG_NAME = "dsas_config.json"
TENSORS_NAME = "dsas_steerer.safetensors"


def write_artifact(path: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write both files into `path` (created if needed); each file is replaced atomically."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory: pass a directory path to save into.")
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"schema_version": SCHEMA_VERSION, **config}
    flat = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    with tempfile.NamedTemporaryFile(dir=out, suffix=".tmp", delete=False) as f:
        tmp_t = f.name
    save_file(flat, tmp_t, metadata={"format": "pt", "schema_version": str(SCHEMA_VERSION)})
    os.replace(tmp_t, out / TENSORS_NAME)
    with tempfile.NamedTemporaryFile("w", dir=out, suffix=".tmp", delete=False) as fj:
        json.dump(cfg, fj, indent=2, sort_keys=False, default=_json_default)
        tmp_c = fj.name
    os.replace(tmp_c, out / CONFIG_NAME)
    return out


def read_artifact(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    p = Path(path)
    cfg_path, ten_path = p / CONFIG_NAME, p / TENSORS_NAME
    if not cfg_path.is_file() or not ten_path.is_file():
        raise FileNotFoundError(
            f"{p} is not a dsas steerer: expected {CONFIG_NAME} and {TENSORS_NAME} in it "
            "(written by Steerer.save)."
        )
    cfg = json.loads(cfg_path.read_text())
    version = cfg.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{cfg_path} has schema_version {version!r}; this dsas reads version {SCHEMA_VERSION}. "
            "Refit the steerer with this version of dsas."
        )
    return cfg, load_file(str(ten_path))


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"cannot store {type(o).__name__} in {CONFIG_NAME}")


def check_fingerprint(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    """Refuse a model other than the one a steerer was fitted on, saying what differs."""
    diffs = []
    for key in ("architecture", "model_type", "hidden_size", "num_layers"):
        e, a = expected.get(key), actual.get(key)
        if e is not None and a is not None and e != a:
            diffs.append(f"{key}: fitted on {e!r}, this model has {a!r}")
    es, as_ = expected.get("shape") or {}, actual.get("shape") or {}
    for key in sorted(set(es) & set(as_)):
        if es[key] != as_[key]:
            diffs.append(f"{key}: fitted on {es[key]!r}, this model has {as_[key]!r}")
    missing = [
        s for s in expected.get("sites", []) if s.split(":")[0] not in actual.get("module_names", set())
    ]
    if missing:
        diffs.append(f"sites missing from this model: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if diffs:
        raise ValueError(
            "This steerer was fitted on a different model (" + "; ".join(diffs) + "). "
            "Load the model it was fitted on, or refit with dsas.fit on this one."
        )
