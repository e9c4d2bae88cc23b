"""Where a steered compiled `generate` spends its host time: torch.profiler over the decode loop, steered vs not.

    .venv/bin/python benchmarks/profile_decode.py                                   # CPU smoke: tiny Qwen2, 4 layers
    python3 benchmarks/profile_decode.py --shape qwen2.5-1.5b --out-dir $OUT        # on a GPU (~2 min)

`bench_generate.py` measures that compiled DSAS decode steps cost ~160-185 us more than unsteered ones on the
H200 (Qwen2.5-1.5B shape), while one isolated compiled step (`bench_graph.py`, CUDA graphs) explains ~65 us of
it. This script looks for the rest: it runs the same compiled `generate` (static cache, `fullgraph=True`, mode
"reduce-overhead" on CUDA) unsteered and with CAA + DSAS on every site (random parameters, as in
`bench_graph.py`), profiles `--calls` warm calls of each, and prints the host-side operators and Python-level
events whose self CPU time per call differs most. Tables land in `--out-dir` (`profile_<config>.txt`,
`profile_diff.txt`); `--trace` also writes one Chrome trace per configuration (open in https://ui.perfetto.dev).
"""

from __future__ import annotations

import argparse
import contextlib
import re
from pathlib import Path
from typing import Any

import torch
from bench_graph import make_model, make_steerer
from common import compile_config, setup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["tiny", "qwen2.5-1.5b"], default="tiny")
    p.add_argument("--layers", type=int, default=None, help="default: 4 (tiny), 28 (qwen2.5-1.5b)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--calls", type=int, default=3, help="profiled generate calls per configuration")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace", action="store_true", help="also write a Chrome trace per configuration")
    p.add_argument("--out-dir", default="benchmarks/results/profile")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    dev, dtype = setup(args)
    layers = args.layers or (28 if args.shape == "qwen2.5-1.5b" else 4)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    from torch.profiler import ProfilerActivity, profile

    model = make_model(args.shape, layers, dev, dtype)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    steerer = make_steerer(model, "dsas")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_tokens), generator=g).to(dev)
    cuda = dev.type == "cuda"
    cc = compile_config(dev)

    def generate(cfg: str) -> Any:
        ctx = steerer.apply(model, strength=2.0) if cfg == "dsas" else contextlib.nullcontext()
        with ctx, torch.no_grad():
            res = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                cache_implementation="static",
                compile_config=cc,
            )
        if cuda:
            torch.cuda.synchronize(dev)
        return res

    configs = ["unsteered", "dsas"]
    for cfg in configs:  # compile and warm both graphs (and CUDA-graph recordings) before profiling
        generate(cfg)
        generate(cfg)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    per_call: dict[str, dict[str, float]] = {}
    for cfg in configs:
        with profile(activities=activities, with_stack=False) as prof:
            for _ in range(args.calls):
                generate(cfg)
        avg = prof.key_averages()
        table = avg.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=70)
        (out / f"profile_{cfg}.txt").write_text(table)
        per_call[cfg] = {}
        for e in avg:  # one name per kind of event: graphs and compiled regions differ by hash / frame id
            k = re.sub(r"CompiledFxGraph \w+", "CompiledFxGraph", re.sub(r"Region: \d+/\d+", "Region", e.key))
            per_call[cfg][k] = per_call[cfg].get(k, 0.0) + e.self_cpu_time_total / args.calls
        total = sum(per_call[cfg].values())
        print(f"{cfg}: {total / 1e3:.1f} ms self CPU per generate call ({args.new_tokens} new tokens)")
        if args.trace:
            prof.export_chrome_trace(str(out / f"trace_{cfg}.json"))

    keys = set(per_call["unsteered"]) | set(per_call["dsas"])
    diff = sorted(
        ((per_call["dsas"].get(k, 0.0) - per_call["unsteered"].get(k, 0.0), k) for k in keys), reverse=True
    )
    steps = max(args.new_tokens - 1, 1)
    lines = [
        f"self CPU time per decode step, DSAS minus unsteered ({args.shape}, {layers} layers, batch {args.batch}, "
        f"{dev}; {args.calls} calls of {args.new_tokens} new tokens; positive = DSAS spends more)",
        f"{'us/step':>10}  {'unsteered':>10}  {'dsas':>10}  event",
    ]
    for d, k in [*diff[: args.top], (0.0, "..."), *diff[-5:]]:
        if k == "...":
            lines.append("...")
            continue
        u, s = per_call["unsteered"].get(k, 0.0), per_call["dsas"].get(k, 0.0)
        lines.append(f"{d / steps:10.2f}  {u / steps:10.2f}  {s / steps:10.2f}  {k}")
    text = "\n".join(lines)
    (out / "profile_diff.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
