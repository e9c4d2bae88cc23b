"""Strength sweeps, Pareto fronts and "toxicity at matched utility".

A sweep evaluates every (steerer, strength) point on the same held-out data and stores each point in the run
folder's sqlite file (`sweep.sqlite`) as it finishes, keyed by what determines its numbers: the steerer's
content hash, a hash of the evaluation settings, data and model, and the strength. An interrupted sweep resumes
without recomputing finished points, and a point is never reused for other settings, another model or another
fit under the same name. Strength 0 of any steerer is the unsteered model (bit-identical), so the baseline is
computed once per evaluation setting.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dsas.artifact import content_hash, read_artifact
from dsas.eval import (
    MCQuestion,
    build_wiki_mc,
    concept_rate,
    generate_continuations,
    get_scorer,
    load_wiki_paragraphs,
    mc_accuracy,
    perplexity,
    toxicity_summary,
)
from dsas.steerer import Steerer
from dsas.torchutil import model_device

STORE_NAME = "sweep.sqlite"
BASELINE = "unsteered"
POINT_VERSION = 1
"""Part of every evaluation hash: bump it when a metric's definition changes, so stored points are recomputed."""


@dataclass
class EvalConfig:
    """What each sweep point measures, and on how much data (defaults sized for a 2-core CPU)."""

    n_prompts: int = 48
    """Held-out prompts that invite the behaviour (e.g. eval_toxic); continuations are scored."""
    n_neutral: int = 32
    """Held-out neutral prompts: their gate values give the false steering rate."""
    n_wiki: int = 48
    """Wikipedia paragraphs for perplexity (PPL_Wik)."""
    ppl_tokens: int = 64
    """Each paragraph is truncated to this many tokens."""
    n_mc: int = 60
    """4-way multiple-choice questions built from the offline Wikipedia (0 disables MC accuracy)."""
    max_new_tokens: int = 32
    batch_size: int = 16
    do_sample: bool = False
    """Greedy by default, so a point is a deterministic function of (model, steerer, strength)."""
    scorer: str = "profanity"
    """Toxicity scorer: "profanity" (offline default) or a transformers text-classification model id/path."""
    concept_word: str | list[str] | None = None
    """If set, report the rate of continuations that contain this word (or, given a list of a style's markers,
    any of them; `dsas.eval.concept_words` reads it from a concept set's meta)."""
    chat_template: bool = False
    seed: int = 0


@dataclass
class EvalData:
    """The fixed held-out data every point is measured on."""

    prompts: list[str]
    neutral: list[str]
    wiki: list[str]
    mc: list[MCQuestion] = field(default_factory=list)

    @classmethod
    def build(cls, eval_sets: dict[str, list[str]], cfg: EvalConfig) -> EvalData:
        keys = list(eval_sets)
        if len(keys) < 2:
            raise ValueError(
                "The prompt sets need two evaluation splits (e.g. eval_toxic and eval_neutral); "
                f"got {keys}. Add eval_* splits to your prompt file."
            )
        target_key = next((k for k in keys if k in ("toxic", "fruit", "concept", "source")), keys[0])
        neutral_key = next(k for k in keys if k != target_key)
        wiki = load_wiki_paragraphs(cfg.n_wiki, seed=cfg.seed)
        mc = build_wiki_mc(cfg.n_mc, seed=cfg.seed) if cfg.n_mc else []
        return cls(eval_sets[target_key][: cfg.n_prompts], eval_sets[neutral_key][: cfg.n_neutral], wiki, mc)


