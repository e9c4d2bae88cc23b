"""dsas against the steering libraries people use today: same vectors, same layers, same model, same generate call.

    bash benchmarks/install_libraries.sh                          # steering-vectors, repeng, pyvene (--no-deps)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_libraries.py               # SmolLM2-135M, CPU
    python3 benchmarks/bench_libraries.py --shape qwen2.5-1.5b                     # on a GPU

Every library adds the same CAA vectors (dsas `fit(method="caa", gate="none", sites="blocks")`: one per decoder
block output, all 30 blocks of SmolLM2) times the same strength, at every token, prompt included:

* `dsas` — `Steerer.apply` (vanilla CAA: one add per block); `dsas+gate` the same vectors with the DSAS gate;
* `steering-vectors` — `SteeringVector(layer_activations, "decoder_block").apply(model, multiplier=lam)`;
* `repeng` — `ControlModel(model, layers).set_control(ControlVector, coeff=lam)` (wraps the blocks; unwrapped
  after each call so that the other configurations run the plain model);
* `pyvene` — `IntervenableModel` with one `AdditionIntervention` per `block_output`, every position
  (`unit_locations=None`), `intervene_on_prompt=True`.

First the outputs are compared (logits of one unpadded prompt against dsas: the libraries must agree before their
speeds mean anything), then `model.generate` (eager, greedy, `min_new_tokens` = `max_new_tokens`) is timed with
the configurations interleaved; ratio = unsteered tokens/s over the library's, median of per-round ratios. A
library that fails to import or to run is reported with its error, not dropped silently.
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from common import (
    add_common_args,
    environment,
    interleave,
    load,
    load_average,
    result_path,
    setup,
    sync,
    throughput,
    write_json,
)

import dsas
from dsas.sites import find_blocks


def _numpy_compat() -> None:
    """repeng 0.4.0 names `np.float_` in an annotation (removed in numpy 2): alias it so that it imports."""
    import numpy as np

    if not hasattr(np, "float_"):
        np.float_ = np.float64  # type: ignore[attr-defined]


Runner = Callable[[Callable[[], Any]], Any]
"""Runs a thunk (a forward or a generate call) with one library's steering active."""


def dsas_runner(model: Any, st: dsas.Steerer, lam: float) -> Runner:
    def run(fn: Callable[[], Any]) -> Any:
        with st.apply(model, strength=lam):
            return fn()

    return run


def sv_runner(model: Any, vectors: dict[int, torch.Tensor], lam: float) -> Runner:
    from steering_vectors import SteeringVector

    sv = SteeringVector(layer_activations=vectors, layer_type="decoder_block")

    def run(fn: Callable[[], Any]) -> Any:
        with sv.apply(model, multiplier=lam):
            return fn()

    return run


def repeng_runner(model: Any, vectors: dict[int, torch.Tensor], lam: float) -> Runner:
    _numpy_compat()
    from repeng import ControlModel, ControlVector

    cv = ControlVector(
        model_type=model.config.model_type,
        directions={k: v.float().cpu().numpy() for k, v in vectors.items()},
    )

    def run(fn: Callable[[], Any]) -> Any:
        cm = ControlModel(model, list(vectors))
        try:
            cm.set_control(cv, coeff=lam)
            return fn()
        finally:
            cm.reset()
            cm.unwrap()

    return run


def pyvene_runner(model: Any, vectors: dict[int, torch.Tensor], lam: float) -> Runner:
    import pyvene as pv

    layers = list(vectors)
    cfg = pv.IntervenableConfig(
        [
            {"layer": i, "component": "block_output", "intervention_type": pv.AdditionIntervention}
            for i in layers
        ]
    )
    pvm = pv.IntervenableModel(cfg, model)
    pvm.disable_model_gradients()
    dev = next(model.parameters()).device
    reps = {
        f"layer_{i}_comp_block_output_unit_pos_nunit_1#0": (lam * vectors[i]).to(
            dev, next(model.parameters()).dtype
        )
        for i in layers
    }
    keys = list(pvm.representations)
    src = {k: reps.get(k) for k in keys}
    missing = [k for k in keys if src[k] is None]
    if missing:
        raise RuntimeError(f"pyvene named its intervention slots {keys[:2]}..., not as expected")

    def run(fn: Callable[[], Any]) -> Any:
        return fn(pvm, [src[k] for k in keys])  # type: ignore[call-arg]

    return run


