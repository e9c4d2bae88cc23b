"""How well DSAS regulator options tell a concept set's held-out in-category prompts from its out-of-category ones,
read as the default latched pooled gate reads them at the last prompt token (where generation starts), on the
unsteered stream, without generating anything (docs/concepts.md, "Choosing the regulator"):

    OMP_NUM_THREADS=1 .venv/bin/python scripts/regulator_probe.py --sets concept animal pirate toxicity --seeds 0 1 2
    OMP_NUM_THREADS=1 .venv/bin/python scripts/regulator_probe.py --sets concept animal toxicity --seeds 0 1 2 \
        --variants default pca_dim=32 --skip-tokens 1

For scope "below+prefix" the gate of the top site at the last prompt token is sigmoid of the mean, over the
accurate regulators, of w . mean(z) + b (each regulator read on its site's token-mean), so one recording of the
token-means per prompt gives it exactly for every option. Each row fits the regulators with one option set (the
seed draws the fit prompts as the study does: `load_prompt_sets(name, n, seed)`) and prints: the sites whose
regulator passed the accuracy threshold, the ROC AUC of the pooled logit, the share of in-category prompts whose
gate is open (> 0.5) and of out-of-category ones, and the share of in-category prompts above the out-of-category
95th percentile (how many could be steered if at most 5% of the others may be).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import dsas
from dsas.gates import DSASConfig, fit_regulator
from dsas.record import record
from dsas.sites import resolve_sites

VARIANTS = {
    "default": {},
    "pca_dim=16": {"pca_dim": 16},
    "pca_dim=32": {"pca_dim": 32},
    "pca_dim=64": {"pca_dim": 64},
    "pca_dim=32,C=0.1": {"pca_dim": 32, "C": 0.1},
    "pca_dim=64,C=0.1": {"pca_dim": 64, "C": 0.1},
}


def pooled_logit(fits: list, acts: dict[str, torch.Tensor], names: list[str]) -> np.ndarray:
    """Mean over the accurate regulators of w . z + b, per prompt (the top site's latched pool)."""
    logits = [
        acts[n].double().numpy() @ f.gate.w.double().numpy() + f.gate.b
        for n, f in zip(names, fits, strict=True)
        if f.active
    ]
    if not logits:
        return np.zeros(len(next(iter(acts.values()))))
    return np.mean(logits, axis=0)


def row(vals: Any) -> str:
    """The table cells after the names: sites, then AUC and the three shares."""
    return f"{vals[0]:.0f} | " + " | ".join(f"{x:.3f}" for x in vals[1:]) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", nargs="+", default=["concept"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--n-fit", type=int, default=56, help="Fit prompts per split (the study: 56 concept, 32 toxicity)."
    )
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"Of {list(VARIANTS)}.")
    ap.add_argument("--extra", default="{}", help='More variants as JSON: {"name": {options}}.')
    ap.add_argument(
        "--skip-tokens", type=int, default=0, help="FitConfig.skip_tokens: leave the first k tokens out."
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    variants = {k: VARIANTS[k] for k in args.variants} | json.loads(args.extra)
    model, tok = dsas.load_model(args.model)
    sites = resolve_sites(model, "auto")
    names = [s.name for s in sites]
    print(f"skip_tokens={args.skip_tokens}, {args.n_fit} fit prompts per split\n")
    print("| set | seed | options | accurate sites | AUC | in open | out open | in above out's 95th pct |")
    print("|---|---|---|---|---|---|---|---|")
    summary: dict[tuple[str, str], list[list[float]]] = {}
    for name in args.sets:
        for seed in args.seeds:
            sets = dsas.load_prompt_sets(name, n=args.n_fit, seed=seed)
            ev_in, ev_out = sets.meta.get("eval_in", "toxic"), sets.meta.get("eval_out", "neutral")
            rec = {
                k: record(model, tok, texts, sites, progress=False, skip=args.skip_tokens)
                for k, texts in {
                    "source": sets.source,
                    "control": sets.control,
                    "target": sets.target,
                    "in": sets.eval[ev_in],
                    "out": sets.eval[ev_out],
                }.items()
            }
            for vname, opts in variants.items():
                cfg = DSASConfig(**opts)
                neg = "target" if cfg.negatives == "control+target" else None
                fits = []
                for n in names:
                    ctl = rec["control"][n] if neg is None else torch.cat([rec["control"][n], rec[neg][n]])
                    fits.append(fit_regulator(rec["source"][n], ctl, cfg, seed))
                li, lo = pooled_logit(fits, rec["in"], names), pooled_logit(fits, rec["out"], names)
                auc = roc_auc_score(np.r_[np.ones(len(li)), np.zeros(len(lo))], np.r_[li, lo])
                q = float(np.quantile(lo, 0.95))
                vals = [sum(f.active for f in fits), auc, (li > 0).mean(), (lo > 0).mean(), (li > q).mean()]
                summary.setdefault((name, vname), []).append(vals)
                print(f"| {name} | {seed} | {vname} | {row(vals)}", flush=True)
    print(f"\nMeans over seeds {args.seeds}:\n")
    print("| set | options | accurate sites | AUC | in open | out open | in above out's 95th pct |")
    print("|---|---|---|---|---|---|---|")
    for (name, vname), rows in summary.items():
        print(f"| {name} | {vname} | {row(np.mean(rows, axis=0))}")


if __name__ == "__main__":
    main()
