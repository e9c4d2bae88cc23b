"""What steering adds to one compiled decode step: kernels, graph inputs, guard checks, and time per step.

    .venv/bin/python benchmarks/bench_graph.py                                   # CPU: tiny Qwen2 shape, 8 layers
    .venv/bin/python benchmarks/bench_graph.py --shape qwen2.5-1.5b --layers 4   # real widths, fewer layers
    python3 benchmarks/bench_graph.py --shape qwen2.5-1.5b --layers 28           # on a GPU: the whole model

The tokens/s benchmark (`bench_generate.py`) says *how much* a steered compiled decode step costs; this one says
*where*. For each configuration (unsteered, vanilla CAA, CAA + DSAS on every site, random parameters) it compiles
`model.forward` for one decode token over a static cache (`fullgraph=True, dynamic=False`, inductor, mode
"default" so the generated code can be read) and reports:

* `kernels`: fused kernels launched per step (inductor's generated `call`: `cpp_fused_*` on CPU, Triton
  `.run(` on CUDA) and `extern` calls (matmuls, attention). DSAS adds no kernel when inductor fuses the gate
  (a dot product over the features), the sigmoid and the update into the kernel that already adds the residual
  and normalizes (a chained reduction, like softmax).
* `inputs`: graph inputs (the steered graph adds the packed site parameters and the strengths: two tensors).
* `guard_us`: the cost of dynamo's guard check for the graph the call selects (dynamo's default settings, which
  `apply` leaves alone), timed on the captured frame locals (`guard_cpu_us`: in thread CPU time, robust to a
  shared machine), and its size: `guard_leaves` (of which `guard_lambdas` are Python lambda guards, the slow
  kind) and `guard_managers`, which do not depend on the load. `--hook-guards` adds the unsteered graph compiled
  with dynamo's guards on module hooks, what hook-based steering needs to be noticed by compiled graphs.
* `step_us`: median time of one compiled decode step (interleaved rounds, CUDA synchronized), and `ratio` =
  unsteered / config. On CUDA `--cudagraphs` also times the step under mode "reduce-overhead".
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from typing import Any

import torch
from common import QWEN25_15B, environment, interleave, load_average, result_path, setup, sync, write_json
from graph_code import inductor_code, kernel_launches

import dsas
from dsas.sites import fingerprint, resolve_sites

TINY: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=512
)


def make_model(shape: str, layers: int, dev: torch.device, dtype: torch.dtype) -> Any:
    import transformers as tf

    base = dict(QWEN25_15B) if shape == "qwen2.5-1.5b" else dict(TINY)
    base["num_hidden_layers"] = layers
    torch.manual_seed(0)
    with dev:
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**base))
    return model.to(dtype).eval()


def make_steerer(model: Any, gate: str, seed: int = 0) -> dsas.Steerer:
    """CAA-shaped steerer on every residual-increment site with random parameters (a gate that is open on about
    half the tokens): what matters here is the work per site, not what it steers toward."""
    g = torch.Generator().manual_seed(seed)
    sites = resolve_sites(model)
    d = model.config.hidden_size
    maps, gates = {}, {}
    for s in sites:
        maps[s.name] = dsas.SiteMap(shift=torch.randn(d, generator=g) / d**0.5)
        w = torch.randn(d, generator=g) / d**0.5
        gates[s.name] = dsas.SiteGate("sigmoid", w, 0.0, 1.0) if gate == "dsas" else dsas.SiteGate()
    names = [s.name for s in sites]
    return dsas.Steerer(sites, maps, gates, names, {"method": "caa", "gate": gate}, fingerprint(model, sites))


def count_kernels(codes: list[str]) -> dict[str, int]:
    """Launches per step in inductor's generated `call` (one module: fullgraph) and the graph's inputs."""
    launches = kernel_launches(codes)
    call = "\n".join(c[c.find("def call(") :] for c in codes)
    return {
        "kernels": sum(launches[::2]),
        "extern": sum(launches[1::2]),
        "inputs": len(set(re.findall(r"\barg\d+_1\b", call))),
    }


class Step:
    """One decode token through a compiled forward over a static cache, the cache reset every `period` steps
    (transformers 5's static cache advances its own length counter)."""

    def __init__(self, model: Any, batch: int, dev: torch.device, mode: str, period: int = 32):
        from transformers import StaticCache

        self.model, self.period, self.n = model, period, 0
        self.cache = StaticCache(config=model.config, max_cache_len=2 * period + 8)
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(3, model.config.vocab_size, (batch, 1), generator=g).to(dev)
        self.pos = torch.tensor([0], device=dev)
        self.fn = torch.compile(model.forward, fullgraph=True, dynamic=False, mode=mode)

    def __call__(self) -> Any:
        if self.n % self.period == 0:
            self.cache.reset()
        self.n += 1
        with torch.no_grad():
            return self.fn(self.ids, cache=self.cache, cache_position=self.pos, use_cache=True).logits


def frame_locals(step: Step) -> dict[str, Any]:
    """The locals dynamo's guards see when `step.fn` is called: caught by a profile hook on an eager call of the
    same forward (kwargs copied at entry, since the wrapper renames some)."""
    code = type(step.model).forward.__code__
    cap: dict[str, Any] = {}

    def prof(frame: Any, event: str, _arg: Any) -> None:
        if event == "call" and frame.f_code is code and not cap:
            cap.update(frame.f_locals)
            if isinstance(cap.get("kwargs"), dict):
                cap["kwargs"] = dict(cap["kwargs"])

    sys.setprofile(prof)
    try:
        with torch.no_grad():
            step.model.forward(step.ids, cache=step.cache, cache_position=step.pos, use_cache=True)
    finally:
        sys.setprofile(None)
    return cap


def guards(step: Step, repeats: int = 500) -> dict[str, Any]:
    """The guard check of the cache entry that accepts the current call: its median time (wall and thread CPU
    time, which a shared machine's preemption does not inflate) and its size (leaf guards, of them Python lambda
    guards, and guard managers: deterministic). Empty if no entry accepts the call or this torch lacks the hook."""
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        return {}
    fl = frame_locals(step)
    with torch.no_grad():
        for entry in _debug_get_cache_entry_list(type(step.model).forward.__code__):
            gm = entry.guard_manager
            if not gm.check(fl):
                continue
            wall, cpu = [], []
            for _ in range(5):
                t, c = time.perf_counter(), time.thread_time()
                for _ in range(repeats):
                    gm.check(fl)
                cpu.append((time.thread_time() - c) / repeats * 1e6)
                wall.append((time.perf_counter() - t) / repeats * 1e6)
            out: dict[str, Any] = {
                "guard_us": round(sorted(wall)[2], 1),
                "guard_cpu_us": round(sorted(cpu)[2], 1),
            }
            # the guard tree as TORCH_LOGS=guards prints it: one line per guard manager or leaf guard
            tree = [x.strip(" |+-") for x in str(gm).splitlines()[1:]]
            managers = sum(x.startswith(("GuardManager", "RootGuardManager")) for x in tree)
            out["guard_leaves"] = sum(bool(x) for x in tree) - managers
            out["guard_lambdas"] = sum(x.startswith("LAMBDA_GUARD") for x in tree)
            out["guard_managers"] = managers
            return out
    return {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["tiny", "qwen2.5-1.5b"], default="tiny")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (the 1.5B model has 28)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--configs", default="unsteered,vanilla,dsas")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=64, help="decode steps per round and configuration")
    p.add_argument("--cudagraphs", action="store_true", help="CUDA: also time mode 'reduce-overhead'")
    p.add_argument(
        "--hook-guards",
        action="store_true",
        help="finally also compile the unsteered model with dynamo's guards on module hooks (what hook-based "
        "steering needs under compile)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.model = None
    dev, dtype = setup(args)
    from rich.console import Console
    from rich.table import Table

    env = environment(dev)
    torch._dynamo.reset()
    model = make_model(args.shape, args.layers, dev, dtype)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    steerers = {
        c: make_steerer(model, "dsas" if c == "dsas" else "none") for c in configs if c != "unsteered"
    }

    def ctx(c: str) -> Any:
        return steerers[c].apply(model, strength=2.0) if c in steerers else contextlib.nullcontext()

    rows: dict[str, dict[str, Any]] = {}
    modes = ["default"] + (["reduce-overhead"] if args.cudagraphs and dev.type == "cuda" else [])
    timing: dict[str, dict[str, dict[str, Any]]] = {}
    for mode in modes:
        step = Step(model, args.batch, dev, mode)
        for c in configs:
            t0 = time.perf_counter()
            with ctx(c), inductor_code() as codes:
                step()  # compiles (the first call of a fresh cache may compile once more)
                step()
            sync(dev)
            if mode == "default":
                row = rows.setdefault(c, {})
                row.update(count_kernels(codes[-1:]) if codes else {})
                row["compile_s"] = round(time.perf_counter() - t0, 1)
                with ctx(c):
                    row.update(guards(step))

        def timed(c: str, step: Step = step) -> float:
            with ctx(c):
                sync(dev)
                t = time.perf_counter()
                for _ in range(args.steps):
                    step()
                sync(dev)
            return (time.perf_counter() - t) / args.steps

        timing[mode] = interleave({c: (lambda c=c: timed(c)) for c in configs}, args.rounds, configs[0])
        for c in configs:
            r = timing[mode][c]
            key = "" if mode == "default" else "graphs_"
            rows[c][f"{key}step_us"] = round(r["median_s"] * 1e6, 1)
            rows[c][f"{key}ratio"] = round(r.get("ratio", 1.0), 3)

    if args.hook_guards:
        # What dynamo's guards on module hooks cost every compiled model once some library turns them on.
        torch._dynamo.reset()
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        step = Step(model, args.batch, dev, "default")
        with inductor_code() as codes:
            step()
            step()
        row = {**count_kernels(codes[-1:]), **guards(step)}
        rows["unsteered, hook guards on"] = row

    table = Table(
        title=f"one compiled decode step, {args.shape} x {args.layers} layers, batch {args.batch}, {dev}"
    )
    cols = ["kernels", "extern", "inputs", "guard_leaves", "guard_lambdas", "guard_managers", "guard_us"]
    cols += ["guard_cpu_us", "step_us", "ratio", "graphs_step_us", "graphs_ratio"]
    cols = [k for k in cols if any(k in r for r in rows.values())]
    table.add_column("config")
    for k in cols:
        table.add_column(k, justify="right")
    for c, r in rows.items():
        table.add_row(c, *(str(r.get(k, "")) for k in cols))
    Console(width=140).print(table)
    env["load_average_end"] = load_average()
    payload = {"env": env, "args": vars(args), "rows": rows, "timing": timing}
    tag = f"{args.shape}-{args.layers}l_b{args.batch}"
    out = result_path(argparse.Namespace(out=args.out, shape=tag, model=None), "graph", dev)
    write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
