"""Prompt sets: the three sets DSAS is fitted on (source, target, control) plus held-out evaluation prompts.

Built-in sets ship as JSONL files beside this module (written for this project, not copied from a dataset);
users bring their own as JSONL, CSV or a directory of text files. See `load_prompt_sets`.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["BUILTIN_PROMPT_SETS", "CONCEPT_SETS", "PromptSets", "list_prompt_sets", "load_prompt_sets"]

BUILTIN_PROMPT_SETS = ("toxicity", "concept", "animal", "pirate")
CONCEPT_SETS = ("concept", "animal", "pirate")
"""The concept-induction sets: meta `concept_word`, `eval_in` / `eval_out` (held-out in- and out-of-category
splits), `paired: true`."""
_FIT_SPLITS = ("source", "target", "control")
_EVAL_PREFIX = "eval_"


@dataclass
class PromptSets:
    """The sets a steerer is fitted on.

    source:  inputs that show the behaviour to remove (e.g. toxic text); positive class of the DSAS regulator.
    target:  inputs that show the behaviour wanted; with `source`, they define the steering map.
    control: neutral inputs steering must leave untouched; negative class of the regulator.
    eval:    optional held-out prompts by name (e.g. {"toxic": [...], "neutral": [...]}), never used for fitting.
    meta:    optional facts about the set (e.g. {"concept_word": "pear"}, or {"paired": True} when line i of
             target rewrites line i of source, which `subsample` then keeps aligned).
    """

    source: list[str]
    target: list[str]
    control: list[str] = field(default_factory=list)
    eval: dict[str, list[str]] = field(default_factory=dict)
    name: str = "custom"
    meta: dict[str, Any] = field(default_factory=dict)

    def validate(self, need_control: bool = True, min_size: int = 2) -> None:
        """Raise a ValueError naming the set and the fix if a set is empty, too small or not all strings."""
        splits = {"source": self.source, "target": self.target}
        if need_control:
            splits["control"] = self.control
        for split, texts in splits.items():
            if not isinstance(texts, list | tuple) or any(not isinstance(t, str) for t in texts):
                raise ValueError(f"PromptSets.{split} must be a list of strings.")
            if len(texts) < min_size:
                raise ValueError(
                    f"PromptSets.{split} has {len(texts)} prompt(s); at least {min_size} are needed "
                    f"(the paper uses 32 per set). Add more {split} prompts."
                )
            if any(not t.strip() for t in texts):
                raise ValueError(f"PromptSets.{split} contains an empty prompt; remove it.")

    def subsample(self, n: int, seed: int = 0) -> PromptSets:
        """At most `n` prompts per fitting set, drawn with a seeded shuffle (a seed resamples the sets)."""
        rng = random.Random(seed)

        def pick(xs: list[str]) -> list[str]:
            xs = list(xs)
            rng.shuffle(xs)
            return xs[:n]

        if self.meta.get("paired") and len(self.source) == len(self.target):
            # One permutation for both, so the i-th target still rewrites the i-th source.
            order = list(range(len(self.source)))
            rng.shuffle(order)
            source = [self.source[i] for i in order[:n]]
            target = [self.target[i] for i in order[:n]]
        else:
            source, target = pick(self.source), pick(self.target)
        return PromptSets(source, target, pick(self.control), dict(self.eval), self.name, dict(self.meta))

    def with_label_noise(self, p: float, seed: int = 0) -> PromptSets:
        """A copy in which round(p * min(|source|, |control|)) source prompts and as many control prompts trade
        places: symmetric noise on the regulator's labels (source = 1, control = 0), for robustness studies
        (`scripts/robustness.py`). p = 0.5 leaves the labels uninformative. Target and eval splits are kept."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"label noise p must be a fraction in [0, 1], got {p}.")
        k = round(p * min(len(self.source), len(self.control)))
        rng = random.Random(seed)
        source, control = list(self.source), list(self.control)
        for i, j in zip(rng.sample(range(len(source)), k), rng.sample(range(len(control)), k), strict=True):
            source[i], control[j] = control[j], source[i]
        meta = {**self.meta, "label_noise": p}
        return PromptSets(source, list(self.target), control, dict(self.eval), self.name, meta)


