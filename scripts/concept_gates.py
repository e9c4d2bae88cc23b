"""Concept induction with different gates, quickly: CAA, CAA + DSAS with each gate scope ("token": the paper's
per-site gate; "prefix": the running mean of its logit over the sequence; "below": the pooled logits of the
regulators at or below each site; "below+prefix": both) and a few other options, on one concept set (docs/concepts.md).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/concept_gates.py --sets concept --only caa caa+dsas "caa+dsas(below)"

~50-70 s per strength on 2 CPU cores (about 15 min for those three steerers); without --only it runs them all.

Prints, per steerer and strength, the share of held-out in-category and out-of-category continuations (40 each,
24 greedy tokens) that contain the concept word (the pirate set: any of its voice's markers); for gated
steerers the mean gate g (over steered sites) on the continuation tokens; and the unsteered model's perplexity
of the continuations (how far from fluent text the steering drove them; the unsteered continuations' own is the
first row). Writes <out>/<sets>.json and a Markdown
table <out>/<sets>.md (rows of earlier runs with other steerers are kept). A fast probe for choosing what the
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
from dsas.eval.common import token_logprobs
from dsas.eval.concept import concept_rate, concept_words
from dsas.torchutil import model_device

HARD: dict[str, object] = {"floor": 0.5, "control_fpr": 0.05, "calibrate_on": "tokens"}
"""Hard gates: exactly 0 on all but 5% of the control prompts' tokens. Pooled gates (scope "below") are the
default since they were compared here; "caa+dsas" names the paper's per-site gate (scope "token")."""
GRIDS: dict[str, tuple[str, dict[str, object], list[float]]] = {
    "caa": ("none", {}, [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]),
    "caa+dsas": ("dsas", {"scope": "token"}, [2.0, 4.0, 6.0, 8.0]),  # the paper's per-site gate
    "caa+dsas(prefix)": ("dsas", {"scope": "prefix"}, [2.0, 4.0, 6.0, 8.0]),
    "caa+dsas(below)": ("dsas", {"scope": "below"}, [1.5, 2.0, 2.5, 3.0]),
    "caa+dsas(hard)": ("dsas", HARD, [2.0, 4.0, 6.0, 8.0]),
    "caa+dsas(below,hard)": ("dsas", {"scope": "below", **HARD}, [2.0, 3.0, 4.0, 6.0]),
    "caa+dsas(below+prefix)": ("dsas", {"scope": "below+prefix"}, [2.0, 3.0, 4.0, 5.0]),
    "caa+dsas(below+prefix,fpr)": ("dsas", {"scope": "below+prefix", "control_fpr": 0.05}, [3.0, 4.0, 6.0]),
    "caa+dsas(split)": ("dsas", {"scope": "below", "split": 0.5}, [2.0, 3.0, 4.0, 6.0]),
    "caa+dsas(T=0.5)": ("dsas", {"temperature": 0.5}, [2.0, 3.0, 4.0, 6.0]),
    "caa+dsas(T=0.25)": ("dsas", {"temperature": 0.25}, [2.0, 3.0, 4.0, 6.0]),
    "caa+dsas(tokens)": ("dsas", {"features": "tokens"}, [2.0, 3.0, 4.0, 6.0]),
    "caa(incr)": ("none", {"incremental": True}, [0.5, 1.0, 1.5, 2.0]),
    "caa(incr)+dsas": ("dsas", {"incremental": True}, [1.0, 2.0, 3.0, 4.0]),
    "caa(incr)+dsas(tokens)": ("dsas", {"incremental": True, "features": "tokens"}, [1.0, 2.0, 3.0, 4.0]),
    "caa(skip)": ("none", {"skip_tokens": 1}, [0.25, 0.5, 1.0, 1.5]),
    "caa+dsas(skip)": ("dsas", {"skip_tokens": 1}, [1.0, 2.0, 3.0, 4.0]),
}


def continuation_stats(
    model: torch.nn.Module, tok: object, prompts: list[str], conts: list[str], st: object, lam: float
) -> tuple[float, float | None]:
    """(unsteered perplexity of the continuation tokens, mean gate on them under `st` at `lam` or None)."""
    nll = count = 0.0
    gates: list[torch.Tensor] = []
    gated = st is not None and any(getattr(st.gates[s], "kind", "const") != "const" for s in st.steered)
    for p, c in zip(prompts, conts, strict=True):
        n_p = len(tok(p)["input_ids"])
        enc = tok(p + c, return_tensors="pt").to(model_device(model))
        n = enc["input_ids"].shape[1]
        if n <= n_p:
            continue
        with torch.no_grad():
            # Entry t of token_logprobs scores token t + 1: the continuation's tokens are entries n_p - 1 on.
            nll -= float(token_logprobs(model, enc["input_ids"], enc["attention_mask"])[0, n_p - 1 :].sum())
            count += n - n_p
            if gated:
                with st.apply(model, lam, trace=True) as tr:
                    model(**enc)
                gates.append(torch.stack([v[0, n_p:].abs() / abs(lam) for v in tr.scales.values()]).flatten())
    ppl = float(torch.exp(torch.tensor(nll / max(count, 1.0))))
    return ppl, (float(torch.cat(gates).mean()) if gates else None)


