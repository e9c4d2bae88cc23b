"""Multiple-choice: length-normalised log-likelihood scoring, Wikipedia question building, MMLU CSV loading."""

from __future__ import annotations

import collections
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dsas.eval import (
    MCQuestion,
    WikiRecord,
    build_wiki_mc,
    load_mmlu_csv,
    mask_title,
    mc_accuracy,
    score_choices,
)

pytestmark = pytest.mark.usefixtures("single_thread")


class CopyLM(torch.nn.Module):
    """A rigged causal LM: every token already seen in the context gets logit 6, every other token 0.

    So it 'knows' exactly the answers spelled out in the prompt. Causal by construction (cumulative sum over
    positions), so right padding cannot reach the scored positions."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids, attention_mask=None, **kwargs):
        seen = torch.nn.functional.one_hot(input_ids, self.vocab_size).cumsum(dim=1) > 0
        return SimpleNamespace(logits=6.0 * seen.float())


# answer words appear in the prompt, the distractors do not
COPY_QUESTIONS = [
    MCQuestion("passage : the cat eats . question : who eats ? answer :", ("cat", "moon", "car", "river"), 0),
    MCQuestion(
        "passage : a dog saw the sun . question : what ? answer :", ("milk", "sun", "road", "wine"), 1
    ),
    MCQuestion(
        "passage : the queen and the king . question : who ? answer :", ("fish", "tree", "queen", "cow"), 2
    ),
    MCQuestion("passage : green apple . question : what ? answer :", ("bread", "horse", "star", "apple"), 3),
    MCQuestion(
        "passage : old red house . question : what ? answer :", ("blue car", "red house", "new sky"), 1
    ),
]


def test_rigged_model_gets_everything_right(tiny_tok):
    model = CopyLM(len(tiny_tok))
    acc, preds = mc_accuracy(
        model, tiny_tok, COPY_QUESTIONS, batch_size=3, progress=False, return_predictions=True
    )
    assert acc == 1.0
    assert preds == [0, 1, 2, 3, 1]
    wrong = [MCQuestion(q.prompt, q.choices, (q.answer + 1) % len(q.choices)) for q in COPY_QUESTIONS]
    assert mc_accuracy(model, tiny_tok, wrong, progress=False) == 0.0


def reference_logprob(model, tok, prompt: str, choice: str) -> tuple[float, int]:
    ctx = tok(prompt)["input_ids"]
    ids = tok(f"{prompt} {choice}")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    total = sum(float(logp[t - 1, ids[t]]) for t in range(len(ctx), len(ids)))
    return total, len(ids) - len(ctx)


@pytest.mark.parametrize("normalize", ["chars", "tokens", "none", "calibrated"])
def test_scores_match_unbatched_reference(tiny_lm, tiny_tok, normalize):
    got = score_choices(tiny_lm, tiny_tok, COPY_QUESTIONS, batch_size=4, normalize=normalize, progress=False)
    for q, scores in zip(COPY_QUESTIONS, got, strict=True):
        for choice, s in zip(q.choices, scores, strict=True):
            total, n_tok = reference_logprob(tiny_lm, tiny_tok, q.prompt, choice)
            if normalize == "calibrated":
                expected = total - reference_logprob(tiny_lm, tiny_tok, "Answer:", choice)[0]
            else:
                expected = total / {"chars": len(choice), "tokens": n_tok, "none": 1}[normalize]
            assert s == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_length_normalisation_changes_the_winner(tiny_tok):
    # With the copy model a seen token costs ~2.7 nats and an unseen one ~8.7: the 4-word answer spelled out in
    # the prompt loses on the raw sum (-10.9 vs -8.7) to a 1-word unseen option, and wins per character.
    model = CopyLM(len(tiny_tok))
    q = MCQuestion(
        "the man saw the cat , the dog , the bird , the fish , the cow and the horse . answer :",
        ("cat dog bird horse", "moon"),
        0,
    )
    raw = score_choices(model, tiny_tok, [q], normalize="none", progress=False)[0]
    assert raw[1] > raw[0]
    assert mc_accuracy(model, tiny_tok, [q], normalize="chars", progress=False) == 1.0
    assert mc_accuracy(model, tiny_tok, [q], normalize="none", progress=False) == 0.0


def test_question_validation():
    with pytest.raises(ValueError, match="out of range"):
        MCQuestion("q", ("a", "b"), 2)
    with pytest.raises(ValueError, match="at least two"):
        MCQuestion("q", ("a",), 0)


def test_mask_title():
    assert (
        mask_title("The tomato is a plant. Tomatoes are red.", "Tomato") == "The ___ is a plant. ___ are red."
    )
    assert (
        mask_title("An opinion poll, or poll, is a survey.", "Opinion poll") == "An ___, or ___, is a survey."
    )
    assert mask_title("Mercury is the smallest planet.", "Mercury (planet)") == "___ is the smallest planet."
    assert mask_title("The African economy of Africa", "Africa") == "The ___ economy of ___"
    assert mask_title("Anchovies: an anchovy", "Anchovy") == "___: an ___"
    assert mask_title("Ali met Talib", "Ali") == "___ met Talib"  # short titles: whole word only


SYNTH = [
    WikiRecord(
        f"Thing{i}",
        f"Kind {i} of object",
        f"Thing{i} is object number {i}. It is made of wood, which makes Thing{i} a useful object.",
        f"t{i % 3}",
    )
    for i in range(30)
]


def test_build_wiki_mc_structure_on_synthetic_records():
    qs = build_wiki_mc(40, seed=3, n_choices=4, records=SYNTH)
    assert qs == build_wiki_mc(40, seed=3, n_choices=4, records=SYNTH)
    assert qs != build_wiki_mc(40, seed=4, n_choices=4, records=SYNTH)
    assert collections.Counter(q.kind for q in qs) == {"wiki-title": 20, "wiki-description": 20}
    by_title = {r.title: r for r in SYNTH}
    for q in qs:
        assert len(q.choices) == 4 and len({c.lower() for c in q.choices}) == 4
        if q.kind == "wiki-title":
            title = q.choices[q.answer]
            assert "___ is object number" in q.prompt and title not in q.prompt
            assert by_title[title].extract.replace(title, "___") in q.prompt
            # distractors share the answer's topic
            assert {by_title[c].topic for c in q.choices} == {by_title[title].topic}
        else:
            found = re.search(r'"(.+)"', q.prompt)
            assert found is not None
            title = found.group(1)
            assert q.choices[q.answer] == by_title[title].description
    two = build_wiki_mc(10, seed=0, n_choices=2, kinds=("title",), records=SYNTH)
    assert all(len(q.choices) == 2 and q.kind == "wiki-title" for q in two)


def test_build_wiki_mc_on_real_wikipedia():
    qs = build_wiki_mc(200, seed=0)
    assert len(qs) == 200 and qs == build_wiki_mc(200, seed=0)
    positions = collections.Counter(q.answer for q in qs)
    assert set(positions) == {0, 1, 2, 3} and min(positions.values()) >= 25
    for q in qs:
        assert len({c.lower() for c in q.choices}) == 4
        if q.kind == "wiki-title":
            base = re.sub(r"\s*\([^)]*\)\s*$", "", q.choices[q.answer])
            assert not re.search(rf"(?<!\w){re.escape(base)}(?!\w)", q.prompt, re.IGNORECASE), q.prompt


def test_load_mmlu_csv(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "college_physics_test.csv").write_text(
        '"What is 1, 2?",one,"two, three",four,five,B\nWhy?,a,b,c,d,d\n', encoding="utf-8"
    )
    (tmp_path / "anatomy_dev.csv").write_text("Bone?,x,y,z,w,A\n", encoding="utf-8")
    qs = load_mmlu_csv(tmp_path)
    assert [q.answer for q in qs] == [
        0,
        1,
        3,
    ]  # files sorted: anatomy_dev.csv, then sub/college_physics_test.csv
    assert qs[0].kind == "mmlu-anatomy" and qs[0].choices == ("x", "y", "z", "w")
    assert qs[1].choices == ("one", "two, three", "four", "five")
    assert qs[1].prompt == (
        "The following are questions (with answers) about college physics.\n\nQuestion: What is 1, 2?\nAnswer:"
    )
    assert len(load_mmlu_csv(tmp_path / "anatomy_dev.csv")) == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("Q,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.csv:1: answer must be"):
        load_mmlu_csv(bad)
    bad.write_text("Q,a,b,c,A\n", encoding="utf-8")
    with pytest.raises(ValueError, match="6 columns"):
        load_mmlu_csv(bad)


def test_mc_accuracy_batch_invariant_on_real_transformer(tiny_lm, tiny_tok):
    a = score_choices(tiny_lm, tiny_tok, COPY_QUESTIONS, batch_size=1, progress=False)
    b = score_choices(tiny_lm, tiny_tok, COPY_QUESTIONS, batch_size=16, progress=False)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5)
