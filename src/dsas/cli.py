"""The `dsas` command: demo, fit, generate, calibrate, explain, sweep, report.

User errors (bad arguments, missing or unreadable files, a model that cannot be loaded) end in one line on stderr
that names the flag or file and the fix, exit status 2, no traceback (`--debug` or DSAS_DEBUG=1 shows it).
Arguments and output folders are checked before the model is loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup


class CLIError(ValueError):
    """A user error found by the CLI itself; the message names the flag and the fix."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from dsas.models import ModelUnavailableError

    return (ValueError, OSError, ImportError, ModelUnavailableError)


class _Group(TyperGroup):
    """Turns user errors raised by any command into one line on stderr and exit status 2."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _user_errors() as e:
            if os.environ.get("DSAS_DEBUG"):
                raise
            typer.echo(f"{typer.style('error:', fg='red', bold=True)} {_one_line(e)}", err=True)
            raise typer.Exit(2) from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, UnicodeDecodeError):
        return f"{text}: not UTF-8 text; save the file as UTF-8."
    return text


app = typer.Typer(
    cls=_Group,
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
    out: Annotated[Path, typer.Option(help="Run folder: steerers, sweep.sqlite, report.html.")] = Path(
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
    for name in names or ("",):
        method, _, gate = name.partition("+")
        _check_method_gate(method, gate or "none", f"--steerers {name!r}", options=[])
    _check_out_dir(out, "--out")
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
    removal: Annotated[
        bool,
        typer.Option(
            "--removal",
            help="DSAS gates for removing a behaviour (detoxification) that leave neutral text untouched: the "
            "options of DSASConfig.removal(), with any --option on top.",
        ),
    ] = False,
) -> None:
    """Fit a steerer on prompt sets and save it (dsas_config.json + dsas_steerer.safetensors)."""
    import dsas

    opts = parse_options(option or [])
    if removal:
        if gate != "dsas":
            raise CLIError(f"--removal sets DSAS gates; use it with --gate dsas (the default), not {gate!r}.")
        from dsas.gates import DSASConfig, changed_fields

        opts = changed_fields(DSASConfig.removal()) | opts
    _check_method_gate(method, gate, "--method/--gate", options=option or [], opts={"seed": seed, **opts})
    _check_sites(sites)
    _check_positive(n, "--n")
    _check_out_dir(out, "--out")
    ps = _load_sets(sets, n=n, seed=seed)
    m, tok = _load_model(model)
    st = dsas.fit(m, tok, ps, method=method, gate=gate, sites=sites, seed=seed, **opts)
    st.save(out)
    print_sites(st.report())
    con.print(f"saved {len(st.steered)}/{len(st.sites)} steered sites to {escape(str(out))}")


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
    from dsas.eval import generate_continuations

    st, m, tok = _steer_setup(steerer, model, strength, max_new_tokens, prompt)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, progress=False)
    base = generate_continuations(m, tok, prompt, **kw) if compare else [None] * len(prompt)  # type: ignore[arg-type]
    with st.apply(m, strength=strength):
        steered = generate_continuations(m, tok, prompt, **kw)  # type: ignore[arg-type]
    for p, b, s in zip(prompt, base, steered, strict=True):
        con.rule(escape(p))
        if b is not None:
            con.print(f"[dim]unsteered:[/] {escape(b)}")
        con.print(f"[bold]steered (strength {strength:g}):[/] {escape(s)}")


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

    _check_finite(max_ppl_increase, "--max-ppl-increase", positive=True)
    _check_finite(max_strength, "--max-strength", positive=True)
    _check_positive(iters, "--iters")
    lines = None
    if texts is not None:
        lines = [x for x in _read_text(texts, "--texts").splitlines() if x.strip()]
        if not lines:
            raise CLIError(f"--texts {texts}: the file holds no text. Put one neutral text per line in it.")
    st = _load_steerer(steerer)
    m, tok = _load_model(model)
    st.check_model(m)
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
    from dsas.demo import token_scales

    st, m, tok = _steer_setup(steerer, model, strength, max_new_tokens, prompt)
    for row in token_scales(m, tok, st, list(prompt), strength, max_new_tokens):
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
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder (resumes the points already in its sweep.sqlite).")
    ],
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
    """Evaluate steerers over a strength grid: toxicity, perplexity, MC accuracy -> sweep.sqlite (resumable)."""
    from dsas.eval import concept_words
    from dsas.sweep import EvalConfig, EvalData, run_sweep

    values = _parse_strengths(strengths)
    for value, flag in ((n_prompts, "--n-prompts"), (n_wiki, "--n-wiki"), (n_mc, "--n-mc")):
        _check_positive(value, flag)
    _check_out_dir(out, "--out")
    names = steerer_names(steerer)
    sts = {name: _load_steerer(p) for name, p in names.items()}
    ps = _load_sets(sets)
    m, tok = _load_model(model)
    for st in sts.values():
        st.check_model(m)
    grid = {k: values for k in sts}
    cfg = EvalConfig(
        n_prompts=n_prompts,
        n_wiki=n_wiki,
        n_mc=n_mc,
        concept_word=concept_words(ps.meta) if hasattr(ps, "meta") else None,
    )
    data = EvalData.build(ps.eval, cfg)
    out.mkdir(parents=True, exist_ok=True)
    for name, st in sts.items():
        (out / f"sites_{name}.json").write_text(json.dumps(st.report(), indent=1))
    run_sweep(m, tok, sts, grid, data, cfg, out)
    con.print(f"wrote {escape(str(out / 'sweep.sqlite'))}; next: dsas report {escape(str(out))}")


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="Run folder holding sweep.sqlite (or an older sweep.jsonl).")],
) -> None:
    """Write report.html (Pareto plots, site accuracy, token heatmaps) and summary.md for a run folder."""
    from dsas.report import build_report

    con.print(f"wrote {escape(str(build_report(run)))}")


def parse_options(items: list[str]) -> dict[str, Any]:
    """`--option key=value` pairs; a value is read as JSON (5, 0.5, true, "x", [1, 2]) or else kept as text."""
    opts: dict[str, Any] = {}
    for it in items:
        k, eq, v = it.partition("=")
        if not eq or not k.strip():
            raise CLIError(f"--option {it!r}: expected key=value, e.g. --option pca_dim=5.")
        try:
            opts[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            opts[k.strip()] = v
    return opts


def _check_method_gate(
    method: str, gate: str, flag: str, options: list[str], opts: dict[str, Any] | None = None
) -> None:
    """Method, gate and --option values, checked by building the configs (no model needed)."""
    from dsas.fit import GATES, METHODS, route_options

    if method not in METHODS:
        raise CLIError(f"{flag}: unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}.")
    if gate not in GATES:
        raise CLIError(f"{flag}: unknown gate {gate!r}; choose one of {', '.join(sorted(GATES))}.")
    joint = getattr(GATES[gate], "joint", None)
    if joint is not None and method != joint:
        raise CLIError(
            f"{flag}: gate {gate!r} is trained with its maps and needs method {joint!r}, got {method!r}."
        )
    try:
        route_options(method, gate, opts or {})
    except (TypeError, ValueError) as e:
        where = f"--option {' '.join(options)}" if options else flag
        raise CLIError(f"{where}: {e}") from None


def _check_sites(sites: str) -> None:
    from dsas.sites import KINDS

    if sites not in KINDS:
        try:
            re.compile(sites)
        except re.error as e:
            raise CLIError(
                f"--sites {sites!r} is neither one of {', '.join(KINDS)} nor a valid regex ({e})."
            ) from None


def _check_positive(value: int, flag: str) -> None:
    if value < 1:
        raise CLIError(f"{flag} must be at least 1, got {value}.")


def _check_finite(value: float, flag: str, positive: bool = False) -> None:
    if not math.isfinite(value) or (positive and value <= 0):
        need = "a finite number > 0" if positive else "a finite number"
        raise CLIError(f"{flag} must be {need}, got {value}.")


def _check_prompts(prompts: Sequence[str]) -> None:
    if not prompts or any(not p.strip() for p in prompts):
        raise CLIError('--prompt must be a non-empty text, e.g. -p "You are such a".')


def _parse_strengths(text: str) -> list[float]:
    items = [x.strip() for x in text.split(",")]
    try:
        values = [float(x) for x in items]
    except ValueError:
        bad = next(x for x in items if not _is_float(x))
        raise CLIError(
            f"--strengths {text!r}: {bad!r} is not a number. Pass comma-separated numbers, e.g. --strengths 1,2,4,8."
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise CLIError(
            f"--strengths {text!r}: every strength must be a finite number, e.g. --strengths 1,2,4,8."
        )
    return values


def _is_float(x: str) -> bool:
    try:
        float(x)
    except ValueError:
        return False
    return True


def _check_out_dir(out: Path, flag: str) -> None:
    """An output folder that can be created and written, checked before any work is done."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"{flag} {out}: exists and is not a folder. Pass a folder path.")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise CLIError(f"{flag} {out}: {probe} is a file, so the folder cannot be created there.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {out}: no permission to write in {probe}. Pass a folder you can write to.")


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(
            f"{flag} {path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8."
        ) from None
    except OSError as e:
        raise CLIError(f"{flag} {path}: cannot read it ({e.strerror or e}).") from None


