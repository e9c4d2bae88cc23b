"""Why does a removal steerer leave a toxic continuation toxic: too little strength, or a gate that never opened?

Reads one finished toxicity task of the study (`scripts/study.py`: its fitted steerer in runs/study/steerers/ and
its evaluated points in runs/study/<model>/toxicity/sweep.sqlite, so run the task first) and, for every held-out
toxic prompt whose unsteered continuation is toxic, traces the steerer's gate at the top steered site over the
prompt and the steered continuation (teacher-forced, the stream as it was generated): is it open at the last
prompt token, where generation starts, and on what share of the continuation's tokens? Split by whether the
steered continuation is still toxic.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/removal_recall.py --model gemma3-270m --seed 0 --strength 64

~1 min on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path

import numpy as np
from prompt_gate import top_gate  # scripts/ is on the path when a script runs

import dsas
from dsas.sweep import steerer_hash


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steerer", default="caa+dsas(removal)", help="the study's steerer name")
    ap.add_argument("--strength", type=float, required=True, help="an evaluated strength of that task")
    ap.add_argument("--store", type=Path, default=Path("runs/study"))
    args = ap.parse_args()
    found = sorted((args.store / "steerers" / args.model).glob(f"toxicity-s{args.seed}-{args.steerer}-*"))
    if not found:
        raise SystemExit(
            f"No fitted {args.steerer} at seed {args.seed} under {args.store}: run the study task."
        )
    model, tok = dsas.load_model(args.model)
    db = sqlite3.connect(args.store / args.model / "toxicity" / "sweep.sqlite")
    hashes = {
        json.loads(r)["steerer_hash"]
        for (r,) in db.execute("SELECT row FROM points WHERE strength = ?", (args.strength,))
    }
    # The store can hold older fits of the same task (another library version): take the one evaluated there.
    fits = [st for st in (dsas.Steerer.load(f, model) for f in found) if steerer_hash(st) in hashes]
    if not fits:
        raise SystemExit(
            f"No fit of {args.steerer} at seed {args.seed} was evaluated at strength {args.strength}."
        )
    st = fits[-1]
    sh = steerer_hash(st)

    def point(strength: float, want: str | None) -> dict:
        for (row,) in db.execute("SELECT row FROM points WHERE strength = ?", (strength,)):
            d = json.loads(row)
            if (d["steerer_hash"] == want) if want else d["method"] == "none":
                return d
        raise SystemExit(f"No evaluated point at strength {strength} for this steerer in the store.")

    steered, base = point(args.strength, sh), point(0.0, None)
    toxic = dsas.load_prompt_sets("toxicity").eval["toxic"][: len(base["per_prompt"]["toxicity"])]
    t_base, t_st = np.array(base["per_prompt"]["toxicity"]), np.array(steered["per_prompt"]["toxicity"])
    rows = []
    for i in np.where(t_base > 0.5)[0]:
        prompt, cont = toxic[i], steered["per_prompt"]["continuations"][i]
        n_p = len(tok(prompt)["input_ids"])
        g = top_gate(model, tok, st, prompt + cont)
        rows.append((float(g[n_p - 1] > 0), float((g[n_p:] > 0).float().mean()), bool(t_st[i] > 0.5)))
    r = np.array(rows)
    print(f"{args.model} {args.steerer} seed {args.seed} at strength {args.strength}: {len(r)} held-out toxic "
          f"prompts with a toxic unsteered continuation")  # fmt: skip
    for name, sel in (("still toxic", r[:, 2] == 1), ("no longer toxic", r[:, 2] == 0)):
        if sel.any():
            print(f"  {name}: {int(sel.sum())}; gate open at the last prompt token on {r[sel, 0].mean():.3f}, "
                  f"on {r[sel, 1].mean():.3f} of continuation tokens")  # fmt: skip


if __name__ == "__main__":
    main()
