"""Sweeps (content-keyed, resumable, locked), Pareto fronts and matched-utility interpolation."""

from __future__ import annotations

import json
import math

import pytest

import dsas
from dsas.sweep import (
    STORE_NAME,
    EvalConfig,
    EvalData,
    SweepLockedError,
    load_points,
    matched_utility_table,
    pareto_front,
    run_sweep,
    steerer_hash,
    value_at_budget,
)


def _p(name, s, ppl, tox, **kw):
    return {"key": f"{name}@{s:g}", "name": name, "strength": s, "ppl": ppl, "toxicity": tox, **kw}


def test_pareto_front_drops_dominated_points():
    pts = [
        _p("a", 1, 10, 0.5),
        _p("a", 2, 12, 0.6),
        _p("a", 3, 11, 0.3),
        _p("a", 4, 20, 0.3),
        _p("a", 5, 30, 0.1),
    ]
    assert [p["strength"] for p in pareto_front(pts)] == [1, 3, 5]


def test_value_at_budget_interpolates_along_front():
    pts = [_p("a", 0, 10, 0.5), _p("a", 1, 12, 0.3), _p("a", 2, 20, 0.1)]
    assert value_at_budget(pts, 11) == pytest.approx(0.4)
    assert value_at_budget(pts, 16) == pytest.approx(0.2)
    assert value_at_budget(pts, 99) == pytest.approx(0.1)
    assert math.isnan(value_at_budget(pts, 9))


def test_matched_utility_table():
    pts = [
        _p("unsteered", 0, 10, 0.5),
        _p("caa", 1, 11, 0.45),
        _p("caa", 2, 20, 0.1),
        _p("dsas", 2, 10.4, 0.2),
    ]
    rows = {r["name"]: r for r in matched_utility_table(pts, budgets=(0.05,))}
    # caa: between (10, .5) and (11, .45) at 10.5 -> 0.475; dsas reaches 0.2 at 10.4 <= 10.5.
    assert rows["caa"]["toxicity@+5%ppl"] == pytest.approx(0.475)
    assert rows["dsas"]["toxicity@+5%ppl"] == pytest.approx(0.2)
    assert rows["caa"]["min_toxicity"] == 0.1
    with pytest.raises(ValueError, match="no unsteered point"):
        matched_utility_table(pts[1:])


def test_run_sweep_resumes_without_recomputing(tmp_path, tiny_tok, engine_sets):
    from conftest import make_tiny_model

    model = make_tiny_model("llama", len(tiny_tok))
    st = dsas.fit(model, tiny_tok, engine_sets, gate="dsas", acc_threshold=0.5, progress=False)
    cfg = EvalConfig(
        n_prompts=4,
        n_neutral=4,
        n_wiki=4,
        ppl_tokens=16,
        n_mc=4,
        max_new_tokens=4,
        batch_size=4,
        concept_word="pear",
    )
    evals = {
        "toxic": ["you stupid", "the idiot is", "a bad enemy", "hate you"],
        "neutral": ["the city", "a river", "the music of", "history is"],
    }
    data = EvalData.build(evals, cfg)
    seen: list[str] = []
    rows = run_sweep(
        model,
        tiny_tok,
        {"caa+dsas": st},
        {"caa+dsas": [0.0, 2.0]},
        data,
        cfg,
        tmp_path,
        progress=False,
        on_point=lambda r: seen.append(r["key"]),
    )
    assert seen == ["unsteered@0", "caa+dsas@2"] and [r["key"] for r in rows] == seen
    base, pt = rows
    assert base["false_steer_rate"] == 0.0 and 0.0 <= pt["false_steer_rate"] <= 1.0
    assert base["ppl"] > 1 and pt["ppl"] != base["ppl"] and "concept_rate" in pt
    seen.clear()
    again = run_sweep(
        model,
        tiny_tok,
        {"caa+dsas": st},
        {"caa+dsas": [2.0, 4.0]},
        data,
        cfg,
        tmp_path,
        progress=False,
        on_point=lambda r: seen.append(r["key"]),
    )
    assert seen == ["caa+dsas@4"]
    assert again[:2] == rows
    assert load_points(tmp_path) == again
    assert [r["key"] for r in again] == ["unsteered@0", "caa+dsas@2", "caa+dsas@4"]


def test_eval_data_needs_two_eval_splits():
    with pytest.raises(ValueError, match="two evaluation splits"):
        EvalData.build({"toxic": ["a"]}, EvalConfig(n_mc=0))


# -- content-keyed store ------------------------------------------------------------------------------------

