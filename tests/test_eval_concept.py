"""concept_rate (whole-word concept mentions) and false_steer_rate (gate firing on control tokens)."""

from __future__ import annotations

import pytest
import torch

from dsas.eval import concept_rate, concept_words, false_steer_rate


def test_concept_rate_whole_word_with_plurals():
    texts = [
        "I ate a pear.",
        "Pears are sweet",
        "PEAR!",
        "a pear's skin",
        "it will appear soon",  # inside a word
        "a pearl necklace",
        "a spear",
        "no fruit here",
    ]
    assert concept_rate(texts, "pear") == pytest.approx(4 / 8)
    assert concept_rate(["Berries!", "a berry", "berryish"], "berry") == pytest.approx(2 / 3)
    assert concept_rate(["two peaches", "peach", "impeach"], "peach") == pytest.approx(2 / 3)
    assert concept_rate(["banana split"], "Banana") == 1.0
    with pytest.raises(ValueError):
        concept_rate([], "pear")
    with pytest.raises(ValueError):
        concept_rate(["x"], " ")


def test_concept_rate_counts_any_marker_exactly_as_written():
    """A style's markers: any one counts, each whole-word and case-insensitive, with no plural forms (the
    pirate's "ye" must not count every "yes")."""
    texts = ["Aye, matey", "yes sir", "Ye be lost", "yers", "mateys ahoy", "a yeti", "plain text"]
    assert concept_rate(texts, ["matey", "ye", "aye"]) == pytest.approx(2 / 7)
    assert concept_rate(texts, ["matey", "mateys", "ye", "aye"]) == pytest.approx(3 / 7)
    assert concept_rate(texts, ("ahoy",)) == pytest.approx(1 / 7)
    for bad in ([], ["ye", " "], ["ye", 3]):
        with pytest.raises(ValueError, match="markers"):
            concept_rate(texts, bad)


def test_concept_words_prefers_a_sets_markers():
    assert concept_words({"concept_word": "pear"}) == "pear"
    assert concept_words({"concept_word": "matey", "markers": ["matey", "ye"]}) == ["matey", "ye"]
    assert concept_words({"paired": True}) is None


def test_false_steer_rate_counts_real_tokens_above_threshold():
    scales = {
        "model.layers.0": torch.tensor([[0.1, 0.9, 0.7], [0.6, 0.5, 0.9]]),
        "model.layers.1": torch.tensor([[0.0, 0.2, 0.51], [0.4, 0.3, 1.0]]),
    }
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # last token of row 1 is padding
    # real tokens: site0 -> 0.1 0.9 0.7 0.6 0.5 (3 above 0.5, 0.5 itself not); site1 -> 0 .2 .51 .4 .3 (1)
    assert false_steer_rate(scales, mask) == pytest.approx(4 / 10)
    assert false_steer_rate(scales) == pytest.approx(6 / 12)
    assert false_steer_rate(scales, mask, threshold=0.0) == pytest.approx(9 / 10)
    assert false_steer_rate({"s": torch.tensor([[2.0, 0.9]], dtype=torch.bfloat16)}, threshold=1.0) == 0.5


def test_false_steer_rate_rejects_bad_shapes():
    s = {"a": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="mask shape"):
        false_steer_rate(s, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        false_steer_rate({"a": torch.zeros(2, 3, 1)})
    with pytest.raises(ValueError, match="keeps no token"):
        false_steer_rate(s, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no sites"):
        false_steer_rate({})
