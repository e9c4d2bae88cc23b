"""The evaluation points of a diffusion steerer: images at each strength, their scores, matched-effect tables.

Every strength regenerates the same seeded batch, so each steered image pairs with its unsteered twin and strength
0 can be checked bit for bit. Scores are split by class group: the concept class (meant to change) and the other
classes (meant to stay put).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dsas.diffusion.digits import DigitsDiffusion
from dsas.diffusion.images import IMAGE_SIZE
from dsas.diffusion.metrics import blur_score, concept_score, image_similarity
from dsas.diffusion.steering import gate_maps
from dsas.steerer import Steerer
from dsas.sweep import value_at_budget


@dataclass
class EvalBatch:
    """The seeded prompts (one class label per image) every strength regenerates, and their unsteered images."""

    classes: list[int]
    concept: int
    target_class: int
    seed: int
    steps: int
    """DDIM sampling steps."""
    base: torch.Tensor
    """The unsteered images `[B, 1, H, W]` every score compares against."""

    @classmethod
    def build(
        cls,
        model: DigitsDiffusion,
        classes: Sequence[int],
        concept: int,
        target_class: int,
        seed: int,
        steps: int,
    ) -> EvalBatch:
        base = model.sample(list(classes), seed=seed, steps=steps)
        return cls(list(classes), concept, target_class, seed, steps, base)

    @property
    def is_concept(self) -> torch.Tensor:
        """`[B]` bool: which rows are concept-class prompts."""
        return torch.tensor(self.classes) == self.concept

    def sample(self, model: DigitsDiffusion) -> torch.Tensor:
        return model.sample(self.classes, seed=self.seed, steps=self.steps)


def measure(images: torch.Tensor, ev: EvalBatch) -> dict[str, float]:
    """Per group (concept / other) means of every score of one strength's images."""
    cls = torch.tensor(ev.classes)
    conc = ev.is_concept
    b, b0 = blur_score(images), blur_score(ev.base)
    sim = image_similarity(images, ev.base)
    cs = concept_score(images, cls)
    tgt = torch.full_like(cls, ev.target_class)
    out: dict[str, float] = {}
    for g, m in (("concept", conc), ("other", ~conc)):
        out[f"blur_{g}"] = float(b[m].mean())
        out[f"dblur_{g}"] = float((b[m] - b0[m]).mean())
        out[f"sim_{g}"] = float(sim[m].mean())
        out[f"change_{g}"] = 1.0 - out[f"sim_{g}"]
        out[f"concept_score_{g}"] = float(cs[m].mean())
    out["p_target_concept"] = float(concept_score(images[conc], tgt[conc]).mean())
    out["p_target_other"] = float(concept_score(images[~conc], tgt[~conc]).mean())
    return out


def effect_key(effect: str) -> str:
    """The concept-effect metric of an effect: how much concept images changed (blur; the blur score's sign is
    reported separately) or how often they render as the target digit (class)."""
    return "change_concept" if effect == "blur" else "p_target_concept"


@torch.no_grad()
def sweep_steerer(
    model: DigitsDiffusion, st: Steerer, name: str, strengths: Sequence[float], ev: EvalBatch
) -> tuple[list[dict[str, Any]], dict[float, torch.Tensor]]:
    """One point per strength (0 first, to check it reproduces the unsteered images) and the images."""
    points, images = [], {}
    for s in (0.0, *strengths):
        t = time.perf_counter()
        with st.apply(model.unet, strength=s):
            im = ev.sample(model)
        row: dict[str, Any] = {"steerer": name, "gate": st.gate, "strength": float(s)}
        row.update(measure(im, ev))
        row["identical_to_unsteered"] = bool(torch.equal(im, ev.base))
        row["seconds"] = round(time.perf_counter() - t, 2)
        points.append(row)
        images[float(s)] = im
    return points, images


@torch.no_grad()
def gate_stats(model: DigitsDiffusion, st: Steerer, ev: EvalBatch) -> tuple[dict[str, float], torch.Tensor]:
    """Mean DSAS gate (strength 1, so scale = g) over sites, locations and steps on concept vs other prompts,
    and the per-image gate maps `[B, H, W]` averaged over steps."""
    with st.apply(model.unet, strength=1.0, trace=True) as tr:
        ev.sample(model)
    maps = torch.stack(gate_maps(tr, size=(IMAGE_SIZE, IMAGE_SIZE))).mean(0)  # [B, H, W]
    conc = ev.is_concept
    per_img = maps.flatten(1).mean(1)
    return {"gate_concept": float(per_img[conc].mean()), "gate_other": float(per_img[~conc].mean())}, maps


MATCHED_COLUMNS = ("sim_other", "dblur_other", "concept_score_other")
"""What the matched table reads off each steerer's front: non-concept similarity (the selectivity), and the
non-concept blur change and class confidence at the same points."""


def at_matched(points: Sequence[dict[str, Any]], key: str, level: float, read: str = "sim_other") -> float:
    """`read` at concept effect `key` = `level` on the front of (effect up, non-concept similarity up), linearly
    interpolated: the most selective way to reach that effect, as `dsas.sweep.value_at_budget` gives the lowest
    toxicity within a perplexity budget. NaN if no strength reaches the level."""
    flipped = [{**p, "_x": -p[key], "_y": -p["sim_other"]} for p in points]
    return value_at_budget(flipped, -level, "_x", "_y", read=read)


def matched_table(
    points: Sequence[dict[str, Any]], key: str, levels: Sequence[float]
) -> list[dict[str, Any]]:
    """Per steerer: every `MATCHED_COLUMNS` entry at each concept-effect level, and the largest effect reached."""
    rows = []
    for name in dict.fromkeys(p["steerer"] for p in points):
        pts = [p for p in points if p["steerer"] == name]
        row: dict[str, Any] = {"steerer": name}
        for lv in levels:
            for col in MATCHED_COLUMNS:
                row[f"{col}@{lv:g}"] = at_matched(pts, key, lv, col)
        row[f"max_{key}"] = max(p[key] for p in pts)
        rows.append(row)
    return rows
