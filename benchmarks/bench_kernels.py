"""What eager steering dispatches per site, and what a site call costs where launches dominate.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_kernels.py                       # ~5 min on 2 loaded cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_kernels.py --before /tmp/before/src   # + an older tree

1. Ops: for every method x gate (caa / iti / lineas / linear_act x none / dsas, and lineas x e2e-sigmoid) fitted on
   a tiny random-init Llama (2 layers, d = 32; DSAS sites kept whatever their regulator's accuracy), the aten ops
   each steered site dispatches in one steady-state forward (the second one inside `apply`), minus what the same
   site dispatched unsteered: all ops, the ones that launch a kernel on a GPU, and the factory ops (a tensor
   created from nothing); and the same for the first forward inside `apply`, where per-batch-size parameters
   may be prepared. One global strength (batch 1) and one strength per row (batch 2). Counted with a
   `TorchDispatchMode` (tests/dispatch_count.py, which tests/test_kernels.py also uses).
2. Launch-bound proxy: tiny Llama with 28 layers, d = 64, batch 1, one thread, greedy `generate` of 32 new tokens;
   CPU time (process time) unsteered vs vanilla CAA vs CAA + DSAS, interleaved, medians; the steering cost per
   site call = (steered - unsteered) / (sites x forward passes), paired per round.

`--before PATH` imports a second dsas tree (e.g. a worktree of the previous commit) into the same process and runs
both parts for it too, in the same interleaved loop.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, environment, import_tree, interleave, load_average, use_tree, write_json
from conftest import make_engine_sets, make_tiny_model, make_tiny_tokenizer
from dispatch_count import Ops, per_site, steering_ops

COMBOS = [(m, g) for m in ("caa", "iti", "lineas", "linear_act") for g in ("none", "dsas")] + [
    ("lineas", "e2e-sigmoid")
]
PROMPTS = ["the cat is stupid and you are bad", "a nice dog is a good friend"]


def fit(d: Any, model: Any, tok: Any, sets: Any, method: str, gate: str, lineas_steps: int) -> Any:
    opts: dict[str, Any] = {}
    if gate == "dsas":
        opts["inactive"] = "keep"  # steer every site, whatever its regulator's accuracy on random weights
    if method == "lineas":
        opts["steps"] = lineas_steps
    return d.fit(model, tok, sets, method=method, gate=gate, progress=False, **opts)


def summarise(diff: dict[str, Ops], plain: dict[str, Ops], sites: list[str]) -> dict[str, Any]:
    """Per site: the maximum over sites of what steering added (all, launching, factory ops), the ops of the
    site with the most launches, and what was added outside every site."""
    worst = max(sites, key=lambda s: diff[s].n()[1])
    return {
        "sites": len(sites),
        "dispatched": max(diff[s].n()[0] for s in sites),
        "launches": max(diff[s].n()[1] for s in sites),
        "factory": max(diff[s].n()[2] for s in sites),
        "launch_ops": dict(diff[worst].launch),
        "all_ops": dict(diff[worst].all),
        "factory_ops": dict(diff[worst].factory),
        "unsteered_site_dispatched": plain[worst].n()[0],
        "unsteered_site_launches": plain[worst].n()[1],
        "outside_sites": list(diff[""].n()),
    }


def ops_part(trees: dict[str, Any], lineas_steps: int) -> list[dict[str, Any]]:
    tok = make_tiny_tokenizer()
    tok.padding_side = "left"
    model = make_tiny_model("llama", len(tok), layers=2, hidden=32)
    rows = []
    for version, mods in trees.items():
        with use_tree(mods) as d:
            sets = make_engine_sets(16)  # the tree's own PromptSets
            for method, gate in COMBOS:
                st = fit(d, model, tok, sets, method, gate, lineas_steps)
                for scenario, batch, strength in (("global", 1, 4.0), ("per-row", 2, [2.0, 4.0])):
                    enc = tok(PROMPTS[:batch], padding=True, return_tensors="pt")
                    steered, first, plain = steering_ops(model, enc, st, strength)
                    d1 = per_site(first, plain, st.steered)
                    row = {
                        "version": version,
                        "method": method,
                        "gate": gate,
                        "strength": scenario,
                        **summarise(per_site(steered, plain, st.steered), plain, st.steered),
                        "first_forward_launches": max(d1[s].n()[1] for s in st.steered),
                        "first_forward_factory": max(d1[s].n()[2] for s in st.steered),
                    }
                    rows.append(row)
                    print(
                        f"{version:6s} {method:10s} {gate:11s} {scenario:7s} sites {row['sites']}: per site "
                        f"+{row['dispatched']} ops, +{row['launches']} launches {row['launch_ops']}, "
                        f"+{row['factory']} factory; outside sites {row['outside_sites']}; first forward "
                        f"+{row['first_forward_launches']} launches, +{row['first_forward_factory']} factory"
                    )
    return rows


def proxy_part(trees: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    tok = make_tiny_tokenizer()
    tok.padding_side = "left"
    model = make_tiny_model("llama", len(tok), layers=args.layers, hidden=args.hidden)
    enc = tok(PROMPTS[:1], return_tensors="pt")
    kw = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    steerers: dict[str, tuple[Any, Any]] = {}
    for version, mods in trees.items():
        with use_tree(mods) as d:
            sets = make_engine_sets(32)
            for label, gate in (("vanilla", "none"), ("dsas", "dsas")):
                steerers[f"{version}:{label}"] = (mods, fit(d, model, tok, sets, "caa", gate, 1))
    n_sites = {k: len(st.steered) for k, (_, st) in steerers.items()}

    def run(entry: tuple[Any, Any] | None) -> float:
        mods, st = entry if entry is not None else (None, None)
        with use_tree(mods), torch.no_grad():
            if st is None:
                t0 = time.process_time()
                for _ in range(args.repeats):
                    model.generate(**enc, **kw)
                return (time.process_time() - t0) / args.repeats
            with st.apply(model, strength=4.0):
                t0 = time.process_time()
                for _ in range(args.repeats):
                    model.generate(**enc, **kw)
                return (time.process_time() - t0) / args.repeats

    fns: dict[str, Any] = {"unsteered": lambda: run(None)}
    for k, e in steerers.items():
        fns[k] = lambda e=e: run(e)
    for f in fns.values():  # warm up
        f()
    load0 = load_average()
    res = interleave(fns, args.rounds, base="unsteered")
    base = res["unsteered"]["seconds"]
    out: dict[str, Any] = {"load_average": [load0, load_average()], "configs": {}}
    calls = args.new_tokens  # forward passes per generate: the prefill and new_tokens - 1 decode steps
    for k, r in res.items():
        row: dict[str, Any] = {"median_ms": round(r["median_s"] * 1e3, 3), "seconds": r["seconds"]}
        if k != "unsteered":
            per = sorted(
                (t - b) / (n_sites[k] * calls) * 1e6 for t, b in zip(r["seconds"], base, strict=True)
            )
            row.update(
                sites=n_sites[k],
                us_per_site_call=round(per[len(per) // 2], 2),
                us_per_site_call_q1_q3=[round(per[len(per) // 4], 2), round(per[(3 * len(per)) // 4], 2)],
                ratio=round(r["ratio"], 4),
                ratio_min=round(r["ratio_min"], 4),
                ratio_max=round(r["ratio_max"], 4),
            )
        out["configs"][k] = row
    for k, row in out["configs"].items():
        other = k.replace("after:", "before:")
        if k.startswith("after:") and other in res:  # the same config of both trees, paired per round
            per = sorted(
                (a - b) / (n_sites[k] * calls) * 1e6
                for a, b in zip(res[k]["seconds"], res[other]["seconds"], strict=True)
            )
            row["after_minus_before_us_per_site_call"] = round(per[len(per) // 2], 2)
            row["after_minus_before_q1_q3"] = [
                round(per[len(per) // 4], 2),
                round(per[(3 * len(per)) // 4], 2),
            ]
        print(f"proxy {k:16s} " + ", ".join(f"{a}={b}" for a, b in row.items() if a != "seconds"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default=None, help="src folder of another dsas tree, measured alongside")
    p.add_argument("--parts", default="ops,proxy")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--repeats", type=int, default=2, help="generate calls per timing")
    p.add_argument(
        "--lineas-steps", type=int, default=3, help="LinEAS / E2E training steps (ops do not depend)"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    trees: dict[str, Any] = {"after": None}
    if args.before:
        trees = {"before": import_tree(args.before), "after": None}
    env = environment(torch.device("cpu"))
    env["trees"] = {k: (args.before if v is not None else "this checkout") for k, v in trees.items()}
    payload: dict[str, Any] = {"env": env, "args": vars(args)}
    out = args.out or str(RESULTS / ("kernels_cpu_before_after.json" if args.before else "kernels_cpu.json"))
    parts = args.parts.split(",")
    if "ops" in parts:
        payload["ops"] = ops_part(trees, args.lineas_steps)
        write_json(Path(out), payload)
    if "proxy" in parts:
        payload["proxy"] = proxy_part(trees, args)
    payload["env"]["load_average_end"] = load_average()
    write_json(Path(out), payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
