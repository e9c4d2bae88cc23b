"""Multiple-choice utility (MMLU stand-in): questions built from offline Wikipedia, or real MMLU CSV files.

Scoring is cloze style, as lm-evaluation-harness does for continuation tasks: the prompt does not list the
options; each option is scored as the continuation " <choice>" of the prompt, by its summed log-likelihood divided
by its length in characters (lm-eval's `acc_norm`), and the highest wins. Characters, not tokens, so that the
normalisation does not depend on the tokenizer and scores stay comparable across models. Cloze scoring is the usual
choice for small models, since letter scoring ("A/B/C/D") needs a model that has learned the answer format.
`normalize="calibrated"` (PMI against a bare "Answer:" prompt) is the better-separating option for very small
models; see `score_choices`.
"""

from __future__ import annotations

import csv
import random
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import torch
from tqdm.auto import tqdm

from dsas.eval.common import length_sorted_batches, pad_batch, pad_id, token_logprobs
from dsas.eval.perplexity import WikiRecord, load_wiki_records
from dsas.torchutil import model_device

Normalize = Literal["chars", "tokens", "none", "calibrated"]
MASK = "___"
NULL_PROMPT = "Answer:"


@dataclass(frozen=True)
class MCQuestion:
    """One question: `prompt` (ends just before the answer), the option texts, the index of the right one."""

    prompt: str
    choices: tuple[str, ...]
    answer: int
    kind: str = ""

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError("a multiple-choice question needs at least two choices")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer index {self.answer} out of range for {len(self.choices)} choices")


# ---------------------------------------------------------------- Wikipedia questions

_STOP = {"with", "from", "that", "this", "into", "over", "upon", "under", "list", "their", "which", "about"}


def mask_title(text: str, title: str, mask: str = MASK) -> str:
    """Replace the article's own title in `text` by `mask`, so a question cannot be solved by string matching.

    Masked terms: the title without a trailing parenthetical qualifier ("Mercury (planet)" -> "Mercury") and each
    of its words of 4+ characters (bar a few function words), case-insensitively, at word starts. A term of 4+
    characters also masks the words it begins ("Africa" -> "African", "Algebra" -> "algebraic"), since derived
    forms give the answer away as surely; shorter terms mask only themselves and their plural. A final
    consonant + "y" also covers "-ies" ("Anchovy" -> "anchovies"). Occurrences inside a word ("preadolescence")
    are kept. Runs of masks collapse to one."""
    base = re.sub(r"\s*\([^)]*\)\s*$", "", title).strip() or title.strip()
    terms = {base, *(w for w in re.findall(r"[\w'-]+", base) if len(w) >= 4 and w.lower() not in _STOP)}
    terms.discard("")
    if not terms:
        return text
    forms = []
    for term in sorted(terms, key=len, reverse=True):
        esc = re.escape(term)
        forms.append(esc + (r"\w*" if len(term) >= 4 else r"(?:e?s)?"))
        if len(term) >= 2 and term[-1].lower() == "y" and term[-2].lower() not in "aeiou":
            forms.append(re.escape(term[:-1]) + "ies")
    masked = re.sub(rf"(?<!\w)(?:{'|'.join(forms)})(?!\w)", mask, text, flags=re.IGNORECASE)
    return re.sub(rf"{re.escape(mask)}(?:\s+{re.escape(mask)})+", mask, masked)


def _truncate_sentences(text: str, max_chars: int) -> str:
    """Whole leading sentences up to `max_chars` (at least one; an over-long first sentence is cut at a word)."""
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", text.strip())
    out = sentences[0]
    for s in sentences[1:]:
        if len(out) + 1 + len(s) > max_chars:
            break
        out = f"{out} {s}"
    if len(out) > max_chars:
        out = out[:max_chars].rsplit(" ", 1)[0] + " ..."
    return out


def _title_option(r: WikiRecord) -> str:
    return r.title


def _description_option(r: WikiRecord) -> str:
    return mask_title(r.description, r.title)


_OPTION_TEXT: dict[str, Callable[[WikiRecord], str]] = {
    "title": _title_option,
    "description": _description_option,
}


def _pick_distractors(
    rng: random.Random,
    record: WikiRecord,
    pool: Sequence[WikiRecord],
    by_topic: dict[str, list[WikiRecord]],
    key: Callable[[WikiRecord], str],
    k: int,
    same_topic: bool,
) -> list[WikiRecord]:
    """`k` records whose option text (via `key`) differs from the answer's and from each other."""
    taken = {key(record).lower()}
    out: list[WikiRecord] = []
    sources = [by_topic.get(record.topic, []), pool] if same_topic else [pool]
    for source in sources:
        candidates = list(source)
        rng.shuffle(candidates)
        for cand in candidates:
            text = key(cand).lower()
            if cand.title == record.title or text in taken or not text:
                continue
            taken.add(text)
            out.append(cand)
            if len(out) == k:
                return out
    raise ValueError(f"not enough distinct records to build {k} distractors")


