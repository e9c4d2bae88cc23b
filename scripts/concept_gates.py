"""Concept induction with different gates, quickly: CAA vs CAA + DSAS (per-token gate) vs CAA + DSAS with
`scope="prefix"` (the gate reads the running mean of its logit over the sequence), on one concept set.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/concept_gates.py --sets concept     # pear / fruit, ~10 min on CPU

Prints, per steerer and strength, the share of held-out in-category and out-of-category continuations (40 each,
24 greedy tokens) that contain the concept word, and writes them as JSON. A fast probe for choosing what the
full study (`scripts/study.py`) should compare; no intervals.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import dsas
from dsas.eval import generate_continuations
from dsas.eval.concept import concept_rate

GRIDS: dict[str, tuple[str, dict[str, object], list[float]]] = {
    "caa": ("none", {}, [0.5, 1.0, 1.5, 2.0]),
    "caa+dsas": ("dsas", {}, [2.0, 4.0, 6.0, 8.0]),
    "caa+dsas(prefix)": ("dsas", {"scope": "prefix"}, [2.0, 4.0, 6.0, 8.0]),
    "caa(incr)": ("none", {"incremental": True}, [0.5, 1.0, 1.5, 2.0]),
    "caa(incr)+dsas": ("dsas", {"incremental": True}, [1.0, 2.0, 3.0, 4.0]),
    "caa(incr)+dsas(tokens)": ("dsas", {"incremental": True, "features": "tokens"}, [1.0, 2.0, 3.0, 4.0]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="concept", help="A concept prompt set: concept, animal, pirate.")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-eval", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path("runs/concept_gates"))
    ap.add_argument("--only", nargs="*", choices=list(GRIDS), help="Steerers to run (default: all).")
    ap.add_argument("--strengths", type=float, nargs="*", help="Override every steerer's strength grid.")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = dsas.load_model(args.model)
    sets = dsas.load_prompt_sets(args.sets, n=32, seed=0)
    word = sets.meta["concept_word"]
    keys = list(sets.eval)
    ins = sets.eval[sets.meta.get("eval_in") or keys[0]][: args.n_eval]
    outs = sets.eval[sets.meta.get("eval_out") or keys[1]][: args.n_eval]
    rows = []
    for name, (gate, opts, grid) in GRIDS.items():
        if args.only and name not in args.only:
            continue
        grid = args.strengths or grid
        st = dsas.fit(model, tok, sets, gate=gate, progress=False, **opts)
        print(f"{name}: {len(st.steered)} of {len(st.sites)} sites steered", flush=True)
        for lam in grid:
            t0 = time.time()
            with st.apply(model, lam):
                ci = generate_continuations(model, tok, ins, max_new_tokens=24, progress=False)
                co = generate_continuations(model, tok, outs, max_new_tokens=24, progress=False)
            r = {
                "steerer": name,
                "strength": lam,
                "in": concept_rate(ci, word),
                "out": concept_rate(co, word),
            }
            rows.append(r)
            print(json.dumps(r), f"({time.time() - t0:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.sets}.json"
    ran = {r["steerer"] for r in rows}
    kept = [r for r in json.loads(path.read_text()) if r["steerer"] not in ran] if path.exists() else []
    path.write_text(json.dumps(kept + rows, indent=1))


if __name__ == "__main__":
    main()
