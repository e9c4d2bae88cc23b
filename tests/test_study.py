"""scripts/study.py end to end on its random tiny model: the report, its intervals and plots, resuming, refusals."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
INTERVAL = re.compile(r"(-?\d+\.\d{3}) \[(-?\d+\.\d{3}), (-?\d+\.\d{3})\]")


def _load_study():
    spec = importlib.util.spec_from_file_location("dsas_study_script", ROOT / "scripts" / "study.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


study = _load_study()


def _sections(md: str) -> dict[str, str]:
    parts = re.split(r"^### (.+)$", md, flags=re.MULTILINE)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def _points(store: Path) -> int:
    n = 0
    for db in store.rglob("sweep.sqlite"):
        with sqlite3.connect(db) as con:
            n += con.execute("SELECT COUNT(*) FROM points").fetchone()[0]
    return n


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("study")
    try:
        md = study.main(["--config", "tiny", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out, md


def test_tiny_study_writes_a_table_per_metric_with_intervals_and_plots(tiny_run):
    out, md_path = tiny_run
    assert md_path == out / "study.md"
    md = md_path.read_text()
    cfg = study.CONFIGS["tiny"]
    sections = _sections(md)
    for _, title in study.METRICS:
        table = sections[title]
        rows = [line for line in table.splitlines() if line.startswith("| ") and "steerer" not in line]
        assert [r.split(" | ")[0][2:] for r in rows] == list(cfg.steerers), title
        for row in rows:  # one interval per budget, each containing its value
            cells = INTERVAL.findall(row)
            assert len(cells) == len(cfg.budgets), row
            for value, low, high in cells:
                assert float(low) <= float(value) <= float(high), row
    concept = sections["Concept induction at the most selective strength"]
    for name in cfg.concept_sets:
        assert sum(line.startswith(f"| {name} (") for line in concept.splitlines()) == len(
            cfg.concept_steerers
        )
    claims = sections["Claims (toxicity)"] + sections["Claims (concepts)"]
    verdicts = re.findall(r"\*\*(holds|does not hold)[^*]*\*\*", claims)
    assert len(verdicts) >= 10
    assert "0.6 x CAA's" in claims and ">= 80% of neutral greedy continuations" in claims
    # Every set run: the concept goal is decided, not left open.
    assert re.search(r"meets both .* on \d of 3 concept sets \(goal: at least 2 of 3\): \*\*(holds|does not hold)\*\*$",
                     claims, re.M)  # fmt: skip
    for png in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (out / png).stat().st_size > 5_000  # a real figure, referenced relative to the report
    assert {p.name for p in (out / "study").glob("*.png")} == {"tiny-toxicity.png", "tiny-concepts.png"}
    assert "How to run it" in md and "Partial report" not in md
    progress = md.split("## Progress and cost")[1].split("##")[0]
    n_tasks = len(study.plan(cfg))
    assert f"Computing the {n_tasks} finished tasks took" in progress
    assert "toxicity tasks" in progress and "concept tasks" in progress


def _refuse(*args, **kwargs):
    raise AssertionError("recomputed something that was stored")


def _rerun(out: Path, monkeypatch, *extra: str) -> str:
    """The tiny study rerun into `out` with every fit, calibration and evaluation refused."""
    import torch

    monkeypatch.setattr(study.dsas, "fit", _refuse)
    monkeypatch.setattr(study.dsas, "calibrate_strength", _refuse)
    monkeypatch.setattr("dsas.sweep.evaluate_point", _refuse)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return study.main(["--config", "tiny", "--out", str(out), *extra]).read_text()
    finally:
        torch.set_num_threads(threads)


def _ledger_copy(tiny_run, tmp_path: Path) -> Path:
    """The finished run's report folder as another machine gets it from git: the ledger, not the store."""
    out, _ = tiny_run
    shutil.copytree(out / "study" / "results", tmp_path / "study" / "results")
    return tmp_path


STRIP = re.compile(r"This invocation took [\d.]+ h")


def test_a_rerun_resumes_without_fitting_or_evaluating(tiny_run, monkeypatch):
    """Every fit, calibration and point is stored: a second run only reads them and writes the same numbers (the
    ledger removed, as when a run is killed between a task's last point and its ledger file)."""
    out, md_path = tiny_run
    before = md_path.read_text()
    n_points = _points(out / "store")
    assert n_points > 0
    ledger = sorted((out / "study" / "results").rglob("*.json"))

    def entries():  # what a file says, less who made it when
        return [{k: v for k, v in json.loads(p.read_text()).items() if k != "made"} for p in ledger]

    saved = entries()
    shutil.rmtree(out / "study" / "results")
    _rerun(out, monkeypatch)
    assert entries() == saved  # rewritten from the store, the same
    assert _points(out / "store") == n_points
    assert STRIP.sub("", md_path.read_text()) == STRIP.sub("", before)


