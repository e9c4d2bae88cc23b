"""End-to-end training of steering maps through the frozen model: LinEAS and E2E-DSAS (paper §4, Alg. 3).

Every site gets a per-coordinate affine map T(z) = (1 + δ) ⊙ z + b, initialised at the identity, optionally
scaled by a learned gate φ(u · z + c). The source prompts run through the model with the hooks of *all* sites
active, so each site sees already-steered upstream activations. The loss reads each site's output after its own
intervention (token-mean per prompt, padding masked) and compares it with the unsteered target token-means by a
per-coordinate 1-D Wasserstein distance (sort, match by rank). E2E-DSAS adds the Circuit-Breakers retain term:
the L2 distance, per control token and summed over sites, between steered and unsteered activations.

The result is expressed in the engine's terms: SiteMap(scale=δ, shift=b) and SiteGate(kind, u, c), so the
run-time hook, tracing and artifacts are the same as for every other method.

Parametrisation (same maps, better conditioned; chosen because a CPU affords tens of steps, not 1000):
1 + δ = exp(s) keeps every map monotone, as a 1-D OT map is (a reflected map can match near-symmetric sorted
values and trap the optimiser); the map is centred at the source mean μ, Δ(z) = δ ⊙ (z − μ) + b', which
decouples δ from the shift (every prompt's token-mean is close to μ); and b' is learned in units of its
coordinate's spread over the target prompts, so that one Adam step moves every coordinate alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dsas.gates import SiteGate
from dsas.maps import SiteMap, resample_sorted
from dsas.options import check_fields
from dsas.record import accepts_position_ids, context_length, drop_first, tokenize
from dsas.rule import SiteParams, gate, rule
from dsas.sites import Site, get_module
from dsas.steer import wrap_forward
from dsas.torchutil import StopForward, model_device, output_tensor, replace_output

OPTIMIZERS = ("adam", "lbfgs")
DEFAULT_STEPS = {False: 50, True: 25}
"""LinEASConfig.steps=None: optimiser steps for LinEAS (False) and E2E-DSAS (True)."""


@dataclass
class LinEASConfig:
    """Options of LinEAS (Rodriguez et al., NeurIPS 2025) and of the joint E2E-DSAS training built on it."""

    steps: int | None = None
    """Maximum full-batch optimiser steps (each one forward + backward pass); None: 50 for LinEAS, 25 for
    E2E-DSAS, whose steps also run the control prompts: budgets sized for a CPU (fit times in
    benchmarks/README.md). The loss still creeps down after that: give more where steps are cheap (e.g. 300 on a
    GPU)."""
    lr: float = 1e-2
    """Adam learning rate of log(1 + δ) and of b in units of its coordinate's spread (see `relative`)."""
    patience: int = 10
    """Stop early when the best objective improved by less than `tol` (relative) over this many steps;
    0 never stops early."""
    tol: float = 1e-2
    """See `patience`."""
    l1: float = 0.0
    """λ1: elementwise soft-threshold on (log(1 + δ), b) after every step (sparsity: units left at the
    identity). Adam only."""
    group: float = 0.0
    """λG: per-site group-lasso proximal step on (log(1 + δ_l), b_l) (sparsity: whole sites left at the
    identity). Adam only."""
    pool_after: bool = True
    """The loss reads each site's output after its own intervention (LinEAS); False reads it before."""
    optimizer: str = "adam"
    """"adam" (LinEAS) or "lbfgs"."""
    history: int = 10
    """L-BFGS memory."""
    relative: bool = True
    """Learn b in units of each coordinate's spread over the target prompts (b = std ⊙ b̃), so one Adam lr moves
    every coordinate at the same relative speed: coordinates of a residual increment differ in scale by 100x."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.steps is not None and self.steps < 1:
            raise ValueError("LinEASConfig.steps must be >= 1 (or None for the default budget).")
        if self.lr <= 0:
            raise ValueError("LinEASConfig.lr must be > 0.")
        if self.patience < 0 or self.tol < 0 or self.l1 < 0 or self.group < 0:
            raise ValueError("LinEASConfig.patience, tol, l1 and group must be >= 0.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"LinEASConfig.optimizer={self.optimizer!r} is not one of {OPTIMIZERS}.")
        if self.optimizer == "lbfgs" and (self.l1 > 0 or self.group > 0):
            raise ValueError(
                "Sparsity (l1, group) is applied by proximal steps after each Adam step: use optimizer='adam'."
            )


E2E_KINDS = ("sigmoid", "relu")


@dataclass
class E2EConfig:
    """Options of the E2E-DSAS gate φ(u · z + c), trained jointly with the LinEAS maps (steps, lr: LinEASConfig)."""

    beta: float = 0.3
    """Weight of the control (retain) regulariser: mean over control tokens of Σ_sites ||steered − unsteered||.
    With `relative_beta` (default) β is unitless: 1 prices moving control tokens by the full source -> target
    displacement as much as leaving the whole initial W2 distance untransported. 0.3 is ~30 in the raw units
    on SmolLM2 (unit 96 there), the best raw value measured (docs/methods.md)."""
    relative_beta: bool = True
    """Scale the retain term by W2(init) / D, W2(init) the Wasserstein term with identity maps and D = Σ_sites
    ||mean target − mean source|| (what the retain term reads when control tokens are moved as far as source
    ones), so one β serves models whose activations have different scales. False: the spec's raw sum, where the
    right β depends on the model (10-30 on SmolLM2, docs/methods.md)."""
    warm_start: bool = True
    """Start each gate from the DSAS regulator fitted on the same data (u = folded w, c = b); else u = 0,
    c = 0 (sigmoid, g = 0.5) or c = 1 (ReLU, g = 1)."""
    gate_lr: float | None = None
    """Adam learning rate of (u, c); None uses LinEASConfig.lr."""
    gate_weight_decay: float = 0.0
    """ρ: adds ρ Σ_l ||ũ_l||² to the objective, ũ the gate weight in units of its input's spread (u = ũ / (σ √d)
    per coordinate), so that ρ means the same at every site."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.beta < 0 or self.gate_weight_decay < 0:
            raise ValueError("E2EConfig.beta and gate_weight_decay must be >= 0.")
        if self.gate_lr is not None and self.gate_lr <= 0:
            raise ValueError("E2EConfig.gate_lr must be > 0.")


