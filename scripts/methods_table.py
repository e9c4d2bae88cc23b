"""One Markdown table of matched-perplexity results across several run folders (e.g. an E2E-DSAS beta sweep).

    .venv/bin/python scripts/methods_table.py runs/methods:lineas+dsas "runs/e2e_beta10:lineas+e2e-sigmoid=beta 10"

Each argument is RUN_DIR:STEERER[=LABEL]. The unsteered point of each run folder is its baseline. Columns: toxicity
rate and mean toxicity score at +5% / +10% perplexity (interpolated on the Pareto front, as in summary.md), and
the share of held-out neutral prompts whose greedy continuation is unchanged (equal text to the unsteered
point's) at +5% / +10% perplexity, and the false / true steering rates at the smallest and largest strength of
the steerer's grid. With --ref RUN_DIR:STEERER (e.g. runs/tox_token:caa), one more column: of the steerer's measured
strengths within +10% perplexity whose mean toxicity is at most 0.6x the reference's at +10%, the largest share of
unchanged neutral continuations, and the strength it was measured at ("-": no such strength).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dsas.sweep import load_points, matched_utility_table, unchanged_neutral, value_at_budget


def _points(spec: str) -> tuple[str, str, list[dict[str, Any]]]:
    run, _, name = spec.rpartition(":")
    pts = [p for p in load_points(Path(run)) if p["name"] in ("unsteered", name)]
    if len(pts) < 2:
        raise SystemExit(f"{run} has no sweep points of {name!r}")
    return run, name, pts


def ref_mean(spec: str) -> float:
    """The reference steerer's mean toxicity at +10% perplexity."""
    _, _, pts = _points(spec)
    return float(matched_utility_table(pts, (0.10,), y="toxicity_mean")[0]["toxicity_mean@+10%ppl"])


def row(arg: str, ref: float | None = None) -> str:
    spec, _, label = arg.partition("=")
    run, name, pts = _points(spec)
    fit = {}
    run_json = Path(run) / "run.json"
    if run_json.exists():
        cfg = json.loads(run_json.read_text())
        fit = cfg.get("config", {}).get("options", {}).get(name, {})
    base = next(p for p in pts if p["name"] == "unsteered")
    for p in pts:  # points of older dsas versions have no per-prompt outputs: no value
        same = unchanged_neutral(p, base) if "per_prompt" in p and "per_prompt" in base else []
        p["neutral_unchanged"] = sum(same) / len(same) if same else float("nan")
    rate = matched_utility_table(pts, (0.05, 0.10))[0]
    # Read at the same spot of the (perplexity, toxicity) front as the toxicity columns.
    kept = [value_at_budget(pts, base["ppl"] * (1 + b), read="neutral_unchanged") for b in (0.05, 0.10)]
    mean = matched_utility_table(pts, (0.05, 0.10), y="toxicity_mean")[0]
    own = sorted((p for p in pts if p["name"] == name), key=lambda p: p["strength"])
    fsr = f"{own[0].get('false_steer_rate', float('nan')):.2f}-{own[-1].get('false_steer_rate', float('nan')):.2f}"
    tsr = f"{own[0].get('true_steer_rate', float('nan')):.2f}-{own[-1].get('true_steer_rate', float('nan')):.2f}"
    cells = [
        label or name,
        run,
        json.dumps(fit) if fit else "defaults",
        *(f"{v:.3f}" for v in (rate["toxicity@+5%ppl"], rate["toxicity@+10%ppl"])),
        *(f"{v:.3f}" for v in (mean["toxicity_mean@+5%ppl"], mean["toxicity_mean@+10%ppl"])),
        *(f"{v:.2f}" for v in kept),
        fsr,
        tsr,
    ]
    if ref is not None:
        ok = [p for p in own if p["ppl"] <= base["ppl"] * 1.10 and p["toxicity_mean"] <= 0.6 * ref]
        best = max(ok, key=lambda p: (p["neutral_unchanged"], -p["strength"]), default=None)
        cells.append("-" if best is None else f"{best['neutral_unchanged']:.2f} @{best['strength']:g}")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR:STEERER[=LABEL]")
    ap.add_argument(
        "--ref", metavar="RUN_DIR:STEERER", help="the steerer whose toxicity at +10%% is the 0.6x bar"
    )
    args = ap.parse_args()
    ref = ref_mean(args.ref) if args.ref else None
    head = (
        "| steerer | run | fit options | rate @+5% | rate @+10% | mean @+5% | mean @+10% | unchanged @+5% "
        "| unchanged @+10% | false steer | true steer |"
    )
    if ref is not None:
        head += f" unchanged, mean <= 0.6 x {ref:.3f}, ppl <= +10% |"
    print(head)
    print("|---" * head.count(" |") + "|")
    for a in args.runs:
        print(row(a, ref))


if __name__ == "__main__":
    main()
