"""How well a fitted gate tells a concept set's held-out in-category prompts from its out-of-category ones, read at
the last prompt token (where generation starts), without generating anything (docs/concepts.md, "Fitted on the
whole fit split"):

    OMP_NUM_THREADS=1 .venv/bin/python scripts/gate_separation.py --sets concept --n-fit 32
    OMP_NUM_THREADS=1 .venv/bin/python scripts/gate_separation.py --sets concept --n-fit 0   # the whole fit split

Prints, per strength (1e-4: the gate as the unsteered stream gives it; larger: what the steered stream below
leaves of it), the ROC AUC of the mean gate over the steered sites, the mean gate per side, and the share of
in-category prompts whose gate lies above the 95th percentile of the out-of-category prompts' (how many could be
steered if at most 5% of the others may be). ~1 min per fit on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import dsas


def last_token_gates(
    st: dsas.Steerer, model: torch.nn.Module, tok: object, texts: list[str], lam: float
) -> np.ndarray:
    """Per text, the mean over steered sites of g at the last prompt token, steering at strength `lam`."""
    out = []
    for t in texts:
        enc = tok(t, return_tensors="pt")  # type: ignore[operator]
        with torch.no_grad(), st.apply(model, lam, trace=True) as tr:
            model(**enc)
        out.append(float(torch.stack([v[0, -1].abs() / abs(lam) for v in tr.scales.values()]).mean()))
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="concept", help="A concept prompt set: concept, animal, pirate.")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument(
        "--n-fit", type=int, default=32, help="Fit prompts per split, seed 0 (0: the whole split)."
    )
    ap.add_argument("--strengths", type=float, nargs="*", default=[1e-4, 3.0])
    ap.add_argument("--options", default="{}", help="DSAS fit options as JSON, e.g. '{\"pca_dim\": 16}'.")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = dsas.load_model(args.model)
    sets = dsas.load_prompt_sets(args.sets, n=args.n_fit or None, seed=0)
    st = dsas.fit(model, tok, sets, gate="dsas", progress=False, **json.loads(args.options))
    ins, outs = sets.eval[sets.meta["eval_in"]], sets.eval[sets.meta["eval_out"]]
    for lam in args.strengths:
        gi, go = last_token_gates(st, model, tok, ins, lam), last_token_gates(st, model, tok, outs, lam)
        auc = roc_auc_score(np.r_[np.ones(len(gi)), np.zeros(len(go))], np.r_[gi, go])
        q = float(np.quantile(go, 0.95))
        print(
            f"{args.sets} n_fit={args.n_fit or 'all'} {args.options} strength {lam:g}: AUC {auc:.3f}, mean gate "
            f"in {gi.mean():.3f} / out {go.mean():.3f}, in above the out side's 95th percentile ({q:.3f}): "
            f"{(gi > q).mean():.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
