"""Sweeps (resumable JSONL), Pareto fronts and matched-utility interpolation."""

from __future__ import annotations

import json
import math

import pytest

import dsas
from dsas.sweep import (
    EvalConfig,
    EvalData,
    load_points,
    matched_utility_table,
    pareto_front,
    run_sweep,
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
    out = tmp_path / "sweep.jsonl"
    seen: list[str] = []
    rows = run_sweep(
        model,
        tiny_tok,
        {"caa+dsas": st},
        {"caa+dsas": [0.0, 2.0]},
        data,
        cfg,
        out,
        progress=False,
        on_point=lambda r: seen.append(r["key"]),
    )
    assert seen == ["unsteered@0", "caa+dsas@2"] and [r["key"] for r in rows] == seen
    base, pt = rows
    assert base["false_steer_rate"] == 0.0 and 0.0 <= pt["false_steer_rate"] <= 1.0
    assert base["ppl"] > 1 and pt["ppl"] != base["ppl"] and "concept_rate" in pt
    with out.open("a") as f:
        f.write('{"key": "caa+dsas@4", "trunc')  # an interrupted write
    seen.clear()
    rows = run_sweep(
        model,
        tiny_tok,
        {"caa+dsas": st},
        {"caa+dsas": [2.0, 4.0]},
        data,
        cfg,
        out,
        progress=False,
        on_point=lambda r: seen.append(r["key"]),
    )
    assert seen == ["caa+dsas@4"]
    assert rows[1] == json.loads(out.read_text().splitlines()[1])
    assert [r["key"] for r in load_points(out)] == ["unsteered@0", "caa+dsas@2", "caa+dsas@4"]


def test_eval_data_needs_two_eval_splits():
    with pytest.raises(ValueError, match="two evaluation splits"):
        EvalData.build({"toxic": ["a"]}, EvalConfig(n_mc=0))
