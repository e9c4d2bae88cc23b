"""vLLM serving throughput with dsas on CPU: SmolLM2, 16 concurrent requests x 64 greedy tokens.

Two engines live side by side: A with the dsas plugin (DSAS_STEERERS set) and B without it (a fresh engine-core
process, plugin never installed). Each round runs, in rotating order: A with every request steered, A with no
request steered, B. Ratios of medians:

    steered / unsteered           A all-steered vs A unsteered (target >= 0.95)
    plugin-idle / no plugin       A unsteered vs B (target >= 0.99)

Prefix caching is off so every round computes its prompts. The front end of this process has the plugin's
request validation installed for both engines (a dict lookup per request; the engine-side cost is what differs).

    .venv-vllm/bin/python benchmarks/bench_vllm.py --steerer runs/tox [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

N_REQ, N_TOK = 16, 64


def _run(llm: Any, prompts: list[Any], steered: bool, strength: float) -> float:
    from vllm import SamplingParams

    extra = {"dsas_steerer": "s", "dsas_strength": strength} if steered else None
    sp = SamplingParams(max_tokens=N_TOK, temperature=0.0, ignore_eos=True, extra_args=extra)
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t
    assert sum(len(o.outputs[0].token_ids) for o in outs) == N_REQ * N_TOK
    return N_REQ * N_TOK / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steerer", required=True, help="A folder saved by `dsas fit` on SmolLM2.")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--strength", type=float, default=2.0)
    ap.add_argument("--out", default="benchmarks/results/vllm_cpu.json")
    args = ap.parse_args()

    import dsas
    from dsas.serving.launch import resolve_model

    checkpoint = resolve_model("smollm2-135m")
    _, tok = dsas.load_model("smollm2-135m")
    texts = dsas.load_prompt_sets("toxicity", n=N_REQ, seed=2)
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    prompts = [
        TokensPrompt(prompt_token_ids=tok(t)["input_ids"]) for t in (texts.source + texts.control)[:N_REQ]
    ]
    # vLLM CPU reserves ~90% of memory for the KV cache by default; two engines side by side need a fixed share.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = dict(dtype="float32", max_model_len=512, max_num_seqs=N_REQ, seed=0, enable_prefix_caching=False)
    os.environ["DSAS_STEERERS"] = f"s={os.path.abspath(args.steerer)}"
    a = LLM(model=checkpoint, **engine)  # engine core spawned with the plugin on
    del os.environ["DSAS_STEERERS"]
    b = LLM(model=checkpoint, **engine)  # spawned without: vLLM as a user without dsas steering has it
    runs = {
        "steered": lambda: _run(a, prompts, True, args.strength),
        "unsteered": lambda: _run(a, prompts, False, args.strength),
        "no_plugin": lambda: _run(b, prompts, False, args.strength),
    }
    for f in runs.values():
        f()  # warm-up
    tps: dict[str, list[float]] = {k: [] for k in runs}
    keys = list(runs)
    for r in range(args.rounds):
        for k in keys[r % 3 :] + keys[: r % 3]:
            tps[k].append(runs[k]())
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in tps.items()), flush=True)
    med = {k: statistics.median(v) for k, v in tps.items()}
    result = {
        "requests": N_REQ,
        "tokens": N_TOK,
        "rounds": args.rounds,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "median_tok_s": med,
        "steered_over_unsteered": med["steered"] / med["unsteered"],
        "plugin_idle_over_no_plugin": med["unsteered"] / med["no_plugin"],
        "all_tok_s": tps,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "all_tok_s"}, indent=2))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
