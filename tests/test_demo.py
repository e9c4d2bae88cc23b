from __future__ import annotations

import json

import pytest

import dsas
from dsas.demo import DemoConfig, run_demo
from dsas.sweep import EvalConfig, load_points


@pytest.mark.parametrize("names", [(), ("caa+",), ("+dsas",), ("caa+dsas+x",), ("",)])
def test_bad_steerer_names_are_refused_before_any_work(names, tmp_path):
    with pytest.raises(ValueError, match=r"DemoConfig\.steerers"):
        run_demo(tmp_path, DemoConfig(steerers=names))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_demo_with_several_methods_and_grids(smollm2, smollm2_cache_dir, tmp_path, monkeypatch):
    """`dsas demo --steerers` end to end on the real model, tiny: every steerer fitted, saved, swept on its own
    grid, and reported."""
    monkeypatch.setenv("DSAS_CACHE", str(smollm2_cache_dir))  # reuse the session's converted model
    cfg = DemoConfig(
        n=12,
        steerers=("caa", "iti+dsas"),
        vanilla_grid=(0.5,),
        grids={"iti+dsas": (2.0, 4.0)},
        options={"iti+dsas": {"top_frac": 0.25, "acc_threshold": 0.7}},
        eval=EvalConfig(n_prompts=3, n_neutral=2, n_wiki=2, n_mc=2, max_new_tokens=4),
    )
    report = run_demo(tmp_path, cfg)
    rows = load_points(tmp_path)
    assert [r["key"] for r in rows] == ["unsteered@0", "caa@0.5", "iti+dsas@2", "iti+dsas@4"]
    assert [(r["method"], r["gate"]) for r in rows[1:]] == [("caa", "none"), ("iti", "dsas"), ("iti", "dsas")]
    run = json.loads((tmp_path / "run.json").read_text())
    assert set(run["fit_seconds"]) == {"caa", "iti+dsas"}
    assert run["acc_threshold"] == {"iti+dsas": 0.7}  # what the steerer used, drawn in the report
    st = dsas.Steerer.load(tmp_path / "steerers" / "iti+dsas")
    assert (st.method, st.gate) == ("iti", "dsas")
    assert st.config["options"]["iti"]["top_frac"] == 0.25  # per-steerer fit options reach dsas.fit
    assert report.exists() and "iti+dsas" in report.read_text()
