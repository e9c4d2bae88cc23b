"""`dsas demo-diffusion`: matched-effect tables (dsas.diffusion.sweep) and the whole quick run with its report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dsas.diffusion.demo import quick_config, run_diffusion_demo
from dsas.diffusion.sweep import at_matched, matched_table


def _pt(steerer: str, s: float, effect: float, sim: float, dblur: float = 0.0) -> dict:
    return {"steerer": steerer, "strength": s, "p_target_concept": effect, "sim_other": sim,
            "dblur_other": dblur, "concept_score_other": 1.0}  # fmt: skip


def test_at_matched_interpolates_along_the_most_selective_front() -> None:
    curve = [_pt("a", 0, 0.0, 1.0, 0.0), _pt("a", 1, 0.2, 0.9, 0.1), _pt("a", 2, 0.6, 0.7, 0.3)]
    key = "p_target_concept"
    assert at_matched(curve, key, 0.4) == pytest.approx(0.8)  # halfway between strengths 1 and 2
    assert at_matched(curve, key, 0.4, read="dblur_other") == pytest.approx(0.2)  # same spot, another column
    assert at_matched(curve, key, 0.0) == pytest.approx(1.0)
    assert math.isnan(at_matched(curve, key, 0.7))  # no strength reaches it
    # A point with less effect and less similarity than another is never the best way to reach a level.
    dominated = [*curve, _pt("a", 3, 0.5, 0.6, 9.0)]
    assert at_matched(dominated, key, 0.4) == at_matched(curve, key, 0.4)
    assert at_matched(dominated, key, 0.4, read="dblur_other") == pytest.approx(0.2)


def test_matched_table_has_one_row_per_steerer() -> None:
    pts = [
        _pt("caa", 0, 0.0, 1.0),
        _pt("caa", 1, 0.5, 0.5),
        _pt("caa+dsas", 0, 0.0, 1.0),
        _pt("caa+dsas", 4, 0.5, 0.9),
    ]
    rows = matched_table(pts, "p_target_concept", (0.25,))
    assert [r["steerer"] for r in rows] == ["caa", "caa+dsas"]
    assert list(rows[0]) == ["steerer", "sim_other@0.25", "dblur_other@0.25", "concept_score_other@0.25",
                             "max_p_target_concept"]  # fmt: skip
    assert rows[0]["sim_other@0.25"] == pytest.approx(0.75) and rows[1]["sim_other@0.25"] == pytest.approx(
        0.95
    )


def test_demo_quick_run_shows_selectivity(tmp_path: Path) -> None:
    """The digits demo's core claim on a small run: at matched concept effect (P(8) on digit-3 prompts),
    non-concept images stay closer to their unsteered twins with DSAS than with vanilla CAA."""
    res = run_diffusion_demo(tmp_path, quick_config(effects=("class", "blur")))
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 8 and "<script" not in html
    assert json.loads((tmp_path / "results.json").read_text())["effects"].keys() == {"class", "blur"}
    assert (tmp_path / "steerers" / "class" / "caa+dsas" / "dsas_config.json").exists()
    for eff in res["effects"].values():
        assert eff["strength0_bit_identical"]
        assert eff["gates"]["gate_concept"] > eff["gates"]["gate_other"] + 0.2
    cls = {r["steerer"]: r for r in res["effects"]["class"]["matched"]}
    print(
        "\nclass effect, non-concept SSIM @ P(8)=0.25:",
        {k: round(v["sim_other@0.25"], 3) for k, v in cls.items()},
    )
    assert cls["caa+dsas"]["sim_other@0.25"] > cls["caa"]["sim_other@0.25"] + 0.05
    blur_m = {r["steerer"]: r for r in res["effects"]["blur"]["matched"]}
    assert blur_m["caa+dsas"]["sim_other@0.04"] > blur_m["caa"]["sim_other@0.04"]
