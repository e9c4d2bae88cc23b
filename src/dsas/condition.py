"""The CAST-style threshold baseline (Lee et al., 2024), whole: fitting a condition and steering with it.

A binary decision per prompt, held for the continuation: not a function of the current token, so it cannot live in
the per-token gate; it enters the rule through the per-row strength, `z' = z + (lam * d_row) * g * Δ(z)` with
d_row in {0, 1} and each site's constant gate g.

* Fitting (`fit_condition`): a direction at the condition site (a decoder block's output) and a cosine threshold
  chosen by F1 on held-out source (fire) vs control (do not fire) prompts. A steerer keeps it as
  `Steerer.condition`, saved as its own tensor.
* prefill: the condition site's output gives each prompt's token-mean (padding masked); the row fires when
  cos(t̄, direction) >= threshold. Sites that run before the condition site in that pass are left alone on the
  prompt tokens (the decision is not known yet); every site is steered on every later token.
* cached decode steps reuse the decision. An uncached step re-runs the whole sequence from position 0: when it
  starts with the prompt the decision was taken on, the decision is kept and the prompt tokens are treated
  exactly as at prefill, so cached and uncached generation agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from dsas.options import check_fields
from dsas.record import drop_first, pool_tokens
from dsas.rule import SiteParams, rule
from dsas.sites import Site, find_blocks, get_module, resolve_sites
from dsas.steer import SteerState, Trace, check_width, pass_position, steering_frame, wrap_forward
from dsas.torchutil import model_device, output_tensor, replace_output

THRESHOLD_DIRECTIONS = ("pc1", "mean")


@dataclass
class ThresholdConfig:
    """Options of the CAST-style condition (Lee et al., 2024): a binary, prompt-level decision, a baseline."""

    site: str | None = None
    """Condition site (a module name); None: the output of the middle decoder block. Saved resolved."""
    direction: Literal["pc1", "mean"] = "pc1"
    """"pc1": first principal axis (uncentred) of paired source − control token-mean differences, as CAST;
    "mean": mean(source) − mean(control)."""
    holdout: float = 0.25
    """Fraction of source and control prompts (stratified, seeded by FitConfig.seed) on which the threshold
    is chosen by F1; the direction is fitted on the rest."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.direction not in THRESHOLD_DIRECTIONS:
            raise ValueError(
                f"ThresholdConfig.direction={self.direction!r} is not one of {THRESHOLD_DIRECTIONS}."
            )
        if not 0 < self.holdout < 1:
            raise ValueError("ThresholdConfig.holdout must lie in (0, 1).")


