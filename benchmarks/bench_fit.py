"""Fit time of every registered method x gate, and the DSAS regulator alone, on 32 + 32 + 32 prompts.

    .venv/bin/python benchmarks/bench_fit.py                     # SmolLM2-135M on CPU, all 60 residual-increment sites
    .venv/bin/python benchmarks/bench_fit.py --shape tiny
    python3 benchmarks/bench_fit.py --shape qwen2.5-1.5b          # on a GPU

`dsas.fit` = recording the unsteered activations of the sets it needs + fitting maps + fitting gates. The
"regulator" row times `fit_regulator` (PCA -> logistic regression, 5-fold CV accuracy, fold) for every site on
activations recorded beforehand: the DSAS part proper. LinEAS / E2E rows train with the library's default step
budget (`LinEASConfig.steps=None`: 50 for LinEAS, 25 for E2E-DSAS, early stop on a plateau) unless
`--lineas-steps` is given; their fit time grows linearly with the steps.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from common import (
    add_common_args,
    environment,
    load,
    load_average,
    model_tag,
    result_path,
    setup,
    sync,
    write_json,
)

import dsas
from dsas.fit import GATES, METHODS
from dsas.gates import DSASConfig, fit_regulator
from dsas.record import record
from dsas.sites import resolve_sites

PAIRS = [
    ("caa", "none"),
    ("caa", "dsas"),
    ("iti", "dsas"),
    ("linear_act", "dsas"),
    ("caa", "threshold"),
    ("lineas", "none"),
    ("lineas", "e2e-sigmoid"),
    ("lineas", "e2e-relu"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--repeats", type=int, default=3, help="fits per pair (LinEAS-based pairs: 1)")
    p.add_argument("--lineas-steps", type=int, default=None, help="default: the library default budget")
    args = p.parse_args()
    dev, dtype = setup(args)
    out = result_path(args, "fit", dev)
    model, tok, sets = load(args, dev, dtype)
    payload: dict[str, Any] = {
        "env": environment(dev),
        "args": vars(args),
        "model": model_tag(args),
        "rows": [],
    }
    sites = resolve_sites(model, "auto")
    payload["sites"] = len(sites)
    print(
        f"{model_tag(args)} on {dev}: {len(sites)} sites, {len(sets.source)}+{len(sets.target)}+"
        f"{len(sets.control)} prompts; load average {load_average()}"
    )

    # The regulator alone, on recorded activations.
    t0 = time.perf_counter()
    src = record(model, tok, sets.source, sites, progress=False, max_length=128)
    ctl = record(model, tok, sets.control, sites, progress=False, max_length=128)
    sync(dev)
    rec_s = time.perf_counter() - t0
    cfg = DSASConfig()
    reg_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fits = [fit_regulator(src[s.name], ctl[s.name], cfg) for s in sites]
        reg_times.append(time.perf_counter() - t0)
    reg = sorted(reg_times)[len(reg_times) // 2]
    active = sum(f.active for f in fits)
    payload["rows"].append(
        {
            "pair": "dsas regulator only",
            "median_s": round(reg, 3),
            "seconds": reg_times,
            "active_sites": active,
            "recording_source_control_s": round(rec_s, 3),
        }
    )
    print(
        f"recording source+control: {rec_s:.2f} s; regulator for {len(sites)} sites: {reg:.2f} s "
        f"({active} active)"
    )

    for method, gate in PAIRS:
        joint = GATES[gate].joint if gate in GATES else None
        if method not in METHODS or gate not in GATES or (joint is not None and method != joint):
            payload["rows"].append({"pair": f"{method}+{gate}", "skipped": "not registered"})
            continue
        opts: dict[str, Any] = (
            {"steps": args.lineas_steps} if method == "lineas" and args.lineas_steps else {}
        )
        reps = 1 if method == "lineas" else args.repeats
        times = []
        try:
            for _ in range(reps):
                t0 = time.perf_counter()
                st = dsas.fit(model, tok, sets, method=method, gate=gate, progress=False, **opts)
                sync(dev)
                times.append(time.perf_counter() - t0)
        except Exception as e:
            payload["rows"].append({"pair": f"{method}+{gate}", "skipped": f"{type(e).__name__}: {e}"[:300]})
            print(f"[skip] {method}+{gate}: {e}")
            continue
        med = sorted(times)[len(times) // 2]
        payload["rows"].append(
            {
                "pair": f"{method}+{gate}",
                "median_s": round(med, 3),
                "seconds": [round(t, 3) for t in times],
                "steered_sites": len(st.steered),
                "options": opts,
            }
        )
        print(
            f"{method}+{gate}: {med:.2f} s (runs {[round(t, 2) for t in times]}), {len(st.steered)} sites steered"
        )
        write_json(out, payload)
    payload["env"]["load_average_end"] = load_average()
    write_json(out, payload)

    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"fit time: {model_tag(args)} on {dev}, load {payload['env']['load_average_start']} -> "
        f"{payload['env']['load_average_end']}"
    )
    for c in ("method + gate", "median s", "runs", "sites steered"):
        t.add_column(c)
    for r in payload["rows"]:
        t.add_row(
            r["pair"],
            f"{r['median_s']:.2f}" if "median_s" in r else r.get("skipped", ""),
            str(len(r.get("seconds", []))),
            str(r.get("steered_sites", r.get("active_sites", ""))),
        )
    Console(width=150).print(t)
    print(f"wrote {out}")


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
