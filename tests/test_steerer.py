"""`Steerer`: the model check at load and apply, with the opt-out for fine-tuned variants."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

import dsas


def test_other_weights_are_refused_unless_told_it_is_a_fine_tune(
    tiny_tok, engine_sets, tmp_path, single_thread
):
    base = make_tiny_model("llama", len(tiny_tok), seed=0)
    tuned = make_tiny_model("llama", len(tiny_tok), seed=1)  # same config, other weights
    st = dsas.fit(base, tiny_tok, engine_sets, gate="none", progress=False)
    st.save(tmp_path / "st")
    with pytest.raises(ValueError, match="different model"), st.apply(tuned, 1.0):
        pass
    with pytest.raises(ValueError, match="different model"):
        dsas.Steerer.load(tmp_path / "st", model=tuned)
    back = dsas.Steerer.load(tmp_path / "st", model=tuned, check_weights=False)
    enc = tiny_tok(["the city river"], return_tensors="pt")
    with torch.no_grad():
        plain = tuned(**enc).logits
        with back.apply(tuned, 4.0, check_weights=False):
            assert not torch.equal(tuned(**enc).logits, plain)
