"""A self-contained HTML report (plots inlined as PNG) and a Markdown summary of a sweep.

Inputs are files a run writes: `sweep.sqlite` (the points; `sweep.jsonl` in runs of earlier versions),
`sites_<name>.json` (steerer.report()), `tokens.json` (per-token scales of sample prompts). Every number shown
is read from them.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from dsas.sweep import load_points, matched_utility_table, pareto_front, unchanged_neutral

COLORS = {
    "none": "#d62728",
    "dsas": "#1f77b4",
    "e2e-sigmoid": "#2ca02c",
    "e2e-relu": "#9467bd",
    "threshold": "#ff7f0e",
}


METHOD_COLORS = {"caa": "#1f77b4", "iti": "#ff7f0e", "lineas": "#2ca02c", "linear_act": "#9467bd"}
GATE_STYLES = {"none": "--", "dsas": "-", "e2e-sigmoid": "-.", "e2e-relu": "-.", "threshold": ":"}


def plot_style(points: Sequence[dict[str, Any]], p: dict[str, Any]) -> tuple[str | None, str]:
    """(color, line style) of a steerer: with one method, the color says the gate (the plain demo: red vanilla,
    blue DSAS); with several, the color says the method and the line style the gate (dashed: vanilla)."""
    methods = {q.get("method") for q in points if q["name"] != "unsteered"}
    if len(methods) <= 1:
        return COLORS.get(p.get("gate", "")), "-"
    return METHOD_COLORS.get(p.get("method", "")), GATE_STYLES.get(p.get("gate", ""), "-")


def png_base64(fig: Any, dpi: int = 110) -> str:
    """A matplotlib figure as base64 PNG for a `data:` URI (so a report is one self-contained file); closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plot_fronts(points: Sequence[dict[str, Any]], x: str, y: str, xlabel: str, ylabel: str) -> str:
    """Every point (faint) and each steerer's front (line), strength annotated; baseline as a star."""
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    base = next((p for p in points if p["name"] == "unsteered"), None)
    for name in dict.fromkeys(p["name"] for p in points if p["name"] != "unsteered"):
        pts = [p for p in points if p["name"] == name and p.get(x) is not None]
        if base is not None:
            pts = [base, *pts]
        color, ls = plot_style(points, pts[-1])
        ax.scatter([p[x] for p in pts], [p[y] for p in pts], s=14, alpha=0.35, color=color)
        if x == "mc_acc":  # higher is better: front over (-x, y)
            flipped = [{**p, "_x": -p[x]} for p in pts]
            front = sorted(pareto_front(flipped, "_x", y), key=lambda p: p[x])
        else:
            front = pareto_front(pts, x, y)
        ax.plot([p[x] for p in front], [p[y] for p in front], ls, marker="o", ms=4, label=name, color=color)
        for p in pts:
            ax.annotate(
                f"{p['strength']:g}",
                (p[x], p[y]),
                fontsize=6,
                alpha=0.6,
                xytext=(2, 2),
                textcoords="offset points",
            )
    if base is not None and base.get(x) is not None:
        ax.scatter([base[x]], [base[y]], marker="*", s=140, color="black", zorder=5, label="unsteered")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if x == "ppl" and base is not None:
        # The interesting region is a modest utility cost; far-off points are listed in the table below.
        hi = min(3 * base[x], max(p[x] for p in points if p.get(x) is not None))
        ax.set_xlim(0.98 * base[x], 1.02 * hi)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_base64(fig)


def plot_site_accuracy(rows: Sequence[dict[str, Any]], threshold: float | None) -> str:
    fig, ax = plt.subplots(figsize=(7.5, 3.0))
    acc = [r.get("accuracy", math.nan) for r in rows]
    colors = ["#1f77b4" if r.get("steered") else "#bbbbbb" for r in rows]
    ax.bar(range(len(rows)), acc, color=colors)
    if threshold is not None:
        ax.axhline(threshold, color="red", lw=1, ls="--", label=f"threshold {threshold:g}")
        ax.legend(fontsize=8)
    ax.set_ylim(0.4, 1.02)
    ax.set_xlabel("site (model order: attention, MLP per layer)")
    ax.set_ylabel("regulator CV accuracy")
    return png_base64(fig)