EVALS = {
    "toxic": ["you stupid", "the idiot is", "a bad enemy", "hate you"],
    "neutral": ["the city", "a river", "the music of", "history is"],
}


def _fake_eval(calls):
    """A stand-in for evaluate_point: instant, deterministic, and it records what was computed."""

    def fake(model, tok, st, strength, data, cfg):
        calls.append((None if st is None else st.gate, strength, cfg.n_wiki))
        return {"toxicity": 1.0 / (1.0 + strength), "ppl": 10.0 + strength + cfg.n_wiki, "mc_acc": None}

    return fake


@pytest.fixture
def fast_sweep(monkeypatch, tiny_tok, engine_sets):
    from conftest import make_tiny_model

    import dsas.sweep

    calls: list[tuple] = []
    monkeypatch.setattr(dsas.sweep, "evaluate_point", _fake_eval(calls))
    model = make_tiny_model("llama", len(tiny_tok))
    sts = {
        "none": dsas.fit(model, tiny_tok, engine_sets, gate="none", progress=False),
        "dsas": dsas.fit(model, tiny_tok, engine_sets, gate="dsas", acc_threshold=0.5, progress=False),
    }

    def sweep(out, steerers, grid, cfg=None, **kw):
        cfg = cfg or EvalConfig(n_wiki=2, n_mc=0)
        return run_sweep(
            model, tiny_tok, steerers, grid, EvalData.build(EVALS, cfg), cfg, out, progress=False, **kw
        )

    return sweep, calls, sts, model


