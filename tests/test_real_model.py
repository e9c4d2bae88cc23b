"""The engine's guarantees on the real embedded model (SmolLM2-135M-Instruct), plus the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

import dsas
from dsas.sweep import load_points

pytestmark = pytest.mark.slow

TOXIC = ["You are such a stupid", "Shut up, you worthless"]
NEUTRAL = ["The river flows through the", "In 1850 the city council"]


@pytest.fixture(scope="module")
def fitted(smollm2):
    model, tok = smollm2
    sets = dsas.load_prompt_sets("toxicity", n=16, seed=0)
    return dsas.fit(model, tok, sets, method="caa", gate="dsas", progress=False)


def test_regulator_on_real_model(smollm2, fitted):
    model, _ = smollm2
    rows = fitted.report()
    assert len(rows) == 2 * model.config.num_hidden_layers
    accs = [r["accuracy"] for r in rows]
    # Toxic vs neutral text is linearly separable in most residual increments of a real LM.
    assert sum(a >= 0.75 for a in accs) >= len(accs) // 2
    # Pooled gates (the default scope for text): every site from the first accurate regulator up is steered; the
    # accurate ones feed the pool with their own regulator, the others borrow it.
    active = [r["site"] for r in rows if r["accuracy"] >= 0.75]
    names = [r["site"] for r in rows]
    assert fitted.steered == names[names.index(active[0]) :]
    assert fitted.config["options"]["dsas"]["scope"] == "below+prefix"
    for r in rows:
        g = fitted.gates[r["site"]]
        if r["site"] in fitted.steered:
            assert g.kind == ("sigmoid" if r["site"] in active else "pooled") and g.scope == "below+prefix"


def test_strength_zero_and_gate_selectivity(smollm2, fitted):
    model, tok = smollm2
    enc = tok(TOXIC + NEUTRAL, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**enc).logits
        with fitted.apply(model, strength=0.0):
            same = model(**enc).logits
        with fitted.apply(model, strength=1.0, trace=True) as tr:
            model(**enc)
    assert torch.equal(ref, same)
    g = tr.site_mean()
    mask = enc["attention_mask"].bool()
    tox = g[:2][mask[:2]].mean()
    neu = g[2:][mask[2:]].mean()
    assert tox > neu + 0.1, (float(tox), float(neu))


def test_generation_guarantees(smollm2, fitted, tmp_path):
    model, tok = smollm2
    enc = tok(TOXIC + NEUTRAL, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    with fitted.apply(model, strength=2.0, trace=True) as tr:
        cached = model.generate(**enc, use_cache=True, **kw)
    with fitted.apply(model, strength=2.0):
        uncached = model.generate(**enc, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    one = tok([NEUTRAL[1]], return_tensors="pt")
    with fitted.apply(model, strength=2.0, trace=True) as t1:
        alone = model.generate(**one, **kw)
    assert torch.equal(cached[3, -alone.shape[1] :], alone[0])
    k = fitted.steered[5]
    real = tr.scales[k][3][tr.mask[3].bool()]
    torch.testing.assert_close(real, t1.scales[k][0], rtol=1e-4, atol=1e-4)
    fitted.save(tmp_path / "st")
    back = dsas.Steerer.load(tmp_path / "st", model=model)
    with back.apply(model, strength=2.0):
        again = model.generate(**enc, **kw)
    assert torch.equal(again, cached)


def test_cli_fit_generate_sweep_report(smollm2, smollm2_cache_dir, tmp_path, monkeypatch):
    """The README's CLI on the real model: fit -> generate -> explain -> calibrate -> sweep (tiny) -> report."""
    from typer.testing import CliRunner

    from dsas.cli import app

    monkeypatch.setenv("DSAS_CACHE", str(smollm2_cache_dir))  # reuse the session's converted model
    r = CliRunner()
    res = r.invoke(app, ["fit", "--out", str(tmp_path / "st"), "--n", "12", "--option", "pca_dim=4"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "st" / "dsas_config.json").read_text())
    assert cfg["config"]["options"]["dsas"]["pca_dim"] == 4
    res = r.invoke(
        app, ["generate", "--steerer", str(tmp_path / "st"), "-p", "You are such a", "--max-new-tokens", "6"]
    )
    assert res.exit_code == 0 and "steered (strength 4)" in res.output, res.output
    res = r.invoke(
        app, ["explain", "--steerer", str(tmp_path / "st"), "-p", "You idiot", "--max-new-tokens", "4"]
    )
    assert res.exit_code == 0 and "max scale" in res.output, res.output
    (tmp_path / "neutral.txt").write_text(
        "The river runs through the old city.\n\nBread is made from flour.\n"
    )
    cal = [
        "calibrate",
        "--steerer",
        str(tmp_path / "st"),
        "--texts",
        str(tmp_path / "neutral.txt"),
        "--iters",
        "1",
    ]
    res = r.invoke(app, cal)
    assert res.exit_code == 0 and "budget +5%" in res.output, res.output
    res = r.invoke(
        app,
        [
            "sweep",
            "--out",
            str(tmp_path / "run"),
            "--steerer",
            str(tmp_path / "st"),
            "--strengths",
            "1",
            "--n-prompts",
            "3",
            "--n-wiki",
            "3",
            "--n-mc",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = load_points(tmp_path / "run")
    assert [row["key"] for row in rows] == ["unsteered@0", "st@1"]
    res = r.invoke(app, ["report", str(tmp_path / "run")])
    assert res.exit_code == 0 and (tmp_path / "run" / "report.html").stat().st_size > 10_000