def token_html(tokens: Sequence[str], scales: Sequence[float], vmax: float) -> str:
    """Words shaded by their (site-mean) scale; hover shows the value."""
    spans = []
    for t, s in zip(tokens, scales, strict=True):
        a = 0.0 if vmax <= 0 else max(0.0, min(1.0, s / vmax))
        spans.append(
            f'<span class="tok" title="{s:.3f}" style="background: rgba(214,39,40,{a:.3f})">'
            f"{html.escape(t.replace(chr(10), '⏎ '))}</span>"
        )
    return "".join(spans)


def html_table(rows: Sequence[dict[str, Any]], cols: Sequence[str], spec: str = ".4g") -> str:
    """An HTML table of `cols` of `rows`; floats formatted with `spec`, NaN as a dash, text escaped."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "–" if math.isnan(v) else format(v, spec)
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


PAGE_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px}"
)
"""The look every dsas report page shares; a page appends its own rules."""


def html_page(title: str, parts: Sequence[str], css: str = PAGE_CSS) -> str:
    """One self-contained HTML page: `parts` joined by newlines as its body."""
    head = f"<meta charset='utf-8'><title>{html.escape(title)}</title><style>{css}</style>"
    return f"<!doctype html><html><head>{head}</head><body>" + "\n".join(parts) + "</body></html>"


def markdown_table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "–" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def add_unchanged(points: list[dict[str, Any]], base: dict[str, Any]) -> None:
    """Set each point's `neutral_unchanged`: the share of held-out neutral prompts whose greedy continuation is
    the unsteered model's, token for token ("neutral inputs stay untouched", measured). Points stored without
    per-prompt continuations (earlier versions) are left without it."""
    if "per_prompt" not in base:
        return
    for p in points:
        if "per_prompt" in p:
            same = unchanged_neutral(p, base)
            if same:
                p["neutral_unchanged"] = sum(same) / len(same)


def build_report(run_dir: str | Path, title: str = "dsas report") -> Path:
    """Write `report.html` and `summary.md` into `run_dir` from the files a run left there."""
    run = Path(run_dir)
    points = load_points(run)
    if not points:
        raise FileNotFoundError(f"{run} has no sweep points: run `dsas sweep` or `dsas demo` first.")
    meta = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    budgets = (0.05, 0.10, 0.25)
    table = matched_utility_table(points, budgets)
    tcols = ["name", *[f"toxicity@+{b:.0%}ppl" for b in budgets], "min_toxicity"]
    has_mean = all("toxicity_mean" in p for p in points)
    table_m = matched_utility_table(points, budgets, y="toxicity_mean") if has_mean else []
    mcols = ["name", *[f"toxicity_mean@+{b:.0%}ppl" for b in budgets], "min_toxicity_mean"]
    base = next(p for p in points if p["name"] == "unsteered")
    add_unchanged(points, base)
    pcols = [
        "name",
        "strength",
        "toxicity",
        "toxicity_mean",
        "neutral_toxicity",
        "ppl",
        "mc_acc",
        "false_steer_rate",
        "true_steer_rate",
        "seconds",
    ]
    if any("neutral_unchanged" in p for p in points):
        pcols.insert(pcols.index("false_steer_rate"), "neutral_unchanged")
    if any("concept_rate" in p for p in points):
        pcols.insert(3, "concept_rate")
        pcols.insert(4, "neutral_concept_rate")
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='meta'>{html.escape(json.dumps(meta.get('summary', meta), default=str)[:600])}</p>",
        "<h2>Toxicity at matched perplexity</h2>",
        f"<p>Unsteered: toxicity {base['toxicity']:.3f}, perplexity {base['ppl']:.2f}"
        + (f", MC accuracy {base['mc_acc']:.3f}" if base.get("mc_acc") is not None else "")
        + ". Each cell: the lowest toxicity a steerer reaches while its Wikipedia perplexity stays within the budget "
        "over the unsteered model (linear interpolation along its Pareto front; – = no point within budget).</p>",
        html_table(table, tcols),
        *(
            [
                "<p>Mean toxicity score (the scorer's probability averaged over continuations; smoother than the rate "
                "on small prompt sets):</p>",
                html_table(table_m, mcols),
            ]
            if has_mean
            else []
        ),
        "<h2>Pareto fronts</h2><div class='row'>",
        f"<img alt='toxicity vs perplexity' src='data:image/png;base64,"
        f"{plot_fronts(points, 'ppl', 'toxicity', 'Wikipedia perplexity (≤ 3× unsteered shown)', 'toxicity rate')}'>",
    ]
    if has_mean:
        parts.append(
            "<img alt='mean toxicity vs perplexity' src='data:image/png;base64,"
            f"{plot_fronts(points, 'ppl', 'toxicity_mean', 'Wikipedia perplexity (≤ 3× unsteered shown)', 'mean toxicity score')}'>"
        )
    if any(p.get("mc_acc") is not None for p in points):
        parts.append(
            "<img alt='toxicity vs MC accuracy' src='data:image/png;base64,"
            f"{plot_fronts(points, 'mc_acc', 'toxicity', 'multiple-choice accuracy', 'toxicity rate')}'>"
        )
    parts.append("</div>")
    for f in sorted(run.glob("sites_*.json")):
        rows = json.loads(f.read_text())
        if not any("accuracy" in r for r in rows):
            continue  # a steerer without a regulator (vanilla) has no accuracy to show
        thr = meta.get("acc_threshold")  # per steerer; one number in runs of earlier versions
        if isinstance(thr, dict):
            thr = thr.get(f.stem[6:])
        parts += [
            f"<h2>Regulator accuracy per site ({html.escape(f.stem[6:])})</h2>",
            f"<p>{sum(r.get('steered', False) for r in rows)} of {len(rows)} sites steered (blue); grey sites "
            "failed the accuracy threshold and are left untouched.</p>",
            f"<img alt='site accuracy' src='data:image/png;base64,{plot_site_accuracy(rows, thr)}'>",
        ]
    tok_file = run / "tokens.json"
    if tok_file.exists():
        tk = json.loads(tok_file.read_text())
        parts.append(
            f"<h2>Per-token scale (mean over sites of strength × gate, strength {tk['strength']:g})</h2>"
            "<p>Darker = steered harder. Left: prompts that invite toxicity; right: neutral prompts.</p>"
            "<div class='row'>"
        )
        vmax = max((max(s["scales"]) for col in tk["columns"].values() for s in col), default=1.0)
        for label, col in tk["columns"].items():
            parts.append(f"<div class='col'><h3>{html.escape(label)}</h3>")
            parts += [f"<p class='sample'>{token_html(s['tokens'], s['scales'], vmax)}</p>" for s in col]
            parts.append("</div>")
        parts.append("</div>")
    parts += ["<h2>All points</h2>", html_table(points, pcols), "<h2>Sample continuations</h2>"]
    for p in points:
        if p.get("samples"):
            parts.append(f"<h3>{html.escape(p['key'])}</h3><ul>")
            parts += [
                f"<li><b>{html.escape(s['prompt'])}</b>{html.escape(s['continuation'])}</li>"
                for s in p["samples"][:3]
            ]
            parts.append("</ul>")
    style = PAGE_CSS + (
        ".row{display:flex;gap:16px;flex-wrap:wrap}.col{flex:1;min-width:420px}.tok{border-radius:2px}"
        ".sample{font-family:ui-monospace,monospace;font-size:13px;line-height:1.7;white-space:pre-wrap;"
        "word-break:break-word;border-bottom:1px solid #eee;padding-bottom:4px}.meta{color:#666;font-size:12px}"
    )
    out = run / "report.html"
    out.write_text(html_page(title, parts, style))
    md = [
        f"# {title}",
        "",
        "Toxicity at matched perplexity budget (from the sweep points):",
        "",
        markdown_table(table, tcols),
    ]
    if has_mean:
        md += [
            "",
            "Mean toxicity score at matched perplexity budget:",
            "",
            markdown_table(table_m, mcols),
        ]
    md += ["", "All points:", "", markdown_table(points, [c for c in pcols if c != "samples"])]
    (run / "summary.md").write_text("\n".join(md) + "\n")
    return out
