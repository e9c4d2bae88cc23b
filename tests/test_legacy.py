"""Artifacts saved by dsas 0.1.0 (tests/fixtures/legacy, made by make_legacy.py before the one-rule refactor) load
with this version and give the same outputs: logits at three strengths, per-row generation, a diffusion sample.

The stored outputs were bit-identical on the machine that made them; another CPU sums floats in another order
(the unsteered tiny models' logits differ by up to 5e-6 across machines, measured), so tensors are compared at
1e-5 and strength 0 is compared bit for bit with this machine's unsteered model. Generated tokens stay exact."""

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
        with st.apply(model, 0.0):
            assert torch.equal(model(**enc).logits, base)
        for lam in (0.0, 1.0, 4.0):
            with st.apply(model, lam):
                got = model(**enc).logits
            torch.testing.assert_close(
                got, want[f"logits@{lam}"], rtol=1e-5, atol=1e-5, msg=f"{name} @ {lam}"
            )
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
    torch.testing.assert_close(got, want["sample@3"], rtol=1e-5, atol=1e-5)
    assert (got - digits.sample([3, 3, 0, 5], seed=0, steps=4)).abs().max() > 0.1, (
        "the fixture steers nothing"
    )
