"""`dsas demo-diffusion`: concept-selective steering of image generation on the embedded digits model.

The concept is one digit class (3 by default). For each effect, CAA (vanilla, gate = 1) and CAA+DSAS are fitted on
the shipped UNet and swept over strengths; every strength regenerates the same seeded images, so each steered image
pairs with its unsteered twin (strength 0 reproduces it bit for bit, checked on every run).

Effects (spec section 8 recipe, adapted to a class-conditional model):

* "blur"  -- the paper's recipe: source = noised real images of the concept class, target = the same images
  blurred (`images.blur`, same noise), control = the other classes. Measured here: on this epsilon-prediction UNet
  the CAA direction thins strokes (blur score *falls*), because a shift recorded on noised inputs makes the
  denoiser perceive blur and remove it (docs/diffusion.md). Selectivity is still measured: how much concept images
  change versus non-concept images.
* "class" -- a conditioning difference, the analogue of the paper's prompt-difference CAA: source = noised concept
  images with their label, target = the same inputs labelled `target_class`; the effect is the classifier's
  probability that a concept-class prompt now renders as `target_class`.

Per class group (concept / other classes) and strength: blur score, concept score (classifier confidence for the
intended class), SSIM to the unsteered twin (the IMGScore analogue), and the effect metric. The key comparison is
non-concept similarity *at matched concept effect*, interpolated along each steerer's strength curve.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from dsas.diffusion.digits import DigitsDiffusion, load_digits_model
from dsas.diffusion.images import IMAGE_SIZE, NUM_CLASSES, blur, load_real_digits
from dsas.diffusion.metrics import blur_score, concept_score, image_similarity
from dsas.diffusion.steering import DenoiserCall, digits_calls, fit_diffusion, gate_maps
from dsas.report import html_table
from dsas.steerer import Steerer

EFFECTS = ("blur", "class")


@dataclass
class EffectGrid:
    """Strength grids of one effect. DSAS's scale is at most 1 per location, so its grid reaches further."""

    vanilla: tuple[float, ...]
    dsas: tuple[float, ...]
    levels: tuple[float, ...]
    """Concept-effect levels at which non-concept similarity is compared."""


def _default_grids() -> dict[str, EffectGrid]:
    return {
        "blur": EffectGrid(
            (0.5, 1.0, 2.0, 3.0, 4.0, 6.0), (1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0), (0.04, 0.08, 0.12)
        ),
        "class": EffectGrid(
            (0.5, 1.0, 1.5, 2.0, 3.0, 4.0),
            (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0),
            (0.25, 0.5, 0.75),
        ),
    }


@dataclass
class DiffusionDemoConfig:
    """What `dsas demo-diffusion` runs (defaults: about a minute on 2 CPU cores)."""

    concept: int = 3
    """The concept: one digit class."""
    effects: tuple[str, ...] = EFFECTS
    target_class: int = -1
    """Effect "class": concept-class prompts are steered towards rendering this digit (-1: 8, or 3 when the
    concept is 8)."""
    sigma: float = 1.5
    """Effect "blur": Gaussian blur width of the target images (pixels at 16x16)."""
    n_fit: int = 32
    """Source (= target) images of the concept class (paper: 32 prompts per set)."""
    n_control_per_class: int = 4
    """Control images per other class (9 classes: 36 by default)."""
    steps: int = 10
    """DDIM sampling steps; fitting records every `fit_every`-th of these timesteps."""
    fit_every: int = 2
    regulator_steps: str = "each"
    """How timesteps enter the regulator (fit_diffusion's `steps`): "each" or "mean"."""
    sites: str = "auto"
    n_concept: int = 16
    """Generated concept-class images per strength."""
    n_other_per_class: int = 4
    """Generated images per non-concept class per strength."""
    seed: int = 0
    dtype: str = "float32"
    """UNet compute dtype. float32 is ~3x faster than the loader's float64 default; every strength regenerates
    the same batch, so float64's batch-composition invariance is not needed here."""
    threads: int | None = 1
    """torch intra-op threads for the run (restored afterwards); None keeps torch's setting. The UNet is tiny, so
    one thread loses little, and it is immune to oversubscription: on this project's shared 2-core machine the
    default run took 62 s with 1 thread and 258 s with 2."""
    grids: dict[str, EffectGrid] = field(default_factory=_default_grids)

    def __post_init__(self) -> None:
        bad = [e for e in self.effects if e not in EFFECTS]
        if bad:
            raise ValueError(f"unknown effect(s) {bad}; choose from {EFFECTS}")
        if self.target_class == -1:
            self.target_class = 3 if self.concept == 8 else 8
        if not 0 <= self.concept < NUM_CLASSES or not 0 <= self.target_class < NUM_CLASSES:
            raise ValueError("concept and target_class must be digits 0-9")
        if "class" in self.effects and self.target_class == self.concept:
            raise ValueError("target_class must differ from the concept class")


