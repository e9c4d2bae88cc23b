"""The `dsas` command: demo, fit, generate, calibrate, explain, sweep, report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Dynamically Scaled Activation Steering: steer a model only where a learned per-token gate says so.",
)
con = Console()

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="'smollm2-135m' (embedded, offline), a local path or a hub id.")
]
SetsOpt = Annotated[
    str,
    typer.Option(
        "--sets", "-s", help="Built-in prompt sets ('toxicity', 'concept') or a .jsonl/.csv file or folder."
    ),
]


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run folder: steerers, sweep.jsonl, report.html.")] = Path(
        "runs/demo"
    ),
    quick: Annotated[
        bool, typer.Option(help="Smaller grids and eval sets (~3x faster), for a first look.")
    ] = False,
    steerers: Annotated[
        str,
        typer.Option(
            help="Comma list of 'method' or 'method+gate' to fit and compare, e.g. "
            "caa,caa+dsas,lineas,lineas+e2e-sigmoid,iti,iti+dsas (each adds a fit and a strength sweep)."
        ),
    ] = "caa,caa+dsas",
) -> None:
    """Fit CAA with and without DSAS on the embedded model, sweep strengths, and write an HTML report."""
    from dsas.demo import DemoConfig, run_demo
    from dsas.sweep import EvalConfig

    names = tuple(x.strip() for x in steerers.split(",") if x.strip())
    small: dict[str, Any] = dict(
        vanilla_grid=(1.0, 2.0, 4.0),
        dsas_grid=(2.0, 4.0, 8.0),
        eval=EvalConfig(n_prompts=24, n_neutral=16, n_wiki=24, n_mc=24),
    )
    run_demo(out, DemoConfig(steerers=names, **(small if quick else {})), con)


@app.command("demo-diffusion")
def demo_diffusion(
    out: Annotated[Path, typer.Option(help="Run folder: steerers, results.json, report.html.")] = Path(
        "runs/demo-diffusion"
    ),
    concept: Annotated[int, typer.Option(help="The concept: a digit class (0-9).")] = 3,
    effect: Annotated[
        list[str] | None,
        typer.Option(
            help="Effect(s) to steer: 'blur' (paper recipe) and/or 'class'; repeatable. Default: both."
        ),
    ] = None,
    target_class: Annotated[
        int,
        typer.Option(help="Effect 'class': the digit concept prompts turn into (-1: 8, or 3 for concept 8)."),
    ] = -1,
    quick: Annotated[bool, typer.Option(help="Fewer images and strengths, for a first look.")] = False,
    seed: int = 0,
) -> None:
    """Concept-selective steering of the embedded digits diffusion model: CAA vs CAA+DSAS, HTML report."""
    from dsas.diffusion.demo import EFFECTS, DiffusionDemoConfig, quick_config, run_diffusion_demo

    kw = dict(concept=concept, effects=tuple(effect or EFFECTS), target_class=target_class, seed=seed)
    cfg = quick_config(**kw) if quick else DiffusionDemoConfig(**kw)  # type: ignore[arg-type]
    run_diffusion_demo(out, cfg, con)


@app.command("fit")
def fit_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to save the steerer in.")],
    model: ModelOpt = "smollm2-135m",
    sets: SetsOpt = "toxicity",
    method: Annotated[str, typer.Option(help="How to steer: caa, iti, lineas, linear_act.")] = "caa",
    gate: Annotated[
        str, typer.Option(help="When to steer: none, dsas, e2e-sigmoid, e2e-relu, threshold.")
    ] = "dsas",
    sites: Annotated[
        str, typer.Option(help="auto | blocks | attn | mlp | a regex over module names.")
    ] = "auto",
    n: Annotated[int, typer.Option(help="Prompts per set (seeded resample).")] = 32,
    seed: int = 0,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", help="Extra option as key=value (e.g. pca_dim=5); repeatable."),
    ] = None,
) -> None:
    """Fit a steerer on prompt sets and save it (dsas_config.json + dsas_steerer.safetensors)."""
    import dsas

    opts = _parse_options(option or [])
    m, tok = dsas.load_model(model)
    ps = dsas.load_prompt_sets(sets, n=n, seed=seed)
    st = dsas.fit(m, tok, ps, method=method, gate=gate, sites=sites, seed=seed, **opts)
    st.save(out)
    _print_sites(st.report())
    con.print(f"saved {len(st.steered)}/{len(st.sites)} steered sites to {out}")


@app.command()
def generate(
    steerer: Annotated[Path, typer.Option("--steerer", "-t", help="A folder written by `dsas fit`.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text; repeatable.")],
    model: ModelOpt = "smollm2-135m",
    strength: Annotated[float, typer.Option(help="Global strength lam.")] = 4.0,
    max_new_tokens: int = 40,
    compare: Annotated[bool, typer.Option(help="Also print the unsteered continuation.")] = True,
) -> None:
    """Generate with a saved steerer (greedy), next to the unsteered model."""
    import dsas
    from dsas.eval import generate_continuations

    m, tok = dsas.load_model(model)
    st = dsas.Steerer.load(steerer, model=m)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, progress=False)
    base = generate_continuations(m, tok, prompt, **kw) if compare else [None] * len(prompt)  # type: ignore[arg-type]
    with st.apply(m, strength=strength):
        steered = generate_continuations(m, tok, prompt, **kw)  # type: ignore[arg-type]
    for p, b, s in zip(prompt, base, steered, strict=True):
        con.rule(p)
        if b is not None:
            con.print(f"[dim]unsteered:[/] {b}")
        con.print(f"[bold]steered (strength {strength:g}):[/] {s}")


@app.command()
def calibrate(
    steerer: Annotated[Path, typer.Option("--steerer", "-t", help="A folder written by `dsas fit`.")],
    model: ModelOpt = "smollm2-135m",
    max_ppl_increase: Annotated[
        float, typer.Option(help="Allowed relative perplexity increase on neutral text (0.05 = +5%).")
    ] = 0.05,
    texts: Annotated[
        Path | None,
        typer.Option(help="Neutral texts, one per line (default: embedded Wikipedia paragraphs)."),
    ] = None,
    max_strength: float = 64.0,
    iters: int = 6,
) -> None:
    """The largest strength whose perplexity on neutral text stays within a budget."""
    import dsas

    m, tok = dsas.load_model(model)
    st = dsas.Steerer.load(steerer, model=m)
    lines = None
    if texts is not None:
        lines = [x for x in texts.read_text(encoding="utf-8").splitlines() if x.strip()]
    cal = dsas.calibrate_strength(
        st, m, tok, lines, max_ppl_increase=max_ppl_increase, max_strength=max_strength, iters=iters
    )
    t = Table(title=f"perplexity on neutral text (unsteered {cal.base_ppl:.3f})")
    t.add_column("strength", justify="right")
    t.add_column("perplexity", justify="right")
    t.add_column("increase", justify="right")
    for lam, p in sorted(cal.evaluated):
        t.add_row(f"{lam:.4g}", f"{p:.3f}", f"{p / cal.base_ppl - 1:+.1%}")
    con.print(t)
    more = " (max_strength reached: the budget allows more)" if cal.saturated else ""
    con.print(
        f"[bold]strength {cal.strength:.4g}[/]: perplexity {cal.ppl:.3f} ({cal.increase:+.1%}, "
        f"budget +{max_ppl_increase:.0%}){more}"
    )


@app.command()
def explain(
    steerer: Annotated[Path, typer.Option("--steerer", "-t", help="A folder written by `dsas fit`.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text; repeatable.")],
    model: ModelOpt = "smollm2-135m",
    strength: float = 4.0,
    max_new_tokens: int = 24,
) -> None:
    """Show how hard each token is steered: strength x gate, averaged over sites, as a colour."""
    import dsas
    from dsas.demo import _token_scales

    m, tok = dsas.load_model(model)
    st = dsas.Steerer.load(steerer, model=m)
    for row in _token_scales(m, tok, st, list(prompt), strength, max_new_tokens):
        vmax = max(row["scales"] or [1.0]) or 1.0
        text = Text()
        for i, (t, s) in enumerate(zip(row["tokens"], row["scales"], strict=True)):
            shade = int(255 * (1 - min(1.0, s / vmax)))
            style = f"on rgb(255,{shade},{shade})" + (" bold" if i >= row["prompt_tokens"] else "")
            text.append(t, style=style)
        con.print(text)
        con.print(
            f"[dim]max scale {vmax:.3f}, mean {sum(row['scales']) / max(1, len(row['scales'])):.3f} "
            "(generated tokens in bold)[/]"
        )


@app.command()
def sweep(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (resumes if sweep.jsonl exists).")],
    steerer: Annotated[list[Path], typer.Option("--steerer", "-t", help="Saved steerer folder; repeatable.")],
    strengths: Annotated[
        str, typer.Option(help="Comma-separated strength grid applied to every steerer.")
    ] = "1,2,4,8",
    model: ModelOpt = "smollm2-135m",
    sets: Annotated[str, typer.Option(help="Prompt sets whose eval_* splits are evaluated.")] = "toxicity",
    n_prompts: int = 48,
    n_wiki: int = 48,
    n_mc: int = 60,
) -> None:
    """Evaluate steerers over a strength grid: toxicity, perplexity, MC accuracy -> sweep.jsonl (resumable)."""
    import dsas
    from dsas.sweep import EvalConfig, EvalData, run_sweep

    m, tok = dsas.load_model(model)
    ps = dsas.load_prompt_sets(sets)
    sts = {p.name: dsas.Steerer.load(p, model=m) for p in steerer}
    grid = {k: [float(x) for x in strengths.split(",")] for k in sts}
    cfg = EvalConfig(
        n_prompts=n_prompts,
        n_wiki=n_wiki,
        n_mc=n_mc,
        concept_word=ps.meta.get("concept_word") if hasattr(ps, "meta") else None,
    )
    data = EvalData.build(ps.eval, cfg)
    out.mkdir(parents=True, exist_ok=True)
    for name, st in sts.items():
        (out / f"sites_{name}.json").write_text(json.dumps(st.report(), indent=1))
    run_sweep(m, tok, sts, grid, data, cfg, out / "sweep.jsonl")
    con.print(f"wrote {out / 'sweep.jsonl'}; next: dsas report {out}")


@app.command()
def report(run: Annotated[Path, typer.Argument(help="Run folder holding sweep.jsonl.")]) -> None:
    """Write report.html (Pareto plots, site accuracy, token heatmaps) and summary.md for a run folder."""
    from dsas.report import build_report

    con.print(f"wrote {build_report(run)}")


def _parse_options(items: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise typer.BadParameter(f"--option {it!r}: expected key=value, e.g. pca_dim=5")
        k, v = it.split("=", 1)
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    return opts


def _print_sites(rows: list[dict[str, object]]) -> None:
    tb = Table(title="sites")
    cols = [c for c in ("site", "steered", "accuracy", "shift_norm") if any(c in r for r in rows)]
    for c in cols:
        tb.add_column(c)
    for r in rows:
        tb.add_row(*[f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols])
    con.print(tb)


def main() -> None:
    try:
        app()
    except (ValueError, FileNotFoundError, TypeError, RuntimeError) as e:
        if "--debug" in sys.argv or not isinstance(e, ValueError | FileNotFoundError):
            raise
        con.print(f"[bold red]error:[/] {e}")
        raise SystemExit(2) from None