def test_the_ledger_alone_rebuilds_the_report_on_another_machine(tiny_run, tmp_path, monkeypatch):
    """Without the store (fits, calibrations, points), the committed per-task results give the same report."""
    out, md_path = tiny_run
    n_tasks = len(study.plan(study.CONFIGS["tiny"]))
    assert len(list((out / "study" / "results").rglob("*.json"))) == n_tasks
    copy = _ledger_copy(tiny_run, tmp_path)
    md = _rerun(copy, monkeypatch)
    assert STRIP.sub("", md) == STRIP.sub("", md_path.read_text())
    assert not (copy / "store" / "steerers").exists()


def test_a_ledger_entry_with_another_key_or_damaged_is_recomputed_not_reused(tiny_run, tmp_path, monkeypatch):
    copy = _ledger_copy(tiny_run, tmp_path)
    entry = next((copy / "study" / "results").rglob("*.json"))
    saved = entry.read_text()
    data = json.loads(saved)
    data["key"] = "0" * 16  # what a change of config, data, model or RESULT_VERSION does to the key
    entry.write_text(json.dumps(data))
    with pytest.raises(AssertionError, match="recomputed"):
        _rerun(copy, monkeypatch)
    entry.write_text(saved[: len(saved) // 2])  # a torn file (not one this script writes: it renames)
    with pytest.raises(AssertionError, match="recomputed"):
        _rerun(copy, monkeypatch)
    entry.write_text(saved)
    _rerun(copy, monkeypatch)


def test_a_model_not_installed_reads_its_results_unverified_and_says_so(tiny_run, tmp_path, monkeypatch):
    _, md_path = tiny_run
    copy = _ledger_copy(tiny_run, tmp_path)

    def missing(name):
        raise study.ModelUnavailableError(f"{name} is not installed")

    monkeypatch.setattr(study, "load", missing)
    md = _rerun(copy, monkeypatch)
    n_tasks = len(study.plan(study.CONFIGS["tiny"]))
    assert f"**tiny not installed here** (tiny is not installed): its {n_tasks} finished task(s)" in md
    assert md.split("## tiny")[1] == md_path.read_text().split("## tiny")[1]


def test_ledger_json_keeps_arrays_dtypes_and_numeric_keys():
    result = {
        "strengths": {0.05: 1.5, 0.1: 2.0},
        "arrays": {0.05: {"toxic": np.array([0.0, 1.0]), "ppl": 12.5}},
        "curve": [(1.0, np.float64(0.25), 0.0)],
        "hits": {1.0: np.array([1.0, 0.0], dtype=np.float32)},
    }
    back = json.loads(json.dumps(study._encode(result)), object_hook=study._decode)
    assert back["strengths"] == {0.05: 1.5, 0.1: 2.0}
    assert back["arrays"][0.05]["toxic"].dtype == np.float64
    np.testing.assert_array_equal(back["arrays"][0.05]["toxic"], [0.0, 1.0])
    assert back["hits"][1.0].dtype == np.float32 and back["curve"] == [[1.0, 0.25, 0.0]]


def test_an_hours_budget_reads_finished_tasks_back_and_lists_the_rest(tiny_run, tmp_path, monkeypatch):
    """Past the budget no task is started, finished ones are still read back, and the report says what is
    missing: a fresh store with no time gets no results and names every task; the finished store is whole."""
    out, _ = tiny_run
    cfg = study.CONFIGS["tiny"]
    tasks = study.plan(cfg)
    # The order of the work: the claims' steerers on toxicity, then the concepts, then the other steerers.
    kinds = [(t.kind == "toxicity", t.steerer in study.PRIORITY) for t in tasks]
    first_concept = kinds.index((False, True))
    assert first_concept > 0 and all(k == (True, True) for k in kinds[:first_concept])
    last_concept = len(kinds) - 1 - kinds[::-1].index((False, True))
    assert all(k == (True, False) for k in kinds[last_concept + 1 :]) and last_concept + 1 < len(kinds)

    fresh = _rerun(tmp_path, monkeypatch, "--hours", "1e-9")  # started nothing past the budget
    whole = _rerun(out, monkeypatch, "--hours", "1e-9")
    assert f"**Partial report: {len(tasks)} of {len(tasks)} tasks are not run yet**" in fresh
    assert "* tiny toxicity: caa, seeds 0, 1" in fresh and "### Claims" not in fresh
    assert "Partial report" not in whole and "### Claims (concepts)" in whole


def test_first_moves_one_models_tasks_ahead_in_plan_order():
    tasks = study.plan(study.CONFIGS["full"])
    moved = study.put_first(tasks, ["smollm2-135m"])
    n = sum(t.model == "smollm2-135m" for t in tasks)
    assert sorted(moved, key=tasks.index) == tasks and 0 < n < len(tasks)
    assert [t.model for t in moved[:n]] == ["smollm2-135m"] * n
    assert moved[:n] == [t for t in tasks if t.model == "smollm2-135m"]
    assert moved[n:] == [t for t in tasks if t.model != "smollm2-135m"]
    both = study.put_first(tasks, ["smollm2-135m"], concepts=True)
    n_con = sum(t.model == "smollm2-135m" and t.kind != "toxicity" for t in tasks)
    assert both[:n_con] == [t for t in tasks if t.model == "smollm2-135m" and t.kind != "toxicity"]
    assert both[n_con:n] == [t for t in tasks if t.model == "smollm2-135m" and t.kind == "toxicity"]
    assert both[n:] == sorted(moved[n:], key=lambda t: t.kind == "toxicity")
    assert study.put_first(tasks, [], concepts=True) == [t for t in tasks if t.kind != "toxicity"] + [
        t for t in tasks if t.kind == "toxicity"
    ]


def test_a_tasks_key_holds_its_part_of_the_configuration_only():
    """A task's ledger key changes with what it computes (sizes, its own grid) and not with which other tasks
    exist (`--models`, another steerer's grid), so a run of one model's tasks writes entries the full study
    reads back; the fit options are in the fit's key, resolved."""
    from dataclasses import replace

    full = study.CONFIGS["full"]
    tox, con = (
        study.Task("smollm2-135m", "toxicity", "caa", 0),
        study.Task("smollm2-135m", "pirate", "caa", 0),
    )
    one_model = replace(full, name="full --models smollm2-135m", models=("smollm2-135m",))
    other_grid = replace(full, concept_grids=full.concept_grids | {"caa+dsas": (1.0,)})
    own_grid = replace(full, concept_grids=full.concept_grids | {"caa": (1.0,)})
    for task in (tox, con):
        assert (
            study.config_key(one_model, task)
            == study.config_key(other_grid, task)
            == study.config_key(full, task)
        )
    assert study.config_key(own_grid, tox) == study.config_key(full, tox)
    assert study.config_key(own_grid, con) != study.config_key(full, con)
    assert study.config_key(replace(full, n_concept=10), con) != study.config_key(full, con)


def test_sets_starts_only_those_sets_tasks(tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        study.main(["--config", "tiny", "--out", str(tmp_path), "--sets", "pirate", "--steerers", "caa"])
    finally:
        torch.set_num_threads(threads)
    results = tmp_path / "study" / "results"
    done = sorted(p.relative_to(results).as_posix() for p in results.rglob("*.json"))
    assert done == ["tiny/pirate/caa-seed0.json", "tiny/pirate/caa-seed1.json"]
    with pytest.raises(SystemExit):
        study.main(["--config", "tiny", "--out", str(tmp_path), "--sets", "toxicity,nope"])
    assert "['nope'] not among" in capsys.readouterr().err


def test_only_the_full_configuration_may_write_docs_study_md(capsys):
    report = study.DOCS_REPORT
    stamp = report.stat().st_mtime_ns if report.exists() else None
    with pytest.raises(SystemExit):
        study.main(["--config", "tiny", "--out", str(ROOT / "docs")])
    assert "full configuration only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--config", "smoke"])  # no --out: it would default to docs/
    assert "needs --out" in capsys.readouterr().err
    assert (report.stat().st_mtime_ns if report.exists() else None) == stamp


def test_bootstrap_intervals():
    rng = np.random.default_rng(1)
    x = (rng.random(200) < 0.3).astype(float)
    est = study.mean_ci(np.stack([x, x]), n_boot=500)
    assert est.low < x.mean() < est.high and 0.05 < est.high - est.low < 0.2
    assert est.seeds == [x.mean(), x.mean()]
    flat = study.mean_ci(np.zeros((3, 50)), n_boot=500)
    assert (flat.value, flat.low, flat.high) == (0.0, 0.0, 0.0)
    f, t = np.array([1.0, 3, 0, 2]), np.array([4.0, 4, 4, 4])
    ratio = study.bootstrap([f, t], study._ratio_of_sums, 500, paired=True)
    assert ratio.value == pytest.approx(6 / 16) and ratio.low <= ratio.value <= ratio.high
    assert "[" in ratio.fmt() and study.Estimate(float("nan"), 0, 0).fmt() == "n/a"


def test_gate_counts_per_prompt_add_up_to_the_sweeps_false_steering_rate():
    """The study resamples prompts with `gate_counts`; summed, they must be the rate `run_sweep` reports."""
    import dsas
    from dsas.sweep import gate_counts, gate_rate

    model, tok = study.tiny_model()
    sets = dsas.load_prompt_sets("toxicity", n=8, seed=0)
    st = dsas.fit(model, tok, sets, method="caa", gate="dsas", acc_threshold=0.5, progress=False)
    texts = sets.eval["neutral"][:6]
    counts = gate_counts(st, model, tok, texts, 2.0)
    fired, total = (sum(c) for c in zip(*counts, strict=True))
    assert len(counts) == 6 and total > 0 and all(0 <= f <= t for f, t in counts)
    assert fired / total == pytest.approx(gate_rate(st, model, tok, texts, 2.0), abs=1e-6)
    assert 0 < fired < total  # a gate that is neither always on nor always off, or the check proves little
    assert gate_counts(None, model, tok, texts, 2.0) == [(0, 0)] * 6
