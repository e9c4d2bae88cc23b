"""`report.html` of `dsas demo-diffusion`: one self-contained page (figures inlined as PNG).

Numbers come from the run's results (what `results.json` holds); the images from the run itself, since
`results.json` keeps none.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch

from dsas.diffusion.sweep import EvalBatch
from dsas.report import COLORS, PAGE_CSS, html_page, html_table, png_base64

CSS = (
    PAGE_CSS + "body{padding:0 1em}table{margin:.6em 0}td,th{text-align:right}th{background:#f3f3f3}"
    "img{max-width:100%}.note{color:#555;font-size:14px}"
)


def _img(fig: Any) -> str:
    return f'<img src="data:image/png;base64,{png_base64(fig, dpi=100)}">'


def _mosaic(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Images `[k, 1, H, W]` per row -> one `[R*(H+1), k*(W+1)]` array with 1-px gaps."""
    tiles = []
    for r in rows:
        cells = [torch.nn.functional.pad(im[0], (0, 1, 0, 1), value=0.5) for im in r]
        tiles.append(torch.cat(cells, 1))
    return torch.cat(tiles, 0)


def _pick(ev: EvalBatch, k: int = 6) -> tuple[list[int], list[int]]:
    """Rows to show: the first `k` concept prompts, and the first prompt of each of `k` other classes."""
    conc = [i for i, c in enumerate(ev.classes) if c == ev.concept][:k]
    seen: set[int] = set()
    other = []
    for i, c in enumerate(ev.classes):
        if c != ev.concept and c not in seen:
            other.append(i)
            seen.add(c)
    return conc, other[:k]


