"""The CAST-style threshold gate at run time: a binary decision per prompt, held for the continuation.

The decision is not a function of the current token, so it cannot live in the per-token gate of
`dsas.steer.steer_tensor`; it enters through the per-row strength instead, and the rule stays
`z' = z + (lam * d_row) * g * Δ(z)` with d_row in {0, 1} and the site's constant gate g:

* prefill: a hook at the condition site reads the prompt's token-mean (padding masked), and the row fires
  when cos(t̄, direction) >= threshold. Sites that run before the condition site in that pass are left alone
  on the prompt tokens (the decision is not known yet); every site is steered on every later token.
* cached decode steps reuse the decision. An uncached step re-runs the whole sequence from position 0: when
  it starts with the prompt the decision was taken on, the decision is kept and the prompt tokens are
  treated exactly as at prefill, so cached and uncached generation agree.

A steerer fitted with gate="threshold" stores the direction as every site's gate.w and the threshold as
gate.b (kind "const": a plain `dsas.steer.steering` over it is vanilla steering), and the condition site in
its config; `Steerer.apply` routes it here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from dsas.gates import SiteGate
from dsas.maps import SiteMap
from dsas.record import pool_tokens
from dsas.sites import Site, get_module, output_tensor, replace_output
from dsas.steer import (
    SiteParams,
    Trace,
    _State,
    guard_hooks_under_compile,
    hooked,
    pass_position,
    steer_tensor,
)


class _Decision:
    """Per-row decision of one `conditional_steering` block, with what is needed to hold it."""

    def __init__(self, direction: torch.Tensor, threshold: float):
        self.direction = direction.float()
        self.threshold = threshold
        self.prompt: torch.Tensor | None = None  # ids the decision was taken on
        self.length = 0  # prompt length P
        self.value: torch.Tensor | None = None  # [B] in {0., 1.}; None until the condition site ran
        self.upstream: set[str] = set()  # sites that ran before the decision in the prefill pass
        self.offset = 0  # position of the current pass's first token
        self.mask: torch.Tensor | None = None  # attention mask of the current pass (past + current tokens)

    def begin(
        self, ids: torch.Tensor | None, length: int, offset: int, mask: torch.Tensor | None, uncached: bool
    ) -> None:
        """Called before every top-level forward: a pass from position 0 is a new prompt unless it is an
        uncached generation step that extends the prompt the decision was taken on."""
        self.offset, self.mask = offset, mask
        if offset > 0:
            return
        same = (
            uncached
            and self.value is not None
            and self.prompt is not None
            and ids is not None
            and ids.shape[0] == self.prompt.shape[0]
            and ids.shape[1] >= self.length
            and torch.equal(ids[:, : self.length], self.prompt.to(ids.device))
        )
        if not same:
            self.prompt = None if ids is None else ids.detach().clone()
            self.length = length
            self.value = None
            self.upstream = set()

    def decide(self, h: torch.Tensor) -> None:
        if h.dim() != 3:
            raise ValueError(
                f"The threshold gate reads a token sequence [batch, tokens, d] at its condition site; got shape "
                f"{tuple(h.shape)}. Refit with ThresholdConfig.site set to a decoder block."
            )
        t = h.shape[1]
        mask = None if self.mask is None else self.mask[:, -t:]
        mean = pool_tokens(h, mask, "mean")
        d = self.direction.to(mean.device)
        cos = (mean @ d) / (mean.norm(dim=-1) * d.norm()).clamp_min(1e-12)
        self.value = (cos >= self.threshold).float()


def _pre_hook(dec: _Decision, trace: Trace | None) -> Any:
    def pre(_mod: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        off, mask, ref = pass_position(args, kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        length = ref.shape[1] if ref is not None else 0
        uncached = kwargs.get("use_cache") is False
        dec.begin(ids if isinstance(ids, torch.Tensor) else None, length, off, mask, uncached)
        if trace is not None:
            trace.begin_pass(off, mask)

    return pre


def _site_hook(site: Site, m: SiteMap, g: SiteGate, dec: _Decision, state: _State) -> Any:
    params: dict[torch.device, SiteParams] = {}
    const = SiteGate("const", None, 0.0, g.mult)

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> Any:
        h = output_tensor(out, site.index)
        if h.dim() != 3:
            raise ValueError(
                f"The threshold gate steers token sequences; site {site.name} outputs {tuple(h.shape)}."
            )
        if h.shape[-1] != m.dim:
            raise ValueError(
                f"Site {site.name} outputs {h.shape[-1]} features but the steerer was fitted with {m.dim}: "
                "this steerer belongs to another model."
            )
        if dec.value is None:  # the condition site has not run yet in this prefill pass
            dec.upstream.add(site.name)
            if state.trace is not None:
                state.trace.calls.append((site.name, dec.offset, torch.zeros(h.shape[:2])))
            return None
        p = params.get(h.device)
        if p is None:
            p = params[h.device] = SiteParams.build(m, const, h.device)
        lam = state.lam_for(h.shape[0], h.device) * dec.value.to(h.device)
        y, a = steer_tensor(h, p, lam)
        if site.name in dec.upstream and dec.offset < dec.length:
            pos = torch.arange(dec.offset, dec.offset + h.shape[1], device=h.device)
            keep = pos < dec.length  # prompt tokens this site left alone at prefill
            y = torch.where(keep[None, :, None], h, y)
            a = torch.where(keep[None, :], torch.zeros((), device=a.device), a)
        if state.trace is not None:
            state.trace.calls.append((site.name, dec.offset, a.detach()))
        return replace_output(out, y, site.index)

    return hook


@contextmanager
def conditional_steering(
    model: nn.Module,
    sites: Sequence[Site],
    maps: dict[str, SiteMap],
    gates: dict[str, SiteGate],
    condition: Site,
    direction: torch.Tensor,
    threshold: float,
    strength: float | Sequence[float] | torch.Tensor = 1.0,
    *,
    trace: bool = False,
    expand: str = "interleave",
) -> Iterator[Trace]:
    """Steer the rows whose prompt passes the condition (see module docstring); hooks removed on exit."""
    dec = _Decision(direction, threshold)

    def on_condition(_mod: nn.Module, _inp: Any, out: Any) -> None:
        if dec.value is None:
            dec.decide(output_tensor(out, condition.index).detach())

    with hooked(model, strength, expand, trace) as (state, handles):
        guard_hooks_under_compile(model)  # the pre-hook and the hooks below must be seen by compiled graphs
        handles.append(model.register_forward_pre_hook(_pre_hook(dec, state.trace), with_kwargs=True))
        # Registered before the steering hooks: at a site that is both, the condition reads the unsteered output.
        handles.append(get_module(model, condition).register_forward_hook(on_condition))
        for s in sites:
            hook = _site_hook(s, maps[s.name], gates[s.name], dec, state)
            handles.append(get_module(model, s).register_forward_hook(hook))
        yield state.trace if state.trace is not None else Trace()
