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
intended class), SSIM to the unsteered twin (the IMGScore analogue), and the effect metric (`dsas.diffusion.sweep`).
The key comparison is non-concept similarity *at matched concept effect* (`sweep.matched_table`); the page is
`dsas.diffusion.report`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from dsas.diffusion.digits import DigitsDiffusion, load_digits_model
from dsas.diffusion.images import NUM_CLASSES, blur, load_real_digits
from dsas.diffusion.report import write_report
from dsas.diffusion.steering import DenoiserCall, ImageSets, digits_calls
from dsas.diffusion.sweep import EvalBatch, effect_key, gate_stats, matched_table, measure, sweep_steerer
from dsas.fit import fit

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
    """What `dsas demo-diffusion` runs."""

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
    """How timesteps enter the regulator: "each" (DSAS features="tokens": every image and timestep labelled)
    or "mean" (features="mean": one timestep-mean vector per image)."""
    sites: str = "auto"
    n_concept: int = 16
    """Generated concept-class images per strength."""
    n_other_per_class: int = 4
    """Generated images per non-concept class per strength."""
    seed: int = 0
    dtype: str = "float32"
    """UNet compute dtype. float32 is faster than the loader's float64 default, and every strength regenerates
    the same batch, so float64's batch-composition invariance is not needed here."""
    threads: int | None = 1
    """torch intra-op threads for the run (restored afterwards); None keeps torch's setting. The UNet is tiny, so
    one thread loses little, and it is immune to oversubscription on a busy machine (docs/diffusion.md)."""
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


# -- the run ----------------------------------------------------------------------------------------------


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
    ev = EvalBatch.build(model, prompt_classes(cfg), cfg.concept, cfg.target_class, cfg.seed, cfg.steps)
    con.print(
        f"digits UNet ({sum(p.numel() for p in model.unet.parameters()) / 1e3:.0f}k params), concept = digit "
        f"{cfg.concept}; {len(ev.classes)} seeded prompts per strength, {cfg.steps} DDIM steps"
    )
    results: dict[str, Any] = {"config": _jsonable(asdict(cfg)), "effects": {}}
    figures: dict[str, dict[str, Any]] = {}
    for effect in cfg.effects:
        te = time.perf_counter()
        src, tgt, ctl = fit_sets(model, cfg, effect)
        grid = cfg.grids[effect]
        steerers = {
            "caa": fit(model.unet, ImageSets(src, tgt), gate="none", sites=cfg.sites, progress=False),
            "caa+dsas": fit(
                model.unet,
                ImageSets(src, tgt, ctl),
                gate="dsas",
                sites=cfg.sites,
                features="tokens" if cfg.regulator_steps == "each" else "mean",
                seed=cfg.seed,
                progress=False,
            ),
        }
        fit_s = time.perf_counter() - te
        points: list[dict[str, Any]] = []
        imgs: dict[str, dict[float, torch.Tensor]] = {}
        for name, st in steerers.items():
            st.save(out / "steerers" / effect / name)
            p, ims = sweep_steerer(model, st, name, grid.vanilla if st.gate == "none" else grid.dsas, ev)
            points += p
            imgs[name] = ims
        gates, gmaps = gate_stats(model, steerers["caa+dsas"], ev)
        key = effect_key(effect)
        ok = all(p["identical_to_unsteered"] for p in points if p["strength"] == 0.0)
        res = {
            "effect": effect,
            "effect_metric": key,
            "levels": list(grid.levels),
            "points": points,
            "matched": matched_table(points, key, grid.levels),
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
    results["base"] = measure(ev.base, ev)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report = write_report(out, results, figures, ev)
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
