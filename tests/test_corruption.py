"""Property tests: artifacts and prompt-set files round-trip exactly; a corrupted file (truncated, bit-flipped,
NaN payload, edited JSON) loads exactly or fails with a message naming the file. Plus the kill -9 loops of
scripts/kill_loop.py, short."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from dsas.artifact import CONFIG_NAME, INTEGRITY_KEY, TENSORS_NAME, read_artifact, write_artifact
from dsas.data import load_prompt_sets

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@st.composite
def artifacts(draw):
    """A steerer-shaped artifact: per-site JSON rows and a map (+ gate) vector of one width per site."""
    n_sites, width = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    names = [f"model.layers.{i}.mlp" for i in range(n_sites)]
    rows = [
        {"name": n, "kind": "mlp", "layer": i, "steered": draw(st.booleans()), "gate": {"b": draw(finite)}}
        for i, n in enumerate(names)
    ]
    config = {
        "config": {"note": draw(st.text(max_size=8)), "x": draw(finite)},
        "fingerprint": {},
        "sites": rows,
    }
    tensors = {}
    for n in names:
        tensors[f"{n}/map.shift"] = torch.tensor(draw(st.lists(finite, min_size=width, max_size=width)))
        if draw(st.booleans()):
            tensors[f"{n}/gate.w"] = torch.tensor(draw(st.lists(finite, min_size=width, max_size=width)))
    return config, tensors


corruptions = st.one_of(
    st.tuples(st.just("truncate"), st.sampled_from([CONFIG_NAME, TENSORS_NAME]), st.floats(0, 0.999)),
    st.tuples(st.just("bitflip"), st.sampled_from([CONFIG_NAME, TENSORS_NAME]), st.floats(0, 0.999)),
    st.tuples(st.just("nan"), st.just(TENSORS_NAME), st.floats(0, 0.999)),
    st.tuples(st.just("edit"), st.just(CONFIG_NAME), st.floats(0, 0.999)),
)


def _corrupt(folder: Path, kind: str, name: str, where: float, bit: int) -> None:
    path = folder / name
    data = bytearray(path.read_bytes())
    if kind == "truncate":
        path.write_bytes(data[: int(where * len(data))])
    elif kind == "bitflip":
        data[int(where * len(data))] ^= 1 << bit
        path.write_bytes(bytes(data))
    elif kind == "nan":
        t = read_artifact(folder)[1]
        k = sorted(t)[int(where * len(t))]
        t[k][0] = math.nan
        save_file(t, str(path))
    else:  # a hand edit that keeps the JSON valid
        cfg = json.loads(path.read_text())
        row = cfg["sites"][int(where * len(cfg["sites"]))]
        row["steered"] = not row["steered"]
        path.write_text(json.dumps(cfg))


def _expected(config):
    return json.loads(json.dumps({"schema_version": 1, **config}))


@FAST
@given(artifacts())
def test_artifact_round_trip_is_exact(art):
    config, tensors = art
    with tempfile.TemporaryDirectory() as d:
        write_artifact(d, config, tensors)
        cfg, back = read_artifact(d)
    assert cfg == _expected(config)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


@FAST
@given(artifacts(), corruptions, st.integers(0, 7))
def test_corrupted_artifact_loads_exactly_or_names_the_file(art, corruption, bit):
    config, tensors = art
    kind, name, where = corruption
    with tempfile.TemporaryDirectory() as d:
        write_artifact(d, config, tensors)
        _corrupt(Path(d), kind, name, where, bit)
        try:
            cfg, back = read_artifact(d)
        except (ValueError, FileNotFoundError) as err:
            assert str(Path(d) / name) in str(err)
            return
    assert cfg == _expected(config)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


@FAST
@given(artifacts(), st.sampled_from(["truncate", "nan"]), st.floats(0, 0.999))
def test_corrupted_legacy_artifact_names_the_file(art, kind, where):
    """Artifacts of earlier versions carry no checksums: what can still be caught (a cut file, a NaN) is."""
    config, tensors = art
    with tempfile.TemporaryDirectory() as d:
        write_artifact(d, config, tensors)
        p = Path(d) / CONFIG_NAME
        cfg = json.loads(p.read_text())
        del cfg[INTEGRITY_KEY]
        p.write_text(json.dumps(cfg))
        _corrupt(Path(d), kind, TENSORS_NAME, where, 0)
        with pytest.raises(ValueError) as err:
            read_artifact(d)
        assert str(Path(d) / TENSORS_NAME) in str(err.value)


# -- prompt-set files ---------------------------------------------------------------------------------------

# Printable text without line or paragraph separators (a line-based format cannot hold those), pre-stripped
# as the loader strips.
texts = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=16).map(
    str.strip
)
prompts = st.lists(texts.filter(bool), min_size=1, max_size=4)


@st.composite
def prompt_sets(draw):
    return {
        "source": draw(prompts),
        "target": draw(prompts),
        "control": draw(prompts),
        **({"eval_toxic": draw(prompts)} if draw(st.booleans()) else {}),
    }


def _write_sets(folder: Path, sets: dict[str, list[str]], fmt: str) -> Path:
    if fmt == "jsonl":
        path = folder / "sets.jsonl"
        path.write_text(
            "".join(json.dumps({"split": k, "text": t}) + "\n" for k, v in sets.items() for t in v),
            encoding="utf-8",
        )
    elif fmt == "csv":
        path = folder / "sets.csv"
        with path.open("w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["split", "text"])
            w.writerows([k, t] for k, v in sets.items() for t in v)
    else:
        path = folder / "sets"
        path.mkdir()
        for k, v in sets.items():
            (path / f"{k}.txt").write_text("\n".join(v) + "\n", encoding="utf-8")
    return path


def _as_dict(ps) -> dict[str, list[str]]:
    return {
        "source": ps.source,
        "target": ps.target,
        "control": ps.control,
        **{f"eval_{k}": v for k, v in ps.eval.items()},
    }


@FAST
@given(prompt_sets(), st.sampled_from(["jsonl", "csv", "dir"]))
def test_prompt_set_files_round_trip_exactly(sets, fmt):
    with tempfile.TemporaryDirectory() as d:
        assert _as_dict(load_prompt_sets(_write_sets(Path(d), sets, fmt))) == sets


@FAST
@given(
    prompt_sets(),
    st.sampled_from(["jsonl", "csv", "dir"]),
    st.sampled_from(["truncate", "bitflip"]),
    st.floats(0, 0.999),
    st.integers(0, 7),
)
def test_corrupted_prompt_set_file_loads_or_names_the_file(sets, fmt, kind, where, bit):
    """Plain-text formats carry no checksum, so a damaged file may still load (with what its bytes now say);
    what must never happen is an error that does not say which file is at fault."""
    with tempfile.TemporaryDirectory() as d:
        path = _write_sets(Path(d), sets, fmt)
        target = path / "source.txt" if fmt == "dir" else path
        _corrupt(target.parent, kind, target.name, where, bit)
        try:
            load_prompt_sets(path)
        except ValueError as err:
            assert str(path) in str(err)


# -- kill -9 loops -------------------------------------------------------------------------------------------


def _kill_loop():
    path = Path(__file__).parents[1] / "scripts" / "kill_loop.py"
    spec = importlib.util.spec_from_file_location("kill_loop", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kill_during_save_never_leaves_a_hybrid(single_thread):
    got = _kill_loop().save_loop(6, seed=1)
    assert got["kills"] == 6 and got["loaded_A"] + got["loaded_B"] == 6
    assert (got["hybrids"], got["errors"], got["stray_after_next_save"]) == (0, 0, 0)


def test_kill_during_sweep_loses_no_point(single_thread):
    got = _kill_loop().sweep_loop(2, seed=1)
    assert got["kills"] == 2
    assert (got["lost"], got["recomputed"], got["incomplete"], got["child_errors"]) == (0, 0, 0, 0)