def w2_sorted(z: torch.Tensor, v_sorted: torch.Tensor) -> torch.Tensor:
    """Σ_j (1/n) Σ_i (sort(z[:, j])_i − v_sorted[i, j])²: the per-coordinate 1-D squared W2 (paper Eq. 4).

    z [m, d]; v_sorted [n, d], each column sorted. Sets of different sizes are compared at max(m, n) common
    quantile levels. Differentiable in z.
    """
    zs = torch.sort(z, dim=0).values
    n = max(zs.shape[0], v_sorted.shape[0])
    diff = resample_sorted(zs, n) - resample_sorted(v_sorted, n)
    return diff.pow(2).mean(0).sum()


@dataclass
class TrainResult:
    """Trained maps (and gates, for E2E), with the objective's history."""

    maps: dict[str, SiteMap]
    gates: dict[str, SiteGate] | None
    history: list[float]
    """Objective per step (before that step's update)."""
    best_step: int
    """Step whose parameters are returned (lowest objective)."""
    evaluations: int
    """Forward + backward passes over the training sets (L-BFGS line searches take several per step)."""
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per site (E2E): mean gate over the real tokens of the source and of the control prompts."""
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The training curve's ends, for the steerer's config."""
        return {
            "evaluations": self.evaluations,
            "best_step": self.best_step,
            "objective_start": self.history[0],
            "objective_best": self.history[self.best_step],
            "seconds": round(self.seconds, 2),
        }


class _Chunk:
    """Prompts of one forward pass, tokenized once."""

    def __init__(self, enc: dict[str, torch.Tensor], skip: int = 0):
        self.enc = enc
        self.mask = enc["attention_mask"].to(torch.float32)
        # The tokens a token-mean averages (`FitConfig.skip_tokens` leaves the first ones out).
        self.pool = drop_first(self.mask, skip)
        self.pool_count = self.pool.sum(1, keepdim=True).clamp_min(1)


