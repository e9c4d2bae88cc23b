"""Where the study's toxicity gates open: on the held-out toxic and neutral prompts, at the strength the study
calibrated for a perplexity budget, the share of prompts on which any steered (site, token) gate opens (g > 0.5)
and the mean share of a prompt's (site, token) pairs that open (docs/study.md's false steering rate is the latter
on neutral prompts). It tells a gate that misses toxic prompts from one that catches them but steers few sites:

    OMP_NUM_THREADS=2 .venv/bin/python scripts/gate_coverage.py                      # SmolLM2, seeds 0-2, +10%
    OMP_NUM_THREADS=2 .venv/bin/python scripts/gate_coverage.py --model gemma3-270m --seeds 0
    OMP_NUM_THREADS=2 .venv/bin/python scripts/gate_coverage.py --steerers "caa+dsas(removal)" \
        --variant 'latched, no split={"split": null}' --variant 'split, fpr .1={"control_fpr": 0.1}'

A `--variant LABEL=JSON` is the first steerer fitted with those options on top of its own (what a study
configuration's `fit_options` would give it); it is fitted, calibrated and stored like the study's.

Reads the fits and calibrations `scripts/study.py` stored under runs/study/ (what is missing is fitted or
calibrated the way the study does it, and stored). ~1 min per steerer and seed for SmolLM2 on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import dsas
from dsas.sweep import gate_counts, model_signature, steerer_hash

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study  # the study's store, fits and calibrations


def coverage(
    st: dsas.Steerer, model: torch.nn.Module, tok: object, texts: list[str], lam: float
) -> np.ndarray:
    """Per text: (steered (site, token) pairs whose gate opens, all steered pairs), read at strength `lam`."""
    return np.array(
        [c for i in range(0, len(texts), 16) for c in gate_counts(st, model, tok, texts[i : i + 16], lam)]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steerers", default="caa+dsas,caa+dsas(removal)")
    ap.add_argument("--budget", type=float, default=0.10)
    ap.add_argument("--store", default=str(study.ROOT / "runs" / "study"))
    ap.add_argument(
        "--variant", action="append", default=[], metavar="LABEL=JSON",
        help="also the first steerer with these fit options on top of its own (repeatable)",
    )  # fmt: skip
    args = ap.parse_args()
    full = study.CONFIGS["full"]
    names = args.steerers.split(",")
    rows = [(n, n, full) for n in names]
    for v in args.variant:
        label, _, opts = v.partition("=")
        extra = {names[0]: {**full.fit_options.get(names[0], {}), **json.loads(opts)}}
        rows.append((f"{names[0]} [{label}]", names[0], replace(full, fit_options=extra)))
    store = study.Store(Path(args.store))
    model, tok = study.load(args.model)
    data = study.toxicity_data(full)
    sig = model_signature(model)["weights"]
    print(
        f"{args.model}, +{args.budget:.0%} perplexity; {len(data.prompts)} toxic, {len(data.neutral)} neutral"
    )
    print(
        "steerer | seed | strength | toxic: any gate open, mean open share | neutral: any open, mean open share"
    )
    for label, name, cfg in rows:
        for seed in map(int, args.seeds.split(",")):
            sets = dsas.load_prompt_sets("toxicity", n=cfg.n_fit, seed=seed)
            st = study.fitted(store, model, tok, args.model, sig, sets, name, seed, cfg)
            lam = study.calibrated(store, st, steerer_hash(st), model, tok, data, cfg, args.budget)
            cells = []
            for texts in (data.prompts, data.neutral):
                c = coverage(st, model, tok, texts, lam)
                cells.append(f"{np.mean(c[:, 0] > 0):.3f}, {np.mean(c[:, 0] / c[:, 1]):.4f}")
            print(f"{label} | {seed} | {lam:.3g} | {cells[0]} | {cells[1]}", flush=True)


if __name__ == "__main__":
    main()
