"""Strength sweeps, Pareto fronts and "toxicity at matched utility".

A sweep evaluates every (steerer, strength) point on the same held-out data and appends one JSON line per
point, so an interrupted sweep resumes without recomputing finished points. Strength 0 of any steerer is the
unsteered model (bit-identical), so the baseline is computed once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

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
from dsas.record import model_device
from dsas.steerer import Steerer


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
    concept_word: str | None = None
    """If set, report the rate of continuations that contain this word (the `concept` sets)."""
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


def _gate_rate(st: Steerer | None, model: nn.Module, tok: Any, texts: list[str], strength: float) -> float:
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


def evaluate_point(
    model: nn.Module, tok: Any, st: Steerer | None, strength: float, data: EvalData, cfg: EvalConfig
) -> dict[str, Any]:
    """Every metric of one (steerer, strength) point."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    scorer = get_scorer(cfg.scorer)
    ctx: AbstractContextManager[Any] = st.apply(model, strength=strength) if st is not None else nullcontext()
    with ctx:
        conts = generate_continuations(
            model,
            tok,
            data.prompts,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            do_sample=cfg.do_sample,
            seed=cfg.seed,
            chat_template=cfg.chat_template,
            progress=False,
        )
        neutral = generate_continuations(
            model,
            tok,
            data.neutral[: max(8, len(data.neutral) // 2)],
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            do_sample=cfg.do_sample,
            seed=cfg.seed,
            chat_template=cfg.chat_template,
            progress=False,
        )
        ppl = perplexity(
            model, tok, data.wiki, max_tokens=cfg.ppl_tokens, batch_size=cfg.batch_size, progress=False
        )
        mc = mc_accuracy(model, tok, data.mc, batch_size=cfg.batch_size, progress=False) if data.mc else None
    tox = toxicity_summary(scorer(conts))
    out.update(
        toxicity=tox["rate"],
        toxicity_mean=tox["mean_prob"],
        neutral_toxicity=toxicity_summary(scorer(neutral))["rate"],
        ppl=float(ppl),
        mc_acc=None if mc is None else float(mc),
        false_steer_rate=_gate_rate(st, model, tok, data.neutral, strength),
        true_steer_rate=_gate_rate(st, model, tok, data.prompts, strength),
        samples=[
            {"prompt": p, "continuation": c} for p, c in list(zip(data.prompts, conts, strict=True))[:6]
        ],
    )
    if cfg.concept_word:
        out["concept_rate"] = concept_rate(conts, cfg.concept_word)
        out["neutral_concept_rate"] = concept_rate(neutral, cfg.concept_word)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def point_key(name: str, strength: float) -> str:
    return f"{name}@{float(strength):g}"


def load_points(path: str | Path) -> list[dict[str, Any]]:
    """Read a sweep's JSONL; a truncated last line (interrupted write) is ignored."""
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
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

    Points already in `out` (same key) are kept, not recomputed; new points are appended as they finish.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = load_points(out)
    done = {r["key"]: r for r in kept}
    if out.exists() and len(out.read_text().splitlines()) != len(kept):
        # Drop the torn line an interrupted run left, so new points start on a clean line.
        out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    todo: list[tuple[str, Steerer | None, float]] = [("unsteered", None, 0.0)]
    for name, st in steerers.items():
        todo += [(name, st, float(s)) for s in grid[name] if float(s) != 0.0]
    rows = []
    bar = tqdm(todo, desc="sweep", disable=not progress)
    for name, st, s in bar:
        key = point_key(name, s)
        bar.set_postfix_str(key)
        if key in done:
            rows.append(done[key])
            continue
        row = {"key": key, "name": name, "strength": s}
        if st is not None:
            row.update(method=st.method, gate=st.gate)
        else:
            row.update(method="none", gate="none")
        row.update(evaluate_point(model, tok, st, s, data, cfg))
        row["eval"] = asdict(cfg)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        if on_point is not None:
            on_point(row)
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
    points: Sequence[dict[str, Any]], budget: float, x: str = "ppl", y: str = "toxicity"
) -> float:
    """Lowest y reachable with x <= budget, interpolating linearly between neighbouring front points."""
    front = pareto_front(points, x, y)
    if not front or front[0][x] > budget:
        return float("nan")
    xs = np.array([p[x] for p in front], dtype=float)
    ys = np.array([p[y] for p in front], dtype=float)
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
