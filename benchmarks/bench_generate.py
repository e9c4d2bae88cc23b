"""Tokens/s of `model.generate` unsteered vs vanilla steering vs DSAS vs E2E-DSAS, eager and compiled.

    .venv/bin/python benchmarks/bench_generate.py                       # SmolLM2-135M, CPU: batch 1 and 8
    .venv/bin/python benchmarks/bench_generate.py --shape tiny --new-tokens 16
    python3 benchmarks/bench_generate.py --shape qwen2.5-1.5b            # on a GPU: batch 1 and 32, bf16

Eager: plain HF `generate` (dynamic KV cache). Compiled: HF `generate` over a static cache with
`CompileConfig(fullgraph=True, dynamic=False)` (mode "reduce-overhead" on CUDA, "default" on CPU), so every decode
step runs one compiled graph (no graph break: fullgraph=True raises on one) and the prefill runs eagerly. dsas
steers by wrapping each site's `forward` on the instance, which dynamo already guards: the unsteered and the
steered graph live side by side and every call picks its own, with dynamo's default settings for both.

Ratios are tokens/s relative to unsteered, the median of per-round ratios with the configurations interleaved.
Each row has two: of the whole `generate` call (prefill + decode) and of its decode steps alone (`decode_*`:
from the first logits to the end, timed by a logits processor that syncs once), the quantity DESIGN.md's anchors
quote for the compiled path.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

import torch
from common import (
    Clock,
    add_common_args,
    compile_config,
    environment,
    interleave,
    load,
    load_average,
    model_tag,
    result_path,
    rss_mb,
    setup,
    steerer_bytes,
    sync,
    throughput,
    write_json,
)

import dsas
import dsas.steer
from dsas.gates import RUNNING_MEAN_SCOPES

CONFIGS: dict[str, tuple[str, str] | None] = {
    "unsteered": None,
    "vanilla": ("caa", "none"),
    "dsas": ("caa", "dsas"),
    "dsas-token": ("caa", "dsas"),
    "dsas-below": ("caa", "dsas"),
    "e2e-dsas": ("lineas", "e2e-sigmoid"),
}
SCOPES = {"dsas-token": "token", "dsas-below": "below"}
"""Configs that fix `DSASConfig.scope` ("dsas" fits with the default)."""
REFERENCE = "dsas-reference"  # the DSAS steerer with FAST_EAGER off: every site call through `rule`


def running_mean(st: dsas.Steerer) -> bool:
    return any(st.gates[n].scope in RUNNING_MEAN_SCOPES for n in st.steered)


def set_fast_eager(on: bool) -> None:
    """dsas.steer.FAST_EAGER: eager token activations take `dsas.rule.rule_folded` (True) or the reference
    `dsas.rule.rule` (False). A tree without the flag has only one eager path: nothing to set."""
    if hasattr(dsas.steer, "FAST_EAGER"):
        dsas.steer.FAST_EAGER = on


def fit_steerers(
    model: Any, tok: Any, sets: dsas.PromptSets, args: argparse.Namespace, dev: torch.device
) -> tuple[dict[str, dsas.Steerer], dict[str, Any]]:
    random_init = args.shape is not None
    steerers: dict[str, dsas.Steerer] = {}
    info: dict[str, Any] = {}
    for name, mg in CONFIGS.items():
        if mg is None or name not in args.configs:
            continue
        method, gate = mg
        opts: dict[str, Any] = {}
        if gate != "none" and random_init:
            # Random weights: hook every site, as the active sites of a trained model would be.
            opts["inactive"] = "keep"
        if method == "lineas":
            opts["steps"] = args.e2e_steps
        if name in SCOPES:
            opts["scope"] = SCOPES[name]
        t0 = time.perf_counter()
        try:
            st = dsas.fit(model, tok, sets, method=method, gate=gate, progress=False, **opts)
        except Exception as e:  # another agent may still be adding a method or gate: skip, say why
            info[name] = {"skipped": f"{type(e).__name__}: {e}"[:300]}
            print(f"[skip] {name}: {info[name]['skipped']}")
            continue
        sync(dev)
        steerers[name] = st
        info[name] = {
            "method": method,
            "gate": gate,
            "options": opts,
            "fit_s": round(time.perf_counter() - t0, 3),
            "sites": len(st.sites),
            "steered_sites": len(st.steered),
            "steerer_bytes": steerer_bytes(st),
        }
        print(f"fitted {name}: {info[name]}")
    return steerers, info


def prompt_batch(
    tok: Any, sets: dsas.PromptSets, batch: int, length: int, dev: torch.device
) -> dict[str, Any]:
    ids = tok(" ".join(sets.control * 4), add_special_tokens=False).input_ids[: length - 1]
    if tok.bos_token_id is not None:
        ids = [tok.bos_token_id, *ids]
    x = torch.tensor([ids] * batch, device=dev)
    return {"input_ids": x, "attention_mask": torch.ones_like(x)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--batches", default=None, help="comma list (default: 1,8 on CPU, 1,32 on CUDA)")
    p.add_argument("--modes", default="eager,compiled", help="eager, compiled or both")
    p.add_argument(
        "--plan", default=None, help="phase order, e.g. compiled:1,compiled:32,eager:1 (default: all)"
    )
    p.add_argument("--configs", default=",".join(CONFIGS), help="subset of " + ",".join(CONFIGS))
    p.add_argument(
        "--compiled-configs",
        default="unsteered,vanilla,dsas,dsas-below",
        help="configs to compile (each is a graph)",
    )
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=None, help="default: 64 on CUDA, 32 on CPU")
    p.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds (default: 5; 20 compiled on CUDA)"
    )
    p.add_argument("--strength", type=float, default=4.0)
    p.add_argument(
        "--e2e-steps", type=int, default=30, help="LinEAS / E2E training steps (speed needs no quality)"
    )
    p.add_argument("--budget-s", type=float, default=None, help="skip phases that would start after this")
    p.add_argument("--phase-reserve-s", type=float, default=90.0, help="time a phase needs to be started")
    p.add_argument("--reference", action="store_true", help=f"eager: add {REFERENCE!r} (before/after)")
    args = p.parse_args()
    args.configs = [c for c in args.configs.split(",") if c]
    if args.reference and not hasattr(dsas.steer, "FAST_EAGER"):
        p.error("--reference needs dsas.steer.FAST_EAGER, which this dsas tree does not have")
    clock = Clock(args.budget_s)
    dev, dtype = setup(args)
    cuda = dev.type == "cuda"
    batches = [int(b) for b in (args.batches or ("1,32" if cuda else "1,8")).split(",")]
    new_tokens = args.new_tokens or (64 if cuda else 32)
    modes = args.modes.split(",")
    plan = (
        [(m, int(b)) for m, b in (x.split(":") for x in args.plan.split(","))]
        if args.plan
        else [(m, b) for m in modes for b in batches]
    )
    out = result_path(args, "generate", dev)
    payload: dict[str, Any] = {"env": environment(dev), "args": vars(args), "rows": [], "notes": []}

    import torch._dynamo

    for key in (
        "recompile_limit",
        "cache_size_limit",
    ):  # one graph per (config, batch): more than the default 8
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, 64)

    model, tok, sets = load(args, dev, dtype)
    payload["model"] = {
        "name": model_tag(args),
        "params": sum(x.numel() for x in model.parameters()),
        "dtype": str(dtype),
        "layers": model.config.num_hidden_layers,
        "hidden": model.config.hidden_size,
    }
    print(f"model {payload['model']} on {dev}; load average {load_average()}")
    steerers, payload["fit"] = fit_steerers(model, tok, sets, args, dev)
    for st_name, st in steerers.items():  # entry cost of `apply` (fingerprint check, hook install/removal)
        ts = []
        for _ in range(10):
            t0 = time.perf_counter()
            with st.apply(model, strength=args.strength):
                pass
            ts.append(time.perf_counter() - t0)
        payload["fit"][st_name]["apply_enter_exit_ms"] = round(sorted(ts)[5] * 1e3, 3)
    write_json(out, payload)

    cc = compile_config(dev)

    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstStep(LogitsProcessor):
        """Notes when the first logits arrive, i.e. when the (eager) prefill is done: decode seconds = end - that.
        One device sync, on the first call only; the decode steps themselves are not synced."""

        def __init__(self) -> None:
            self.t: float | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self.t is None:
                sync(dev)
                self.t = time.perf_counter()
            return scores

    def generate(
        st: dsas.Steerer | None, enc: dict[str, Any], compiled: bool, reference: bool = False
    ) -> tuple[float, float]:
        """(seconds of the whole generate call, seconds of its new_tokens - 1 decode steps)."""
        first = FirstStep()
        kw: dict[str, Any] = dict(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            logits_processor=LogitsProcessorList([first]),
        )
        if compiled:
            kw.update(cache_implementation="static", compile_config=cc)
        ctx = st.apply(model, strength=args.strength) if st is not None else contextlib.nullcontext()
        set_fast_eager(not reference)
        try:
            with ctx, torch.no_grad():
                sync(dev)
                t0 = time.perf_counter()
                res = model.generate(**enc, **kw)
                sync(dev)
                t1 = time.perf_counter()
        finally:
            set_fast_eager(True)
        assert res.shape[1] == enc["input_ids"].shape[1] + new_tokens and first.t is not None
        return t1 - t0, t1 - first.t

    for mode, batch in plan:
        compiled = mode == "compiled"
        if clock.left() < args.phase_reserve_s:
            note = (
                f"{mode} batch {batch}: skipped, {clock.elapsed():.0f} s of a {args.budget_s} s budget used"
            )
            payload["notes"].append(note)
            print("[skip]", note)
            continue
        enc = prompt_batch(tok, sets, batch, args.prompt_tokens, dev)
        names = ["unsteered", *steerers]
        if args.reference and not compiled and "dsas" in steerers:
            names.append(REFERENCE)
        if compiled:
            names = [n for n in names if n in args.compiled_configs.split(",")]
            latched = [n for n in names if n in steerers and running_mean(steerers[n])]
            for n in latched:  # torch.compile refuses a per-sequence running mean: measure dsas-below instead
                note = f"{n}: running-mean gates (scope 'below+prefix' or 'prefix') run eagerly only"
                payload["notes"].append(note)
                print("[skip compiled]", note)
            names = [n for n in names if n not in latched]
        fns: dict[str, Any] = {}
        warm: dict[str, dict[str, Any]] = {}
        for name in names:
            st = steerers.get("dsas" if name == REFERENCE else name)
            ref = name == REFERENCE
            t_first = generate(st, enc, compiled, ref)[0]  # compiles (compiled mode) / warms up
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            rss0 = rss_mb()
            t_second = generate(st, enc, compiled, ref)[0]
            mem: dict[str, Any] = {"first_call_s": round(t_first, 3), "second_call_s": round(t_second, 3)}
            if compiled:
                mem["compile_s"] = round(t_first - t_second, 2)
            if cuda:
                mem["peak_extra_mb"] = round((torch.cuda.max_memory_allocated(dev) - base) / 2**20, 1)
            mem["rss_delta_mb"] = round(rss_mb() - rss0, 1)
            warm[name] = mem
            fns[name] = lambda st=st, enc=enc, c=compiled, ref=name == REFERENCE: generate(st, enc, c, ref)
            print(f"{mode} b={batch} {name}: warm {mem}")
        rounds = args.rounds or (20 if cuda and compiled else 5)
        res = interleave(fns, rounds, base="unsteered")
        for name in names:
            r = res[name]
            row = {
                "mode": mode,
                "batch": batch,
                "config": name,
                **throughput(r, batch * new_tokens),
                "median_s": round(r["median_s"], 4),
                # decode steps only (prefill excluded: transformers runs it eagerly even when compiled)
                "decode_tok_s": round(batch * (new_tokens - 1) / r["decode_median_s"], 2),
                "decode_ratio": round(r.get("decode_ratio", 1.0), 4),
                "decode_ratio_min": round(r.get("decode_ratio_min", 1.0), 4),
                "decode_ratio_max": round(r.get("decode_ratio_max", 1.0), 4),
                "rounds": rounds,
                "seconds": [round(x, 4) for x in r["seconds"]],
                **warm[name],
                "load_average": load_average(),
            }
            payload["rows"].append(row)
            print(
                f"{mode:8s} b={batch:<3d} {name:10s} {row['tok_s']:9.1f} tok/s  x{row['ratio']:.3f}  "
                f"decode {row['decode_tok_s']:9.1f} tok/s  x{row['decode_ratio']:.3f}"
            )
        write_json(out, payload)

    payload["hooks_left_outside_apply"] = sum(  # hooks and wrapped (instance-level) forwards
        len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in m.__dict__) for m in model.modules()
    )
    payload["env"]["load_average_end"] = load_average()
    payload["env"]["elapsed_s"] = round(clock.elapsed(), 1)
    write_json(out, payload)
    print_table(payload)
    print(f"wrote {out}")


def print_table(payload: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    env = payload["env"]
    title = (
        f"generate: {payload['model']['name']} ({payload['model']['dtype']}) on "
        f"{env.get('gpu') or env.get('cpu')} [{env['device']}], load {env['load_average_start']} -> "
        f"{env.get('load_average_end')}"
    )
    t = Table(title=title)
    cols = (
        "mode",
        "batch",
        "config",
        "tok/s",
        "x unsteered",
        "min-max",
        "decode tok/s",
        "decode x",
        "compile s",
        "mem",
    )
    for c in cols:
        t.add_column(c, justify="right" if c not in ("mode", "config") else "left")
    for r in payload["rows"]:
        mem = r.get("peak_extra_mb")
        mem_s = (
            f"{mem:.0f} MiB peak"
            if mem is not None
            else f"{r.get('rss_delta_mb', float('nan')):+.0f} MiB RSS"
        )
        t.add_row(
            r["mode"],
            str(r["batch"]),
            r["config"],
            f"{r['tok_s']:.1f}",
            f"{r['ratio']:.3f}",
            f"{r.get('ratio_min', float('nan')):.2f}-{r.get('ratio_max', float('nan')):.2f}",
            f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "",
            f"{r['decode_ratio']:.3f}" if "decode_ratio" in r else "",
            f"{r['compile_s']:.0f}" if "compile_s" in r else "",
            mem_s,
        )
    console = Console(width=150)
    console.print(t)
    for n in payload["notes"]:
        console.print(f"note: {n}")


if __name__ == "__main__":
    main()