def compile_worker(lib: str) -> dict[str, Any]:
    """In a fresh process (dynamo's settings and caches untouched by the other libraries): does
    `lib`'s steering take effect on a model compiled with `model.compile()` (a) before steering, (b) inside the
    steering block, and (c) is the model unsteered again after the block? Tiny random Llama, eager as reference."""
    import warnings

    from conftest import make_tiny_model

    from dsas.gates import SiteGate
    from dsas.maps import SiteMap
    from dsas.sites import fingerprint, resolve_sites

    torch.manual_seed(0)
    model = make_tiny_model("llama", 100, layers=4)
    d = model.config.hidden_size
    vectors = {i: torch.randn(d) for i in range(4)}
    sites = resolve_sites(model, "blocks")
    st = dsas.Steerer(
        sites,
        {s.name: SiteMap(shift=vectors[int(s.layer)]) for s in sites if s.layer is not None},
        {s.name: SiteGate() for s in sites},
        [s.name for s in sites],
        {"method": "caa", "gate": "none"},
        fingerprint(model, sites),
    )
    make = {
        "dsas": lambda: dsas_runner(model, st, 4.0),
        "steering-vectors": sv_runner,
        "repeng": repeng_runner,
    }
    make["pyvene"] = pyvene_runner
    runner = make[lib]() if lib == "dsas" else make[lib](model, vectors, 4.0)
    ids = torch.randint(
        4, 100, (1, 9), generator=torch.Generator().manual_seed(1)
    )  # repeng 0.4 fails on 2 rows

    def steered() -> torch.Tensor:
        if lib == "pyvene":
            return runner(lambda pvm, src: pvm({"input_ids": ids}, source_representations=src)[1].logits)
        return runner(lambda: model(ids).logits)

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4))

    out: dict[str, Any] = {}
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref_plain, ref_steered = model(ids).logits, steered()
        assert not same(ref_plain, ref_steered)
        model.compile(dynamic=False)
        model(ids)  # (a) compiled unsteered first ...
        out["compiled_before_steers"] = same(steered(), ref_steered)  # ... then steered
        torch._dynamo.reset()
        counters = torch._dynamo.utils.counters
        counters.clear()
        out["compiled_inside_steers"] = same(steered(), ref_steered)  # (b) first compiled inside the block
        out["graph_breaks_inside"] = sum(counters["graph_break"].values())
        out["unsteered_after"] = same(model(ids).logits, ref_plain)  # (c) after the block
        out["warnings"] = sorted({str(w.message)[:120] for w in caught if "hook" in str(w.message).lower()})
    return out