class _Batch:
    """One set, tokenized once, for every step (full batch). Prompts are sorted by length and cut into chunks
    of `chunk` prompts, so that padding stays short: the loss does not depend on the order of the prompts
    (W2 sorts, the retain term sums), and one backward pass covers all chunks."""

    def __init__(
        self,
        tokenizer: Any,
        texts: Sequence[str],
        max_length: int,
        device: torch.device,
        chunk: int,
        positions: bool = True,
        skip: int = 0,
    ):
        lengths = [len(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
        self.chunks = [
            _Chunk(
                tokenize(
                    tokenizer,
                    [texts[i] for i in order[k : k + chunk]],
                    max_length,
                    device,
                    position_ids=positions,
                ),
                skip,
            )
            for k in range(0, len(texts), max(1, chunk))
        ]
        self.tokens = float(sum(float(c.mask.sum()) for c in self.chunks))


class SiteTrainer:
    """Hooks that apply the current maps/gates with autograd and collect what the loss needs."""

    def __init__(
        self,
        model: nn.Module,
        sites: Sequence[Site],
        dims: Sequence[int],
        device: torch.device,
        gate_kind: str | None,
        pool_after: bool,
        units: Sequence[torch.Tensor] | None = None,
    ):
        self.model, self.sites, self.gate_kind, self.pool_after = model, list(sites), gate_kind, pool_after
        # Δ(z) = δ ⊙ (z − μ) + units ⊙ p, an exact reparametrisation of δ ⊙ z + b (b = units ⊙ p − δ ⊙ μ).
        # Centring at the source mean μ decouples δ from the shift, which otherwise move together (z̄ ≈ μ for
        # every prompt) and make Adam crawl; `units` puts the shift in each coordinate's own scale.
        self.units = list(units) if units is not None else [torch.ones(d, device=device) for d in dims]
        self.center = [torch.zeros(d, device=device) for d in dims]
        # ω = 1 + δ = exp(s): a reflected map (ω < 0) can match a near-symmetric set of sorted values and
        # trap the optimiser there, and a 1-D OT map is monotone anyway. s = 0 is the identity.
        self.logscale = [torch.zeros(d, device=device, requires_grad=True) for d in dims]
        self.shift = [torch.zeros(d, device=device, requires_grad=True) for d in dims]
        self.u: list[torch.Tensor] = []
        self.c: list[torch.Tensor] = []
        # The gate's weight is learned as ũ with u = ũ ⊙ gate_units, 1 / (token spread ⊙ √d): an Adam step then
        # moves the logit u · z by about lr whatever the scale of the coordinates. Left raw, the first steps
        # of a ReLU gate on SmolLM2 blew the objective up 15x.
        self.gate_units = [torch.ones(d, device=device) for d in dims]
        if gate_kind is not None:
            self.u = [torch.zeros(d, device=device, requires_grad=True) for d in dims]
            self.c = [torch.zeros((), device=device, requires_grad=True) for _ in dims]
        # "source": pool outputs; "control": retain distances; "off": record unsteered; "inputs": record the
        # steered activations arriving at each site.
        self.mode = "off"
        self.chunk: _Chunk | None = None
        self.pooled: list[list[torch.Tensor]] = [[] for _ in self.sites]  # per site, one [B, d] per chunk
        self.reference: list[list[torch.Tensor]] = []  # per chunk and site: unsteered control [B, T, d]
        self.recorded: list[torch.Tensor] = []
        self.retain: torch.Tensor | None = None  # Σ over sites and real control tokens of the L2 distance

    def params(self, i: int) -> SiteParams:
        """Site i's map and gate in the rule's terms, differentiable in the trained parameters: Δ(z) = δ ⊙ z + b
        with δ = expm1(s), b = units ⊙ p − δ ⊙ μ; g = φ(u · z + c) with u = ũ ⊙ gate_units."""
        scale = torch.expm1(self.logscale[i])
        shift = torch.addcmul(self.shift[i] * self.units[i], scale, self.center[i], value=-1)
        if self.gate_kind is None:
            return SiteParams(shift, scale)
        return SiteParams(
            shift, scale, w=self.u[i] * self.gate_units[i], b=self.c[i], relu=self.gate_kind == "relu"
        )

    def gate(self, i: int, z: torch.Tensor) -> torch.Tensor:
        p = self.params(i)
        return gate(z, p.w, p.b, 1.0, p.relu)

    def _hook(self, i: int, site: Site) -> Callable[..., Any]:
        last = i == len(self.sites) - 1

        def hook(_m: nn.Module, _inp: Any, out: Any) -> Any:
            h = output_tensor(out, site.index)
            if h.dim() != 3:
                raise ValueError(
                    f"End-to-end training steers token sequences [batch, tokens, d]; site {site.name} outputs "
                    f"shape {tuple(h.shape)}. Pick sites whose output is a token sequence."
                )
            assert self.chunk is not None
            z = h.float()
            if self.mode == "off":
                self.recorded.append(z.detach())
                if last:
                    raise StopForward
                return out
            y, _ = rule(z, self.params(i), torch.ones(z.shape[0], device=z.device))  # strength 1
            mask = self.chunk.mask
            if self.mode == "inputs":
                self.recorded.append(z.detach())
            elif self.mode == "source":
                read = y if self.pool_after else z
                self.pooled[i].append((read * self.chunk.pool[..., None]).sum(1) / self.chunk.pool_count)
            elif self.mode == "control":
                dist = torch.sqrt((y - self.reference[self.index][i]).pow(2).sum(-1) + 1e-12)
                term = (dist * mask).sum()
                self.retain = term if self.retain is None else self.retain + term
            if last:
                raise StopForward
            return replace_output(out, y.to(h.dtype), site.index)

        return hook

    def forward(self, batch: _Batch, mode: str) -> list[list[torch.Tensor]]:
        """Run every chunk with the hooks in `mode`; returns what modes "off"/"inputs" record, per chunk."""
        self.mode = mode
        self.pooled = [[] for _ in self.sites]
        self.retain = None
        recorded = []
        handles = [
            wrap_forward(get_module(self.model, s), self._hook(i, s)) for i, s in enumerate(self.sites)
        ]
        try:
            for self.index, self.chunk in enumerate(batch.chunks):
                self.recorded = []
                with suppress(StopForward):
                    self.model(**self.chunk.enc)
                recorded.append(self.recorded)
        finally:
            for hd in reversed(handles):
                hd.remove()
            self.chunk, self.mode, self.recorded = None, "off", []
        if mode == "control" and self.retain is not None:
            self.retain = self.retain / batch.tokens
        return recorded

    def pooled_means(self) -> list[torch.Tensor]:
        """Per site, the [n, d] token-means of the last "source" pass (in chunk order)."""
        return [torch.cat(p) for p in self.pooled]

    def map_params(self) -> list[torch.Tensor]:
        return [*self.logscale, *self.shift]

    def actual_shift(self, i: int, snap: list[torch.Tensor] | None = None) -> torch.Tensor:
        """b of the map δ ⊙ z + b, from the current parameters or a snapshot."""
        n = len(self.sites)
        s, p = (self.logscale[i], self.shift[i]) if snap is None else (snap[i], snap[n + i])
        return p * self.units[i] - torch.expm1(s) * self.center[i]

    @torch.no_grad()
    def prox(self, lr: float, l1: float, group: float) -> None:
        """LinEAS proximal step on (s, b), s = log(1 + δ) (equal to δ to first order; 0 is the identity):
        soft-threshold ST_{lr·λ1}, then the per-site group prox of lr·λG."""
        if l1 == 0 and group == 0:
            return
        for i, dl in enumerate(self.logscale):
            bl = self.actual_shift(i)
            if l1 > 0:
                dl.copy_(torch.sign(dl) * (dl.abs() - lr * l1).clamp_min(0))
                bl = torch.sign(bl) * (bl.abs() - lr * l1).clamp_min(0)
            if group > 0:
                norm = torch.sqrt(dl.pow(2).sum() + bl.pow(2).sum())
                factor = (1 - lr * group / norm).clamp_min(0) if norm > 0 else norm
                dl.mul_(factor)
                bl = bl * factor
            self.shift[i].copy_((bl + torch.expm1(dl) * self.center[i]) / self.units[i])

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in (*self.logscale, *self.shift, *self.u, *self.c)]

    def maps(self, snap: list[torch.Tensor]) -> dict[str, SiteMap]:
        return {
            s.name: SiteMap(
                shift=self.actual_shift(i, snap).float().cpu(), scale=torch.expm1(snap[i]).float().cpu()
            )
            for i, s in enumerate(self.sites)
        }

    def gates(self, snap: list[torch.Tensor]) -> dict[str, SiteGate]:
        assert self.gate_kind is not None
        n = len(self.sites)
        return {
            s.name: SiteGate(
                self.gate_kind, (snap[2 * n + i] * self.gate_units[i]).float().cpu(), float(snap[3 * n + i])
            )
            for i, s in enumerate(self.sites)
        }


def _spread(x: torch.Tensor) -> torch.Tensor:
    """Per-coordinate std of the rows of x, floored at 1e-3 of its mean so a constant coordinate is no division
    by zero: the unit in which shifts and gate weights are learned."""
    sd = x.std(0, unbiased=False)
    return sd.clamp_min(1e-3 * float(sd.mean()) + 1e-12)


def train_maps(
    model: nn.Module,
    tokenizer: Any,
    sites: Sequence[Site],
    source: Sequence[str],
    target_means: dict[str, torch.Tensor],
    cfg: LinEASConfig,
    *,
    control: Sequence[str] | None = None,
    gate_kind: str | None = None,
    gate_init: dict[str, tuple[torch.Tensor, float]] | None = None,
    e2e: E2EConfig | None = None,
    max_length: int = 128,
    chunk: int = 16,
    progress: bool = True,
    desc: str = "lineas",
    skip: int = 0,
) -> TrainResult:
    """Train per-site affine maps (LinEAS), or maps and gates jointly (E2E-DSAS with `gate_kind`).

    source: prompts to move; target_means: unsteered token-mean activations of the target prompts per site
    [n, d] (precomputed, e.g. `dsas.record.record`). control: prompts whose activations the retain term keeps
    (E2E only). gate_init: {site: (u, c)} starting gates (E2E; default u = 0, c = 0 sigmoid / 1 ReLU).
    skip: the first real tokens of each prompt left out of its token-mean (`FitConfig.skip_tokens`).
    Full batch (one optimiser step per pass over all prompts, run `chunk` prompts at a time), proximal
    sparsity steps, early stop on a plateau; the parameters of the best objective are returned. The model's parameters are frozen during training and restored afterwards.
    """
    if gate_kind is not None and gate_kind not in E2E_KINDS:
        raise ValueError(f"gate_kind={gate_kind!r} is not one of {E2E_KINDS}.")
    if gate_kind is not None and not control:
        raise ValueError("E2E-DSAS training needs control prompts (PromptSets.control) for its retain term.")
    t0 = time.perf_counter()
    steps = cfg.steps if cfg.steps is not None else DEFAULT_STEPS[gate_kind is not None]
    e2e = e2e or E2EConfig()
    dev = model_device(model)
    dims = [int(target_means[s.name].shape[-1]) for s in sites]
    units = None
    if cfg.relative:
        units = []
        for s in sites:
            units.append(_spread(target_means[s.name].float().to(dev)))
    tr = SiteTrainer(model, sites, dims, dev, gate_kind, cfg.pool_after, units)
    targets = [torch.sort(target_means[s.name].to(dev, torch.float32), dim=0).values for s in sites]
    # Position ids from the mask make the loss independent of the padding side (absolute-position models).
    pos = accepts_position_ids(model)
    ctx_len = context_length(model)
    if ctx_len is not None:
        max_length = min(max_length, ctx_len)
    src = _Batch(tokenizer, source, max_length, dev, chunk, pos, skip)
    ctl = (
        _Batch(tokenizer, control, max_length, dev, chunk, pos, skip)
        if gate_kind is not None and control
        else None
    )

    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    groups: list[dict[str, Any]] = [{"params": tr.map_params(), "lr": cfg.lr}]
    if gate_kind is not None:
        groups.append({"params": [*tr.u, *tr.c], "lr": e2e.gate_lr or cfg.lr})
    params = [p for g in groups for p in g["params"]]
    track = _Tracker(cfg, steps, tr, desc, progress)
    retain_unit = 1.0

    def closure() -> torch.Tensor:
        """One forward + backward over the training sets at the current parameters; returns the loss."""
        for p in params:
            p.grad = None
        tr.forward(src, "source")
        w2 = torch.stack([w2_sorted(p, t) for p, t in zip(tr.pooled_means(), targets, strict=True)]).sum()
        loss, retain = w2, None
        if ctl is not None:
            tr.forward(ctl, "control")
            assert tr.retain is not None
            retain = tr.retain
            loss = loss + e2e.beta * retain_unit * retain
            if e2e.gate_weight_decay > 0:
                loss = loss + e2e.gate_weight_decay * sum(u.pow(2).sum() for u in tr.u)
        loss.backward()
        track.seen(
            float(loss.detach()), float(w2.detach()), None if retain is None else float(retain.detach())
        )
        return loss

    try:
        model.eval()
        for p, _ in frozen:
            p.requires_grad_(False)
        with torch.no_grad():
            # Centre of the parametrisation: the mean source token-mean of every site.
            rec = tr.forward(src, "off")
            src_means = []
            for i in range(len(sites)):
                means = [
                    (r[i] * c.pool[..., None]).sum(1) / c.pool_count
                    for r, c in zip(rec, src.chunks, strict=True)
                ]
                src_means.append(torch.cat(means))
                tr.center[i] = src_means[-1].mean(0)
            if ctl is not None and e2e.relative_beta:
                retain_unit = _retain_unit(src_means, targets, [target_means[s.name] for s in sites])
            if ctl is not None:
                tr.reference = tr.forward(ctl, "off")  # unsteered control activations, once
                for i, s in enumerate(sites):
                    real = [r[i][c.pool.bool()] for r, c in zip(rec, src.chunks, strict=True)]
                    real += [r[i][c.pool.bool()] for r, c in zip(tr.reference, ctl.chunks, strict=True)]
                    sd = _spread(torch.cat(real))
                    tr.gate_units[i] = 1 / (sd * math.sqrt(sd.numel()))
                    u0, c0 = (gate_init or {}).get(s.name, (None, 1.0 if gate_kind == "relu" else 0.0))
                    if u0 is not None:
                        tr.u[i].copy_(u0.to(dev, torch.float32) / tr.gate_units[i])
                    tr.c[i].fill_(float(c0))
            del rec
        try:
            if cfg.optimizer == "lbfgs":
                lbfgs = torch.optim.LBFGS(
                    params,
                    lr=1.0,
                    max_iter=steps,
                    max_eval=steps,
                    history_size=cfg.history,
                    line_search_fn="strong_wolfe",
                    tolerance_grad=0.0,
                    tolerance_change=0.0,
                )
                lbfgs.step(closure)
            else:
                adam = torch.optim.Adam(groups)
                for _ in range(steps):
                    closure()
                    adam.step()
                    tr.prox(cfg.lr, cfg.l1, cfg.group)
        except _Done:
            pass
    finally:
        track.close()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    best_snap = track.best_snap
    maps = tr.maps(best_snap)
    gates = tr.gates(best_snap) if gate_kind is not None else None
    stats: dict[str, dict[str, Any]] = {}
    if gate_kind is not None:
        gm = _gate_means(tr, best_snap, src, ctl)
        stats = {s.name: {k: v[i] for k, v in gm.items()} for i, s in enumerate(sites)}
    seconds = time.perf_counter() - t0
    return TrainResult(maps, gates, track.history, track.best_step, len(track.history), stats, seconds)


def _retain_unit(
    src_means: list[torch.Tensor], targets: list[torch.Tensor], target_means: list[torch.Tensor]
) -> float:
    """W2(init) / D (`E2EConfig.relative_beta`): the Wasserstein term of the unsteered source token-means (per
    site [n, d]) against the sorted targets, over the summed norm of the mean source -> target displacement."""
    w2 = dist = 0.0
    for x, t_sorted, t in zip(src_means, targets, target_means, strict=True):
        w2 += float(w2_sorted(x.float(), t_sorted))
        dist += float(torch.linalg.vector_norm(t.float().mean(0).to(x.device) - x.float().mean(0)))
    if not (math.isfinite(w2) and math.isfinite(dist)) or dist <= 0 or w2 <= 0:
        return 1.0  # source and target coincide: nothing to transport, nothing to rescale
    return w2 / dist


def _penalty(tr: SiteTrainer, cfg: LinEASConfig) -> float:
    """The sparsity terms λ1 Σ||(δ, b)||_1 + λG Σ_l ||(δ_l, b_l)||_2 (handled by prox steps, reported here)."""
    if cfg.l1 == 0 and cfg.group == 0:
        return 0.0
    with torch.no_grad():
        pairs = [(s, tr.actual_shift(i)) for i, s in enumerate(tr.logscale)]
        l1 = sum(float(d.abs().sum() + b.abs().sum()) for d, b in pairs)
        gl = sum(float(torch.sqrt(d.pow(2).sum() + b.pow(2).sum())) for d, b in pairs)
    return cfg.l1 * l1 + cfg.group * gl


class _Done(Exception):
    """Raised by the tracker to end training (step budget spent, or a plateau)."""


class _Tracker:
    """Bookkeeping of every objective evaluation: history, best parameters, progress bar, early stopping.

    Counting evaluations (forward + backward passes), not optimiser steps, gives Adam and L-BFGS (whose line
    search evaluates several points per step) the same budget in the unit that costs time.
    """

    def __init__(self, cfg: LinEASConfig, steps: int, tr: SiteTrainer, desc: str, progress: bool):
        self.cfg, self.steps, self.tr, self.desc = cfg, steps, tr, desc
        self.history: list[float] = []
        self.best = math.inf
        self.best_step = 0
        self.best_snap = tr.snapshot()
        self.bests: list[float] = []  # best objective after each evaluation
        self.bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)

    def seen(self, loss: float, w2: float, retain: float | None) -> None:
        step = len(self.history)
        objective = loss + _penalty(self.tr, self.cfg)
        if not math.isfinite(objective):
            raise FloatingPointError(
                f"The {self.desc} objective became {objective} at evaluation {step}: lower lr (now "
                f"{self.cfg.lr}) or load the model in float32."
            )
        self.history.append(objective)
        if objective < self.best:
            self.best, self.best_step, self.best_snap = objective, step, self.tr.snapshot()
        self.bests.append(self.best)
        post = {"loss": f"{objective:.4g}", "w2": f"{w2:.4g}"}
        if retain is not None:
            post["retain"] = f"{retain:.4g}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)
        if len(self.history) >= self.steps or self.plateau():
            raise _Done

    def plateau(self) -> bool:
        """The best objective improved by less than `tol` (relative) over the last `patience` evaluations."""
        k = self.cfg.patience
        return bool(k) and len(self.bests) > k and self.bests[-1] > (1 - self.cfg.tol) * self.bests[-1 - k]

    def close(self) -> None:
        self.bar.close()


@torch.no_grad()
def _gate_means(
    tr: SiteTrainer, snap: list[torch.Tensor], src: _Batch, ctl: _Batch | None
) -> dict[str, list[float]]:
    """Mean gate value per site over the real tokens of the source and control prompts, at `snap`."""
    current = tr.snapshot()
    params = [*tr.logscale, *tr.shift, *tr.u, *tr.c]
    for p, v in zip(params, snap, strict=True):
        p.copy_(v)
    out: dict[str, list[float]] = {}
    try:
        for name, batch in (("gate_source", src), ("gate_control", ctl)):
            if batch is None:
                continue
            rec = tr.forward(batch, "inputs")  # activations arriving at each site, all maps applied
            out[name] = [
                sum(float((tr.gate(i, r[i]) * c.mask).sum()) for r, c in zip(rec, batch.chunks, strict=True))
                / batch.tokens
                for i in range(len(tr.sites))
            ]
    finally:
        for p, v in zip(params, current, strict=True):
            p.copy_(v)
    return out
