"""Concept-steering metrics: how often a concept word appears, and how often the gate fires where it should not."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def concept_pattern(word: str | Sequence[str]) -> re.Pattern[str]:
    """Whole-word, case-insensitive pattern. One word matches itself and its regular plural ("pear"/"pears",
    "peach"/"peaches", "berry"/"berries"; "appear" or "pearl" do not match "pear"). A list of words is a style's
    markers: any one of them, each exactly as written (no plural forms, so the pirate's "ye" does not match
    "yes")."""
    if isinstance(word, str):
        word = word.strip()
        if not word:
            raise ValueError("concept word must be non-empty")
        forms = {re.escape(word) + r"(?:e?s)?"}
        if len(word) > 1 and word[-1].lower() == "y" and word[-2].lower() not in "aeiou":
            forms.add(re.escape(word[:-1]) + "ies")
    else:
        words = [w.strip() if isinstance(w, str) else w for w in word]
        if not words or not all(isinstance(w, str) and w for w in words):
            raise ValueError(f"concept markers must be a non-empty list of non-empty words, got {word!r}")
        forms = {re.escape(w) for w in words}
    return re.compile(rf"(?<!\w)(?:{'|'.join(sorted(forms))})(?!\w)", re.IGNORECASE)


def concept_words(meta: Mapping[str, Any]) -> str | list[str] | None:
    """What a concept set's continuations are scored for: its `markers` (a style's words: any of them counts)
    when the set names them, else its `concept_word` (a topic's word and its plural); None when it has neither.
    A style is carried by several words (the pirate's "ye", "aye", "matey"), and steering that writes the voice
    without one chosen word has still written the voice."""
    markers = meta.get("markers")
    if markers:
        return [str(m) for m in markers]
    word = meta.get("concept_word")
    return str(word) if word else None


def concept_rate(texts: Sequence[str], word: str | Sequence[str]) -> float:
    """Fraction of texts that mention `word` (or, given a list, any of those markers) at least once (see
    `concept_pattern` for what counts)."""
    texts = list(texts)
    if not texts:
        raise ValueError("concept_rate of zero texts is undefined")
    pattern = concept_pattern(word)
    return sum(bool(pattern.search(t)) for t in texts) / len(texts)


def false_steer_rate(
    scales: Mapping[str, torch.Tensor], mask: torch.Tensor | None = None, threshold: float = 0.5
) -> float:
    """Fraction of (site, real token) pairs whose scale is strictly above `threshold`.

    Meant for control prompts, where every firing is a false positive. `scales` is a trace's
    `{site: Tensor[B, T]}`; `mask` (`[B, T]`, nonzero = real token, e.g. the attention mask extended over the
    generated tokens) drops padding. A trace records lam * g, so to ask "is the gate above 0.5" at strength lam
    pass `threshold=0.5 * lam`.
    """
    if not scales:
        raise ValueError("no sites in scales")
    fired = 0
    total = 0
    for site, s in scales.items():
        if s.dim() != 2:
            raise ValueError(f"scales[{site!r}] must be [batch, tokens], got shape {tuple(s.shape)}")
        if mask is None:
            keep = torch.ones_like(s, dtype=torch.bool)
        else:
            if mask.shape != s.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} != scales[{site!r}] shape {tuple(s.shape)}")
            keep = mask.to(device=s.device) != 0
        fired += int(((s.float() > threshold) & keep).sum())
        total += int(keep.sum())
    if total == 0:
        raise ValueError("the mask keeps no token")
    return fired / total