def compile_check(libs: list[str]) -> dict[str, Any]:
    """`compile_worker` for each library, each in its own process."""
    import json
    import subprocess
    import sys

    res: dict[str, Any] = {}
    for lib in libs:
        cmd = [sys.executable, __file__, "--compile-worker", lib]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        line = next((x for x in reversed(p.stdout.splitlines()) if x.startswith("{")), None)
        res[lib] = json.loads(line) if p.returncode == 0 and line else {"error": p.stderr[-300:]}
        print(f"compile check {lib}: {res[lib]}")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--batches", default=None, help="comma list (default: 1,8 on CPU, 1,32 on CUDA)")
    p.add_argument("--libraries", default="dsas,dsas+gate,steering-vectors,repeng,pyvene")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=None, help="default: 64 on CUDA, 32 on CPU")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--strength", type=float, default=4.0)
    p.add_argument(
        "--compile-check", action="store_true", help="also check each library under model.compile()"
    )
    p.add_argument("--compile-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.compile_worker:
        import json

        torch.set_num_threads(1)
        print(json.dumps(compile_worker(args.compile_worker)))
        return
    dev, dtype = setup(args)
    cuda = dev.type == "cuda"
    batches = [int(b) for b in (args.batches or ("1,32" if cuda else "1,8")).split(",")]
    new_tokens = args.new_tokens or (64 if cuda else 32)
    env = environment(dev)
    model, tok, sets = load(args, dev, dtype)
    _, blocks = find_blocks(model)
    lam = args.strength

    t0 = time.perf_counter()
    st = dsas.fit(model, tok, sets, method="caa", gate="none", sites="blocks", progress=False)
    fit_s = time.perf_counter() - t0
    gated = dsas.fit(
        model, tok, sets, method="caa", gate="dsas", sites="blocks", progress=False, inactive="keep"
    )
    assert [s.layer for s in st.sites] == list(range(len(blocks))), "sites='blocks': one site per block"
    # In the model's dtype and device, as a user of those libraries would pass them (dsas keeps fp32 itself).
    vectors = {int(s.layer): st.maps[s.name].shift.to(dev, dtype) for s in st.sites if s.layer is not None}

    makers: dict[str, Callable[[], Runner]] = {
        "dsas": lambda: dsas_runner(model, st, lam),
        "dsas+gate": lambda: dsas_runner(model, gated, lam),
        "steering-vectors": lambda: sv_runner(model, vectors, lam),
        "repeng": lambda: repeng_runner(model, vectors, lam),
        "pyvene": lambda: pyvene_runner(model, vectors, lam),
    }
    wanted = [x.strip() for x in args.libraries.split(",") if x.strip()]
    runners: dict[str, Runner] = {}
    info: dict[str, dict[str, Any]] = {}
    for name in wanted:
        try:
            runners[name] = makers[name]()
            info[name] = {"version": _version(name)}
        except Exception as e:  # not installed / incompatible: say so in the table
            info[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(f"[skip] {name}: {info[name]['error']}")

    # 1. Do they steer alike? Logits of one unpadded prompt, against dsas.
    ids = tok(" ".join(sets.source[:2]), return_tensors="pt").input_ids[:, : args.prompt_tokens].to(dev)

    def logits(name: str) -> torch.Tensor:
        if name == "pyvene":
            return runners[name](
                lambda pvm, src: pvm({"input_ids": ids}, source_representations=src)[1].logits
            )
        return runners[name](lambda: model(ids).logits)

    with torch.no_grad():
        plain = model(ids).logits.float()
        ref = logits("dsas").float() if "dsas" in runners else None
        for name in list(runners):
            try:
                out = logits(name).float()
            except Exception as e:
                info[name]["error"] = f"forward: {type(e).__name__}: {e}"[:300]
                traceback.print_exc()
                runners.pop(name)
                continue
            info[name]["moved_logits"] = round(float((out - plain).abs().max()), 4)
            if ref is not None and name != "dsas+gate":
                info[name]["max_abs_diff_vs_dsas"] = float((out - ref).abs().max())

    # 2. Tokens/s of generate, interleaved.
    rows: dict[str, dict[str, Any]] = {}
    for batch in batches:
        x = (
            ids[:, :1]
            .new_tensor(
                tok(" ".join(sets.control * 4), add_special_tokens=False).input_ids[: args.prompt_tokens]
            )
            .repeat(batch, 1)
        )
        enc = {"input_ids": x, "attention_mask": torch.ones_like(x)}
        kw = dict(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )

        def gen(name: str, enc: dict[str, Any] = enc, kw: dict[str, Any] = kw) -> float:
            n_in = enc["input_ids"].shape[1]

            def call(*pv: Any) -> Any:
                if pv:  # pyvene: its own generate, base + source representations
                    pvm, src = pv
                    return pvm.generate(enc, source_representations=src, intervene_on_prompt=True, **kw)[1]
                return model.generate(**enc, **kw)

            with torch.no_grad():
                sync(dev)
                t = time.perf_counter()
                out = call() if name == "unsteered" else runners[name](call)
                sync(dev)
                dt = time.perf_counter() - t
            assert out.shape[1] == n_in + new_tokens, f"{name} generated {out.shape[1] - n_in} tokens"
            return dt

        names = ["unsteered", *runners]
        for n in names:
            gen(n)  # warm up
        res = interleave({n: (lambda n=n: gen(n)) for n in names}, args.rounds, "unsteered")
        for n in names:
            r = res[n]
            rows[f"{n}@{batch}"] = {
                "library": n,
                "batch": batch,
                **throughput(r, batch * new_tokens),
                "seconds": r["seconds"],
            }
            print(
                f"batch {batch} {n}: {rows[f'{n}@{batch}']['tok_s']} tok/s, ratio {rows[f'{n}@{batch}']['ratio']}"
            )

    checked = None
    if args.compile_check:
        checked = compile_check([n for n in wanted if n != "dsas+gate" and "error" not in info.get(n, {})])
    env["load_average_end"] = load_average()
    payload = {
        "env": env,
        "args": vars(args),
        "model": {"layers": len(blocks), "dtype": str(dtype)},
        "caa_fit_s": round(fit_s, 2),
        "libraries": info,
        "rows": rows,
        "compile_check": checked,
    }
    print_table(payload)
    out = result_path(args, "libraries", dev)
    write_json(out, payload)
    print(f"wrote {out}")


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    pkg = {"dsas+gate": "dsas"}.get(name, name)
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def print_table(payload: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="generate tokens/s with the same CAA vectors on every block")
    for c in ("library", "version", "batch", "tok/s", "ratio (min-max)", "max |logit diff| vs dsas"):
        t.add_column(c)
    for r in payload["rows"].values():
        lib = payload["libraries"].get(r["library"], {})
        diff = lib.get("max_abs_diff_vs_dsas")
        t.add_row(
            r["library"],
            str(lib.get("version", "")),
            str(r["batch"]),
            f"{r['tok_s']:.1f}",
            f"{r['ratio']:.3f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})",
            "" if diff is None else f"{diff:.2e}",
        )
    for name, lib in payload["libraries"].items():
        if "error" in lib:
            t.add_row(name, "", "", "", "failed", lib["error"][:60])
    Console(width=150).print(t)
    if payload.get("compile_check"):
        c = Table(title="under model.compile() (tiny random Llama, logits vs eager)")
        keys = ["compiled_before_steers", "compiled_inside_steers", "unsteered_after", "graph_breaks_inside"]
        c.add_column("library")
        for k in keys:
            c.add_column(k)
        for name, r in payload["compile_check"].items():
            c.add_row(name, *(str(r.get(k, r.get("error", "")))[:40] for k in keys))
        Console(width=150).print(c)


if __name__ == "__main__":
    main()