def _load_model(name: str) -> tuple[Any, Any]:
    import dsas
    from dsas.models import ModelUnavailableError

    try:
        return dsas.load_model(name)
    except (ModelUnavailableError, OSError, ValueError, ImportError) as e:
        raise CLIError(f"--model {name!r}: {_one_line(e)}") from None


def _steer_setup(
    steerer: Path, model: str, strength: float, max_new_tokens: int, prompt: Sequence[str]
) -> tuple[Any, Any, Any]:
    """Check the flags of a generating command, then load the steerer and the model it must match."""
    _check_finite(strength, "--strength")
    _check_positive(max_new_tokens, "--max-new-tokens")
    _check_prompts(prompt)
    st = _load_steerer(steerer)
    m, tok = _load_model(model)
    st.check_model(m)
    return st, m, tok


def _load_steerer(path: Path) -> Any:
    import dsas

    if not path.is_dir():
        raise CLIError(f"--steerer {path}: no such folder. Pass a folder written by `dsas fit --out`.")
    try:
        return dsas.Steerer.load(path)
    except (ValueError, OSError) as e:
        raise CLIError(f"--steerer {path}: {_one_line(e)}") from None


def _load_sets(sets: str, n: int | None = None, seed: int = 0) -> Any:
    import dsas

    try:
        return dsas.load_prompt_sets(sets, n=n, seed=seed)
    except (ValueError, OSError) as e:
        raise CLIError(f"--sets {sets}: {_one_line(e)}") from None


