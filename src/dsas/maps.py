"""Steering maps ("how"): every method reduces to a per-site displacement Δ_l(z) = T_l(z) - z.

One affine form covers the paper's methods, so the run-time hook has a single code path:

    Δ(z) = scale ⊙ z + shift                (inside the support lo <= z <= hi, else 0, when a support is set)

* CAA:        shift = mean(target) - mean(source), scale = None
* ITI:        shift = σ θ ⊙ m (mass-mean direction times its std, masked to the top-k units)
* LinEAS:     T(z) = (1 + δ) ⊙ z + b  ->  scale = δ, shift = b
* Linear-AcT: per-unit 1-D OT line ω z + b, applied inside the source support -> scale = ω - 1, shift = b
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from dsas import rule
from dsas.options import check_fields


@dataclass
class SiteMap:
    """Displacement of one site, fp32: Δ(z) = scale ⊙ z + shift (masked to [lo, hi] when given)."""

    shift: torch.Tensor
    scale: torch.Tensor | None = None
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None

    def displacement(self, z: torch.Tensor) -> torch.Tensor:
        """Δ(z) for z[..., d], by `dsas.rule.displacement`."""
        return rule.displacement(z, self.shift, self.scale, self.lo, self.hi).expand_as(z)

    def is_zero(self) -> bool:
        """Δ is 0 everywhere: the site changes nothing whatever the gate."""
        return not bool(self.shift.any()) and (self.scale is None or not bool(self.scale.any()))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"shift": self.shift}
        for k in ("scale", "lo", "hi"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> SiteMap:
        return cls(t["shift"], t.get("scale"), t.get("lo"), t.get("hi"))

    @property
    def dim(self) -> int:
        return int(self.shift.shape[-1])


def fit_caa(source: torch.Tensor, target: torch.Tensor) -> SiteMap:
    """CAA (unpaired): v = mean(target) - mean(source) of token-mean activations [n, d]."""
    return SiteMap(shift=(target.double().mean(0) - source.double().mean(0)).float())


# ---- shared 1-D optimal-transport helpers --------------------------------------------------------------


def resample_sorted(s: torch.Tensor, n: int) -> torch.Tensor:
    """Empirical quantile function of column-sorted samples [m, d] read at n evenly spaced levels -> [n, d].

    Linear interpolation between order statistics (numpy's default quantile rule), so sets of different sizes
    can be matched rank by rank. Differentiable; the identity when n == m.
    """
    m = s.shape[0]
    if n == m:
        return s
    pos = torch.linspace(0, m - 1, n, dtype=torch.float64, device=s.device)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = (pos - lo).to(s.dtype)[:, None]
    return s[lo] * (1 - frac) + s[hi] * frac


# ---- ITI -------------------------------------------------------------------------------------------------

ITI_UNITS = ("unit", "head")


@dataclass
class ITIConfig:
    """Options of ITI (Li et al., 2023), "ITI-c" variant of the AcT/LinEAS papers (mass-mean shift, top-k probes)."""

    top_k: int | None = None
    """Units (or heads, with unit="head") kept per site; None keeps `top_frac` of them."""
    top_frac: float = 0.125
    """Fraction of units (heads) kept when top_k is None (rounded up, at least one)."""
    unit: Literal["unit", "head"] = "unit"
    """"unit": rank single coordinates; "head": rank contiguous blocks of d / heads coordinates (ITI proper)."""
    heads: int | None = None
    """Blocks per site for unit="head"; None reads the model's num_attention_heads."""
    C: float = 1.0
    """Inverse L2 strength of the per-unit (per-head) logistic probes; class_weight is balanced."""
    holdout: float = 0.25
    """Fraction of source+target prompts (stratified, seeded by FitConfig.seed) on which probes are ranked."""
    incremental: bool = False
    """Fit site by site with the sites below already steered (see `CAAConfig.incremental`)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.unit not in ITI_UNITS:
            raise ValueError(f"ITIConfig.unit={self.unit!r} is not one of {ITI_UNITS}.")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("ITIConfig.top_k must be >= 1 (or None to use top_frac).")
        if not 0 < self.top_frac <= 1:
            raise ValueError("ITIConfig.top_frac must lie in (0, 1].")
        if not 0 < self.holdout < 1:
            raise ValueError("ITIConfig.holdout must lie in (0, 1).")
        if self.C <= 0:
            raise ValueError("ITIConfig.C must be > 0.")


def probe_1d(
    x: torch.Tensor, y: torch.Tensor, C: float = 1.0, iters: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """One L2 logistic regression per column of x [n, d] (labels y [n] in {0, 1}), all columns at once.

    Minimises 0.5 w^2 + C * sum_i s_i log(1 + exp(-y±_i (w x_i + b))) with balanced class weights s_i, the
    objective of sklearn's LogisticRegression(C, class_weight="balanced"), by damped Newton steps on the 2x2
    problem of every column (float64). This is the exact probe, vectorised: d sklearn fits per site would
    dominate the fit time on a real model. Returns (w, b), each [d].
    """
    x = x.double()
    n, d = x.shape
    yy = y.double()
    n1 = float(yy.sum())
    sw = torch.where(yy > 0, n / (2 * n1), n / (2 * (n - n1)))  # balanced weights, as sklearn
    ys = (2 * yy - 1)[:, None]
    w = torch.zeros(d, dtype=torch.float64)
    b = torch.zeros(d, dtype=torch.float64)

    def objective(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        m = ys * (x * w + b)
        return 0.5 * w * w + C * (sw[:, None] * torch.nn.functional.softplus(-m)).sum(0)

    f = objective(w, b)
    for _ in range(iters):
        m = ys * (x * w + b)
        p = torch.sigmoid(-m)  # d loss / d margin = -p
        g_w = w - C * (sw[:, None] * p * ys * x).sum(0)
        g_b = -C * (sw[:, None] * p * ys).sum(0)
        r = C * sw[:, None] * p * (1 - p)
        h_ww = 1 + (r * x * x).sum(0)
        h_wb = (r * x).sum(0)
        h_bb = (r.sum(0)).clamp_min(1e-12)
        det = h_ww * h_bb - h_wb * h_wb
        sw_ = (h_bb * g_w - h_wb * g_b) / det
        sb_ = (h_ww * g_b - h_wb * g_w) / det
        t = torch.ones(d, dtype=torch.float64)
        for _ in range(30):  # backtracking: halve the step of every column whose objective went up
            fn = objective(w - t * sw_, b - t * sb_)
            bad = fn > f + 1e-12 * f.abs()
            if not bad.any():
                break
            t = torch.where(bad, t / 2, t)
        w, b = w - t * sw_, b - t * sb_
        f = objective(w, b)
        if float(torch.maximum((t * sw_).abs(), (t * sb_).abs()).max()) < 1e-10:
            break
    return w, b


def _split(n_src: int, n_tgt: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified (train, held-out) boolean masks over the rows of cat([source, target])."""
    gen = torch.Generator().manual_seed(seed)
    test = torch.zeros(n_src + n_tgt, dtype=torch.bool)
    for start, n in ((0, n_src), (n_src, n_tgt)):
        k = min(max(1, round(holdout * n)), n - 1)
        test[start + torch.randperm(n, generator=gen)[:k]] = True
    return ~test, test


def _rank(acc: torch.Tensor, tie: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best units: by held-out accuracy, ties broken by the separation `tie`."""
    order = sorted(range(len(acc)), key=lambda j: (-float(acc[j]), -float(tie[j]), j))
    return torch.tensor(order[:k], dtype=torch.long)


def _keep(total: int, cfg: ITIConfig) -> int:
    k = cfg.top_k if cfg.top_k is not None else math.ceil(cfg.top_frac * total)
    return max(1, min(k, total))


def fit_iti(
    source: torch.Tensor, target: torch.Tensor, cfg: ITIConfig, heads: int | None = None, seed: int = 0
) -> tuple[SiteMap, dict[str, Any]]:
    """ITI on token-mean activations [n, d]: Δ = σ θ ⊙ m, a constant shift towards the target.

    Probes (target = 1 vs source = 0) are fitted on a stratified split of the prompts and ranked by accuracy on
    the held-out part; the top-k units (heads) form the mask m. θ = normalize(mean(target) - mean(source))
    restricted to the kept units (per head, with unit="head", as ITI does), and σ is the std of all source and
    target activations projected on θ. Units are z-scored on the training part before probing, so the ranking
    measures separability, not a unit's magnitude. Ties in accuracy are broken by the standardised mean
    difference |Δμ| / std, a deterministic and informative order.
    """
    src, tgt = source.double(), target.double()
    x = torch.cat([src, tgt])
    y = torch.cat([torch.zeros(len(src)), torch.ones(len(tgt))])
    tr, te = _split(len(src), len(tgt), cfg.holdout, seed)
    d = x.shape[1]
    v = tgt.mean(0) - src.mean(0)
    sep = v.abs() / x.std(0, unbiased=False).clamp_min(1e-12)
    mu, sd = x[tr].mean(0), x[tr].std(0, unbiased=False).clamp_min(1e-12)
    xs = (x - mu) / sd
    shift = torch.zeros(d, dtype=torch.float64)
    if cfg.unit == "unit":
        w, b = probe_1d(xs[tr], y[tr], cfg.C)
        acc = (((xs[te] * w + b) > 0).double() == y[te, None]).double().mean(0)
        kept = _rank(acc, sep, _keep(d, cfg))
        m = torch.zeros(d, dtype=torch.float64)
        m[kept] = 1.0
        vm = v * m
        if vm.norm() > 0:
            theta = vm / vm.norm()
            shift = (x @ theta).std(unbiased=False) * theta
        acc_kept = acc[kept]
    else:
        if heads is None or heads < 1 or d % heads:
            raise ValueError(
                f"ITI with unit='head' needs a head count that divides the site width {d}; got heads={heads}. "
                "Pass heads=..., or use unit='unit'."
            )
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits

        dh = d // heads
        acc = torch.zeros(heads, dtype=torch.float64)
        for h in range(heads):
            cols = slice(h * dh, (h + 1) * dh)
            lr = LogisticRegression(C=cfg.C, class_weight="balanced", max_iter=1000)
            with threadpool_limits(limits=1):  # tiny problems: a busy thread pool only spins
                lr.fit(xs[tr, cols].numpy(), y[tr].numpy())
            acc[h] = float((lr.predict(xs[te, cols].numpy()) == y[te].numpy()).mean())
        head_sep = sep.view(heads, dh).norm(dim=1)
        kept = _rank(acc, head_sep, _keep(heads, cfg))
        for h in kept.tolist():
            cols = slice(h * dh, (h + 1) * dh)
            vh = v[cols]
            if vh.norm() > 0:
                theta = vh / vh.norm()
                shift[cols] = (x[:, cols] @ theta).std(unbiased=False) * theta
        acc_kept = acc[kept]
    stats = {
        "iti_kept": len(kept),
        "iti_acc_best": float(acc_kept.max()),
        "iti_acc_kept_mean": float(acc_kept.mean()),
    }
    return SiteMap(shift=shift.float()), stats


# ---- Linear-AcT ------------------------------------------------------------------------------------------


@dataclass
class LinearActConfig:
    """Options of Linear-AcT (Rodriguez et al., 2024; `linear_ot` in apple/ml-act)."""

    support: bool = True
    """Leave a unit alone where the source value lies outside [q_lo, q_hi] source percentiles (ml-act's
    `q_0_100`); False maps everywhere."""
    q_lo: float = 0.0
    """Lower source percentile of the support (0: the source minimum)."""
    q_hi: float = 100.0
    """Upper source percentile of the support (100: the source maximum)."""
    incremental: bool = True
    """Fit site by site, recording each site with the already fitted upstream sites steered (ml-act `incr`)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if not 0 <= self.q_lo < self.q_hi <= 100:
            raise ValueError("LinearActConfig needs source percentiles 0 <= q_lo < q_hi <= 100.")

    @property
    def quantiles(self) -> tuple[float, float] | None:
        return (self.q_lo, self.q_hi) if self.support else None


def fit_linear_act(
    source: torch.Tensor, target: torch.Tensor, support: tuple[float, float] | None = (0.0, 100.0)
) -> SiteMap:
    """Per-unit 1-D OT map T(z) = ω z + b between pooled activations [n, d] (Linear-AcT).

    Sorting each unit's source and target samples gives the 1-D optimal coupling (sets of different sizes are
    read at common quantile levels); ω, b is the least-squares line through the coupled pairs:
    ω = Σ x̃ỹ / Σ x̃² on centred values, b = m_y − ω m_x. So T moves the source mean exactly onto the target
    mean, and an affine image of the source exactly onto the target. Δ = (ω − 1) z + b inside the support.
    """
    xs = torch.sort(source.double(), dim=0).values
    ys = torch.sort(target.double(), dim=0).values
    n = max(len(xs), len(ys))
    xs, ys = resample_sorted(xs, n), resample_sorted(ys, n)
    mx, my = xs.mean(0), ys.mean(0)
    xc, yc = xs - mx, ys - my
    den = (xc * xc).sum(0)
    omega = torch.where(den > 1e-24, (xc * yc).sum(0) / den.clamp_min(1e-300), torch.ones_like(den))
    b = my - omega * mx
    lo = hi = None
    if support is not None:
        q = torch.tensor([support[0] / 100, support[1] / 100], dtype=torch.float64)
        lo, hi = torch.quantile(source.double(), q, dim=0)
        lo, hi = lo.float(), hi.float()
    return SiteMap(shift=b.float(), scale=(omega - 1).float(), lo=lo, hi=hi)