def list_prompt_sets() -> dict[str, str]:
    """Built-in prompt set names with their one-line description."""
    return {name: str(_read_builtin(name).meta.get("description", "")) for name in BUILTIN_PROMPT_SETS}


def load_prompt_sets(name_or_path: str | Path, n: int | None = None, seed: int = 0) -> PromptSets:
    """Load a built-in prompt set by name, or a user's set from a file or directory.

    Accepted:
      * a built-in name: see `list_prompt_sets()` ("toxicity"; the concept sets "concept" (pear / fruit),
        "animal" (horse / animals) and "pirate" (a pirate voice, marker "matey", in spoken lines));
      * a `.jsonl` file, one object per line: {"split": "source", "text": "..."}; an optional line
        {"meta": {...}} fills `PromptSets.meta`;
      * a `.csv` file with `split` and `text` columns (other columns are ignored);
      * a directory with `source.txt`, `target.txt`, `control.txt` (one prompt per line), optional
        `eval_<name>.txt` files and an optional `meta.json`.
    Splits are source, target, control (all required) and eval_<name> (held out, stored in
    `PromptSets.eval[<name>]`). `n` keeps at most n prompts per fitting set, drawn with `seed`; eval splits
    are kept whole. Raises ValueError naming the problem and the fix.
    """
    if n is not None and n < 1:
        raise ValueError(f"n must be a positive number of prompts per set (or None for all), got {n}.")
    sets = _load(name_or_path)
    return sets.subsample(n, seed) if n is not None else sets


def _load(name_or_path: str | Path) -> PromptSets:
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_PROMPT_SETS:
        return _read_builtin(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _read_dir(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(_read_text(path), origin=str(path), name=path.stem)
        if suffix == ".csv":
            return _read_csv(path)
        raise ValueError(
            f"Cannot read prompt sets from '{path}': unsupported file type '{suffix}'. Use a .jsonl file "
            '(lines {"split": ..., "text": ...}), a .csv file with split,text columns, or a directory with '
            "source.txt, target.txt and control.txt."
        )
    raise ValueError(
        f"Unknown prompt set '{name_or_path}': it is not a built-in name ({', '.join(BUILTIN_PROMPT_SETS)}) "
        "and no such file or directory exists. Pass a built-in name, or the path of a .jsonl file, a .csv "
        "file or a directory of source.txt / target.txt / control.txt."
    )


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    """The file's text; a file that is not UTF-8 fails with its name and position, not a bare codec error."""
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at position {err.start}). Save it as "
            "UTF-8 (in a spreadsheet: 'CSV UTF-8')."
        ) from err


def _read_builtin(name: str) -> PromptSets:
    text = resources.files(__name__).joinpath(f"{name}.jsonl").read_text(encoding="utf-8")
    return _read_jsonl(text, origin=f"built-in set '{name}'", name=name)


def _read_jsonl(text: str, origin: str, name: str) -> PromptSets:
    rows: list[tuple[str, str, str]] = []
    meta: dict[str, Any] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{origin}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{where} is not valid JSON ({err.msg}). Each line must be one JSON object."
            ) from err
        if isinstance(obj, dict) and set(obj) == {"meta"} and isinstance(obj["meta"], dict):
            meta.update(obj["meta"])
            continue
        if (
            not isinstance(obj, dict)
            or not isinstance(obj.get("split"), str)
            or not isinstance(obj.get("text"), str)
        ):
            raise ValueError(
                f'{where} must be an object with string fields "split" and "text", e.g. '
                '{"split": "source", "text": "..."}.'
            )
        rows.append((obj["split"], obj["text"], where))
    return _assemble(rows, origin, name, meta)