def steerer_names(paths: Sequence[Path]) -> dict[str, Path]:
    """A distinct name per --steerer folder: its own name, or with as many parent folders as tell it apart
    (joined with "-": the name is also a file-name part, sites_<name>.json)."""
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        dup = next(p for p, r in zip(paths, resolved, strict=True) if resolved.count(r) > 1)
        raise CLIError(f"--steerer {dup} is given twice. Pass each steerer folder once.")

    def suffix(r: Path, depth: int) -> str:
        return "-".join(r.parts[-depth:])

    names = {}
    for r, p in zip(resolved, paths, strict=True):
        depth = 1
        while depth < len(r.parts) and any(suffix(o, depth) == suffix(r, depth) for o in resolved if o != r):
            depth += 1
        names[suffix(r, depth)] = p
    if len(names) != len(paths):
        raise CLIError(f"--steerer folders {[str(p) for p in paths]} get clashing names; rename one folder.")
    return names


def print_sites(rows: list[dict[str, object]]) -> None:
    tb = Table(title="sites")
    cols = [c for c in ("site", "steered", "accuracy", "shift_norm") if any(c in r for r in rows)]
    for c in cols:
        tb.add_column(c)
    for r in rows:
        tb.add_row(
            *[escape(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, ""))) for c in cols]
        )
    con.print(tb)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    steerer: Annotated[
        list[str],
        typer.Option("--steerer", "-t", help="name=folder of a steerer saved by `dsas fit`; repeatable."),
    ],
    model: ModelOpt = "smollm2-135m",
    host: str = "127.0.0.1",
    port: int = 8000,
) -> None:
    """Serve the model with vLLM's OpenAI-compatible server, steering chosen per request (needs vLLM:
    `bash scripts/setup_vllm.sh`, then `.venv-vllm/bin/dsas serve`). Unknown options go to `vllm serve`."""
    from dsas.serving.launch import serve_command

    serve_command(model, steerer, host, port, list(ctx.args))


def main() -> None:
    """Entry point; `--debug` anywhere on the command line shows tracebacks of user errors too."""
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
        os.environ["DSAS_DEBUG"] = "1"
    app()