def markdown(rows: list[dict[str, object]], word: str | list[str]) -> str:
    label = repr(word) if isinstance(word, str) else "any of " + "/".join(word)
    head = (
        f"| steerer | strength | in-category with {label} | out-of-category | in - out | gate on in-category "
        "continuations | gate on out-of-category | continuation ppl (in / out) |\n|---|---|---|---|---|---|---|---|\n"
    )

    def f(x: object) -> str:
        return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)

    return head + "".join(
        f"| {r['steerer']} | {f(r['strength'])} | {f(r['in'])} | {f(r['out'])} | "
        f"{f(float(r['in']) - float(r['out']))} | {f(r.get('gate_in'))} | {f(r.get('gate_out'))} | "  # type: ignore[arg-type]
        f"{f(r.get('ppl_in'))} / {f(r.get('ppl_out'))} |\n"
        for r in rows
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="concept", help="A concept prompt set: concept, animal, pirate.")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-eval", type=int, default=40)
    ap.add_argument(
        "--n-fit",
        type=int,
        default=32,
        help="Fit prompts per split, drawn with seed 0 (0: the whole fit split).",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/concept_gates"))
    ap.add_argument("--only", nargs="*", choices=list(GRIDS), help="Steerers to run (default: all).")
    ap.add_argument("--strengths", type=float, nargs="*", help="Override every steerer's strength grid.")
    ap.add_argument(
        "--steerer",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="One more CAA + DSAS steerer with these fit options, e.g. 'caa+dsas(f)={\"floor\": 0.5}' (its grid is "
        "--strengths, or caa+dsas's).",
    )
    ap.add_argument(
        "--show", type=int, default=0, help="Print the first N in-category continuations per row."
    )
    args = ap.parse_args()
    for spec in args.steerer:
        name, _, raw = spec.partition("=")
        GRIDS[name] = ("dsas", json.loads(raw), list(GRIDS["caa+dsas"][2]))
        args.only = [*(args.only or []), name]
    torch.set_num_threads(1)
    model, tok = dsas.load_model(args.model)
    sets = dsas.load_prompt_sets(args.sets, n=args.n_fit or None, seed=0)
    word = concept_words(sets.meta) or ""
    keys = list(sets.eval)
    ins = sets.eval[sets.meta.get("eval_in") or keys[0]][: args.n_eval]
    outs = sets.eval[sets.meta.get("eval_out") or keys[1]][: args.n_eval]
    rows = []
    ci = generate_continuations(model, tok, ins, max_new_tokens=24, progress=False)
    co = generate_continuations(model, tok, outs, max_new_tokens=24, progress=False)
    ppl_in, _ = continuation_stats(model, tok, ins, ci, None, 0.0)
    ppl_out, _ = continuation_stats(model, tok, outs, co, None, 0.0)
    rows.append(
        {
            "steerer": "unsteered",
            "strength": 0.0,
            "in": concept_rate(ci, word),
            "out": concept_rate(co, word),
            "ppl_in": ppl_in,
            "ppl_out": ppl_out,
        }
    )
    print(json.dumps(rows[-1]), flush=True)
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
            ppl_in, g_in = continuation_stats(model, tok, ins, ci, st, lam)
            ppl_out, g_out = continuation_stats(model, tok, outs, co, st, lam)
            r = {
                "steerer": name,
                "strength": lam,
                "in": concept_rate(ci, word),
                "out": concept_rate(co, word),
                "gate_in": g_in,
                "gate_out": g_out,
                "ppl_in": ppl_in,
                "ppl_out": ppl_out,
            }
            rows.append(r)
            print(json.dumps(r), f"({time.time() - t0:.0f} s)", flush=True)
            for p, c in list(zip(ins, ci, strict=True))[: args.show]:
                print(f"    {p!r} -> {c!r}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.sets}.json"
    ran = {r["steerer"] for r in rows}
    kept = [r for r in json.loads(path.read_text()) if r["steerer"] not in ran] if path.exists() else []
    order = ["unsteered", *GRIDS]
    both = sorted(kept + rows, key=lambda r: (order.index(str(r["steerer"])), float(r["strength"])))
    path.write_text(json.dumps(both, indent=1))
    (args.out / f"{args.sets}.md").write_text(markdown(both, word))
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
