"""Artifacts saved by dsas 0.1.0 (tests/fixtures/legacy, made by make_legacy.py before the one-rule refactor) load
with this version and give bit-identical outputs: logits at three strengths, per-row generation, a diffusion
sample."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from fixtures.make_legacy import LM_CASES, PROMPTS
from safetensors.torch import load_file

import dsas

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


@pytest.mark.parametrize("name", sorted(LM_CASES))
def test_legacy_lm_artifact_reproduces_outputs(name, left_tok, single_thread):
    arch = LM_CASES[name][0]
    model = make_tiny_model(arch, len(left_tok))
    st = dsas.Steerer.load(LEGACY / name, model=model)
    want = load_file(str(LEGACY / name / "expected.safetensors"))
    enc = left_tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**enc).logits
        for lam in (0.0, 1.0, 4.0):
            with st.apply(model, lam):
                got = model(**enc).logits
            assert torch.equal(got, want[f"logits@{lam}"]), (name, lam)
        assert not torch.equal(want["logits@4.0"], base), "fixture steers nothing"
        with st.apply(model, [1.0, 2.0, 3.0]):
            gen = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, want["generate@rows"])


def test_legacy_diffusion_artifact_reproduces_sample(single_thread):
    pytest.importorskip("diffusers")
    from dsas.diffusion import load_digits_model

    digits = load_digits_model(dtype=torch.float32)
    st = dsas.Steerer.load(LEGACY / "digits_caa_dsas", model=digits.unet)
    want = load_file(str(LEGACY / "digits_caa_dsas" / "expected.safetensors"))
    with st.apply(digits.unet, 3.0):
        got = digits.sample([3, 3, 0, 5], seed=0, steps=4)
    assert torch.equal(got, want["sample@3"])
