"""The scale of E2E-DSAS's relative beta on a model: W2(init) / D (see `dsas.train.E2EConfig.relative_beta`).

    .venv/bin/python scripts/e2e_unit.py [--model smollm2-135m] [--sets toxicity]

W2(init) is the Wasserstein term of the unsteered source token-means against the target ones, summed over the
default sites; D is the summed norm of the mean source -> target displacement. Raw beta = relative beta * unit.
"""

from __future__ import annotations

import argparse

import torch

import dsas
from dsas.record import record
from dsas.sites import resolve_sites
from dsas.train import w2_sorted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sets", default="toxicity")
    ap.add_argument("--n", type=int, default=32, help="Prompts per set (as `dsas fit` draws them).")
    args = ap.parse_args()
    model, tok = dsas.load_model(args.model)
    sets = dsas.load_prompt_sets(args.sets, n=args.n, seed=0)
    sites = resolve_sites(model, "auto")
    src = record(model, tok, sets.source, sites, progress=False)
    tgt = record(model, tok, sets.target, sites, progress=False)
    w2 = dist = 0.0
    for s in sites:
        a, b = src[s.name].float(), tgt[s.name].float()
        w2 += float(w2_sorted(a, torch.sort(b, 0).values))
        dist += float(torch.linalg.vector_norm(b.mean(0) - a.mean(0)))
    print(
        f"{args.model} / {args.sets}: W2(init) {w2:,.0f}, D {dist:,.0f}, unit W2(init) / D = {w2 / dist:.1f}"
    )


if __name__ == "__main__":
    main()
