"""vLLM serving with dsas on a machine with a CUDA GPU: Qwen2.5-1.5B shape, random weights, CUDA graphs on.

Needs a CUDA build of vLLM 0.32 (`pip install vllm==0.32.*`) and dsas installed in the same environment; no model
hub: the model is Qwen2.5-1.5B's config with `load_format="dummy"` (random weights, token-id prompts, no
tokenizer), and the steerer is a synthetic CAA + DSAS one (a shift and a sigmoid gate at all 56 sites, about
half the tokens gated on), saved and loaded like a fitted one. Two engines share the GPU: A with the plugin, B
without. Interleaved rounds at batch 1 and 32, medians:

    steered / unsteered (A, every request steered vs none; target >= 0.97)
    plugin-idle / no plugin (A unsteered vs B)

    python benchmarks/bench_vllm_gpu.py [--rounds 5] [--tokens 128] [--dry-run]

`--dry-run` writes the config and the steerer and checks the steerer against the served shape (CPU is enough).
Not run yet: numbers go to benchmarks/README.md ("vLLM serving") once run on such a machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

QWEN25_15B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}


def write_model_and_steerer(root: Path) -> tuple[Path, Path]:
    """The config-only checkpoint folder and a synthetic DSAS steerer for it."""
    import torch
    from transformers import Qwen2Config

    from dsas import SiteGate, SiteMap, Steerer
    from dsas.serving.state import load_steerers, served_fingerprint
    from dsas.sites import Site

    model = root / "qwen2.5-1.5b-shape"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(QWEN25_15B, indent=2))
    cfg = Qwen2Config(**QWEN25_15B)
    d, g = cfg.hidden_size, torch.Generator().manual_seed(0)
    sites = [
        Site(f"model.layers.{i}.{part}", kind, i)
        for i in range(cfg.num_hidden_layers)
        for part, kind in (("self_attn", "attn"), ("mlp", "mlp"))
    ]
    maps = {s.name: SiteMap(0.05 * torch.randn(d, generator=g)) for s in sites}
    gates = {s.name: SiteGate("sigmoid", torch.randn(d, generator=g) / d**0.5, 0.0, 1.0) for s in sites}
    fp = {k: v for k, v in served_fingerprint(cfg, None).items() if k not in ("module_names", "weights")}
    steerer = Steerer(
        sites,
        maps,
        gates,
        [s.name for s in sites],
        {"method": "caa", "gate": "dsas"},
        {**fp, "sites": [s.name for s in sites]},
    )
    path = root / "steerer"
    steerer.save(path)
    load_steerers({"s": path}, cfg, None)  # the check the server runs at start
    return model, path


def _run(llm: Any, prompts: list[Any], steered: bool, tokens: int) -> float:
    from vllm import SamplingParams

    extra = {"dsas_steerer": "s", "dsas_strength": 2.0} if steered else None
    sp = SamplingParams(
        max_tokens=tokens, temperature=0.0, ignore_eos=True, detokenize=False, extra_args=extra
    )
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t
    assert sum(len(o.outputs[0].token_ids) for o in outs) == len(prompts) * tokens
    return len(prompts) * tokens / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--out", default="benchmarks/results/vllm_gpu.json")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dsas-vllm-gpu-"))
    model, steerer = write_model_and_steerer(root)
    if args.dry_run:
        print(f"model config and steerer written and checked under {root}")
        return

    import torch
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    engine = dict(
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_model_len=1024,
        max_num_seqs=32,
        gpu_memory_utilization=0.4,
        enable_prefix_caching=False,
        seed=0,
    )
    os.environ["DSAS_STEERERS"] = f"s={steerer}"
    a = LLM(model=str(model), **engine)
    del os.environ["DSAS_STEERERS"]
    b = LLM(model=str(model), **engine)
    g = torch.Generator().manual_seed(0)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "tokens": args.tokens, "batches": {}}
    for bs in (int(x) for x in args.batches.split(",")):
        prompts = [
            TokensPrompt(prompt_token_ids=torch.randint(0, 150000, (32,), generator=g).tolist())
            for _ in range(bs)
        ]
        runs = {
            "steered": lambda p=prompts: _run(a, p, True, args.tokens),
            "unsteered": lambda p=prompts: _run(a, p, False, args.tokens),
            "no_plugin": lambda p=prompts: _run(b, p, False, args.tokens),
        }
        for f in runs.values():
            f()
        tps: dict[str, list[float]] = {k: [] for k in runs}
        keys = list(runs)
        for r in range(args.rounds):
            for k in keys[r % 3 :] + keys[: r % 3]:
                tps[k].append(runs[k]())
        med = {k: statistics.median(v) for k, v in tps.items()}
        results["batches"][bs] = {
            "median_tok_s": med,
            "steered_over_unsteered": med["steered"] / med["unsteered"],
            "plugin_idle_over_no_plugin": med["unsteered"] / med["no_plugin"],
            "all_tok_s": tps,
        }
        print(
            bs, json.dumps({k: v for k, v in results["batches"][bs].items() if k != "all_tok_s"}), flush=True
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
