"""How much the attention sink weighs in a token-mean (docs/concepts.md, "The attention sink"):

    OMP_NUM_THREADS=1 .venv/bin/python scripts/sink_norms.py --sets pirate concept animal toxicity

Per prompt set (fit prompts drawn as the study draws them, seed 0): the mean norm of the first token's activation
and of the other tokens' at the top site, and the length of the CAA shift (target token-mean minus source
token-mean) summed over every site, with the first token in the token-means (the paper's, `skip_tokens=0`) and
without it (`skip_tokens=1`). Seconds on a CPU; nothing is generated.
"""

from __future__ import annotations

import argparse

import torch

import dsas
from dsas.record import record
from dsas.sites import resolve_sites


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", nargs="+", default=["pirate", "concept", "animal", "toxicity"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-fit", type=int, default=56)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = dsas.load_model(args.model)
    sites = resolve_sites(model, "auto")
    top = sites[-1].name
    print(
        "| set | first-token norm (top site) | other tokens' norm | summed CAA shift, first token in | "
        "without it |\n|---|---|---|---|---|"
    )
    for name in args.sets:
        sets = dsas.load_prompt_sets(name, n=args.n_fit, seed=0)
        acts = {
            k: record(model, tok, getattr(sets, k), sites, pool="all", progress=False)
            for k in ("source", "target")
        }
        length = {0: 0.0, 1: 0.0}
        for s in sites:
            for skip in length:
                mu = {k: torch.stack([t[skip:].mean(0) for t in v[s.name]]).mean(0) for k, v in acts.items()}
                length[skip] += float((mu["target"] - mu["source"]).norm())
        src = acts["source"][top]
        first = float(torch.stack([t[0] for t in src]).norm(dim=-1).mean())
        rest = float(torch.cat([t[1:] for t in src]).norm(dim=-1).mean())
        print(f"| {name} | {first:.0f} | {rest:.0f} | {length[0]:.0f} | {length[1]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
