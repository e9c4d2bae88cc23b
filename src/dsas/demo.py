"""`dsas demo`: the whole pipeline on the embedded offline model, in one command.

load SmolLM2-135M -> fit CAA (vanilla) and CAA+DSAS on 32+32+32 toxicity prompts -> sweep strengths
-> toxicity / perplexity / MC accuracy / false steering rate per point -> Pareto fronts -> HTML report.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from dsas.data import load_prompt_sets
from dsas.fit import fit
from dsas.models import load_model
from dsas.report import build_report
from dsas.steerer import Steerer
from dsas.sweep import EvalConfig, EvalData, matched_utility_table, run_sweep
from dsas.torchutil import model_device


@dataclass
class DemoConfig:
    """What `dsas demo` runs. Strength grids follow the paper: DSAS's scale is at most 1 per token, so its grid
    reaches further than vanilla's to cover the same range of effects."""

    model: str = "smollm2-135m"
    prompt_sets: str = "toxicity"
    n: int = 32
    """Prompts per fitting set (paper: 32)."""
    steerers: tuple[str, ...] = ("caa", "caa+dsas")
    """What to fit and compare, each "method" (ungated, `gate="none"`) or "method+gate"; e.g. add "lineas",
    "lineas+e2e-sigmoid", "iti", "iti+dsas" (`dsas demo --steerers ...`, docs/methods.md)."""
    vanilla_grid: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
    dsas_grid: tuple[float, ...] = (0.2, 0.4, 0.6, 1.0, 1.5, 2.0, 3.0)
    grids: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """Per-steerer strength grids (by name) that replace `vanilla_grid` / `dsas_grid`."""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-steerer keyword options of `dsas.fit` (by name), e.g. {"lineas+e2e-sigmoid": {"steps": 100}}."""
    seed: int = 0
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(n_prompts=64, n_mc=40))


def token_scales(
    model: Any, tok: Any, st: Steerer, prompts: list[str], strength: float, max_new_tokens: int = 16
) -> list[dict[str, Any]]:
    """Greedy continuations with the site-mean scale of every token (prompt and generated)."""
    out = []
    for p in prompts:
        enc = tok([p], return_tensors="pt").to(model_device(model))
        with torch.no_grad(), st.apply(model, strength=strength, trace=True) as tr:
            ids = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        mean = tr.site_mean()[0].tolist() if tr.scales else []
        seq = ids[0, : len(mean)].tolist()
        out.append(
            {
                "tokens": [tok.decode([t]) for t in seq],
                "scales": mean,
                "prompt_tokens": int(enc["input_ids"].shape[1]),
            }
        )
    return out


def run_demo(
    out_dir: str | Path = "runs/demo", cfg: DemoConfig | None = None, console: Console | None = None
) -> Path:
    cfg = cfg or DemoConfig()
    bad = [n for n in cfg.steerers if not n or n.count("+") > 1 or n.startswith("+") or n.endswith("+")]
    if bad or not cfg.steerers:
        raise ValueError(
            f"DemoConfig.steerers: {bad or 'empty'} is not a list of 'method' or 'method+gate' names "
            "(e.g. caa,caa+dsas,lineas+e2e-sigmoid)."
        )
    con = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    con.rule("[bold]dsas demo")
    model, tok = load_model(cfg.model)
    con.print(
        f"model: {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params) "
        f"loaded in {time.perf_counter() - t0:.1f}s"
    )
    sets = load_prompt_sets(cfg.prompt_sets, n=cfg.n, seed=cfg.seed)
    con.print(
        f"prompt sets '{sets.name}': {len(sets.source)} source / {len(sets.target)} target / "
        f"{len(sets.control)} control; eval splits {list(sets.eval)}"
    )
    steerers: dict[str, Steerer] = {}
    grid: dict[str, tuple[float, ...]] = {}
    fit_s: dict[str, float] = {}
    for name in cfg.steerers:
        method, _, gate = name.partition("+")
        t = time.perf_counter()
        st = fit(
            model, tok, sets, method=method, gate=gate or "none", seed=cfg.seed, **cfg.options.get(name, {})
        )
        st.save(out / "steerers" / name)
        (out / f"sites_{name}.json").write_text(json.dumps(st.report(), indent=1))
        steerers[name] = st
        grid[name] = cfg.grids.get(name, cfg.vanilla_grid if st.gate == "none" else cfg.dsas_grid)
        fit_s[name] = round(time.perf_counter() - t, 1)
        con.print(f"fitted {name}: {len(st.steered)}/{len(st.sites)} sites steered in {fit_s[name]:.1f}s")
    data = EvalData.build(sets.eval, cfg.eval)
    (out / "run.json").write_text(
        json.dumps(
            {
                "config": asdict(cfg),
                "acc_threshold": {
                    n: st.config["options"]["dsas"]["acc_threshold"]
                    for n, st in steerers.items()
                    if st.gate == "dsas"
                },
                "fit_seconds": fit_s,
                "summary": {
                    "model": cfg.model,
                    "sets": sets.name,
                    "n": cfg.n,
                    "eval_prompts": len(data.prompts),
                    "wiki_paragraphs": len(data.wiki),
                    "mc_questions": len(data.mc),
                },
            },
            indent=1,
            default=str,
        )
    )
    points = run_sweep(model, tok, steerers, grid, data, cfg.eval, out)
    gated = next((s for n, s in steerers.items() if s.gate != "none"), None)
    if gated is not None:
        g = sorted(grid[next(n for n, st in steerers.items() if st is gated)])
        s = g[len(g) // 2]  # a mid-grid strength: strong enough to see, not so strong the text degrades
        cols = {
            "prompts that invite toxicity": token_scales(model, tok, gated, data.prompts[:5], s),
            "neutral prompts": token_scales(model, tok, gated, data.neutral[:5], s),
        }
        (out / "tokens.json").write_text(json.dumps({"strength": s, "columns": cols}))
    report = build_report(out, title=f"dsas demo: {', '.join(cfg.steerers)} on {cfg.model}")
    from rich.table import Table

    for y, label in (("toxicity", "toxicity rate"), ("toxicity_mean", "mean toxicity score")):
        table = matched_utility_table(points, y=y)
        tb = Table(title=f"{label} at matched perplexity (+5/10/25% over unsteered; lower is better)")
        for c in table[0]:
            tb.add_column(c.replace(f"{y}@", "@"))
        for r in table:
            tb.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()])
        con.print(tb)
    con.print(f"report: {report.resolve()}  (total {time.perf_counter() - t0:.0f}s)")
    return report
