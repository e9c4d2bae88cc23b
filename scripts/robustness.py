"""How DSAS holds up with noisy labels and few examples (the paper's Table C and Figure 5 protocols, spec §7.3).

    .venv/bin/python scripts/robustness.py --study noise        # p = 0, 0.1, ..., 0.5 of source/control swapped
    .venv/bin/python scripts/robustness.py --study size         # N = 8, 16, 32, 64 prompts per set
    .venv/bin/python scripts/robustness.py --study noise --seeds 0,1,2,3 --out runs/robust_noise

On the embedded SmolLM2 with the shipped toxicity sets. Each point fits CAA + DSAS, reports the regulator (mean
cross-validated accuracy over the 60 sites, number of active sites), then **calibrates the strength** to +5%
perplexity on the 48 Wikipedia paragraphs of `dsas demo` (`dsas.calibrate_strength`) and measures, at that
strength, the toxicity of the demo's 64 held-out greedy continuations (rate and mean score, `alt-profanity-check`)
and the false steering rate on 32 held-out neutral prompts. That is "toxicity at the 5% perplexity budget" with one calibrated point instead of a
sweep. Vanilla CAA at its own calibrated strength is the reference row of each level.

* noise: the steering map comes from the clean sets; only the regulator's labels are noisy
  (`PromptSets.with_label_noise(p)`: a fraction p of source and control prompts trade places).
* size: maps and regulator are fitted on N prompts per set (`load_prompt_sets(n=N, seed)`).

Resumable (one JSON line per point in <out>/points.jsonl); writes <out>/summary.md, the table quoted in
docs/robustness.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import dsas
from dsas.eval import generate_continuations
from dsas.eval.perplexity import load_wiki_paragraphs
from dsas.eval.toxicity import get_scorer, toxicity_summary
from dsas.sweep import gate_rate

LEVELS = {"noise": "0,0.1,0.2,0.3,0.4,0.5", "size": "8,16,32,64"}


def with_gates(maps_from: dsas.Steerer, gates_from: dsas.Steerer) -> dsas.Steerer:
    """The maps of one steerer with the gates (and active sites) of another fitted on the same sites."""
    assert maps_from.site_names == gates_from.site_names
    return dsas.Steerer(
        maps_from.sites,
        maps_from.maps,
        gates_from.gates,
        gates_from.steered,
        gates_from.config,
        maps_from.fingerprint,
        gates_from.stats,
    )


def measure(model: Any, tok: Any, st: dsas.Steerer, data: dict[str, list[str]], iters: int) -> dict[str, Any]:
    cal = dsas.calibrate_strength(
        st, model, tok, data["wiki"], max_ppl_increase=0.05, iters=iters, progress=False
    )
    with st.apply(model, strength=cal.strength):
        conts = generate_continuations(
            model, tok, data["toxic"], max_new_tokens=32, do_sample=False, progress=False
        )
    tox = toxicity_summary(get_scorer("profanity")(conts))
    accs = [float(v["accuracy"]) for v in st.stats.values() if v.get("accuracy") is not None]
    return {
        "strength": cal.strength,
        "ppl_increase": cal.increase,
        "toxicity": tox["rate"],
        "toxicity_mean": tox["mean_prob"],
        "false_steer_rate": gate_rate(st, model, tok, data["neutral"], cal.strength),
        "active_sites": len(st.steered),
        "mean_accuracy": statistics.fmean(accs) if accs else None,
        "evaluations": len(cal.evaluated),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=list(LEVELS), required=True)
    p.add_argument("--levels", default=None, help="comma list (default: noise " + LEVELS["noise"] + ")")
    p.add_argument("--seeds", default="0", help="comma list of seeds (noise draw / prompt sample)")
    p.add_argument("--out", default=None, help="default: runs/robust_<study>")
    p.add_argument("--iters", type=int, default=4, help="bisection steps of the strength calibration")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/robust_{args.study}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "points.jsonl"
    done = {json.loads(x)["key"] for x in path.read_text().splitlines()} if path.exists() else set()
    model, tok = dsas.load_model("smollm2-135m")
    full = dsas.load_prompt_sets("toxicity")
    data = {
        "toxic": full.eval["toxic"][
            :64
        ],  # the held-out prompts, neutral prompts and Wikipedia of `dsas demo`
        "neutral": full.eval["neutral"][:32],
        "wiki": load_wiki_paragraphs(48, seed=0),
    }
    levels = [float(x) for x in (args.levels or LEVELS[args.study]).split(",")]
    for seed in [int(s) for s in args.seeds.split(",")]:
        clean = dsas.load_prompt_sets("toxicity", n=32, seed=seed)
        vanilla_clean = None
        for level in levels:
            rows = [("caa+dsas", level), ("caa", level)]
            for name, lv in rows:
                key = f"{args.study}={lv:g}/seed={seed}/{name}"
                if key in done or (args.study == "noise" and name == "caa" and lv != levels[0]):
                    continue  # noise leaves vanilla CAA unchanged: measured once per seed
                t0 = time.perf_counter()
                if args.study == "size":
                    sets = dsas.load_prompt_sets("toxicity", n=int(lv), seed=seed)
                    gate = "dsas" if name == "caa+dsas" else "none"
                    st = dsas.fit(model, tok, sets, method="caa", gate=gate, seed=seed, progress=False)
                elif name == "caa":
                    st = dsas.fit(model, tok, clean, method="caa", gate="none", seed=seed, progress=False)
                else:
                    if vanilla_clean is None:
                        vanilla_clean = dsas.fit(model, tok, clean, method="caa", gate="none", progress=False)
                    noisy = clean.with_label_noise(lv, seed=seed)
                    regulated = dsas.fit(
                        model, tok, noisy, method="caa", gate="dsas", seed=seed, progress=False
                    )
                    st = with_gates(vanilla_clean, regulated)
                row = {"key": key, "study": args.study, "level": lv, "seed": seed, "name": name}
                row.update(measure(model, tok, st, data, args.iters))
                row["seconds"] = round(time.perf_counter() - t0, 1)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
                with path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    write_summary(out, args.study)


def write_summary(out: Path, study: str) -> None:
    rows = [json.loads(x) for x in (out / "points.jsonl").read_text().splitlines()]
    cols = ["strength", "toxicity", "toxicity_mean", "false_steer_rate", "active_sites", "mean_accuracy"]
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["level"], r["name"]), []).append(r)
    label = "label noise p" if study == "noise" else "prompts per set N"
    lines = [
        f"| {label} | steerer | seeds | " + " | ".join(cols) + " |",
        "|" + "---|" * (len(cols) + 3),
    ]
    for (level, name), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        vals = []
        for c in cols:
            xs = [r[c] for r in rs if r.get(c) is not None]
            if not xs or (name == "caa" and c in ("active_sites", "mean_accuracy")):
                vals.append("")
                continue
            m = statistics.fmean(xs)
            sd = f" ± {statistics.stdev(xs):.3g}" if len(xs) > 1 else ""
            vals.append(f"{m:.4g}{sd}")
        lines.append(f"| {level:g} | {name} | {len(rs)} | " + " | ".join(vals) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