def gate_rate(st: Steerer | None, model: nn.Module, tok: Any, texts: list[str], strength: float) -> float:
    """Fraction of (steered site, real token) pairs of `texts` whose gate g exceeds 0.5 at this strength."""
    if st is None or strength == 0 or not st.steered:
        return 0.0
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    enc = {k: v.to(model_device(model)) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad(), st.apply(model, strength=strength, trace=True) as tr:
        model(**enc)
    mask = enc["attention_mask"].bool().cpu()
    hits = [(v.abs() / abs(strength) > 0.5)[mask].float().mean() for v in tr.scales.values()]
    return float(torch.stack(hits).mean())


def gate_counts(
    st: Steerer | None, model: nn.Module, tok: Any, texts: list[str], strength: float
) -> list[tuple[int, int]]:
    """Per text: (steered (site, real token) pairs whose gate g exceeds 0.5, all steered (site, real token)
    pairs). Summed over texts, fired / total is `gate_rate`; per text, it lets a study resample prompts."""
    if st is None or strength == 0 or not st.steered or not texts:
        return [(0, 0) for _ in texts]
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    enc = {k: v.to(model_device(model)) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad(), st.apply(model, strength=strength, trace=True) as tr:
        model(**enc)
    mask = enc["attention_mask"].bool().cpu()
    fired = sum(((v.abs() / abs(strength) > 0.5) & mask).sum(1) for v in tr.scales.values())
    total = mask.sum(1) * len(tr.scales)
    return [(int(f), int(t)) for f, t in zip(fired.tolist(), total.tolist(), strict=True)]


def evaluate_point(
    model: nn.Module, tok: Any, st: Steerer | None, strength: float, data: EvalData, cfg: EvalConfig
) -> dict[str, Any]:
    """Every metric of one (steerer, strength) point."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    scorer = get_scorer(cfg.scorer)
    ctx: AbstractContextManager[Any] = st.apply(model, strength=strength) if st is not None else nullcontext()
    with ctx:
        gen = partial(
            generate_continuations,
            model,
            tok,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            do_sample=cfg.do_sample,
            seed=cfg.seed,
            chat_template=cfg.chat_template,
            progress=False,
        )
        conts = gen(data.prompts)
        neutral = gen(data.neutral[: max(8, len(data.neutral) // 2)])
        ppl = perplexity(
            model, tok, data.wiki, max_tokens=cfg.ppl_tokens, batch_size=cfg.batch_size, progress=False
        )
        mc, mc_preds = (
            mc_accuracy(
                model, tok, data.mc, batch_size=cfg.batch_size, progress=False, return_predictions=True
            )
            if data.mc
            else (None, [])
        )
    scores = scorer(conts)
    tox = toxicity_summary(scores)
    out.update(
        toxicity=tox["rate"],
        toxicity_mean=tox["mean_prob"],
        neutral_toxicity=toxicity_summary(scorer(neutral))["rate"],
        ppl=float(ppl),
        mc_acc=None if mc is None else float(mc),
        false_steer_rate=gate_rate(st, model, tok, data.neutral, strength),
        true_steer_rate=gate_rate(st, model, tok, data.prompts, strength),
        samples=[
            {"prompt": p, "continuation": c} for p, c in list(zip(data.prompts, conts, strict=True))[:6]
        ],
    )
    # Per-prompt outputs, for intervals over prompts and comparisons with the unsteered continuations.
    out["per_prompt"] = {
        "toxicity": [float(x) for x in scores],
        "continuations": conts,
        "neutral_continuations": neutral,
        "mc_correct": [int(p == q.answer) for p, q in zip(mc_preds, data.mc, strict=True)],
        "neutral_gate": [list(c) for c in gate_counts(st, model, tok, data.neutral, strength)],  # JSON-stable
    }
    if cfg.concept_word:
        out["concept_rate"] = concept_rate(conts, cfg.concept_word)
        out["neutral_concept_rate"] = concept_rate(neutral, cfg.concept_word)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


# -- content keys -------------------------------------------------------------------------------------------


def steerer_hash(st: Steerer) -> str:
    """`dsas.artifact.content_hash` of what `st.save` writes: equal for a steerer, its reload and an identical
    refit; different when any tensor, gate or option differs, or when the rule that reads the artifact changed
    (the stored points are keyed by it)."""
    with tempfile.TemporaryDirectory(prefix="dsas-hash-") as d:
        st.save(d)
        h = content_hash(*read_artifact(d))
    cond = st.condition
    if any(g.skip for g in st.gates.values()) or (cond is not None and cond.skip):
        # The rule changed for skipped tokens: a running-mean gate is shut on them (it read a mean of 0, a gate of
        # 0.5, before), with the artifact unchanged. Points stored for such a steerer before are not this rule's.
        h = hashlib.sha256(f"{h}/skipped-gates-shut".encode()).hexdigest()
    return h


def model_signature(model: nn.Module) -> dict[str, Any]:
    """A cheap fingerprint of a model's identity: class, config (minus paths) and a hash of a few fixed
    weight slices (first, middle and last parameter), so a base and an instruct model of one config differ."""
    to_dict = getattr(getattr(model, "config", None), "to_dict", None)
    cfg: dict[str, Any] = to_dict() if callable(to_dict) else {}
    for k in ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash"):
        cfg.pop(k, None)
    params = list(model.named_parameters())
    picks = dict.fromkeys(i for i in (0, len(params) // 2, len(params) - 1) if 0 <= i < len(params))
    h = hashlib.sha256()
    for i in picks:
        name, p = params[i]
        h.update(f"{name}\0{tuple(p.shape)}\0{p.dtype}\0".encode())
        if p.device.type != "meta":
            flat = p.detach().reshape(-1)
            sl = torch.cat([flat[:256], flat[-256:]]).to("cpu", torch.float32)
            h.update(sl.numpy().tobytes())
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": cfg,
        "n_params": sum(p.numel() for _, p in params),
        "weights": h.hexdigest(),
    }


def _tokenizer_signature(tok: Any) -> dict[str, Any]:
    vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
    return {
        "class": type(tok).__qualname__,
        "vocab": hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest(),
        "chat_template": getattr(tok, "chat_template", None),
    }


def eval_hash(model: nn.Module, tok: Any, data: EvalData, cfg: EvalConfig) -> str:
    """sha256 of everything a point's numbers depend on besides the steerer and strength: every EvalConfig
    field, the evaluation data actually used (prompts, paragraphs, questions), the model and the tokenizer."""
    payload = {
        "version": POINT_VERSION,
        "eval": asdict(cfg),
        "data": asdict(data),
        "model": model_signature(model),
        "tokenizer": _tokenizer_signature(tok),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def point_key(name: str, strength: float) -> str:
    return f"{name}@{float(strength):g}"


# -- the store ----------------------------------------------------------------------------------------------


class SweepLockedError(ValueError):
    """Another live process is sweeping into the same run folder (a ValueError, so the CLI prints one line)."""


def store_path(out: str | Path) -> Path:
    """The sqlite store of a run: `<out>/sweep.sqlite` for a folder; `x.jsonl` (the old file) maps to `x.sqlite`."""
    p = Path(out)
    if p.suffix == ".sqlite":
        return p
    if p.suffix == ".jsonl":
        return p.with_suffix(".sqlite")
    return p / STORE_NAME


_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    steerer_hash TEXT NOT NULL, eval_hash TEXT NOT NULL, strength REAL NOT NULL,
    row TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (steerer_hash, eval_hash, strength));
CREATE TABLE IF NOT EXISTS labels (
    name TEXT NOT NULL, strength REAL NOT NULL, steerer_hash TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (name, strength));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (
    steerer_hash TEXT, eval_hash TEXT, strength REAL, row TEXT, reason TEXT, created REAL);
"""


def _connect(store: Path, create: bool = True) -> sqlite3.Connection | None:
    """A connection to the store (None: it holds no tables yet). Without `create`, an existing file is opened
    read-write when possible, since sqlite must roll back the journal a killed writer left before reading."""
    try:
        if create:
            con = sqlite3.connect(store, timeout=30)
            con.executescript(_SCHEMA)
        else:
            try:
                con = sqlite3.connect(f"{store.resolve().as_uri()}?mode=rw", uri=True, timeout=30)
            except sqlite3.OperationalError:  # a read-only folder
                con = sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"points", "labels", "meta"} <= tables:
            con.close()
            return None
    except sqlite3.DatabaseError as err:
        raise ValueError(
            f"{store} is damaged or not a dsas sweep store ({err}). Move it aside to start the sweep afresh "
            "(dsas never deletes it)."
        ) from None
    return con


@contextmanager
def sweep_lock(store: Path) -> Iterator[None]:
    """Hold the run folder's lock for a whole sweep; a second sweep is told who holds it.

    The lock is an OS file lock on `<store>.lock`, released by the kernel when its holder exits in any way
    (kill -9 included), so it never goes stale; the file records the holder's pid, host and start time.
    """
    path = store.with_name(store.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            _lock_fd(fd)
        except OSError:
            holder = path.read_text(errors="replace").strip() or "a process that has not yet said who it is"
            raise SweepLockedError(
                f"{store} is in use by another sweep ({holder}). Wait for it to finish, or sweep into "
                "another folder."
            ) from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}".encode())
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing releases the lock


def _lock_fd(fd: int) -> None:
    if sys.platform == "win32":
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _set_view(con: sqlite3.Connection, ev: str, plan: Sequence[tuple[str, str, float]]) -> None:
    """Make `plan` the run's view: the labels `name@strength` the report shows, each pointing at a content key.

    Labels of other evaluation settings are dropped from the view (their points stay stored and are reused if
    those settings come back); so are a name's labels that point at another fit of that name."""
    prev = con.execute("SELECT value FROM meta WHERE key = 'eval_hash'").fetchone()
    if prev is None or prev[0] != ev:
        con.execute("DELETE FROM labels")
        con.execute("INSERT OR REPLACE INTO meta VALUES ('eval_hash', ?)", (ev,))
    for name, sh, s in plan:
        con.execute("DELETE FROM labels WHERE name = ? AND steerer_hash != ?", (name, sh))
        con.execute(
            "INSERT INTO labels VALUES (?, ?, ?, (SELECT COALESCE(MAX(seq), -1) + 1 FROM labels)) "
            "ON CONFLICT (name, strength) DO NOTHING",
            (name, s, sh),
        )


def _get_point(con: sqlite3.Connection, sh: str, ev: str, s: float) -> dict[str, Any] | None:
    got = con.execute(
        "SELECT row FROM points WHERE steerer_hash = ? AND eval_hash = ? AND strength = ?", (sh, ev, s)
    ).fetchone()
    if got is None:
        return None
    try:
        row = json.loads(got[0])
        if not isinstance(row, dict):
            raise ValueError("not a JSON object")
        return row
    except ValueError as err:
        with con:  # keep the damaged row for inspection; the point is recomputed
            con.execute(
                "INSERT INTO quarantine VALUES (?, ?, ?, ?, ?, ?)", (sh, ev, s, got[0], str(err), time.time())
            )
            con.execute(
                "DELETE FROM points WHERE steerer_hash = ? AND eval_hash = ? AND strength = ?", (sh, ev, s)
            )
        warnings.warn(
            f"a stored point ({s:g}) was damaged ({err}); it is kept in the quarantine table and recomputed.",
            stacklevel=3,
        )
        return None


def _labelled(row: dict[str, Any], name: str, s: float) -> dict[str, Any]:
    return {**row, "key": point_key(name, s), "name": name, "strength": s}


def unchanged_neutral(point: dict[str, Any], base: dict[str, Any]) -> list[bool]:
    """Per held-out neutral prompt of a stored point: whether its greedy continuation equals the unsteered point's
    (`base`, the same evaluation). Equal text stands for equal tokens."""
    mine, ref = point["per_prompt"]["neutral_continuations"], base["per_prompt"]["neutral_continuations"]
    return [a == b for a, b in zip(mine, ref, strict=True)]


def load_points(path: str | Path) -> list[dict[str, Any]]:
    """The points of a run, in sweep order: its sqlite store (the latest evaluation settings only), or for a
    run written by an earlier version its `sweep.jsonl`, read-only (damaged lines are skipped with a warning
    and left in the file)."""
    p = Path(path)
    store = store_path(p)
    if store.exists():
        con = _connect(store, create=False)
        if con is None:
            return []
        try:
            got = con.execute(
                "SELECT labels.name, labels.strength, points.row FROM labels JOIN points "
                "ON points.steerer_hash = labels.steerer_hash AND points.strength = labels.strength "
                "AND points.eval_hash = (SELECT value FROM meta WHERE key = 'eval_hash') ORDER BY labels.seq"
            ).fetchall()
        finally:
            con.close()
        return [_labelled(json.loads(row), name, s) for name, s, row in got]
    return _read_legacy(p if p.suffix == ".jsonl" else store.with_suffix(".jsonl"))


def _read_legacy(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(
                f"{path} line {i} is damaged (an interrupted or concurrent write); it is skipped and left in "
                "the file.",
                stacklevel=3,
            )
    return rows


def run_sweep(
    model: nn.Module,
    tok: Any,
    steerers: dict[str, Steerer],
    grid: Mapping[str, Sequence[float]],
    data: EvalData,
    cfg: EvalConfig,
    out: str | Path,
    *,
    progress: bool = True,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every steerer at every strength of its grid (plus the unsteered baseline once).

    `out` is the run folder (or a path in it: `sweep.jsonl` maps to `sweep.sqlite` beside it). Each point is
    stored under (steerer content hash, evaluation hash, strength) as soon as it finishes (one transaction), so
    a rerun recomputes exactly the points it has not stored for this steerer content, these evaluation
    settings and this model, whatever the names. The folder is locked for the sweep: a second concurrent sweep
    into it raises `SweepLockedError` naming the holder. A `sweep.jsonl` of an earlier version is never
    rewritten and its points are not reused (they carry no content key).
    """
    if BASELINE in steerers:
        raise ValueError(f"A steerer may not be named {BASELINE!r} (the name of the baseline); rename it.")
    store = store_path(out)
    store.parent.mkdir(parents=True, exist_ok=True)
    hashes = {name: steerer_hash(st) for name, st in steerers.items()}
    ev = eval_hash(model, tok, data, cfg)
    plan: list[tuple[str, Steerer | None, str, float]] = [(BASELINE, None, BASELINE, 0.0)]
    for name, st in steerers.items():
        strengths = dict.fromkeys(float(s) for s in grid[name] if float(s) != 0.0)
        plan += [(name, st, hashes[name], s) for s in strengths]
    rows = []
    with sweep_lock(store):
        con = _connect(store)
        assert con is not None  # the schema was just created
        try:
            with con:
                _set_view(con, ev, [(n, h, s) for n, _, h, s in plan])
            bar = tqdm(plan, desc="sweep", disable=not progress)
            for name, st, sh, s in bar:
                bar.set_postfix_str(point_key(name, s))
                row = _get_point(con, sh, ev, s)
                if row is None:
                    row = (
                        {"method": "none", "gate": "none"}
                        if st is None
                        else {"method": st.method, "gate": st.gate}
                    )
                    row.update(evaluate_point(model, tok, st, s, data, cfg))
                    row.update(eval=asdict(cfg), steerer_hash=sh, eval_hash=ev)
                    with con:
                        con.execute(
                            "INSERT INTO points VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                            "row = excluded.row, created = excluded.created",
                            (sh, ev, s, json.dumps(row), time.time()),
                        )
                    row = _labelled(row, name, s)
                    rows.append(row)
                    if on_point is not None:
                        on_point(row)
                else:
                    rows.append(_labelled(row, name, s))
        finally:
            con.close()
    return rows


# -- Pareto analysis ----------------------------------------------------------------------------------------


def pareto_front(
    points: Sequence[dict[str, Any]], x: str = "ppl", y: str = "toxicity"
) -> list[dict[str, Any]]:
    """Points not dominated in (x lower-is-better, y lower-is-better), sorted by x."""
    pts = sorted(
        (p for p in points if p.get(x) is not None and p.get(y) is not None), key=lambda p: (p[x], p[y])
    )
    front: list[dict[str, Any]] = []
    best = float("inf")
    for p in pts:
        if p[y] < best:
            front.append(p)
            best = p[y]
    return front


def value_at_budget(
    points: Sequence[dict[str, Any]],
    budget: float,
    x: str = "ppl",
    y: str = "toxicity",
    read: str | None = None,
) -> float:
    """Lowest y reachable with x <= budget, interpolating linearly between neighbouring front points.
    `read`: report another column of the same front points, at the same spot, instead of y."""
    front = pareto_front(points, x, y)
    if not front or front[0][x] > budget:
        return float("nan")
    xs = np.array([p[x] for p in front], dtype=float)
    ys = np.array([p[read or y] for p in front], dtype=float)
    if budget >= xs[-1]:
        return float(ys[-1])
    return float(np.interp(budget, xs, ys))


def matched_utility_table(
    points: Sequence[dict[str, Any]],
    budgets: Sequence[float] = (0.05, 0.10, 0.25),
    x: str = "ppl",
    y: str = "toxicity",
) -> list[dict[str, Any]]:
    """Per steerer: y at x = baseline * (1 + budget) for each budget (the paper's "toxicity at +5% PPL")."""
    base = next((p for p in points if p["name"] == "unsteered"), None)
    if base is None:
        raise ValueError("The sweep has no unsteered point: rerun it (it is computed first).")
    rows = []
    for name in dict.fromkeys(p["name"] for p in points if p["name"] != "unsteered"):
        pts = [p for p in points if p["name"] == name] + [base]
        row: dict[str, Any] = {"name": name, "method": pts[0].get("method"), "gate": pts[0].get("gate")}
        for b in budgets:
            row[f"{y}@+{b:.0%}{x}"] = value_at_budget(pts, base[x] * (1 + b), x, y)
        row[f"min_{y}"] = min(p[y] for p in pts)
        rows.append(row)
    return rows