def condition_scores(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of token-mean activations [n, d] with the condition direction -> [n]."""
    x = x.double()
    d = direction.double()
    return (x @ d) / (x.norm(dim=-1) * d.norm()).clamp_min(1e-12)


def _f1(pred: np.ndarray, y: np.ndarray) -> float:
    tp = float((pred & y).sum())
    fp = float((pred & ~y).sum())
    fn = float((~pred & y).sum())
    return tp / max(tp + 0.5 * (fp + fn), 1e-12)


def fit_threshold(
    source: torch.Tensor, control: torch.Tensor, cfg: ThresholdConfig, seed: int = 0
) -> tuple[torch.Tensor, float, dict[str, Any]]:
    """Condition direction (unit vector) and cosine threshold from token-means [n, d] at the condition site.

    The prompt "fires" (is steered) when cos(t̄, direction) >= threshold. The threshold maximises F1 (source
    positive) on held-out prompts; ties go to the higher F1 on the fitting prompts, then to the middle of the
    tied range, the widest margin available.
    """
    src, ctl = source.double(), control.double()
    gen = torch.Generator().manual_seed(seed)
    held = []
    for n in (len(src), len(ctl)):
        k = min(max(1, round(cfg.holdout * n)), n - 1)
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=gen)[:k]] = True
        held.append(m)
    s_tr, c_tr = src[~held[0]], ctl[~held[1]]
    if cfg.direction == "mean":
        direction = s_tr.mean(0) - c_tr.mean(0)
    else:
        k = min(len(s_tr), len(c_tr))
        diffs = (
            s_tr[torch.randperm(len(s_tr), generator=gen)[:k]]
            - c_tr[torch.randperm(len(c_tr), generator=gen)[:k]]
        )
        direction = torch.linalg.svd(diffs, full_matrices=False).Vh[0]
        if direction @ diffs.mean(0) < 0:
            direction = -direction
    direction = direction / direction.norm().clamp_min(1e-12)
    x = torch.cat([src, ctl])
    y = np.concatenate([np.ones(len(src), bool), np.zeros(len(ctl), bool)])
    test = torch.cat(held).numpy()
    scores = condition_scores(x, direction).numpy()
    u = np.unique(scores)
    cands = np.concatenate([[u[0] - 1e-6], (u[:-1] + u[1:]) / 2, [u[-1] + 1e-6]])
    keys = [(_f1(scores[test] >= t, y[test]), _f1(scores[~test] >= t, y[~test])) for t in cands]
    best = max(keys)
    tied = [t for t, k in zip(cands, keys, strict=True) if k == best]
    threshold = float(tied[len(tied) // 2])
    fire = scores >= threshold
    stats = {
        "condition_f1_holdout": best[0],
        "condition_f1_fit": best[1],
        "condition_fire_source": float(fire[y].mean()),
        "condition_fire_control": float(fire[~y].mean()),
    }
    return direction.float(), threshold, stats


@dataclass
class Condition:
    """A fitted prompt-level condition: steer a row when cos(token-mean at `site`, direction) >= threshold."""

    site: str
    direction: torch.Tensor
    threshold: float
    skip: int = 0
    """The prompt's first `skip` real tokens are left out of its token-mean (`FitConfig.skip_tokens`)."""


def fit_condition(
    model: nn.Module,
    record: Callable[[str, list[Site]], dict[str, Any]],
    cfg: ThresholdConfig,
    seed: int = 0,
) -> tuple[Condition, dict[str, Any]]:
    """Fit the condition at `cfg.site` (default: the middle decoder block's output) from the source and control
    splits; `record(split, sites)` returns their token-mean activations."""
    if cfg.site is None:
        block_name, blocks = find_blocks(model)
        site = resolve_sites(model, [f"{block_name}.{len(blocks) // 2}"])[0]
    else:
        site = resolve_sites(model, [cfg.site])[0]
    src, ctl = record("source", [site])[site.name], record("control", [site])[site.name]
    direction, threshold, stats = fit_threshold(src, ctl, cfg, seed)
    return Condition(site.name, direction, threshold), {"condition_site": site.name, **stats}


class _Decision:
    """Per-row decision of one `conditional_steering` block, with what is needed to hold it."""

    def __init__(self, cond: Condition):
        self.direction = cond.direction.float()
        self.threshold = cond.threshold
        self.skip = cond.skip
        self.prompt: torch.Tensor | None = None  # ids the decision was taken on
        self.length = 0  # prompt length P
        self.value: torch.Tensor | None = None  # [B] in {0., 1.}; None until the condition site ran
        self.upstream: set[str] = set()  # sites that ran before the decision in the prefill pass
        self.offset = 0  # position of the current pass's first token
        self.mask: torch.Tensor | None = None  # attention mask of the current pass (past + current tokens)

    def begin(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Before every top-level forward: a pass from position 0 is a new prompt unless it is an uncached
        generation step that extends the prompt the decision was taken on."""
        off, mask, ref = pass_position(args, kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        ids = ids if isinstance(ids, torch.Tensor) else None
        self.offset, self.mask = off, mask
        if off > 0:
            return
        same = (
            kwargs.get("use_cache") is False
            and self.value is not None
            and self.prompt is not None
            and ids is not None
            and ids.shape[0] == self.prompt.shape[0]
            and ids.shape[1] >= self.length
            and torch.equal(ids[:, : self.length], self.prompt.to(ids.device))
        )
        if not same:
            self.prompt = None if ids is None else ids.detach().clone()
            self.length = ref.shape[1] if ref is not None else 0
            self.value = None
            self.upstream = set()

    def decide(self, h: torch.Tensor) -> None:
        if h.dim() != 3:
            raise ValueError(
                f"The threshold gate reads a token sequence [batch, tokens, d] at its condition site; got shape "
                f"{tuple(h.shape)}. Refit with ThresholdConfig.site set to a decoder block."
            )
        t = h.shape[1]
        mask = torch.ones(h.shape[:2], device=h.device) if self.mask is None else self.mask[:, -t:]
        mean = pool_tokens(h, drop_first(mask, self.skip), "mean")
        d = self.direction.to(mean.device)
        cos = (mean @ d) / (mean.norm(dim=-1) * d.norm()).clamp_min(1e-12)
        self.value = (cos >= self.threshold).float()


def _site_hook(site: Site, p: SiteParams, dec: _Decision, state: SteerState) -> Any:
    per_device = {p.shift.device: p}
    dim = int(p.shift.shape[-1])

    def hook(_mod: nn.Module, _args: Any, out: Any) -> Any:
        h = output_tensor(out, site.index)
        if h.dim() != 3:
            raise ValueError(
                f"The threshold gate steers token sequences; site {site.name} outputs {tuple(h.shape)}."
            )
        check_width(site, h, dim)
        if dec.value is None:  # the condition site has not run yet in this prefill pass
            dec.upstream.add(site.name)
            if state.trace is not None:
                state.trace.add(site.name, torch.zeros(h.shape[:2]))
            return out
        q = per_device.get(h.device)
        if q is None:
            q = per_device[h.device] = p.on(h.device)
        lam = state.lam_for(h.shape[0], h.device) * dec.value.to(h.device)
        y, a = rule(h, q, lam)
        if site.name in dec.upstream and dec.offset < dec.length:
            pos = torch.arange(dec.offset, dec.offset + h.shape[1], device=h.device)
            keep = pos < dec.length  # prompt tokens this site left alone at prefill
            y = torch.where(keep[None, :, None], h, y)
            a = torch.where(keep[None, :], torch.zeros((), device=a.device), a)
        if state.trace is not None:
            state.trace.add(site.name, a)
        return replace_output(out, y, site.index)

    return hook


@contextmanager
def conditional_steering(
    model: nn.Module,
    condition: Condition,
    sites: Sequence[Site],
    maps: dict[str, Any],
    gates: dict[str, Any],
    **kw: Any,
) -> Iterator[Trace]:
    """Steer the rows whose prompt passes the condition (see module docstring); wrappers removed on exit.
    kw: `strength`, `trace`, `expand` as in `dsas.steer.steering`."""
    dec = _Decision(condition)
    cond = Site(condition.site)

    def on_condition(_mod: nn.Module, _args: Any, out: Any) -> Any:
        if dec.value is None:
            dec.decide(output_tensor(out, cond.index).detach())
        return out

    with steering_frame(model, **kw) as (state, wrappers):

        def begin(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            dec.begin(m, args, kwargs)
            state.begin_pass(dec.offset, dec.mask)  # the block's own position bookkeeping (and the trace's)

        wrappers.append(wrap_forward(model, before=begin))
        # Wrapped first (innermost): at a site that is also steered, the condition reads the unsteered output.
        wrappers.append(wrap_forward(get_module(model, cond), on_condition))
        for s in sites:
            g = gates[s.name]
            const = type(g)("const", None, 0.0, g.mult)
            p = SiteParams.build(maps[s.name], const, model_device(get_module(model, s)))
            wrappers.append(wrap_forward(get_module(model, s), _site_hook(s, p, dec, state)))
        yield state.trace if state.trace is not None else Trace()
