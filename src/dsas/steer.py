"""The steering rule as forward hooks:  z' = z + lam * g(z) * Δ(z),  per token, at every site.

`steer_tensor` is the whole rule (one screen). `steering` installs it on a model for the span of a `with` block
and removes every hook in `finally`. Every term depends only on the current token, so prefill and each cached
decode step scale their own tokens: cached and uncached generation agree, and padding does not leak across rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dsas.gates import SiteGate
from dsas.maps import SiteMap
from dsas.sites import Site, get_module, output_tensor, replace_output


@dataclass
class SiteParams:
    """Everything the hook of one site needs, already on the activation's device, fp32."""

    shift: torch.Tensor
    scale: torch.Tensor | None
    lo: torch.Tensor | None
    hi: torch.Tensor | None
    w: torch.Tensor | None
    b: float
    mult: float
    relu: bool

    @classmethod
    def build(cls, m: SiteMap, g: SiteGate, device: torch.device) -> SiteParams:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=torch.float32).contiguous()

        shift = mv(m.shift)
        assert shift is not None
        w = mv(g.w) if g.kind != "const" else None
        return cls(shift, mv(m.scale), mv(m.lo), mv(m.hi), w, float(g.b), float(g.mult), g.kind == "relu")


def steer_tensor(h: torch.Tensor, p: SiteParams, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the rule to one site output. h: [B, T, d], [B, d] or [B, C, H, W] (channels = d).

    lam: [B] fp32 strengths. Returns (h', a) with a = lam * g of shape h'.shape minus the feature dim.
    Math in fp32, cast back to h's dtype.
    """
    chan_first = h.dim() == 4
    z = (h.movedim(1, -1) if chan_first else h).float()
    lam = lam.view(-1, *([1] * (z.dim() - 2)))
    if p.w is None:
        a = (lam * p.mult).expand(z.shape[:-1])
    else:
        # Under torch.compile an elementwise product + sum fuses with the add below; eagerly a matvec is faster.
        s = (z * p.w).sum(-1) if torch.compiler.is_compiling() else z @ p.w
        s = s + p.b
        a = lam * (p.mult * (torch.relu(s) if p.relu else torch.sigmoid(s)))
    delta = p.shift if p.scale is None else torch.addcmul(p.shift, z, p.scale)
    if p.lo is not None and p.hi is not None:
        delta = torch.where((z >= p.lo) & (z <= p.hi), delta, 0.0)
    y = torch.addcmul(z, a.unsqueeze(-1), delta).to(h.dtype)
    return (y.movedim(-1, 1) if chan_first else y), a


@dataclass
class Trace:
    """Per-token scales lam * g seen at each site while steering.

    scales: {site: Tensor[batch, tokens]} aligned with token positions across prefill and every cached decode
            step (an uncached pass that restarts at position 0 overwrites). With beam search, rows are beam
            slots, not final hypotheses. For 4-D (image) sites the last call's [batch, H, W] map is kept.
    mask:   the attention mask of the last forward pass ([batch, tokens]) when the model received one.
    calls:  every hook call in order as (site, offset, scale), for per-step analyses (e.g. diffusion steps).
    """

    calls: list[tuple[str, int, torch.Tensor]] = field(default_factory=list)
    mask: torch.Tensor | None = None
    _offset: int = 0

    @property
    def scales(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for site, off, a in self.calls:
            a = a.float().cpu()
            prev = out.get(site)
            if a.dim() != 2 or prev is None or off == 0:
                out[site] = a
            else:
                out[site] = torch.cat([prev[:, :off], a], dim=1)
        return out

    def site_mean(self) -> torch.Tensor:
        """Mean scale over sites, [batch, tokens]: the paper's Figure-1 per-token view."""
        s = [v for v in self.scales.values() if v.dim() == 2]
        if not s:
            raise ValueError("No token-level scales were traced.")
        return torch.stack(s).mean(0)


class _State:
    """Run-time state shared by the hooks of one `steering` block."""

    def __init__(self, lam: torch.Tensor, expand: str, trace: Trace | None):
        self.lam = lam
        self.expand = expand
        self.trace = trace
        self._lam_cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    def lam_for(self, batch: int, device: torch.device) -> torch.Tensor:
        key = (batch, device)
        lam = self._lam_cache.get(key)
        if lam is None:
            n = self.lam.numel()
            if n == 1 or n == batch:
                lam = self.lam.expand(batch) if n == 1 else self.lam
            elif batch % n == 0:
                # generate() repeats rows for beams / num_return_sequences (interleave); CFG concatenates (tile).
                k = batch // n
                lam = self.lam.repeat_interleave(k) if self.expand == "interleave" else self.lam.repeat(k)
            else:
                raise ValueError(
                    f"strength has {n} values but the batch has {batch} rows: pass one float, or one strength "
                    "per prompt (per batch row)."
                )
            lam = lam.to(device=device, dtype=torch.float32).contiguous()
            self._lam_cache[key] = lam
        return lam


def _make_hook(site: Site, m: SiteMap, g: SiteGate, state: _State) -> Any:
    params: dict[torch.device, SiteParams] = {}

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> Any:
        h = output_tensor(out, site.index)
        d = h.shape[1] if h.dim() == 4 else h.shape[-1]
        if d != m.dim:
            raise ValueError(
                f"Site {site.name} outputs {d} features but the steerer was fitted with {m.dim}: "
                "this steerer belongs to another model."
            )
        p = params.get(h.device)
        if p is None:
            p = params[h.device] = SiteParams.build(m, g, h.device)
        y, a = steer_tensor(h, p, state.lam_for(h.shape[0], h.device))
        if state.trace is not None:
            state.trace.calls.append((site.name, state.trace._offset, a.detach()))
        return replace_output(out, y, site.index)

    return hook


def _trace_pre_hook(trace: Trace) -> Any:
    """Reads the cache length and mask of each top-level forward, so scales land at the right positions."""

    def pre(_mod: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        off = 0
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and isinstance(ids, torch.Tensor):
            # generate() passes the mask of past + current tokens: the current chunk starts where it ends.
            off = mask.shape[1] - ids.shape[1]
            trace.mask = mask.detach().cpu()
        else:
            # transformers 4 calls the cache `past_key_values`, transformers 5 `cache`.
            cache = kwargs.get("past_key_values", kwargs.get("cache"))
            if cache is not None and hasattr(cache, "get_seq_length"):
                off = int(cache.get_seq_length())
        trace._offset = max(off, 0)

    return pre


def as_strength(strength: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    lam = torch.as_tensor(strength, dtype=torch.float32).reshape(-1).detach().cpu()
    if lam.numel() == 0:
        raise ValueError("strength is empty: pass a float or one value per batch row.")
    if not torch.isfinite(lam).all():
        raise ValueError(f"strength must be finite, got {lam.tolist()}.")
    return lam


@contextmanager
def steering(
    model: nn.Module,
    sites: Sequence[Site],
    maps: dict[str, SiteMap],
    gates: dict[str, SiteGate],
    strength: float | Sequence[float] | torch.Tensor = 1.0,
    *,
    trace: bool = False,
    expand: str = "interleave",
) -> Iterator[Trace]:
    """Install steering hooks on `model` for the span of the block; they are removed even on error."""
    if getattr(model, "_dsas_steering", False):
        raise RuntimeError(
            "A steerer is already applied to this model: exit its `with` block first. Nested steering is "
            "refused so that every token's scale is well defined."
        )
    if expand not in ("interleave", "tile"):
        raise ValueError(
            "expand must be 'interleave' (beams, generate) or 'tile' (classifier-free guidance)."
        )
    state = _State(as_strength(strength), expand, Trace() if trace else None)
    handles = []
    try:
        model._dsas_steering = True  # type: ignore[assignment]
        if state.trace is not None:
            handles.append(model.register_forward_pre_hook(_trace_pre_hook(state.trace), with_kwargs=True))
        for s in sites:
            handles.append(
                get_module(model, s).register_forward_hook(_make_hook(s, maps[s.name], gates[s.name], state))
            )
        yield state.trace if state.trace is not None else Trace()
    finally:
        for h in handles:
            h.remove()
        model._dsas_steering = False  # type: ignore[assignment]