def quick_config(**kw: Any) -> DiffusionDemoConfig:
    """A smaller run (fewer images and strengths) for tests and a first look."""
    grids = {
        "blur": EffectGrid((1.0, 3.0, 6.0), (2.0, 6.0, 12.0), (0.04, 0.08)),
        "class": EffectGrid((1.0, 2.0, 3.0), (2.0, 4.0, 8.0), (0.25, 0.5)),
    }
    base: dict[str, Any] = dict(
        n_fit=24, n_control_per_class=3, n_concept=8, n_other_per_class=2, grids=grids
    )
    return DiffusionDemoConfig(**{**base, **kw})


# -- data -------------------------------------------------------------------------------------------------


def fit_sets(
    model: DigitsDiffusion, cfg: DiffusionDemoConfig, effect: str
) -> tuple[list[DenoiserCall], list[DenoiserCall], list[DenoiserCall]]:
    """Source / target / control denoiser inputs of one effect (real training digits, paired noise)."""
    x, y = load_real_digits("train")
    ts = model.sampling_timesteps(cfg.steps)[:: cfg.fit_every]
    src_x = x[y == cfg.concept][: cfg.n_fit]
    n = len(src_x)
    src = digits_calls(model, src_x, [cfg.concept] * n, ts, cfg.seed)
    if effect == "blur":
        tgt = digits_calls(model, blur(src_x, cfg.sigma), [cfg.concept] * n, ts, cfg.seed)
    else:
        tgt = [
            DenoiserCall(c.sample, c.timestep, {"class_labels": torch.full((n,), cfg.target_class)})
            for c in src
        ]
    idx = torch.cat(
        [torch.nonzero(y == c)[: cfg.n_control_per_class, 0] for c in range(NUM_CLASSES) if c != cfg.concept]
    )
    ctl = digits_calls(model, x[idx], y[idx], ts, cfg.seed + 1)
    return src, tgt, ctl


def prompt_classes(cfg: DiffusionDemoConfig) -> list[int]:
    """Generated rows: `n_concept` concept-class prompts, then `n_other_per_class` of every other class."""
    others = [c for c in range(NUM_CLASSES) if c != cfg.concept for _ in range(cfg.n_other_per_class)]
    return [cfg.concept] * cfg.n_concept + others


# -- metrics ----------------------------------------------------------------------------------------------


def measure(
    images: torch.Tensor, base: torch.Tensor, classes: Sequence[int], cfg: DiffusionDemoConfig
) -> dict[str, float]:
    """Per group (concept / other) means of every score for one strength."""
    cls = torch.tensor(list(classes))
    conc = cls == cfg.concept
    b, b0 = blur_score(images), blur_score(base)
    sim = image_similarity(images, base)
    cs = concept_score(images, cls)
    out: dict[str, float] = {}
    for g, m in (("concept", conc), ("other", ~conc)):
        out[f"blur_{g}"] = float(b[m].mean())
        out[f"dblur_{g}"] = float((b[m] - b0[m]).mean())
        out[f"sim_{g}"] = float(sim[m].mean())
        out[f"change_{g}"] = 1.0 - out[f"sim_{g}"]
        out[f"concept_score_{g}"] = float(cs[m].mean())
    tgt = torch.full((int(conc.sum()),), cfg.target_class)
    out["p_target_concept"] = float(concept_score(images[conc], tgt).mean())
    out["p_target_other"] = float(
        concept_score(images[~conc], torch.full((int((~conc).sum()),), cfg.target_class)).mean()
    )
    return out