def build_wiki_mc(
    n: int = 200,
    seed: int = 0,
    n_choices: int = 4,
    *,
    kinds: Sequence[str] = ("title", "description"),
    same_topic: bool = True,
    max_passage_chars: int = 300,
    records: Sequence[WikiRecord] | None = None,
) -> list[MCQuestion]:
    """`n` seeded multiple-choice questions from the offline Wikipedia records.

    Kinds (alternated, so both are equally represented):
      * "title": a lead passage (first sentences, <= `max_passage_chars`, the title masked by `mask_title`) ->
        which article title it belongs to;
      * "description": an article title -> its short Wikidata description (e.g. "Painting by Georges Seurat");
        every option has its own title masked.
    Distractors come from other articles of the same topic when `same_topic` (harder, less guessable from the
    domain alone), topping up from all articles; options are distinct case-insensitively. The answer's position
    is uniform over the `n_choices` slots. `records` overrides the Wikipedia source (for tests or other corpora).
    """
    if n_choices < 2:
        raise ValueError("n_choices must be >= 2")
    unknown = set(kinds) - {"title", "description"}
    if unknown or not kinds:
        raise ValueError(f"kinds must be drawn from 'title', 'description'; got {list(kinds)}")
    all_records = list(records) if records is not None else load_wiki_records()
    pools = {
        "title": [r for r in all_records if len(r.extract) >= 80 and r.title],
        # a description left without content by its own mask ("___ of ___") would be an empty option
        "description": [
            r
            for r in all_records
            if r.title and re.search(r"[^\W\d_]{3}", mask_title(r.description, r.title).replace(MASK, ""))
        ],
    }
    rng = random.Random(seed)
    per_kind = {k: n // len(kinds) + (1 if i < n % len(kinds) else 0) for i, k in enumerate(kinds)}
    chosen: dict[str, list[WikiRecord]] = {}
    for kind, count in per_kind.items():
        if count > len(pools[kind]):
            raise ValueError(
                f"asked for {count} {kind!r} questions but only {len(pools[kind])} records qualify"
            )
        chosen[kind] = rng.sample(pools[kind], count)

    topics: dict[str, dict[str, list[WikiRecord]]] = {}
    for kind in kinds:
        topics[kind] = defaultdict(list)
        for r in pools[kind]:
            topics[kind][r.topic].append(r)

    questions: list[MCQuestion] = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        record = chosen[kind][i // len(kinds)]
        key = _OPTION_TEXT[kind]
        if kind == "title":
            passage = _truncate_sentences(mask_title(record.extract, record.title), max_passage_chars)
            prompt = f"Passage: {passage}\nQuestion: Which Wikipedia article is this passage from?\nAnswer:"
        else:
            prompt = f'Question: Which description fits the Wikipedia article "{record.title}"?\nAnswer:'
        distractors = _pick_distractors(
            rng, record, pools[kind], topics[kind], key, n_choices - 1, same_topic
        )
        options = [key(d) for d in distractors]
        answer = rng.randrange(n_choices)
        options.insert(answer, key(record))
        questions.append(
            MCQuestion(prompt=prompt, choices=tuple(options), answer=answer, kind=f"wiki-{kind}")
        )
    return questions


# ---------------------------------------------------------------- MMLU CSV


def _subject_from_file(path: Path) -> str:
    stem = re.sub(r"_(test|val|dev|train)$", "", path.stem)
    return stem.replace("_", " ")


def load_mmlu_csv(path_or_dir: str | Path) -> list[MCQuestion]:
    """Questions from MMLU CSV files (no header; columns question, A, B, C, D, answer letter).

    A directory is searched recursively for `*.csv` (sorted, so the order is stable). The prompt follows
    lm-eval's continuation format: "The following are questions (with answers) about <subject>.\\n\\nQuestion:
    <q>\\nAnswer:", with the subject read from the file name ("college_physics_test.csv")."""
    root = Path(path_or_dir)
    files = sorted(root.rglob("*.csv")) if root.is_dir() else [root]
    if not files:
        raise FileNotFoundError(f"no .csv files under {root}")
    questions: list[MCQuestion] = []
    for file in files:
        subject = _subject_from_file(file)
        with file.open(encoding="utf-8", newline="") as fh:
            for line_no, row in enumerate(csv.reader(fh), start=1):
                if not row:
                    continue
                if len(row) != 6:
                    raise ValueError(f"{file}:{line_no}: expected 6 columns (question, A, B, C, D, answer)")
                letter = row[5].strip().upper()
                if letter not in ("A", "B", "C", "D"):
                    raise ValueError(f"{file}:{line_no}: answer must be one of A, B, C, D, got {row[5]!r}")
                prompt = (
                    f"The following are questions (with answers) about {subject}.\n\n"
                    f"Question: {row[0].strip()}\nAnswer:"
                )
                choices = tuple(c.strip() for c in row[1:5])
                questions.append(MCQuestion(prompt, choices, "ABCD".index(letter), kind=f"mmlu-{subject}"))
    return questions


# ---------------------------------------------------------------- scoring


def _encode_pair(tokenizer: Any, prompt: str, choice: str) -> tuple[list[int], int]:
    """Token ids of prompt + " " + choice and the number of context tokens.

    Encoded as a whole and split where the prompt's own encoding ends (lm-eval's approach), so tokens merge at
    the boundary as they would in running text; falls back to separate encodings if the prefix does not match."""
    ctx = list(tokenizer(prompt)["input_ids"])
    whole = list(tokenizer(f"{prompt} {choice}")["input_ids"])
    if len(whole) > len(ctx) and whole[: len(ctx)] == ctx:
        return whole, len(ctx)
    cont = list(tokenizer(f" {choice}", add_special_tokens=False)["input_ids"])
    return ctx + cont, len(ctx)


@torch.no_grad()
def score_choices(
    model: Any,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    *,
    batch_size: int = 16,
    normalize: Normalize = "chars",
    max_tokens: int = 1024,
    progress: bool = True,
) -> list[np.ndarray]:
    """Per question, the score of every choice, from the summed log-likelihood of " <choice>" given the prompt:

      * "chars" (default): divided by the choice's character count (lm-eval `acc_norm`);
      * "tokens": divided by its token count;
      * "none": the raw sum;
      * "calibrated": minus the same choice's log-likelihood after the bare prompt "Answer:" (lm-eval
        `acc_mutual_info`, a PMI score). It cancels each option's prior frequency, which dominates small models'
        choices.

    All (question, choice) sequences are batched together, grouped by length and right-padded; contexts longer
    than `max_tokens` minus the choice are cut from the left."""
    if normalize not in ("chars", "tokens", "none", "calibrated"):
        raise ValueError(f"normalize must be 'chars', 'tokens', 'none' or 'calibrated', got {normalize!r}")
    device = model_device(model)
    # (question, choice, is_null_context, ids, n_context_tokens)
    items: list[tuple[int, int, bool, list[int], int]] = []
    contexts = [False, True] if normalize == "calibrated" else [False]
    for qi, q in enumerate(questions):
        for ci, choice in enumerate(q.choices):
            for null in contexts:
                ids, n_ctx = _encode_pair(tokenizer, NULL_PROMPT if null else q.prompt, choice)
                if n_ctx < 1:
                    raise ValueError(
                        "the prompt encodes to zero tokens; the first choice token has no context"
                    )
                if len(ids) > max_tokens:
                    cut = min(len(ids) - max_tokens, n_ctx - 1)
                    ids, n_ctx = ids[cut:], n_ctx - cut
                items.append((qi, ci, null, ids, n_ctx))
    scores = [np.zeros(len(q.choices)) for q in questions]
    pad = pad_id(tokenizer)
    batches = list(length_sorted_batches([len(it[3]) for it in items], batch_size))
    for batch in tqdm(batches, desc="multiple choice", disable=not progress, leave=False):
        rows = [items[j] for j in batch]
        input_ids, mask = pad_batch([r[3] for r in rows], pad, side="right", device=device)
        logp = token_logprobs(model, input_ids, mask).cpu()
        for b, (qi, ci, null, ids, n_ctx) in enumerate(rows):
            total = float(logp[b, n_ctx - 1 : len(ids) - 1].double().sum())
            if normalize == "chars":
                total /= max(len(questions[qi].choices[ci]), 1)
            elif normalize == "tokens":
                total /= len(ids) - n_ctx
            scores[qi][ci] += -total if null else total
    return scores


@overload
def mc_accuracy(
    model: Any,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    *,
    batch_size: int = ...,
    normalize: Normalize = ...,
    progress: bool = ...,
    return_predictions: Literal[False] = ...,
) -> float: ...
@overload
def mc_accuracy(
    model: Any,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    *,
    batch_size: int = ...,
    normalize: Normalize = ...,
    progress: bool = ...,
    return_predictions: Literal[True],
) -> tuple[float, list[int]]: ...
def mc_accuracy(
    model: Any,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    *,
    batch_size: int = 16,
    normalize: Normalize = "chars",
    progress: bool = True,
    return_predictions: bool = False,
) -> float | tuple[float, list[int]]:
    """Fraction of questions whose highest-scoring choice (see `score_choices`) is the answer.

    Ties go to the earliest choice. With `return_predictions=True` also returns the chosen index per question."""
    questions = list(questions)
    if not questions:
        raise ValueError("mc_accuracy of zero questions is undefined")
    scores = score_choices(
        model, tokenizer, questions, batch_size=batch_size, normalize=normalize, progress=progress
    )
    preds = [int(np.argmax(s)) for s in scores]
    acc = float(np.mean([p == q.answer for p, q in zip(preds, questions, strict=True)]))
    return (acc, preds) if return_predictions else acc
