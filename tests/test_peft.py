"""PEFT: a steerer fitted on a base model steers its LoRA-wrapped PeftModel and the merged model, and the other
way round (site names differ only by PEFT's `base_model.model.` prefix)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model

import dsas

peft = pytest.importorskip("peft")

PROMPTS = ["you stupid idiot and the", "a city by the river"]


@pytest.fixture(scope="module")
def models(tiny_tok):
    """base, the same base wrapped with an untrained LoRA (B = 0: same function), and that LoRA merged."""
    base = make_tiny_model("llama", len(tiny_tok))
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    wrapped = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    merged = peft.get_peft_model(copy.deepcopy(base), cfg).merge_and_unload().eval()
    return {"base": base, "peft": wrapped, "merged": merged}


def _logits(model, steerer, tok, strength=4.0):
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), steerer.apply(model, strength):
        return model(**enc).logits


@pytest.mark.parametrize("fitted_on", ["base", "peft"])
def test_steerer_moves_between_base_peft_and_merged(
    models, fitted_on, tiny_tok, engine_sets, tmp_path, single_thread
):
    st = dsas.fit(models[fitted_on], tiny_tok, engine_sets, gate="dsas", acc_threshold=0.5, progress=False)
    prefix = "base_model.model." if fitted_on == "peft" else ""
    assert st.site_names[0] == f"{prefix}model.layers.0.self_attn"
    st.save(tmp_path / "s")
    want = None
    for name in ("base", "peft", "merged"):
        loaded = dsas.Steerer.load(tmp_path / "s", model=models[name])
        got = _logits(models[name], loaded, tiny_tok)
        if want is None:
            want = got
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    enc = tiny_tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert not torch.allclose(want, models["base"](**enc).logits, atol=1e-3), "steers nothing"


def test_lora_wrapping_keeps_the_weight_signature(models):
    from dsas.sites import weight_signature

    sigs = {k: weight_signature(m) for k, m in models.items()}
    assert sigs["base"] == sigs["peft"] == sigs["merged"]
    assert not any("lora" in k for k in sigs["peft"]["values"])