def effect_key(effect: str) -> str:
    """The concept-effect metric of an effect: how much concept images changed (blur; the blur score's sign is
    reported separately) or how often they render as the target digit (class)."""
    return "change_concept" if effect == "blur" else "p_target_concept"


def at_matched(points: Sequence[dict[str, Any]], x: str, y: str, level: float) -> float:
    """`y` where the strength curve (sorted by strength, from 0) first reaches `x = level`, linearly
    interpolated between the two strengths around the crossing; NaN if the grid never reaches it."""
    pts = sorted(points, key=lambda p: p["strength"])
    if pts and pts[0][x] >= level:
        return float(pts[0][y])
    for a, b in itertools.pairwise(pts):
        if a[x] < level <= b[x]:
            f = (level - a[x]) / (b[x] - a[x])
            return float(a[y] + f * (b[y] - a[y]))
    return math.nan


# -- the run ----------------------------------------------------------------------------------------------


@torch.no_grad()
def _sweep(
    model: DigitsDiffusion,
    st: Steerer,
    name: str,
    grid: Sequence[float],
    base: torch.Tensor,
    classes: list[int],
    cfg: DiffusionDemoConfig,
) -> tuple[list[dict[str, Any]], dict[float, torch.Tensor]]:
    points, images = [], {}
    for s in (0.0, *grid):
        t = time.perf_counter()
        with st.apply(model.unet, strength=s):
            im = model.sample(classes, seed=cfg.seed, steps=cfg.steps)
        row: dict[str, Any] = {"steerer": name, "gate": st.gate, "strength": float(s)}
        row.update(measure(im, base, classes, cfg))
        row["identical_to_unsteered"] = bool(torch.equal(im, base))
        row["seconds"] = round(time.perf_counter() - t, 2)
        points.append(row)
        images[float(s)] = im
    return points, images


@torch.no_grad()
def gate_stats(
    model: DigitsDiffusion, st: Steerer, classes: list[int], cfg: DiffusionDemoConfig
) -> tuple[dict[str, float], torch.Tensor]:
    """Mean DSAS gate (strength 1, so scale = g) over sites, locations and steps on concept vs other prompts,
    and the per-image gate maps `[B, H, W]` averaged over steps."""
    with st.apply(model.unet, strength=1.0, trace=True) as tr:
        model.sample(classes, seed=cfg.seed, steps=cfg.steps)
    maps = torch.stack(gate_maps(tr, size=(IMAGE_SIZE, IMAGE_SIZE))).mean(0)  # [B, H, W]
    conc = torch.tensor(classes) == cfg.concept
    per_img = maps.flatten(1).mean(1)
    return {"gate_concept": float(per_img[conc].mean()), "gate_other": float(per_img[~conc].mean())}, maps