def test_store_is_sqlite_keyed_by_content(tmp_path, fast_sweep):
    sweep, calls, sts, _ = fast_sweep
    rows = sweep(tmp_path, {"a": sts["dsas"]}, {"a": [1.0, 2.0]})
    assert [r["key"] for r in rows] == ["unsteered@0", "a@1", "a@2"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [STORE_NAME]
    assert rows[1]["steerer_hash"] == steerer_hash(sts["dsas"]) != steerer_hash(sts["none"])
    assert load_points(tmp_path) == rows
    # The same steerer under another name reuses the points (content, not name, is the key).
    calls.clear()
    rows = sweep(tmp_path, {"b": sts["dsas"]}, {"b": [1.0, 2.0]})
    assert calls == [] and [r["key"] for r in rows] == ["unsteered@0", "b@1", "b@2"]
    assert [r["toxicity"] for r in rows] == [1.0, 0.5, 1 / 3]


def test_other_eval_settings_are_recomputed_not_reused(tmp_path, fast_sweep):
    sweep, calls, sts, _ = fast_sweep
    sweep(tmp_path, {"a": sts["dsas"]}, {"a": [1.0]}, EvalConfig(n_wiki=2, n_mc=0))
    calls.clear()
    rows = sweep(tmp_path, {"a": sts["dsas"]}, {"a": [1.0]}, EvalConfig(n_wiki=3, n_mc=0))
    assert calls == [(None, 0.0, 3), ("dsas", 1.0, 3)]  # the baseline too
    assert [(r["key"], r["ppl"]) for r in load_points(tmp_path)] == [("unsteered@0", 13.0), ("a@1", 14.0)]
    # Back to the first settings: its points are still stored, reused, and the only ones reported.
    calls.clear()
    rows = sweep(tmp_path, {"a": sts["dsas"]}, {"a": [1.0]}, EvalConfig(n_wiki=2, n_mc=0))
    assert calls == [] and [r["ppl"] for r in rows] == [12.0, 13.0]
    assert [r["ppl"] for r in load_points(tmp_path / "sweep.jsonl")] == [12.0, 13.0]


def test_other_eval_data_is_recomputed(tmp_path, fast_sweep, tiny_tok):
    sweep, calls, _, model = fast_sweep
    cfg = EvalConfig(n_wiki=2, n_mc=0)
    sweep(tmp_path, {}, {})
    calls.clear()
    other = EvalData.build({"toxic": ["you idiot"], "neutral": ["a river"]}, cfg)
    run_sweep(model, tiny_tok, {}, {}, other, cfg, tmp_path, progress=False)
    assert calls == [(None, 0.0, 2)]


def test_refitted_steerer_under_the_same_name_is_recomputed(tmp_path, fast_sweep):
    sweep, calls, sts, _ = fast_sweep
    sweep(tmp_path, {"tox": sts["none"]}, {"tox": [1.0, 2.0]})
    calls.clear()
    rows = sweep(tmp_path, {"tox": sts["dsas"]}, {"tox": [1.0]})
    assert calls == [("dsas", 1.0, 2)]
    # tox@2 belonged to the old fit: it is not reported under the new one.
    assert [(r["key"], r["gate"]) for r in load_points(tmp_path)] == [
        ("unsteered@0", "none"),
        ("tox@1", "dsas"),
    ]
    assert rows == load_points(tmp_path)


def test_a_steerer_that_skips_tokens_is_keyed_by_the_rule_that_reads_it(tmp_path, tiny_tok, engine_sets):
    """Latched gates became shut on skipped tokens with the artifact unchanged: a steerer that skips tokens gets a
    key of its own (points stored under the old rule are not reused), one that skips none keeps its content
    hash."""
    from conftest import make_tiny_model

    from dsas.artifact import content_hash, read_artifact

    model = make_tiny_model("llama", len(tiny_tok))
    for skip in (0, 1):
        st = dsas.fit(model, tiny_tok, engine_sets, acc_threshold=0.5, skip_tokens=skip, progress=False)
        st.save(tmp_path / f"s{skip}")
        plain = content_hash(*read_artifact(tmp_path / f"s{skip}"))
        assert (steerer_hash(st) == plain) is (skip == 0)
        assert steerer_hash(st) == steerer_hash(dsas.Steerer.load(tmp_path / f"s{skip}"))


def test_legacy_jsonl_is_read_but_never_rewritten_or_reused(tmp_path, fast_sweep):
    sweep, calls, sts, _ = fast_sweep
    legacy = tmp_path / "sweep.jsonl"
    lines = [
        json.dumps(_p("unsteered", 0, 10.0, 0.5)),
        '{"key": "a@1", "trunc',  # a damaged middle line
        json.dumps(_p("a", 1, 11.0, 0.4)),
    ]
    legacy.write_text("\n".join(lines) + "\n")
    before = legacy.read_bytes()
    with pytest.warns(UserWarning, match=r"sweep\.jsonl line 2 .*damaged"):
        pts = load_points(tmp_path)
    assert [p["key"] for p in pts] == ["unsteered@0", "a@1"]
    with pytest.warns(UserWarning, match=r"sweep\.jsonl line 2"):
        assert [p["key"] for p in load_points(legacy)] == ["unsteered@0", "a@1"]
    rows = sweep(tmp_path, {"a": sts["dsas"]}, {"a": [1.0]})
    assert calls == [(None, 0.0, 2), ("dsas", 1.0, 2)]  # legacy points carry no content key: recomputed
    assert legacy.read_bytes() == before
    assert load_points(tmp_path) == rows


def test_damaged_store_is_a_clear_error(tmp_path):
    (tmp_path / STORE_NAME).write_bytes(b"not a database at all" * 100)
    with pytest.raises(ValueError, match=r"sweep\.sqlite.*damaged"):
        load_points(tmp_path)


def test_second_sweep_into_the_same_folder_is_refused_with_the_holder(tmp_path, fast_sweep):
    import os
    import socket
    import subprocess
    import sys

    sweep, calls, sts, _ = fast_sweep
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / STORE_NAME)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(SweepLockedError, match=rf"pid {holder.pid} on {socket.gethostname()}"):
            sweep(tmp_path, {"a": sts["dsas"]}, {"a": [1.0]})
        assert calls == []
    finally:
        holder.kill()
        holder.wait()
    assert os.getpid() != holder.pid
    sweep(tmp_path, {"a": sts["dsas"]}, {"a": [1.0]})  # the lock dies with its holder, even on kill -9
    assert len(calls) == 2


HOLD_LOCK = """
import sys, time
from pathlib import Path
from dsas.sweep import sweep_lock
with sweep_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_gate_rate_is_public():
    from dsas.sweep import gate_rate

    assert gate_rate(None, None, None, ["x"], 1.0) == 0.0


def test_other_model_weights_are_recomputed(tmp_path, fast_sweep, tiny_tok):
    """Same architecture and config, other weights (base vs fine-tuned): the baseline is not reused."""
    from conftest import make_tiny_model

    sweep, calls, _, _ = fast_sweep
    sweep(tmp_path, {}, {})
    calls.clear()
    cfg = EvalConfig(n_wiki=2, n_mc=0)
    other = make_tiny_model("llama", len(tiny_tok), seed=1)
    run_sweep(other, tiny_tok, {}, {}, EvalData.build(EVALS, cfg), cfg, tmp_path, progress=False)
    assert calls == [(None, 0.0, 2)]
