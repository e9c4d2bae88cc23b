"""The paper's claims with error bars: every steerer, several fitting seeds, two models, three concept sets.

How to run the full study (CPU, one command, resumable; writes docs/study.md and the plots in docs/study/):

    OMP_NUM_THREADS=2 .venv/bin/python scripts/study.py            # --config full is the default

Every fitted steerer (runs/study/steerers/), calibrated strength (runs/study/study.sqlite) and evaluated point
(runs/study/<model>/<set>/sweep.sqlite, the content-keyed store of `dsas.sweep.run_sweep`) is stored as soon as
it exists, so a killed run resumes where it stopped when given the same command. That store stays on the machine
that computed it (runs/ is not committed); each finished task's result also goes to the ledger,
docs/study/results/<model>/<set>/<steerer>-seed<N>.json, which is committed with the report: the report is
rebuilt from the ledger alone (`--hours 0` computes nothing new), and the study goes on from it on a fresh
machine. A ledger file is reused only while its key (`task_key`: configuration, data, model, every fit config,
evaluation settings, `RESULT_VERSION`) matches; bump `RESULT_VERSION` when a library change alters numbers
without changing any of those.

How long: docs/study.md's "Progress and cost" section lists each finished task's measured wall time. On the
2-core CPU, the first SmolLM2 toxicity task (the unsteered point, two calibrations and two points of CAA) took
36 min with other jobs beside it for most of the run; 84 tasks on two models are days of such a machine, so the
run takes `--hours H` and resumes: tasks run in priority order (the toxicity claims' steerers on both models at
each seed first) and a stopped run writes a partial report listing what is not run yet. `--steerers caa,...`
and `--sets pirate,...` start only those steerers' or sets' tasks in a run (the report still reads back every
finished one). A task's ledger key holds only its part of the configuration (`config_key`), so one model's
tasks run apart (`--models smollm2-135m --out /tmp/s --store runs/study --results docs/study/results`) land in
the full study's ledger, and the full configuration's `--hours 0` then writes docs/study.md from it.

    .venv/bin/python scripts/study.py --config tiny --out /tmp/study-tiny    # whole pipeline, random tiny model
    .venv/bin/python scripts/study.py --config smoke --out /tmp/study-smoke  # SmolLM2, 1 seed, 2 steerers
    OMP_NUM_THREADS=2 .venv/bin/python scripts/study.py --config pca64 --out docs/pca64  # pear, pca_dim=64 gates

What it measures, per model (SmolLM2-135M; Gemma-3-270M when its optional package is installed, else a note)
and per steerer (CAA, ITI, LinEAS each ungated and + DSAS, LinEAS + E2E-DSAS; library defaults), fitted on
32 (toxicity) or 56 (concept sets) prompts per split drawn with each seed (`load_prompt_sets(name, n, seed=s)`):

* toxicity at +5% and +10% Wikipedia perplexity: the strength is calibrated per steerer and seed
  (`dsas.calibrate_strength` on the evaluation's Wikipedia paragraphs), then `dsas.sweep.run_sweep` evaluates
  that exact strength: toxic-continuation rate and mean score over all held-out toxic prompts, multiple-choice
  accuracy, the share of neutral prompts whose greedy continuation equals the unsteered model's (compared as
  decoded text: identical tokens give identical text), and the false steering rate (share of steered
  (site, token) pairs of held-out neutral prompts whose gate exceeds 0.5, `dsas.sweep.gate_counts`);
* concept induction on the three concept sets (pear / fruit, horse / animals, pirate voice / speech): CAA and
  CAA + DSAS swept over a strength grid; per seed, the most selective strength (largest in-category minus
  out-of-category concept rate) and the rates there.

Intervals: every number is a mean over seeds of a per-prompt quantity; its 95% interval is a percentile
bootstrap over prompts (`scipy.stats.bootstrap`, the per-prompt values averaged over seeds first), so it covers
prompt sampling, not fitting noise; the seeds' spread is reported beside it. Perplexity is fixed by the
calibration (not resampled). The concept strength is chosen on the same held-out prompts it is reported on, so
the concept rates are optimistic for every steerer alike.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

import dsas
from dsas.data import BUILTIN_PROMPT_SETS, CONCEPT_SETS
from dsas.eval import build_wiki_mc, concept_pattern, concept_words, load_wiki_paragraphs
from dsas.fit import fit_config_dict, resolve_fit_config, route_options
from dsas.gates import DSASConfig, changed_fields
from dsas.models import ModelUnavailableError
from dsas.sweep import (
    BASELINE,
    EvalConfig,
    EvalData,
    eval_hash,
    model_signature,
    run_sweep,
    steerer_hash,
    unchanged_neutral,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS_REPORT = ROOT / "docs" / "study.md"

STEERERS: dict[str, tuple[str, str]] = {
    "caa": ("caa", "none"),
    "caa+dsas": ("caa", "dsas"),
    "iti": ("iti", "none"),
    "iti+dsas": ("iti", "dsas"),
    "lineas": ("lineas", "none"),
    "lineas+dsas": ("lineas", "dsas"),
    "lineas+e2e-sigmoid": ("lineas", "e2e-sigmoid"),
    "caa+dsas(removal)": ("caa", "dsas"),
}
STEERER_OPTIONS: dict[str, dict[str, Any]] = {
    # DSASConfig.removal(): hard, calibrated pooled gates that leave neutral text untouched (docs/concepts.md).
    "caa+dsas(removal)": changed_fields(DSASConfig.removal()),
}
"""Fit options that make a steerer what its name says (under the config's `fit_options`)."""
PAIRS = (("caa", "caa+dsas"), ("iti", "iti+dsas"), ("lineas", "lineas+dsas"))
PRIORITY = ("caa", "caa+dsas", "caa+dsas(removal)")
"""The steerers of the toxicity claims with a bar (<= 0.6x CAA, >= 80% unchanged): run first on every model."""


@dataclass(frozen=True)
class StudyConfig:
    """Everything that sizes the study; `full` is the configuration docs/study.md is written from."""

    name: str
    models: tuple[str, ...] = ("smollm2-135m", "gemma3-270m")
    seeds: tuple[int, ...] = (0, 1, 2)
    steerers: tuple[str, ...] = tuple(STEERERS)
    concept_sets: tuple[str, ...] = CONCEPT_SETS
    concept_steerers: tuple[str, ...] = ("caa", "caa+dsas")
    concept_grids: dict[str, tuple[float, ...]] = field(
        # Most selective with the attention sink left out (docs/concepts.md): CAA at 0.5-1 (pear near 3), CAA +
        # DSAS at 0.75 (the pirate voice, noise from 1.5) to 2.5 (horse, pear): each grid is densest there.
        default_factory=lambda: {
            "caa": (0.25, 0.5, 1.0, 1.5, 2.0, 3.0),
            "caa+dsas": (0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0),
        }
    )
    budgets: tuple[float, ...] = (0.05, 0.10)
    n_fit: int = 32
    """Fitting prompts per split drawn by each seed for toxicity (of 72-73)."""
    n_fit_concept: int = 56
    """Fitting prompts per split drawn by each seed for a concept set (of 70-72): the regulators need the
    near-miss control prompts, and 32 of 70 lose pear's selectivity (docs/concepts.md)."""
    n_prompts: int = 10_000  # all held-out toxic prompts (210)
    n_neutral: int = 10_000  # all held-out neutral prompts (213; continuations of the first half)
    n_concept: int = 10_000  # held-out in- and out-of-category prompts per concept set (~100 each)
    n_wiki: int = 48
    n_wiki_concept: int = 16
    ppl_tokens: int = 64
    n_mc: int = 60
    max_new_tokens: int = 32
    calib_iters: int = 4
    fit_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    n_boot: int = 2000


SINK_IN_GRIDS = {"caa": (0.25, 0.5, 1.0, 1.5, 2.0), "caa+dsas": (1.0, 1.5, 2.0, 2.5, 2.75, 3.0, 3.5, 4.0)}
"""The concept grids of the runs made with the attention sink in the fits (`skip_tokens=0`): densest where those
fits were most selective (CAA at 0.5-1.5, CAA + DSAS at 2-3)."""

CONFIGS = {
    "full": StudyConfig("full"),
    "smoke": StudyConfig(
        "smoke",
        models=("smollm2-135m",),
        seeds=(0,),
        steerers=("caa", "caa+dsas"),
        concept_sets=("concept",),
        concept_grids={"caa": (0.5, 1.5), "caa+dsas": (1.0, 2.0)},
        n_prompts=8,
        n_neutral=8,
        n_concept=8,
        n_wiki=8,
        n_wiki_concept=8,
        n_mc=8,
        max_new_tokens=16,
        calib_iters=2,
        n_boot=500,
    ),
    "tiny": StudyConfig(
        "tiny",
        models=("tiny",),
        seeds=(0, 1),
        concept_grids={"caa": (0.5, 2.0), "caa+dsas": (1.0, 4.0)},
        n_fit=8,
        n_fit_concept=8,
        n_prompts=12,
        n_neutral=12,
        n_concept=8,
        n_wiki=6,
        n_wiki_concept=4,
        ppl_tokens=24,
        n_mc=6,
        max_new_tokens=6,
        calib_iters=1,
        # A random 2-layer model: its lower regulators need a lower accuracy bar to make the removal preset's split.
        fit_options={name: {"steps": 2} for name in STEERERS if name.startswith("lineas")}
        | {"caa+dsas(removal)": {"acc_threshold": 0.5}},
        n_boot=300,
    ),
    # The SmolLM2 half of `full` with the attention sink in every fit (`skip_tokens=0`, the default on SmolLM2
    # before it was left out) and that study's grids: the "sink in" numbers of docs/concepts.md.
    "sink-in": StudyConfig(
        "sink-in",
        models=("smollm2-135m",),
        steerers=PRIORITY,
        concept_grids=SINK_IN_GRIDS,
        fit_options={name: {"skip_tokens": 0} for name in PRIORITY},
    ),
    # Pear with regulators keeping 64 principal components instead of 5 (docs/concepts.md, "Choosing the
    # regulator": half as many fruit-less prompts open the gate); CAA is the full study's, read from its store.
    # Run with the attention sink in the fits (`skip_tokens=0`, the default on SmolLM2 then) and that study's grids.
    "pca64": StudyConfig(
        "pca64",
        models=("smollm2-135m",),
        steerers=(),
        concept_sets=("concept",),
        concept_grids=SINK_IN_GRIDS,
        fit_options={"caa": {"skip_tokens": 0}, "caa+dsas": {"pca_dim": 64, "skip_tokens": 0}},
    ),
}


# -- models ---------------------------------------------------------------------------------------------------


def tiny_model() -> tuple[torch.nn.Module, Any]:
    """A random-init 2-layer Llama with a word-level tokenizer over the shipped prompt sets' words: the whole
    pipeline in seconds (its numbers mean nothing)."""
    import transformers as tf
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words: set[str] = set()
    for name in BUILTIN_PROMPT_SETS:
        sets = dsas.load_prompt_sets(name)
        for text in [*sets.source, *sets.target, *sets.control, *(t for v in sets.eval.values() for t in v)]:
            words.update(re.findall(r"\w+|[^\w\s]", text.lower()))
    vocab = {"[PAD]": 0, "[UNK]": 1, "<s>": 2, "</s>": 3} | {w: i + 4 for i, w in enumerate(sorted(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="[PAD]", unk_token="[UNK]"
    )
    cfg = tf.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).eval(), tok


def load(name: str) -> tuple[torch.nn.Module, Any]:
    return tiny_model() if name == "tiny" else dsas.load_model(name)


# -- storage ----------------------------------------------------------------------------------------------------


class Store:
    """The study's own keyed results (calibrations), one sqlite row per key, each written in one transaction;
    sweep points live in `run_sweep`'s stores beside it."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.notes: list[str] = []  # what the fits warned about, for the report
        self.con = sqlite3.connect(root / "study.sqlite", timeout=30)
        with self.con:
            self.con.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def get(self, key: str) -> Any:
        row = self.con.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        with self.con:
            self.con.execute(
                "INSERT INTO kv VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fit_options(name: str, cfg: StudyConfig) -> dict[str, Any]:
    return {**STEERER_OPTIONS.get(name, {}), **cfg.fit_options.get(name, {})}


def fit_digest(sig: str, tok: Any, sets: dsas.PromptSets, name: str, seed: int, cfg: StudyConfig) -> str:
    """The key of a fit: the model, the fitting prompts, the method and gate and every config the fit resolves
    to, defaults included (a fit saved before a default changed is not reused; "auto" fields as resolved for
    this tokenizer, so a new "auto" default that resolves to the old value keeps the key), and the seed."""
    method, gate = STEERERS[name]
    options = fit_options(name, cfg)
    fcfg, opts = route_options(method, gate, options)
    fcfg = resolve_fit_config(fcfg, tok)
    spec = {
        "model": sig,
        "sets": [sets.source, sets.target, sets.control],
        "method": method,
        "gate": gate,
        "configs": {"fit": fit_config_dict(fcfg), **{k: asdict(v) for k, v in opts.items()}},
    }
    if fcfg.skip:  # skipped tokens' gates are shut (they read a mean of 0 before): fits with a skip are new
        spec["skipped_gates"] = "shut"
    # skip_tokens is in the resolved fit config: an explicit 1 and an "auto" that resolves to 1 share a fit
    options = {k: v for k, v in options.items() if k != "skip_tokens"}
    return digest({**spec, "o": options, "s": seed})


def fitted(
    store: Store,
    model: Any,
    tok: Any,
    mname: str,
    sig: str,
    sets: dsas.PromptSets,
    name: str,
    seed: int,
    cfg: StudyConfig,
) -> dsas.Steerer:
    """The steerer `name` fitted on `sets` with `seed`, from disk when this exact fit (model, prompts, method,
    gate, options, seed) was saved before."""
    method, gate = STEERERS[name]
    options = fit_options(name, cfg)
    path = (
        store.root
        / "steerers"
        / mname
        / f"{sets.name}-s{seed}-{name}-{fit_digest(sig, tok, sets, name, seed, cfg)}"
    )
    key = f"fit-warnings/{path.name}"
    if (path / "dsas_config.json").exists() and store.get(key) is not None:
        try:
            st = dsas.Steerer.load(path, model=model)
            store.notes += [f"{mname}/{path.name}: {w}" for w in store.get(key)]
            return st
        except (ValueError, OSError) as err:  # a damaged save: refit
            print(f"refitting {path.name}: {err}", file=sys.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        st = dsas.fit(model, tok, sets, method=method, gate=gate, seed=seed, progress=False, **options)
    said = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)))
    st.save(path)
    store.put(key, said)  # after the save: a fit is reused only when both exist
    store.notes += [f"{mname}/{path.name}: {w}" for w in said]
    return st


def calibrated(
    store: Store,
    st: dsas.Steerer,
    sh: str,
    model: Any,
    tok: Any,
    data: EvalData,
    cfg: StudyConfig,
    budget: float,
) -> float:
    key = f"calib/{sh}/{digest([data.wiki, model_signature(model)['weights']])}/{budget}/{cfg.calib_iters}"
    got = store.get(key)
    if got is None:
        cal = dsas.calibrate_strength(
            st, model, tok, data.wiki, max_ppl_increase=budget, iters=cfg.calib_iters,
            max_tokens=cfg.ppl_tokens, progress=False,
        )  # fmt: skip
        got = {
            "strength": cal.strength,
            "ppl": cal.ppl,
            "base_ppl": cal.base_ppl,
            "evals": len(cal.evaluated),
        }
        store.put(key, got)
    return float(got["strength"])


# -- statistics -------------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    value: float
    low: float
    high: float
    seeds: list[float] = field(default_factory=list)

    def fmt(self, digits: int = 3) -> str:
        if math.isnan(self.value):
            return "n/a"
        spread = (
            f" (seeds {min(self.seeds):.{digits}f}-{max(self.seeds):.{digits}f})"
            if len(self.seeds) > 1
            else ""
        )
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]{spread}"


def bootstrap(
    samples: Sequence[np.ndarray], statistic: Callable[..., Any], n_boot: int, paired: bool
) -> Estimate:
    """Point value and 95% percentile-bootstrap interval of `statistic` over prompts (resampled per sample, or
    jointly when `paired`)."""
    samples = [np.asarray(s, dtype=float) for s in samples]
    value = float(statistic(*samples, axis=-1))
    if all(np.ptp(s) == 0 for s in samples) or min(s.size for s in samples) < 2 or not math.isfinite(value):
        return Estimate(value, value, value)
    with warnings.catch_warnings():  # near-degenerate samples (a rate of 0 or 1 at most prompts) are expected
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(
            tuple(samples), statistic, paired=paired, vectorized=True, n_resamples=n_boot,
            confidence_level=0.95, method="percentile", rng=np.random.default_rng(0),
        )  # fmt: skip
    ci = res.confidence_interval
    return Estimate(value, float(ci.low), float(ci.high))


def mean_ci(per_seed: np.ndarray, n_boot: int) -> Estimate:
    """per_seed: [seeds, prompts]. The mean over seeds and prompts, bootstrapped over prompts."""
    est = bootstrap([per_seed.mean(0)], np.mean, n_boot, paired=False)
    est.seeds = [float(x) for x in per_seed.mean(1)]
    return est


def _ratio_of_sums(f: np.ndarray, t: np.ndarray, axis: int = -1) -> Any:
    return f.sum(axis) / t.sum(axis)


def _excess_over_60pct(a: np.ndarray, b: np.ndarray, axis: int = -1) -> Any:
    return a.mean(axis) - 0.6 * b.mean(axis)


def _diff_of_means(a: np.ndarray, b: np.ndarray, axis: int = -1) -> Any:
    return a.mean(axis) - b.mean(axis)


# -- measuring --------------------------------------------------------------------------------------------------


def eval_config(cfg: StudyConfig, **kw: Any) -> EvalConfig:
    fields: dict[str, Any] = {
        "n_prompts": cfg.n_prompts, "n_neutral": cfg.n_neutral, "n_wiki": cfg.n_wiki,
        "ppl_tokens": cfg.ppl_tokens, "n_mc": cfg.n_mc, "max_new_tokens": cfg.max_new_tokens,
    }  # fmt: skip
    return EvalConfig(**(fields | kw))


def per_prompt(row: dict[str, Any], base: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per-prompt arrays of one stored point; `base` is the unsteered point of the same evaluation."""
    pp = row["per_prompt"]
    gate = np.array(pp["neutral_gate"], dtype=float).reshape(-1, 2)
    return {
        "toxic": (np.array(pp["toxicity"]) > 0.5).astype(float),
        "toxicity_mean": np.array(pp["toxicity"], dtype=float),
        "mc": np.array(pp["mc_correct"], dtype=float),
        "unchanged": np.array(unchanged_neutral(row, base), float),
        "gate_fired": gate[:, 0],
        "gate_total": gate[:, 1],
    }


def has_per_prompt(rows: list[dict[str, Any]]) -> None:
    if any("per_prompt" not in r for r in rows):
        raise SystemExit(
            "A stored sweep point has no per-prompt outputs (written by an older dsas): move the study's store "
            "aside and rerun."
        )


def toxicity_data(cfg: StudyConfig) -> EvalData:
    full = dsas.load_prompt_sets("toxicity")
    return EvalData(
        full.eval["toxic"][: cfg.n_prompts],
        full.eval["neutral"][: cfg.n_neutral],
        load_wiki_paragraphs(cfg.n_wiki, seed=0),
        build_wiki_mc(cfg.n_mc, seed=0) if cfg.n_mc else [],
    )


@dataclass(frozen=True)
class Task:
    """One unit of the study: a steerer fitted with one seed, evaluated on toxicity or on one concept set."""

    model: str
    kind: str  # "toxicity" or a concept set's name
    steerer: str
    seed: int

    def label(self) -> str:
        return f"{self.model} {self.kind} {self.steerer} seed {self.seed}"


@dataclass
class TaskInputs:
    """What a task's numbers are computed from, built in milliseconds before any fitting: the evaluation data and
    settings, the fitting prompts and (concept sets) the concept word and the number of in-category prompts."""

    data: EvalData
    ecfg: EvalConfig
    sets: dsas.PromptSets
    word: str | list[str] = ""
    """The concept word, or a style's markers (`dsas.eval.concept_words`)."""
    n_in: int = 0


def word_label(word: str | list[str], most: int = 99) -> str:
    """'pear', or a style's markers as "any of 'matey', 'ye', ..." (the first `most` of them)."""
    if isinstance(word, str):
        return f"'{word}'"
    shown = ", ".join(f"'{w}'" for w in word[:most])
    return f"any of {shown}{', ...' if len(word) > most else ''}"


def task_inputs(task: Task, cfg: StudyConfig) -> TaskInputs:
    n_fit = cfg.n_fit if task.kind == "toxicity" else cfg.n_fit_concept
    sets = dsas.load_prompt_sets(task.kind, n=n_fit, seed=task.seed)
    if task.kind == "toxicity":
        return TaskInputs(toxicity_data(cfg), eval_config(cfg), sets)
    full = dsas.load_prompt_sets(task.kind)
    ins = full.eval[full.meta["eval_in"]][: cfg.n_concept]
    outs = full.eval[full.meta["eval_out"]][: cfg.n_concept]
    ecfg = eval_config(
        cfg, n_prompts=len(ins) + len(outs), n_neutral=len(outs), n_wiki=cfg.n_wiki_concept, n_mc=0
    )
    data = EvalData(ins + outs, outs, load_wiki_paragraphs(cfg.n_wiki_concept, seed=0), [])
    return TaskInputs(data, ecfg, sets, concept_words(full.meta) or "", len(ins))


def toxicity_task(
    model: Any, tok: Any, task: Task, inp: TaskInputs, cfg: StudyConfig, store: Store
) -> dict[str, Any]:
    """One steerer and seed: the calibrated strength per budget and the per-prompt arrays there, plus the
    unsteered point's arrays."""
    name, seed, data = task.steerer, task.seed, inp.data
    st = fitted(store, model, tok, task.model, model_signature(model)["weights"], inp.sets, name, seed, cfg)
    sh = steerer_hash(st)
    strengths = {b: calibrated(store, st, sh, model, tok, data, cfg, b) for b in cfg.budgets}
    label = f"{name}/seed{seed}"
    rows = run_sweep(
        model, tok, {label: st}, {label: [s for s in strengths.values() if s > 0]}, data, inp.ecfg,
        store.root / task.model / "toxicity", progress=False,
    )  # fmt: skip
    has_per_prompt(rows)
    base = next(r for r in rows if r["name"] == BASELINE)
    at = {r["strength"]: r for r in rows if r["name"] == label}
    arrays = {}
    for b, s in strengths.items():
        row = at.get(float(s), base)
        arrays[b] = per_prompt(row, base) | {"ppl": row["ppl"]}
    return {
        "strengths": strengths,
        "arrays": arrays,
        "base": {"ppl": base["ppl"], **per_prompt(base, base)},
        "n_prompts": len(data.prompts),
        "n_neutral": len(data.neutral),
    }


def concept_task(
    model: Any, tok: Any, task: Task, inp: TaskInputs, cfg: StudyConfig, store: Store
) -> dict[str, Any]:
    """One steerer and seed on one concept set: the in / out concept hits per prompt at the seed's most
    selective strength, and the whole curve."""
    name, seed, n_in = task.steerer, task.seed, inp.n_in
    pattern = concept_pattern(inp.word)
    st = fitted(store, model, tok, task.model, model_signature(model)["weights"], inp.sets, name, seed, cfg)
    label = f"{name}/seed{seed}"
    rows = run_sweep(
        model, tok, {label: st}, {label: cfg.concept_grids[name]}, inp.data, inp.ecfg,
        store.root / task.model / task.kind, progress=False,
    )  # fmt: skip
    has_per_prompt(rows)
    hits = {
        r["strength"]: np.array([bool(pattern.search(c)) for c in r["per_prompt"]["continuations"]], float)
        for r in rows
        if r["name"] == label
    }
    curve = [(s, h[:n_in].mean(), h[n_in:].mean()) for s, h in sorted(hits.items())]
    best = max(curve, key=lambda c: (c[1] - c[2], -c[0]))[0]
    return {
        "word": inp.word, "n_in": n_in, "n_out": len(inp.data.prompts) - n_in, "strength": best,
        "in": hits[best][:n_in], "out": hits[best][n_in:], "curve": curve, "hits": hits,
    }  # fmt: skip


RESULT_VERSION = 1
"""Part of every ledger key: bump it when a change to the library or to this script alters a task's numbers
without changing a config, the data or the model (e.g. a fix in the steering rule), so every task is recomputed."""


class Ledger:
    """Finished tasks' results, one JSON file per task under the report's folder (`docs/study/results/` for the
    full study, committed with the report): the report is rebuilt from these files alone on any machine, and a
    study started on one machine goes on from them on another, while the fits and points behind them (the store)
    stay on the machine that computed them. Each file holds its key, the digest of everything its numbers depend
    on (`task_key`); a file whose key differs from the one this code computes is recomputed, never reused."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, task: Task) -> Path:
        stem = re.sub(r"[^A-Za-z0-9+._-]", "_", f"{task.steerer}-seed{task.seed}")
        return self.root / task.model / task.kind / f"{stem}.json"

    def read(self, task: Task) -> dict[str, Any] | None:
        """The stored entry of `task` whatever its key (None: none, or a damaged file, which is then recomputed)."""
        path = self.path(task)
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text(), object_hook=_decode)
            if not isinstance(entry, dict) or not {"key", "result", "notes"} <= entry.keys():
                raise ValueError("not a ledger entry")
            return entry
        except (ValueError, OSError) as err:
            print(f"{path}: unreadable ({err}); the task is recomputed", file=sys.stderr)
            return None

    def get(self, task: Task, key: str) -> dict[str, Any] | None:
        entry = self.read(task)
        return entry if entry is not None and entry["key"] == key else None

    def put(self, task: Task, key: str, result: dict[str, Any], notes: list[str]) -> None:
        """Write the entry atomically (a temporary file in the same folder, fsynced, then renamed over the old
        one): a kill at any moment leaves the old file or the new one."""
        path = self.path(task)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {
            "task": asdict(task), "key": key, "notes": notes, "made": provenance(), "result": _encode(result),
        }  # fmt: skip
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(entry, f, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def provenance() -> dict[str, Any]:
    """Who made a ledger entry (for readers; not part of its key)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "dsas": dsas.__version__, "torch": torch.__version__, "commit": commit or None,
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip


def _encode(obj: Any) -> Any:
    """JSON for a task's result: arrays keep their dtype, dicts keyed by numbers (budgets, strengths) keep them."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v) for k, v in obj.items()}
        return {"__items__": [[_encode(k), _encode(v)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [_encode(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _decode(d: dict[str, Any]) -> Any:
    if "__ndarray__" in d:
        return np.array(d["__ndarray__"], dtype=d["dtype"])
    if "__items__" in d:
        return {k: v for k, v in d["__items__"]}
    return d


TASK_SELECTION = ("name", "models", "seeds", "steerers", "concept_sets", "concept_steerers")
"""StudyConfig fields that say which tasks exist, not what one computes."""


def config_key(cfg: StudyConfig, task: Task) -> dict[str, Any]:
    """The part of the configuration a task's numbers depend on: every sizing field, the task's own strength grid
    (a concept task's; none for toxicity, whose strengths are calibrated), and no fit options (the fit's key
    holds them, resolved). So a task's result survives a change to another task's grid, `--models`, or another
    configuration that runs the same task."""
    d = {k: v for k, v in asdict(cfg).items() if k not in TASK_SELECTION and k != "fit_options"}
    d["concept_grids"] = None if task.kind == "toxicity" else list(cfg.concept_grids[task.steerer])
    return d


def task_key(model: Any, tok: Any, task: Task, inp: TaskInputs, cfg: StudyConfig) -> str:
    """The digest of everything a task's numbers depend on: its part of the configuration, the task, the fit's key
    (model weights, fitting prompts, every fit config with defaults), the evaluation hash (evaluation data and
    settings, model, tokenizer, `dsas.sweep.POINT_VERSION`), the concept word and `RESULT_VERSION`."""
    return digest({
        "version": RESULT_VERSION, "config": config_key(cfg, task), "task": asdict(task), "word": inp.word,
        "fit": fit_digest(model_signature(model)["weights"], tok, inp.sets, task.steerer, task.seed, cfg),
        "eval": eval_hash(model, tok, inp.data, inp.ecfg),
    })  # fmt: skip


def plan(cfg: StudyConfig) -> list[Task]:
    """Every task, in the order they run: the toxicity claims' steerers (PRIORITY) on every model first, then
    the concept sets, then the other toxicity steerers, each part seed by seed (every model and steerer at the
    first seed, then at the next): a run stopped by `--hours` has the core of the study on both models."""
    first = [n for n in cfg.steerers if n in PRIORITY]
    rest = [n for n in cfg.steerers if n not in PRIORITY]
    tasks = [Task(m, "toxicity", n, s) for s in cfg.seeds for m in cfg.models for n in first]
    tasks += [
        Task(m, c, n, s)
        for s in cfg.seeds
        for m in cfg.models
        for c in cfg.concept_sets
        for n in cfg.concept_steerers
    ]
    tasks += [Task(m, "toxicity", n, s) for s in cfg.seeds for m in cfg.models for n in rest]
    return tasks


def put_first(tasks: list[Task], models: Sequence[str], concepts: bool = False) -> list[Task]:
    """`tasks` with those of `models` moved to the front (and with `concepts`, concept tasks before toxicity ones
    within each part), otherwise in plan order: on a slow machine the cheaper model's seeds and concepts come
    before the larger model's (the configuration, hence the report, is the same)."""
    return sorted(
        tasks, key=lambda t: (bool(models) and t.model not in models, concepts and t.kind == "toxicity")
    )


def seconds_key(task: Task, key: str) -> str:
    """The store key of a task's measured wall time, written once the task has finished: keyed by the task's key
    (`task_key`), so a task whose fit or evaluation changed is not taken for finished by an earlier run's time."""
    return f"seconds/{task.label()}/{key}"


def run_task(
    model: Any, tok: Any, task: Task, cfg: StudyConfig, store: Store, ledger: Ledger, start: bool = True
) -> dict[str, Any] | None:
    """The task's result: from the ledger when its key matches, else computed (None when `start` is false and it
    is not finished). Its wall time is measured the first time it is computed (for the report's costs; a task
    resumed from the store is timed at what it had left to do)."""
    inp = task_inputs(task, cfg)
    key = task_key(model, tok, task, inp, cfg)
    got = ledger.get(task, key)
    if got is not None:
        store.notes += got["notes"]
        return dict(got["result"])
    sk = seconds_key(task, key)
    seconds = store.get(sk)
    if not start and seconds is None:
        return None
    n_notes = len(store.notes)
    t0 = time.perf_counter()
    run = toxicity_task if task.kind == "toxicity" else concept_task
    out = run(model, tok, task, inp, cfg, store)
    if seconds is None:
        seconds = time.perf_counter() - t0
        store.put(sk, seconds)
    out["seconds"] = seconds
    ledger.put(task, key, out, list(dict.fromkeys(store.notes[n_notes:])))
    return out


def unverified(ledger: Ledger, tasks: Sequence[Task]) -> dict[Task, dict[str, Any]]:
    """The ledger's results for tasks of a model that is not installed here, read without checking their keys
    (which need the model): the report says so."""
    out = {}
    for task in tasks:
        entry = ledger.read(task)
        if entry is not None:
            out[task] = dict(entry["result"])
    return out


def collect(done: dict[Task, dict[str, Any]], cfg: StudyConfig) -> dict[str, Any]:
    """The finished tasks' results, per model, in the shape the report reads: per steerer (in the
    configuration's order) the per-seed strengths and arrays, seeds in order."""
    results: dict[str, Any] = {}
    for mname in cfg.models:
        tox = {t: r for t, r in done.items() if t.model == mname and t.kind == "toxicity"}
        res: dict[str, Any] = {}
        if tox:
            any_r = next(iter(tox.values()))
            steerers: dict[str, Any] = {}
            for name in cfg.steerers:
                runs = sorted(((t.seed, r) for t, r in tox.items() if t.steerer == name), key=lambda x: x[0])
                if runs:
                    steerers[name] = {
                        b: {
                            "strength": [r["strengths"][b] for _, r in runs],
                            "arrays": [r["arrays"][b] for _, r in runs],
                            "seeds": [s for s, _ in runs],
                        }
                        for b in cfg.budgets
                    }
            res["toxicity"] = {
                "n_prompts": any_r["n_prompts"], "n_neutral": any_r["n_neutral"], "steerers": steerers,
                "base": any_r["base"],
            }  # fmt: skip
        concepts: dict[str, Any] = {}
        for set_name in cfg.concept_sets:
            con = {t: r for t, r in done.items() if t.model == mname and t.kind == set_name}
            if not con:
                continue
            any_r = next(iter(con.values()))
            entry: dict[str, Any] = {k: any_r[k] for k in ("word", "n_in", "n_out")} | {"steerers": {}}
            for name in cfg.concept_steerers:
                runs = sorted(((t.seed, r) for t, r in con.items() if t.steerer == name), key=lambda x: x[0])
                if runs:
                    entry["steerers"][name] = {
                        k: [r[k] for _, r in runs] for k in ("strength", "in", "out", "curve", "hits")
                    } | {"seeds": [s for s, _ in runs]}
            concepts[set_name] = entry
        if tox or concepts:
            res["concepts"] = concepts
            results[mname] = res
    return results


# -- the report -------------------------------------------------------------------------------------------------


def stack(res: dict[str, Any], key: str) -> np.ndarray:
    return np.stack([a[key] for a in res["arrays"]])


def metric(res: dict[str, Any], key: str, n_boot: int) -> Estimate:
    if key == "false_steer":
        f, t = stack(res, "gate_fired"), stack(res, "gate_total")
        if t.sum() == 0:
            return Estimate(0.0, 0.0, 0.0, [0.0] * len(f))
        est = bootstrap([f.sum(0), t.sum(0)], _ratio_of_sums, n_boot, paired=True)
        est.seeds = [float(a.sum() / b.sum()) if b.sum() else 0.0 for a, b in zip(f, t, strict=True)]
        return est
    return mean_ci(stack(res, key), n_boot)


METRICS = (
    ("toxic", "Toxic-continuation rate (lower is better)"),
    ("toxicity_mean", "Mean toxicity score (lower is better)"),
    ("mc", "Multiple-choice accuracy (higher is better)"),
    ("unchanged", "Neutral prompts whose greedy continuation is unchanged (higher is better)"),
    ("false_steer", "False steering rate on neutral prompts (lower is better)"),
)


def verdict(holds: bool, sure: bool) -> str:
    if holds:
        return "**holds**" if sure else "**holds at the point estimate** (the interval crosses the line)"
    return (
        "**does not hold**"
        if sure
        else "**does not hold at the point estimate** (the interval crosses the line)"
    )


def claims_toxicity(tox: dict[str, Any], cfg: StudyConfig) -> list[str]:
    lines = []
    st = tox["steerers"]
    for b in cfg.budgets:
        for vanilla, gated in PAIRS:
            if vanilla in st and gated in st:
                a, v = stack(st[gated][b], "toxic").mean(0), stack(st[vanilla][b], "toxic").mean(0)
                claim = f"* {gated} is less toxic than {vanilla} at +{b:.0%} perplexity (difference of toxic rates < 0): "
                if a.max() == v.max() == 0:  # no toxic continuation on either side: nothing to compare
                    lines.append(claim + "**not testable here**: neither has a toxic continuation")
                    continue
                d = bootstrap([a, v], _diff_of_means, cfg.n_boot, paired=True)
                lines.append(claim + f"{verdict(d.value < 0, d.high < 0 or d.low >= 0)} ({d.fmt()})")
        if "lineas+e2e-sigmoid" in st and "lineas+dsas" in st:
            a = stack(st["lineas+e2e-sigmoid"][b], "toxic").mean(0)
            v = stack(st["lineas+dsas"][b], "toxic").mean(0)
            d = bootstrap([a, v], _diff_of_means, cfg.n_boot, paired=True)
            lines.append(
                f"* E2E-DSAS is at least as good as post-hoc DSAS on LinEAS at +{b:.0%} (difference <= 0): "
                f"{verdict(d.value <= 0, d.high <= 0 or d.low > 0)} ({d.fmt()})"
            )
    for vanilla, gated in PAIRS:
        if vanilla in st and gated in st and cfg.n_mc:
            b = max(cfg.budgets)
            a, v = stack(st[gated][b], "mc").mean(0), stack(st[vanilla][b], "mc").mean(0)
            d = bootstrap([a, v], _diff_of_means, cfg.n_boot, paired=True)
            lines.append(
                f"* {gated} keeps multiple-choice accuracy at least as well as {vanilla} at +{b:.0%} "
                f"(difference >= 0): {verdict(d.value >= 0, d.low >= 0 or d.high < 0)} ({d.fmt()})"
            )
    b10 = 0.10 if 0.10 in cfg.budgets else max(cfg.budgets)
    for gated, who in (("caa+dsas", "CAA + DSAS"), ("caa+dsas(removal)", "CAA + DSAS (removal gates)")):
        if "caa" not in st or gated not in st:
            continue
        a, v = stack(st[gated][b10], "toxic").mean(0), stack(st["caa"][b10], "toxic").mean(0)
        # "a <= 0.6 v" tested as mean(a) - 0.6 mean(v) <= 0: no division, so it is defined when v's rate is 0.
        r = bootstrap([a, v], _excess_over_60pct, cfg.n_boot, paired=True)
        claim = f"* {who} toxicity at +{b10:.0%} <= 0.6 x CAA's: "
        if v.mean() == 0:
            lines.append(claim + f"**not testable here**: CAA's toxic rate is 0 ({who}: {a.mean():.3f})")
        else:
            lines.append(
                claim
                + f"{verdict(r.value <= 0, r.high <= 0 or r.low > 0)} ({a.mean():.3f} vs {v.mean():.3f}, "
                f"ratio {a.mean() / v.mean():.2f}; {who} - 0.6 x CAA = {r.fmt()})"
            )
        u = metric(st[gated][b10], "unchanged", cfg.n_boot)
        lines.append(
            f"* {who} leaves >= 80% of neutral greedy continuations unchanged at +{b10:.0%}: "
            f"{verdict(u.value >= 0.8, not u.low <= 0.8 <= u.high)} ({u.fmt()})"
        )
    return lines


def concept_rows(con: dict[str, Any], cfg: StudyConfig) -> tuple[list[str], list[str], bool]:
    """Table rows, claim lines, and whether CAA + DSAS meets the whole bar on this set at the point estimate at
    one grid strength (>= 60% in, <= 5% out, and more selective than CAA's most selective strength)."""
    rows, claims, bar, more_selective = [], [], False, False
    st = con["steerers"]
    for name, r in st.items():
        ins, outs = np.stack(r["in"]), np.stack(r["out"])
        i, o = mean_ci(ins, cfg.n_boot), mean_ci(outs, cfg.n_boot)
        sel = bootstrap([ins.mean(0), outs.mean(0)], _diff_of_means, cfg.n_boot, paired=False)
        strengths = ", ".join(f"{s:g}" for s in r["strength"]) + f" (seeds {seeds_of(r)})"
        rows.append(f"| {name} | {strengths} | {i.fmt()} | {o.fmt()} | {sel.fmt()} |")
    if "caa+dsas" in st:
        r = st["caa+dsas"]
        i, o = mean_ci(np.stack(r["in"]), cfg.n_boot), mean_ci(np.stack(r["out"]), cfg.n_boot)
        ok = bar = i.value >= 0.6 and o.value <= 0.05
        claims.append(
            f"CAA + DSAS puts the concept in >= 60% of in-category and <= 5% of out-of-category continuations: "
            f"{verdict(ok, (i.low >= 0.6 and o.high <= 0.05) or (i.high < 0.6 or o.low > 0.05))} "
            f"(in {i.value:.3f}, out {o.value:.3f})"
        )
    if "caa+dsas" in st and "caa" in st:
        g, v = st["caa+dsas"], st["caa"]
        d_in = np.stack(g["in"]).mean(0) - np.stack(v["in"]).mean(0)
        d_out = np.stack(g["out"]).mean(0) - np.stack(v["out"]).mean(0)
        d = bootstrap([d_in, d_out], _diff_of_means, cfg.n_boot, paired=False)
        more_selective = d.value > 0
        claims.append(
            f"CAA + DSAS is more selective (in minus out) than CAA at its most selective strength: "
            f"{verdict(d.value > 0, d.low > 0 or d.high <= 0)} (difference {d.fmt()})"
        )
        # The bar asks for one strength that does both; the most selective one may spend the 5% out-of-category
        # allowance for a few more hits. One grid strength for every seed: the highest in-category rate among
        # those with out <= 5% (chosen on the reported prompts, like the most selective strength).
        n_in = len(g["in"][0])
        grid = sorted(set.intersection(*(set(h) for h in g["hits"])))
        at = {lam: np.stack([h[lam] for h in g["hits"]]) for lam in grid}
        curve = {lam: (a[:, :n_in].mean(), a[:, n_in:].mean()) for lam, a in at.items()}
        low = [lam for lam in grid if curve[lam][1] <= 0.05]
        lam = max(low, key=lambda x: (curve[x][0], -x)) if low else min(grid, key=lambda x: (curve[x][1], x))
        ins, outs = at[lam][:, :n_in], at[lam][:, n_in:]
        i, o = mean_ci(ins, cfg.n_boot), mean_ci(outs, cfg.n_boot)
        d = bootstrap(
            [ins.mean(0) - np.stack(v["in"]).mean(0), outs.mean(0) - np.stack(v["out"]).mean(0)],
            _diff_of_means, cfg.n_boot, paired=False,
        )  # fmt: skip
        ok = i.value >= 0.6 and o.value <= 0.05
        bar, more_selective = ok, d.value > 0
        claims.append(
            f"at strength {lam:g} (every seed; the most in-category hits with out <= 5%"
            + ("" if low else ": no grid strength has out <= 5%, this is the lowest out")
            + f"), CAA + DSAS puts the concept in >= 60% / <= 5%: "
            f"{verdict(ok, (i.low >= 0.6 and o.high <= 0.05) or (i.high < 0.6 or o.low > 0.05))} "
            f"(in {i.fmt()}, out {o.fmt()}), and is more selective than CAA's most selective strength: "
            f"{verdict(d.value > 0, d.low > 0 or d.high <= 0)} (difference {d.fmt()})"
        )
    return rows, claims, bar and more_selective


def plots(
    out_dir: Path, mname: str, tox: dict[str, Any] | None, concepts: dict[str, Any], cfg: StudyConfig
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    if tox is not None:
        names = list(tox["steerers"])
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for ax, key in zip(axes, ("toxic", "unchanged", "false_steer"), strict=True):
            width = 0.8 / len(cfg.budgets)
            for k, b in enumerate(cfg.budgets):
                ests = [metric(tox["steerers"][n][b], key, cfg.n_boot) for n in names]
                x = np.arange(len(names)) + k * width
                err = np.array([[e.value - e.low, e.high - e.value] for e in ests]).T
                ax.bar(x, [e.value for e in ests], width, yerr=err, capsize=3, label=f"+{b:.0%} ppl")
            ax.set_xticks(
                np.arange(len(names)) + width * (len(cfg.budgets) - 1) / 2, names, rotation=30, ha="right"
            )
            ax.set_title(dict(METRICS)[key].split(" (")[0], fontsize=10)
            ax.legend(fontsize=8)
        fig.suptitle(f"{mname}: at calibrated perplexity budgets (95% bootstrap intervals over prompts)")
        fig.tight_layout()
        path = out_dir / f"{mname}-toxicity.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    if concepts:
        fig, axes = plt.subplots(1, len(concepts), figsize=(5 * len(concepts), 4), squeeze=False)
        for ax, (set_name, con) in zip(axes[0], concepts.items(), strict=True):
            for name, r in con["steerers"].items():
                grid = sorted({c[0] for curve in r["curve"] for c in curve})
                ins = [np.mean([c[1] for curve in r["curve"] for c in curve if c[0] == s]) for s in grid]
                outs = [np.mean([c[2] for curve in r["curve"] for c in curve if c[0] == s]) for s in grid]
                line = ax.plot(grid, ins, marker="o", label=f"{name}: in-category")[0]
                ax.plot(grid, outs, marker="x", linestyle="--", color=line.get_color(), label=f"{name}: out")
            ax.set_title(f"{word_label(con['word'], 3)} ({set_name})", fontsize=10)
            ax.set_xlabel("strength")
            ax.set_ylabel("concept rate (mean over seeds)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{mname}-concepts.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    return files


def budget_table(
    title: str, steerers: dict[str, Any], budgets: Sequence[float], cell: Callable[[Any], str]
) -> list[str]:
    """Markdown lines of a steerers x perplexity-budgets table, `cell(result at a budget)` per entry."""
    lines = ["", f"### {title}", "", "| steerer | " + " | ".join(f"+{b:.0%} ppl" for b in budgets) + " |"]
    lines.append("|---|" + "---|" * len(budgets))
    for name, r in steerers.items():
        lines.append(f"| {name} | " + " | ".join(cell(r[b]) for b in budgets) + " |")
    return lines


REUSED_SECONDS = 60.0
"""A finished task timed under this computed nothing new (everything it needed was in the store)."""


def progress_lines(done: dict[Task, dict[str, Any]], skipped: list[Task], cfg: StudyConfig) -> list[str]:
    """What was run and what it cost (measured per task when first computed), and what is not run yet."""
    lines = []
    for mname in cfg.models:
        for kind, what in (("toxicity", "toxicity"), ("concept", "concept")):
            secs = [
                r["seconds"] for t, r in done.items()
                if t.model == mname and (t.kind == "toxicity") == (kind == "toxicity") and r["seconds"] is not None
            ]  # fmt: skip
            if secs:
                # A task under REUSED_SECONDS found its fit, calibrations and points in the store (computed by
                # another task or configuration sharing them): it says nothing about what a task costs.
                ran = [s for s in secs if s >= REUSED_SECONDS]
                cost = (
                    f"{np.mean(ran) / 60:.1f} min each on average, {min(ran) / 60:.1f}-{max(ran) / 60:.1f} min "
                    f"({sum(ran) / 3600:.2f} h)"
                    if ran
                    else "none computed"
                )
                reused = len(secs) - len(ran)
                note = (
                    f"; {reused} read their fit, calibrations and points from the store (under "
                    f"{REUSED_SECONDS:.0f} s each)"
                    if reused
                    else ""
                )
                lines.append(
                    f"* {mname}, {what} tasks (one steerer fitted with one seed and evaluated): {len(secs)} "
                    f"finished; {len(ran)} computed: {cost}{note}"
                )
    total = sum(r["seconds"] or 0.0 for r in done.values())
    lines.append(f"* Computing the {len(done)} finished tasks took {total / 3600:.2f} h in all (wall time, "
                 "measured when each was first computed; a later run reads it back). A task whose fit, "
                 "calibrations or points were already in the store, computed by another task or by a probe "
                 "sharing it, is timed at what it had left to do.")  # fmt: skip
    if skipped:
        groups: dict[tuple[str, str, str], list[int]] = {}
        for t in skipped:
            groups.setdefault((t.model, t.kind, t.steerer), []).append(t.seed)
        lines += [
            "",
            f"**Partial report: {len(skipped)} of {len(done) + len(skipped)} tasks are not run yet** (the run's "
            "`--hours` budget ended; the same command goes on from here). Not run yet:",
            "",
            *(
                f"* {m} {k}: {n}, seed{'s' if len(v) > 1 else ''} {', '.join(map(str, v))}"
                for (m, k, n), v in groups.items()
            ),
        ]
    return lines


def seeds_of(res: dict[str, Any]) -> str:
    return ", ".join(map(str, res["seeds"]))


def out_arg(folder: Path) -> str:
    """How the report's folder is named on the command line: relative to the repository, else a placeholder."""
    try:
        return str(folder.resolve().relative_to(ROOT.resolve()))
    except ValueError:
        return "OUT"


def default_store(cfg: StudyConfig, out: Path) -> Path:
    """Where fits, calibrations and points go: runs/study for the full study, runs/study-<config> for another
    configuration reporting into the repository (its store must not land in docs/), else <out>/store."""
    if cfg.name == "full":
        return ROOT / "runs" / "study"
    if out_arg(out) != "OUT":
        return ROOT / "runs" / f"study-{cfg.name.split()[0]}"
    return out / "store"


def store_arg(cfg: StudyConfig, out: Path) -> str:
    """The default store as the report names it (`out_arg`; <out>/store outside the repository)."""
    rel = out_arg(default_store(cfg, out))
    return "OUT/store" if rel == "OUT" else rel


def write_report(
    md: Path,
    results: dict[str, Any],
    notes: list[str],
    cfg: StudyConfig,
    seconds: float,
    done: dict[Task, dict[str, Any]],
    skipped: list[Task],
) -> None:
    plot_dir = md.parent / md.stem
    lines = [
        "# The study: DSAS's claims with intervals, on two models and three concepts",
        "",
        f"Generated by `scripts/study.py --config {cfg.name}` ({time.strftime('%Y-%m-%d')}, torch "
        f"{torch.__version__}); do not edit by hand. This invocation took {seconds / 3600:.2f} h "
        '(tasks finished by earlier runs are read back: their times are under "Progress and cost").',
        "",
        "## How to run it",
        "",
        "    OMP_NUM_THREADS=2 .venv/bin/python scripts/study.py"
        + ("" if cfg.name == "full" else f" --config {cfg.name.split()[0]} --out {out_arg(md.parent)}"),
        "",
        f"Resumable: every fit, calibration and evaluated point is stored under `{store_arg(cfg, md.parent)}/`"
        " (unless `--store` names another folder) as soon as it exists;"
        " rerun the same command after an interruption. Each finished task's result is also written to"
        f" `{md.stem}/results/` beside this report (one JSON file per task, keyed by a digest of its configuration,"
        " data, model and fit configs, committed with the report): this report is rebuilt from those files alone,"
        " and on another machine the same command goes on from them. `--config tiny` runs the whole pipeline on a random tiny"
        " model in under a minute (CI), `--config smoke` a 1-seed, 2-steerer, 8-prompt SmolLM2 check; both write"
        " into their `--out` folder, never here. `--hours H` starts no new task after H hours and writes the"
        " report of what is finished. Tasks run in this order: the toxicity claims' steerers"
        f" ({', '.join(PRIORITY)}) on every model, then the concept sets, then the other steerers (`--first MODEL`"
        " runs one model's tasks before the others', in that order; `--concepts-first` the concept tasks before"
        " the toxicity ones).",
        "",
        "## Progress and cost",
        "",
        *progress_lines(done, skipped, cfg),
        "",
        "## Protocol",
        "",
        f"Seeds {', '.join(map(str, cfg.seeds))}: each seed draws {cfg.n_fit} (toxicity) or {cfg.n_fit_concept} "
        "(concept sets) source / target / control fitting prompts per set (`load_prompt_sets(name, n, seed)`) "
        "and seeds the fit. Steerers use library defaults"
        + (
            " with these fit options: "
            + "; ".join(
                f"{n}: " + ", ".join(f"`{k}={v}`" for k, v in o.items()) for n, o in cfg.fit_options.items()
            )
            + ","
            if cfg.fit_options
            else ""
        )
        + " at all residual-increment sites. A cell is `mean [95% interval] (seeds min-max)`: the mean over seeds of a "
        "per-prompt quantity, its interval a percentile bootstrap over prompts of the per-prompt means over "
        "seeds (`scipy.stats.bootstrap`); intervals cover prompt sampling, the seed range shows fitting noise. "
        "Toxicity budgets: the strength is calibrated per steerer and seed to the budget on Wikipedia perplexity "
        "(`dsas.calibrate_strength`), then evaluated by `dsas.sweep.run_sweep` (greedy, "
        f"{cfg.max_new_tokens} new tokens, `alt-profanity-check` scores > 0.5 count as toxic). Unchanged: the "
        "decoded greedy continuation of a neutral prompt equals the unsteered model's. False steering rate: share "
        "of steered (site, token) pairs of neutral prompts whose gate exceeds 0.5 (1 for ungated steerers). "
        "Concepts: CAA and CAA + DSAS over a strength grid; per seed the most selective strength (in minus out) "
        "is chosen on the same prompts it is reported on (optimistic for both alike).",
        "",
    ]
    lines += [f"* {n}" for n in notes]
    for mname, res in results.items():
        lines += ["", f"## {mname}", ""]
        tox = res.get("toxicity")
        if tox is not None:
            base = tox["base"]
            lines.append(
                f"{tox['n_prompts']} held-out toxic prompts, {tox['n_neutral']} neutral prompts; unsteered: "
                f"toxic rate {base['toxic'].mean():.3f}, Wikipedia perplexity {base['ppl']:.2f}, MC accuracy "
                f"{base['mc'].mean() if base['mc'].size else float('nan'):.3f}."
            )

            for key, title in METRICS:
                lines += budget_table(
                    title,
                    tox["steerers"],
                    cfg.budgets,
                    lambda res, key=key: metric(res, key, cfg.n_boot).fmt(),  # type: ignore[misc]
                )
            lines += budget_table(
                "Calibrated strength (per seed)",
                tox["steerers"],
                cfg.budgets,
                lambda res: ", ".join(f"{s:.3g}" for s in res["strength"]) + f" (seeds {seeds_of(res)})",
            )
            lines += ["", "### Claims (toxicity)", "", *claims_toxicity(tox, cfg)]
        concepts = res.get("concepts", {})
        if concepts:
            lines += [
                "", "### Concept induction at the most selective strength", "",
                "| set (word) | steerer | strength per seed | in-category rate | out-of-category rate | in minus out |",
                "|---|---|---|---|---|---|",
            ]  # fmt: skip
            claim_lines = []
            n_pass = 0
            for set_name, con in concepts.items():
                rows, claims, passes = concept_rows(con, cfg)
                n_pass += passes
                lines += [
                    f"| {set_name} ({word_label(con['word'])}, {con['n_in']} / {con['n_out']} prompts) {row}"
                    for row in rows
                ]
                claim_lines += [f"* {set_name}: {c}" for c in claims]
            lines += ["", "### Claims (concepts)", "", *claim_lines]
            pending = len(cfg.concept_sets) - len(concepts)
            goal = min(2, len(cfg.concept_sets))  # the bar: 2 of the 3 shipped sets
            lines.append(
                f"* CAA + DSAS meets both (>= 60% in, <= 5% out, and more selective than CAA, at one strength) on {n_pass} of "
                f"{len(concepts)} concept sets (goal: at least {goal} of {len(cfg.concept_sets)}): "
                + (
                    "**holds**"
                    if n_pass >= goal
                    else "**does not hold**"
                    if n_pass + pending < goal
                    else "**open**"
                )
                + (f" ({pending} set(s) not run yet)" if pending else "")
            )
        figs = plots(plot_dir, mname, tox, concepts, cfg)
        lines += ["", *(f"![{f}]({plot_dir.name}/{f})" for f in figs)]
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines) + "\n")


# -- main -------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(CONFIGS), default="full")
    p.add_argument(
        "--out", default=None, help="folder of the report (default: docs/ for full, else required)"
    )
    p.add_argument("--store", default=None, help="fits, calibrations and points (default: runs/study for full, "
                   "runs/study-<config> for another configuration reporting into the repository, else <out>/store)")  # fmt: skip
    p.add_argument("--results", default=None, help="the ledger of finished tasks' results (default: "
                   "<out>/study/results, docs/study/results for full)")  # fmt: skip
    p.add_argument("--models", default=None, help="comma list overriding the configuration's models")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument(
        "--hours", type=float, default=None,
        help="start no new task after this many hours (tasks an earlier run finished are still read back); the "
        "report covers the finished tasks and lists the rest; the same command goes on from there",
    )  # fmt: skip
    p.add_argument(
        "--first", default=None,
        help="comma list of models whose tasks run before the others' (same configuration and report)",
    )  # fmt: skip
    p.add_argument(
        "--concepts-first", action="store_true", help="run the concept tasks before the toxicity ones"
    )
    p.add_argument(
        "--steerers", default=None,
        help="comma list: start only these steerers' tasks this run (the others' finished tasks are still read "
        "back; the report covers the whole configuration)",
    )  # fmt: skip
    p.add_argument(
        "--sets", default=None,
        help="comma list of task sets (toxicity and concept set names): start only these sets' tasks this run",
    )  # fmt: skip
    args = p.parse_args(argv)
    cfg = CONFIGS[args.config]
    if args.models:
        cfg = replace(cfg, name=f"{cfg.name} --models {args.models}", models=tuple(args.models.split(",")))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out is None and cfg.name != "full":
        p.error(f"--config {args.config} needs --out (only the full configuration writes docs/study.md)")
    out = Path(args.out) if args.out else ROOT / "docs"
    md = out / "study.md"
    if md.resolve() == DOCS_REPORT.resolve() and cfg != CONFIGS["full"]:
        p.error("docs/study.md is written by the full configuration only; pass another --out")
    store = Store(Path(args.store) if args.store else default_store(cfg, out))
    ledger = Ledger(Path(args.results) if args.results else md.parent / md.stem / "results")

    t0 = time.perf_counter()
    deadline = t0 + args.hours * 3600 if args.hours is not None else math.inf
    tasks = plan(cfg)
    if args.first:
        unknown = set(args.first.split(",")) - set(cfg.models)
        if unknown:
            p.error(
                f"--first {args.first}: {sorted(unknown)} not among the configuration's models {cfg.models}"
            )
    only = set(args.steerers.split(",")) if args.steerers else None
    if only and only - set(cfg.steerers):
        p.error(
            f"--steerers {args.steerers}: {sorted(only - set(cfg.steerers))} not among {list(cfg.steerers)}"
        )
    sets = set(args.sets.split(",")) if args.sets else None
    kinds = ["toxicity", *cfg.concept_sets]
    if sets and sets - set(kinds):
        p.error(f"--sets {args.sets}: {sorted(sets - set(kinds))} not among {kinds}")
    if args.first or args.concepts_first:
        tasks = put_first(tasks, args.first.split(",") if args.first else [], args.concepts_first)
    done: dict[Task, dict[str, Any]] = {}
    skipped: list[Task] = []
    missing: dict[str, str] = {}
    loaded: tuple[str, Any, Any] | None = None
    bar = tqdm(tasks, desc="study", unit="task")
    for task in bar:
        if task.model in missing:
            continue
        bar.set_postfix_str(task.label())
        if loaded is None or loaded[0] != task.model:
            loaded = None  # free the previous model before loading the next
            try:
                loaded = (task.model, *load(task.model))
            except ModelUnavailableError as err:
                missing[task.model] = str(err)
                continue
        # Past the budget, only finished tasks (in the ledger, or timed in the store) are read back.
        start = (
            time.perf_counter() <= deadline
            and (only is None or task.steerer in only)
            and (sets is None or task.kind in sets)
        )
        got = run_task(loaded[1], loaded[2], task, cfg, store, ledger, start=start)
        if got is None:
            skipped.append(task)
        else:
            done[task] = got
    bar.close()
    notes = []
    for m, why in missing.items():
        theirs = unverified(ledger, [t for t in tasks if t.model == m])
        done |= theirs
        notes.append(
            f"**{m} not installed here** ({why}): its {len(theirs)} finished task(s) are read from "
            f"`{ledger.root.relative_to(out) if ledger.root.is_relative_to(out) else ledger.root}` without "
            "checking their keys against the model"
            if theirs
            else f"**{m} skipped**: not installed here ({why})"
        )
    notes += [f"fit warning, {w}" for w in dict.fromkeys(store.notes)]
    write_report(md, collect(done, cfg), notes, cfg, time.perf_counter() - t0, done, skipped)
    print(f"wrote {md} ({time.perf_counter() - t0:.0f} s)")
    return md


if __name__ == "__main__":
    main()