def run_diffusion_demo(
    out_dir: str | Path = "runs/demo-diffusion",
    cfg: DiffusionDemoConfig | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Fit, sweep, measure and write `report.html` + `results.json` into `out_dir`; returns the results."""
    cfg = cfg or DiffusionDemoConfig()
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(out_dir, cfg, console)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir: str | Path, cfg: DiffusionDemoConfig, console: Console | None) -> dict[str, Any]:
    con = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    con.rule("[bold]dsas demo-diffusion")
    model = load_digits_model(dtype=getattr(torch, cfg.dtype))
    classes = prompt_classes(cfg)
    base = model.sample(classes, seed=cfg.seed, steps=cfg.steps)
    con.print(
        f"digits UNet ({sum(p.numel() for p in model.unet.parameters()) / 1e3:.0f}k params), concept = digit "
        f"{cfg.concept}; {len(classes)} seeded prompts per strength, {cfg.steps} DDIM steps"
    )
    results: dict[str, Any] = {"config": _jsonable(asdict(cfg)), "effects": {}}
    figures: dict[str, dict[str, Any]] = {}
    for effect in cfg.effects:
        te = time.perf_counter()
        src, tgt, ctl = fit_sets(model, cfg, effect)
        grid = cfg.grids[effect]
        steerers = {
            "caa": fit_diffusion(model.unet, src, tgt, None, gate="none", sites=cfg.sites),
            "caa+dsas": fit_diffusion(
                model.unet,
                src,
                tgt,
                ctl,
                gate="dsas",
                sites=cfg.sites,
                steps=cfg.regulator_steps,
                seed=cfg.seed,
            ),
        }
        fit_s = time.perf_counter() - te
        points: list[dict[str, Any]] = []
        imgs: dict[str, dict[float, torch.Tensor]] = {}
        for name, st in steerers.items():
            st.save(out / "steerers" / effect / name)
            p, ims = _sweep(
                model, st, name, grid.vanilla if st.gate == "none" else grid.dsas, base, classes, cfg
            )
            points += p
            imgs[name] = ims
        gates, gmaps = gate_stats(model, steerers["caa+dsas"], classes, cfg)
        key = effect_key(effect)
        matched = []
        for name in steerers:
            pts = [p for p in points if p["steerer"] == name]
            row: dict[str, Any] = {"steerer": name}
            for lv in grid.levels:
                row[f"sim_other@{lv:g}"] = at_matched(pts, key, "sim_other", lv)
                row[f"dblur_other@{lv:g}"] = at_matched(pts, key, "dblur_other", lv)
                row[f"concept_score_other@{lv:g}"] = at_matched(pts, key, "concept_score_other", lv)
            row[f"max_{key}"] = max(p[key] for p in pts)
            matched.append(row)
        ok = all(p["identical_to_unsteered"] for p in points if p["strength"] == 0.0)
        res = {
            "effect": effect,
            "effect_metric": key,
            "levels": list(grid.levels),
            "points": points,
            "matched": matched,
            "gates": gates,
            "strength0_bit_identical": ok,
            "sites": {n: st.report() for n, st in steerers.items()},
            "steered_sites": {n: len(st.steered) for n, st in steerers.items()},
            "fit_seconds": round(fit_s, 1),
            "seconds": round(time.perf_counter() - te, 1),
        }
        results["effects"][effect] = res
        figures[effect] = {"images": imgs, "gate_maps": gmaps}
        _print_effect(con, res, cfg)
    results["base"] = measure(base, base, classes, cfg)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report = write_report(out, results, figures, base, classes, cfg)
    con.print(f"report: {report.resolve()}  (total {results['seconds']:.0f}s)")
    return results


def _jsonable(x: Any) -> Any:
    return json.loads(
        json.dumps(x, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    )


def _print_effect(con: Console, res: dict[str, Any], cfg: DiffusionDemoConfig) -> None:
    effect, key = res["effect"], res["effect_metric"]
    label = (
        f"concept change (1 - SSIM), blur sigma {cfg.sigma:g}"
        if effect == "blur"
        else f"P(digit {cfg.target_class}) on digit-{cfg.concept} prompts"
    )
    tb = Table(title=f"effect '{effect}': per strength (concept = digit {cfg.concept})")
    cols = ["steerer", "strength", key, "dblur_concept", "dblur_other", "sim_concept", "sim_other",
            "concept_score_other"]  # fmt: skip
    for c in cols:
        tb.add_column(c)
    for p in res["points"]:
        tb.add_row(*[f"{p[c]:.3f}" if isinstance(p[c], float) else str(p[c]) for c in cols])
    con.print(tb)
    tm = Table(title=f"non-concept similarity to unsteered at matched {label}")
    tm.add_column("steerer")
    for lv in res["levels"]:
        tm.add_column(f"@{lv:g}")
    tm.add_column(f"max {key}")
    for r in res["matched"]:
        tm.add_row(r["steerer"], *[_f(r[f"sim_other@{lv:g}"]) for lv in res["levels"]], _f(r[f"max_{key}"]))
    con.print(tm)
    g = res["gates"]
    con.print(
        f"mean DSAS gate: concept {g['gate_concept']:.3f}, other classes {g['gate_other']:.3f}; "
        f"strength 0 bit-identical: {res['strength0_bit_identical']}; {res['seconds']:.0f}s"
    )


def _f(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.3f}"


# -- report -----------------------------------------------------------------------------------------------


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _mosaic(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Images `[k, 1, H, W]` per row -> one `[R*(H+1), k*(W+1)]` array with 1-px gaps."""
    tiles = []
    for r in rows:
        cells = [torch.nn.functional.pad(im[0], (0, 1, 0, 1), value=0.5) for im in r]
        tiles.append(torch.cat(cells, 1))
    return torch.cat(tiles, 0)


def _pick(classes: list[int], cfg: DiffusionDemoConfig, k: int = 6) -> tuple[list[int], list[int]]:
    conc = [i for i, c in enumerate(classes) if c == cfg.concept][:k]
    seen: set[int] = set()
    other = []
    for i, c in enumerate(classes):
        if c != cfg.concept and c not in seen:
            other.append(i)
            seen.add(c)
    return conc, other[:k]


def _grid_figure(
    ims: dict[float, torch.Tensor], classes: list[int], cfg: DiffusionDemoConfig, title: str
) -> str:
    import matplotlib.pyplot as plt

    conc, other = _pick(classes, cfg)
    strengths = sorted(ims)
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 0.55 * len(strengths) + 0.8))
    for ax, idx, lab in ((axes[0], conc, f"digit {cfg.concept} (concept)"), (axes[1], other, "other digits")):
        m = _mosaic([ims[s][idx] for s in strengths])
        ax.imshow(m.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        h = m.shape[0] / len(strengths)
        ax.set_yticks([h * (i + 0.5) for i in range(len(strengths))], [f"{s:g}" for s in strengths])
        ax.set_xticks([])
        ax.set_title(lab, fontsize=9)
    axes[0].set_ylabel("strength")
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def _curves_figure(res: dict[str, Any], cfg: DiffusionDemoConfig) -> str:
    import matplotlib.pyplot as plt

    key = res["effect_metric"]
    colors = {"caa": "#d62728", "caa+dsas": "#1f77b4"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in colors:
        pts = sorted((p for p in res["points"] if p["steerer"] == name), key=lambda p: p["strength"])
        s = [p["strength"] for p in pts]
        for g, ls in (("concept", "-"), ("other", "--")):
            axes[0].plot(s, [p[f"dblur_{g}"] for p in pts], ls, marker="o", ms=3, color=colors[name],
                         label=f"{name}, {g}")  # fmt: skip
            axes[1].plot(s, [p[f"sim_{g}"] for p in pts], ls, marker="o", ms=3, color=colors[name],
                         label=f"{name}, {g}")  # fmt: skip
        axes[2].plot(
            [p[key] for p in pts], [p["sim_other"] for p in pts], "-o", ms=3, color=colors[name], label=name
        )
        for p in pts:
            axes[2].annotate(f"{p['strength']:g}", (p[key], p["sim_other"]), fontsize=6, alpha=0.6,
                             xytext=(2, 2), textcoords="offset points")  # fmt: skip
    axes[0].set(xlabel="strength", ylabel="Δ blur score vs unsteered", title="blur score change")
    axes[1].set(xlabel="strength", ylabel="SSIM to unsteered twin", title="similarity (IMGScore analogue)")
    xl = "concept change (1 - SSIM)" if key == "change_concept" else f"P(digit {cfg.target_class}) on concept"
    axes[2].set(
        xlabel=xl, ylabel="non-concept SSIM to unsteered", title="selectivity: up and right is better"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def _gate_figure(maps: torch.Tensor, base: torch.Tensor, classes: list[int], cfg: DiffusionDemoConfig) -> str:
    import matplotlib.pyplot as plt

    conc, other = _pick(classes, cfg)
    idx = conc + other
    fig, axes = plt.subplots(2, len(idx), figsize=(1.1 * len(idx), 2.5))
    for j, i in enumerate(idx):
        axes[0, j].imshow(base[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[1, j].imshow(maps[i].numpy(), cmap="magma", vmin=0, vmax=1)
        axes[0, j].set_title(str(classes[i]), fontsize=8)
        for a in axes[:, j]:
            a.axis("off")
    fig.suptitle("unsteered image (top) and DSAS gate per location, mean over sites and steps (bottom, 0..1)",
                 fontsize=8)  # fmt: skip
    return _png(fig)


def _table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    return html_table(rows, cols, ".3f")


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.6em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;"
    "text-align:right}th{background:#f3f3f3}img{max-width:100%}.note{color:#555;font-size:14px}"
)


def write_report(
    out: Path,
    results: dict[str, Any],
    figures: dict[str, dict[str, Any]],
    base: torch.Tensor,
    classes: list[int],
    cfg: DiffusionDemoConfig,
) -> Path:
    """`report.html`: one self-contained page (figures inlined as PNG)."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>dsas demo-diffusion</title>",
        f"<style>{_CSS}</style>",
        f"<h1>Concept-selective steering of image generation: digit {cfg.concept}</h1>",
        "<p class='note'>Embedded class-conditional digits UNet (diffusers UNet2DModel), "
        f"{cfg.steps} DDIM steps, guidance 0. Each strength regenerates the same seeded prompts: "
        f"{cfg.n_concept} of digit {cfg.concept} and {cfg.n_other_per_class} of each other digit. CAA is applied at "
        "every steered site, every spatial location and every denoising step; CAA+DSAS scales it per location by "
        f"the regulator trained on digit-{cfg.concept} (source) vs other-digit (control) activations. "
        f"Total run time {results['seconds']:.0f}s.</p>",
    ]
    for effect, res in results["effects"].items():
        key = res["effect_metric"]
        figs = figures[effect]
        if effect == "blur":
            desc = (
                f"Target = the source images blurred (sigma {cfg.sigma:g}), same noise. On this epsilon-prediction "
                "UNet the CAA direction makes strokes thinner and fainter rather than blurred (the blur score falls "
                "for both steerers): a shift recorded on noised inputs makes the denoiser perceive blur, which it "
                "then removes. The comparison below is therefore made at matched <i>concept change</i> "
                "(1 - SSIM of concept images to their unsteered twins)."
            )
        else:
            desc = (
                f"Target = the same noised inputs labelled {cfg.target_class}: a conditioning difference, like the "
                f"paper's prompt difference. Concept effect = P(digit {cfg.target_class}) on digit-{cfg.concept} "
                "prompts (classifier)."
            )
        levels = res["levels"]
        mcols = ["steerer", *[f"sim_other@{lv:g}" for lv in levels], f"max_{key}"]
        dcols = ["steerer", *[f"dblur_other@{lv:g}" for lv in levels]]
        pcols = ["steerer", "strength", key, "dblur_concept", "dblur_other", "sim_concept", "sim_other",
                 "concept_score_concept", "concept_score_other", "p_target_other", "identical_to_unsteered"]  # fmt: skip
        g = res["gates"]
        parts += [
            f"<h2>Effect '{html.escape(effect)}'</h2><p class='note'>{desc}</p>",
            f"<h3>Non-concept similarity to unsteered at matched concept effect ({html.escape(key)})</h3>",
            _table(res["matched"], mcols),
            "<p class='note'>Δ blur score of non-concept images at the same levels:</p>",
            _table(res["matched"], dcols),
            f"<p class='note'>Mean DSAS gate (over sites, locations, steps): digit {cfg.concept} "
            f"{g['gate_concept']:.3f}, other digits {g['gate_other']:.3f}. Strength 0 bit-identical to unsteered: "
            f"{res['strength0_bit_identical']}. Steered sites: {res['steered_sites']}.</p>",
            _curves_figure(res, cfg),
            _grid_figure(figs["images"]["caa"], classes, cfg, "CAA (vanilla): rows = strength"),
            _grid_figure(figs["images"]["caa+dsas"], classes, cfg, "CAA+DSAS: rows = strength"),
            _gate_figure(figs["gate_maps"], base, classes, cfg),
            "<h3>All points</h3>",
            _table(res["points"], pcols),
            "<h3>Sites (CAA+DSAS)</h3>",
            _table(res["sites"]["caa+dsas"], ["site", "steered", "accuracy", "shift_norm", "gate_w_norm"]),
        ]
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path