def _read_csv(path: Path) -> PromptSets:
    # utf-8-sig: spreadsheets often write a byte-order mark that would otherwise glue itself to "split".
    text = _read_text(path, encoding="utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
        columns = {c.strip().lower(): i for i, c in enumerate(header)}
        if "split" not in columns or "text" not in columns:
            raise ValueError(
                f"{path} needs a header row with 'split' and 'text' columns (found: {sorted(columns) or 'none'}). "
                "Write e.g. 'split,text' as the first line."
            )
        si, ti = columns["split"], columns["text"]
        rows = []
        for cells in reader:
            where = f"{path}, line {reader.line_num}"
            if not any(c.strip() for c in cells):
                continue
            if len(cells) > len(header):
                if ti != len(header) - 1:
                    raise ValueError(
                        f"{where} has {len(cells)} fields but the header has {len(header)}: a text holds a comma. "
                        'Quote the text ("like, this"), or make text the last column.'
                    )
                # text is the last column: an unquoted comma belongs to the text.
                cells = [*cells[:ti], ",".join(cells[ti:])]
            cells += [""] * (len(header) - len(cells))  # a short row has empty trailing cells
            rows.append((cells[si].strip(), cells[ti], where))
    except csv.Error as err:
        raise ValueError(f"{path}, line {reader.line_num}: not valid CSV ({err}). Check its quotes.") from err
    return _assemble(rows, str(path), path.stem, {})


def _read_dir(path: Path) -> PromptSets:
    rows: list[tuple[str, str, str]] = []
    for file in sorted(path.glob("*.txt")):
        split = file.stem
        if split not in _FIT_SPLITS and not split.startswith(_EVAL_PREFIX):
            continue  # a README.txt or notes beside the sets is fine
        lines = _read_text(file).splitlines()
        texts = [t for t in lines if t.strip()]
        if not texts:
            raise ValueError(f"{file} is empty. Put one prompt per line in it, or delete the file.")
        rows.extend((split, t, f"{file}, line {i}") for i, t in enumerate(lines, start=1) if t.strip())
    meta: dict[str, Any] = {}
    meta_file = path / "meta.json"
    if meta_file.is_file():
        try:
            loaded = json.loads(_read_text(meta_file))
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_file} is not valid JSON ({err.msg}, line {err.lineno}).") from err
        if not isinstance(loaded, dict):
            raise ValueError(f'{meta_file} must hold a JSON object, e.g. {{"concept_word": "pear"}}.')
        meta = loaded
    return _assemble(rows, str(path), path.name, meta, files=True)


def _assemble(
    rows: list[tuple[str, str, str]], origin: str, name: str, meta: dict[str, Any], files: bool = False
) -> PromptSets:
    """Group (split, text, where) rows into PromptSets, rejecting unknown splits and missing fitting sets."""
    if not rows:
        raise ValueError(
            f"{origin} holds no prompts. Add source, target and control prompts "
            f"(built-in sets to start from: {', '.join(BUILTIN_PROMPT_SETS)})."
        )
    fit: dict[str, list[str]] = {s: [] for s in _FIT_SPLITS}
    evals: dict[str, list[str]] = {}
    for split, raw, where in rows:
        text = raw.strip()
        if not text:
            raise ValueError(f"{where} has an empty text. Remove the line or fill it in.")
        if split in fit:
            fit[split].append(text)
        elif split.startswith(_EVAL_PREFIX) and len(split) > len(_EVAL_PREFIX):
            evals.setdefault(split[len(_EVAL_PREFIX) :], []).append(text)
        else:
            raise ValueError(
                f"{where} has split '{split}'. Splits are source, target, control, or eval_<name> for "
                "held-out prompts (e.g. eval_toxic)."
            )
    missing = [s for s in _FIT_SPLITS if not fit[s]]
    if missing:
        raise ValueError(
            f"{origin} has no {' / '.join(missing)} prompts. A prompt set needs all of source (behaviour to "
            "remove), target (behaviour wanted) and control (neutral text the gate learns to leave alone); "
            f"add {' and '.join(f'{s}.txt' for s in missing) if files else 'the missing split(s)'}. "
            f"Built-in sets: {', '.join(BUILTIN_PROMPT_SETS)}."
        )
    return PromptSets(fit["source"], fit["target"], fit["control"], evals, name, meta)
