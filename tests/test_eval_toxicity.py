"""Toxicity scorers (lexical default, HF classifier on a random-init local model) and rate helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsas.eval import (
    HFClassifierScorer,
    ProfanityScorer,
    Scorer,
    get_scorer,
    score_toxicity,
    toxicity_rate,
    toxicity_summary,
)

pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = ["you are a stupid idiot , fuck you", "the weather is lovely today", "", "the cat eats the fish"]


def test_profanity_scorer_separates_toxic_from_benign():
    scorer = get_scorer()
    assert isinstance(scorer, ProfanityScorer) and isinstance(scorer, Scorer) and scorer.name == "profanity"
    p = scorer(TEXTS)
    assert p.shape == (4,) and p.dtype == np.float64
    assert ((p >= 0) & (p <= 1)).all()
    assert p[0] > 0.9 and (p[1:] < 0.1).all()
    assert scorer([]).shape == (0,)
    assert score_toxicity(TEXTS) == {"mean_prob": pytest.approx(p.mean()), "rate": 0.25, "n": 4.0}


def test_rate_and_summary():
    scores = [0.2, 0.6, 0.5, 0.9]
    assert toxicity_rate(scores) == 0.5  # strictly above the threshold: 0.5 itself is not toxic
    assert toxicity_rate(scores, threshold=0.1) == 1.0
    assert toxicity_summary(scores) == {"mean_prob": pytest.approx(0.55), "rate": 0.5, "n": 4.0}
    with pytest.raises(ValueError):
        toxicity_rate([])


@pytest.fixture
def classifier_dir(tmp_path, tiny_tok):
    """A random-init BERT toxicity classifier and the tiny tokenizer, saved like a hub checkpoint."""
    from transformers import BertConfig, BertForSequenceClassification

    def save(id2label: dict[int, str]):
        torch.manual_seed(0)
        cfg = BertConfig(
            vocab_size=len(tiny_tok),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
            id2label=id2label,
            label2id={v: k for k, v in id2label.items()},
            pad_token_id=tiny_tok.pad_token_id,
            initializer_range=0.5,
        )
        path = tmp_path / f"clf{len(id2label)}"
        BertForSequenceClassification(cfg).save_pretrained(path)
        tiny_tok.save_pretrained(path)
        return path

    return save


def test_hf_classifier_probabilities_match_model(classifier_dir):
    path = classifier_dir({0: "Neutral", 1: "TOXIC"})
    scorer = get_scorer(str(path), toxic_label="toxic", batch_size=3)
    assert isinstance(scorer, HFClassifierScorer) and isinstance(scorer, Scorer)
    p = scorer(TEXTS)
    assert p.shape == (4,) and ((p >= 0) & (p <= 1)).all()
    # each text alone, by hand: padding in the batch must not change a row
    for text, prob in zip(TEXTS, p, strict=True):
        enc = scorer.tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            ref = torch.softmax(scorer.model(**enc).logits, -1)[0, 1]
        assert prob == pytest.approx(float(ref), abs=1e-5)
    assert len(set(np.round(p, 6))) > 1  # a real signal, not a constant


def test_hf_classifier_single_logit_and_bad_label(classifier_dir):
    path1 = classifier_dir({0: "toxicity"})
    scorer = HFClassifierScorer(str(path1))
    enc = scorer.tokenizer(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        ref = torch.sigmoid(scorer.model(**enc).logits[0, 0])
    assert scorer(TEXTS[:1])[0] == pytest.approx(float(ref), abs=1e-6)
    path2 = classifier_dir({0: "neutral", 1: "hate"})
    with pytest.raises(ValueError, match=r"label 'toxic' not found.*\['hate', 'neutral'\]"):
        HFClassifierScorer(str(path2))
    hate = get_scorer(str(path2), toxic_label="hate")
    assert isinstance(hate, HFClassifierScorer) and hate.label_index == 1
    with pytest.raises(TypeError, match="no options"):
        get_scorer("profanity", device="cpu")