def grid_figure(ims: dict[float, torch.Tensor], ev: EvalBatch, title: str) -> str:
    """Concept and other-class images (columns) at every strength (rows)."""
    conc, other = _pick(ev)
    strengths = sorted(ims)
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 0.55 * len(strengths) + 0.8))
    for ax, idx, lab in ((axes[0], conc, f"digit {ev.concept} (concept)"), (axes[1], other, "other digits")):
        m = _mosaic([ims[s][idx] for s in strengths])
        ax.imshow(m.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        h = m.shape[0] / len(strengths)
        ax.set_yticks([h * (i + 0.5) for i in range(len(strengths))], [f"{s:g}" for s in strengths])
        ax.set_xticks([])
        ax.set_title(lab, fontsize=9)
    axes[0].set_ylabel("strength")
    fig.suptitle(title, fontsize=10)
    return _img(fig)


def curves_figure(res: dict[str, Any], target_class: int) -> str:
    """Blur change and similarity per strength, and non-concept similarity against the concept effect."""
    key = res["effect_metric"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in dict.fromkeys(p["steerer"] for p in res["points"]):
        pts = sorted((p for p in res["points"] if p["steerer"] == name), key=lambda p: p["strength"])
        color = COLORS.get(pts[0]["gate"])
        s = [p["strength"] for p in pts]
        for g, ls in (("concept", "-"), ("other", "--")):
            axes[0].plot(s, [p[f"dblur_{g}"] for p in pts], ls, marker="o", ms=3, color=color,
                         label=f"{name}, {g}")  # fmt: skip
            axes[1].plot(s, [p[f"sim_{g}"] for p in pts], ls, marker="o", ms=3, color=color,
                         label=f"{name}, {g}")  # fmt: skip
        axes[2].plot(
            [p[key] for p in pts], [p["sim_other"] for p in pts], "-o", ms=3, color=color, label=name
        )
        for p in pts:
            axes[2].annotate(f"{p['strength']:g}", (p[key], p["sim_other"]), fontsize=6, alpha=0.6,
                             xytext=(2, 2), textcoords="offset points")  # fmt: skip
    axes[0].set(xlabel="strength", ylabel="Δ blur score vs unsteered", title="blur score change")
    axes[1].set(xlabel="strength", ylabel="SSIM to unsteered twin", title="similarity (IMGScore analogue)")
    xl = "concept change (1 - SSIM)" if key == "change_concept" else f"P(digit {target_class}) on concept"
    axes[2].set(
        xlabel=xl, ylabel="non-concept SSIM to unsteered", title="selectivity: up and right is better"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _img(fig)


def gate_figure(maps: torch.Tensor, ev: EvalBatch) -> str:
    """Unsteered images over their DSAS gate maps `[B, H, W]`."""
    conc, other = _pick(ev)
    idx = conc + other
    fig, axes = plt.subplots(2, len(idx), figsize=(1.1 * len(idx), 2.5))
    for j, i in enumerate(idx):
        axes[0, j].imshow(ev.base[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[1, j].imshow(maps[i].numpy(), cmap="magma", vmin=0, vmax=1)
        axes[0, j].set_title(str(ev.classes[i]), fontsize=8)
        for a in axes[:, j]:
            a.axis("off")
    fig.suptitle("unsteered image (top) and DSAS gate per location, mean over sites and steps (bottom, 0..1)",
                 fontsize=8)  # fmt: skip
    return _img(fig)


def _table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    return html_table(rows, cols, ".3f")


def _effect_note(effect: str, cfg: dict[str, Any]) -> str:
    if effect == "blur":
        return (
            f"Target = the source images blurred (sigma {cfg['sigma']:g}), same noise. On this epsilon-prediction "
            "UNet the CAA direction makes strokes thinner and fainter rather than blurred (the blur score falls "
            "for both steerers): a shift recorded on noised inputs makes the denoiser perceive blur, which it "
            "then removes. The comparison below is therefore made at matched <i>concept change</i> "
            "(1 - SSIM of concept images to their unsteered twins)."
        )
    return (
        f"Target = the same noised inputs labelled {cfg['target_class']}: a conditioning difference, like the "
        f"paper's prompt difference. Concept effect = P(digit {cfg['target_class']}) on digit-{cfg['concept']} "
        "prompts (classifier)."
    )


def write_report(
    out: Path, results: dict[str, Any], figures: dict[str, dict[str, Any]], ev: EvalBatch
) -> Path:
    """Write `out/report.html` from the run's results (`results["config"]` is the demo's config) and figures
    (per effect: each steerer's images by strength, and the DSAS gate maps)."""
    cfg = results["config"]
    parts = [
        f"<h1>Concept-selective steering of image generation: digit {cfg['concept']}</h1>",
        "<p class='note'>Embedded class-conditional digits UNet (diffusers UNet2DModel), "
        f"{cfg['steps']} DDIM steps, guidance 0. Each strength regenerates the same seeded prompts: "
        f"{cfg['n_concept']} of digit {cfg['concept']} and {cfg['n_other_per_class']} of each other digit. CAA "
        "is applied at every steered site, every spatial location and every denoising step; CAA+DSAS scales it "
        f"per location by the regulator trained on digit-{cfg['concept']} (source) vs other-digit (control) "
        f"activations. Total run time {results['seconds']:.0f}s.</p>",
    ]
    for effect, res in results["effects"].items():
        key = res["effect_metric"]
        figs = figures[effect]
        levels = res["levels"]
        mcols = ["steerer", *[f"sim_other@{lv:g}" for lv in levels], f"max_{key}"]
        dcols = ["steerer", *[f"dblur_other@{lv:g}" for lv in levels]]
        pcols = ["steerer", "strength", key, "dblur_concept", "dblur_other", "sim_concept", "sim_other",
                 "concept_score_concept", "concept_score_other", "p_target_other", "identical_to_unsteered"]  # fmt: skip
        g = res["gates"]
        parts += [
            f"<h2>Effect '{html.escape(effect)}'</h2><p class='note'>{_effect_note(effect, cfg)}</p>",
            f"<h3>Non-concept similarity to unsteered at matched concept effect ({html.escape(key)})</h3>",
            _table(res["matched"], mcols),
            "<p class='note'>Δ blur score of non-concept images at the same levels:</p>",
            _table(res["matched"], dcols),
            f"<p class='note'>Mean DSAS gate (over sites, locations, steps): digit {cfg['concept']} "
            f"{g['gate_concept']:.3f}, other digits {g['gate_other']:.3f}. Strength 0 bit-identical to unsteered: "
            f"{res['strength0_bit_identical']}. Steered sites: {res['steered_sites']}.</p>",
            curves_figure(res, cfg["target_class"]),
            grid_figure(figs["images"]["caa"], ev, "CAA (vanilla): rows = strength"),
            grid_figure(figs["images"]["caa+dsas"], ev, "CAA+DSAS: rows = strength"),
            gate_figure(figs["gate_maps"], ev),
            "<h3>All points</h3>",
            _table(res["points"], pcols),
            "<h3>Sites (CAA+DSAS)</h3>",
            _table(res["sites"]["caa+dsas"], ["site", "steered", "accuracy", "shift_norm", "gate_w_norm"]),
        ]
    path = out / "report.html"
    path.write_text(html_page("dsas demo-diffusion", parts, CSS))
    return path
