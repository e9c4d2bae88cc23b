"""Every "how" with and without a "when" on the embedded SmolLM2: the data behind docs/methods.md.

    .venv/bin/python scripts/compare_methods.py                 # ~45 min on 2 quiet CPU cores
    .venv/bin/python scripts/compare_methods.py --out runs/methods --steerers caa,caa+dsas,iti,iti+dsas

It is `dsas demo` (same prompt sets, evaluation and report) with more steerers and per-method strength grids:
CAA, ITI and LinEAS, each ungated and gated by DSAS; LinEAS also with the jointly trained E2E-DSAS gate, as in
the paper. Resumable: rerunning with the same --out keeps the sweep points already in sweep.sqlite (the fits are
redone, deterministic under the seed, so their content hashes match). Writes <out>/report.html and <out>/summary.md.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from dsas.demo import DemoConfig, run_demo

STEERERS = "caa,caa+dsas,iti,iti+dsas,lineas,lineas+dsas,lineas+e2e-sigmoid"
VANILLA = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
GATED = (0.2, 0.4, 0.6, 1.0, 1.5, 2.0, 3.0)
# ITI moves only the top-k units (k = 12.5% of a site) by one standard deviation along the mean difference: on
# SmolLM2 its shifts are ~2.7x shorter than CAA's (median norm 2.1 vs 5.6 over the 60 sites), so its grids reach
# ~3x further.
GRIDS = {
    "iti": (0.25, 0.5, 1.0, 1.5, 2.0, 3.0),
    "iti+dsas": (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/methods")
    p.add_argument("--model", default="smollm2-135m", help="a built-in model name, a local path or a hub id")
    p.add_argument("--steerers", default=STEERERS, help="comma list of 'method' or 'method+gate'")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--lineas-steps",
        type=int,
        default=None,
        help="training steps of the LinEAS-based steerers (default: 50/25)",
    )
    p.add_argument(
        "--e2e-beta",
        type=float,
        default=None,
        help="E2EConfig.beta of the E2E-DSAS steerers (relative units, see E2EConfig.relative_beta)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="STEERER:KEY=VALUE",
        help="one more fit option of one steerer, e.g. caa+dsas:scope=below (a JSON value or a string)",
    )
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="STEERER=S1,S2,...",
        help="the strengths swept for one steerer, instead of its default grid",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = tuple(s.strip() for s in args.steerers.split(",") if s.strip())
    opts: dict[str, dict[str, Any]] = {n: {} for n in names}
    for n in names:
        if n.startswith("lineas") and args.lineas_steps:
            opts[n]["steps"] = args.lineas_steps
        if "+e2e" in n and args.e2e_beta is not None:
            opts[n]["beta"] = args.e2e_beta
    for spec in args.option:
        who, _, kv = spec.partition(":")
        key, eq, raw = kv.partition("=")
        if who not in opts or not key or not eq:
            p.error(f"--option {spec!r}: use STEERER:KEY=VALUE with STEERER one of {list(opts)}")
        try:
            opts[who][key] = json.loads(raw)
        except json.JSONDecodeError:
            opts[who][key] = raw
    grids = dict(GRIDS)
    for spec in args.grid:
        who, _, vals = spec.partition("=")
        try:
            grids[who] = tuple(float(v) for v in vals.split(","))
        except ValueError:
            p.error(f"--grid {spec!r}: use STEERER=S1,S2,... with numbers")
        if who not in opts:
            p.error(f"--grid {spec!r}: STEERER must be one of {list(opts)}")
    cfg = DemoConfig(
        model=args.model, steerers=names, vanilla_grid=VANILLA, dsas_grid=GATED, grids=grids, options=opts
    )
    run_demo(args.out, cfg)


if __name__ == "__main__":
    main()
