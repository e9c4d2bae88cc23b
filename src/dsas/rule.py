"""The steering rule, written once:   z' = z + lam * g(z) * Δ(z),   Δ(z) = T(z) - z,   per token.

* Δ(z) = scale ⊙ z + shift, zero outside [lo, hi] where a support is set (every method's map, `dsas.maps`);
* g(z) = mult * phi(w . z + b), phi in {sigmoid, relu}; g = mult when there is no w (`dsas.gates`); a sigmoid
  gate with a floor f reads max(0, (sigmoid - f) / (1 - f)): exactly 0 where it is barely open, 1 stays 1;
* lam: one strength per batch row.

`rule` is the reference and the form every traced, compiled, training, diffusion and serving path calls.
`fold` + `rule_folded` are the same rule for eager token activations with lam * mult folded into the
displacement once per `apply`: a gated site is three kernels (gate logit as a [d -> 1] `addmm`, in-place
sigmoid, `addcmul`), a constant-gate site one `add`, and nothing is allocated per call besides the output.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.nn import functional as F

POOLED_SCOPES = ("below", "below+prefix")
"""Gate scopes that pool the logits of the regulators at or below the site in a forward pass."""
RUNNING_MEAN_SCOPES = ("prefix", "below+prefix")
"""Gate scopes that read a running mean over the sequence: a per-sequence state that eager generate() keeps
and that torch.compile and the vLLM op do not."""

_TENSORS = ("shift", "scale", "lo", "hi", "w")


@dataclass
class SiteParams:
    """One site's map and gate as the rule reads them. Tensors are [d], or [N, d] per token (serving).

    `b`, `mult`, `relu` and `floor` are Python scalars, 0-d tensors (compiled path) or [N] tensors (per token)."""

    shift: torch.Tensor
    scale: torch.Tensor | None = None
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    w: torch.Tensor | None = None
    """Gate weight; None is a constant gate g = mult (vanilla steering)."""
    b: float | torch.Tensor = 0.0
    mult: float | torch.Tensor = 1.0
    relu: bool | torch.Tensor = False
    prefix: bool = False
    """The gate reads the running mean of its logit over the sequence (`prefix_logit`), not each token's."""
    pool: bool = False
    """The gate's logit is the mean logit w_k . z_k + b_k of the pooled regulators at or below this site in the
    forward pass (`DSASConfig.scope="below"`, or "below+prefix" with `prefix`); `w`, `b`, when set, are this
    site's own contribution."""
    floor: float | torch.Tensor = 0.0
    """A sigmoid gate reads max(0, (sigmoid - floor) / (1 - floor)) (`DSASConfig.floor`)."""
    skip: int = 0
    """The running mean of a prefix gate leaves out the first `skip` real tokens of the sequence."""

    @classmethod
    def build(cls, m: Any, g: Any, device: torch.device | str = "cpu") -> SiteParams:
        """From a `SiteMap` and a `SiteGate`: fresh fp32 copies on `device`. Fresh memory matters: a kernel's
        rounding can depend on its operands' alignment, and tensors read from a file are not aligned, so a copy
        is what makes a loaded steerer reproduce the fitted one bit for bit."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(device=device, dtype=torch.float32).clone()

        shift = mv(m.shift)
        assert shift is not None
        w = mv(g.w) if g.kind not in ("const", "pooled") else None
        scope = getattr(g, "scope", "token")
        prefix = scope == "below+prefix" or (scope == "prefix" and w is not None)
        return cls(
            shift,
            mv(m.scale),
            mv(m.lo),
            mv(m.hi),
            w,
            float(g.b),
            float(g.mult),
            g.kind == "relu",
            prefix,
            scope in POOLED_SCOPES,
            float(getattr(g, "floor", 0.0)),
            int(getattr(g, "skip", 0)),
        )

    def on(self, device: torch.device | str) -> SiteParams:
        """A fresh copy on `device`."""
        return replace(
            self, **{k: getattr(self, k).to(device).clone() for k in _TENSORS if getattr(self, k) is not None}
        )

    def to(self, dtype: torch.dtype) -> SiteParams:
        return replace(
            self, **{k: getattr(self, k).to(dtype) for k in _TENSORS if getattr(self, k) is not None}
        )


def displacement(
    z: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor | None = None,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
) -> torch.Tensor:
    """Δ(z) = scale ⊙ z + shift, zero outside [lo, hi] when a support is given."""
    d = shift if scale is None else torch.addcmul(shift, z, scale)
    if lo is not None and hi is not None:
        d = torch.where((z >= lo) & (z <= hi), d, 0.0)
    return d


def logit(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w . z per token. Under torch.compile an elementwise product + sum fuses with the update (and takes a
    per-token w [N, d]); eagerly a matvec is faster."""
    return (z * w).sum(-1) if w.dim() > 1 or torch.compiler.is_compiling() else z @ w


def prefix_logit(
    s: torch.Tensor, real: torch.Tensor, carry: tuple[torch.Tensor, torch.Tensor], skip: int = 0
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Running mean of the logits s [B, T] over the real tokens so far (`real` [B, T] in {0, 1}), continuing the
    sums and counts `carry` ([B], [B]) of earlier passes. Returns the means and the new carry. With `skip`, the
    first `skip` real tokens of the sequence are left out (the carry counts every real token, sums the kept
    ones), and until a token is kept the logit is -inf: the gate is shut on the skipped tokens, which nothing
    was fitted on (a BOS token, the attention sink; steering it would move every later token of every prompt)."""
    cn = carry[1][:, None] + torch.cumsum(real, 1)
    if skip:
        real = real * (cn > skip)
    cs = carry[0][:, None] + torch.cumsum(s * real, 1)
    mean = cs / (cn - skip).clamp_min(1)
    if skip:
        mean = mean.masked_fill(cn <= skip, float("-inf"))
    return mean, (cs[:, -1], cn[:, -1])


def gate(
    z: torch.Tensor,
    w: torch.Tensor | None,
    b: float | torch.Tensor = 0.0,
    mult: float | torch.Tensor = 1.0,
    relu: bool | torch.Tensor = False,
    s: torch.Tensor | None = None,
    floor: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """g(z) = mult * phi(w . z + b) for z [..., d] -> [...]; `mult` broadcast to z's tokens without w. `s`, when
    given, replaces w . z (a prefix gate's running mean, a pooled gate's mean logit). A sigmoid is floored:
    max(0, (sigmoid - floor) / (1 - floor))."""
    if w is None and s is None:
        return torch.as_tensor(mult, dtype=z.dtype, device=z.device).expand(z.shape[:-1])
    if s is None:
        assert w is not None
        s = logit(z, w)
    s = s.to(z.dtype) + b
    if not isinstance(relu, torch.Tensor) and relu:
        return mult * torch.relu(s)
    phi = torch.sigmoid(s)
    if isinstance(floor, torch.Tensor) or floor != 0:
        phi = ((phi - floor) * (1 / (1 - floor))).clamp_min(0)
    if isinstance(relu, torch.Tensor):
        phi = torch.where(relu, torch.relu(s), phi)
    return mult * phi


def rule(
    h: torch.Tensor, p: SiteParams, lam: torch.Tensor, s: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule on one site output h: [B, T, d], [B, d] / [N, d], or [B, C, H, W] (channels = d, every location
    a token). lam: [B] (or [N]) strengths; s: the gate logits w . z to use instead of each token's (a prefix
    gate). Returns (h', a) with a = lam * g, h'.shape minus the feature dim.

    Math in fp32 at least (float64 stays float64, so strength 0 is the identity there too), cast back to h's
    dtype."""
    chan_first = h.dim() == 4
    ct = torch.promote_types(h.dtype, torch.float32)
    z = (h.movedim(1, -1) if chan_first else h).to(ct)
    if ct != torch.float32:
        p = p.to(ct)
    lam = lam.to(ct).view(-1, *([1] * (z.dim() - 2)))
    a = lam * gate(z, p.w, p.b, p.mult, p.relu, s, p.floor)
    y = torch.addcmul(z, a.unsqueeze(-1), displacement(z, p.shift, p.scale, p.lo, p.hi)).to(h.dtype)
    return (y.movedim(-1, 1) if chan_first else y), a


@dataclass
class Folded:
    """One site's parameters with k = lam * mult folded into the displacement (`fold`)."""

    shift: torch.Tensor
    """k * shift: [d] for one strength, [B, 1.., d] for one per row."""
    scale: torch.Tensor | None
    lo: torch.Tensor | None
    hi: torch.Tensor | None
    w: torch.Tensor | None
    """The gate vector as a [1, d] `linear` weight."""
    b: torch.Tensor | None
    """The gate bias as a [1] `linear` bias."""
    relu: bool
    floor: float = 0.0

    @property
    def plain(self) -> bool:
        """A constant shift: the whole site is one add."""
        return self.w is None and self.scale is None and self.lo is None


def fold(p: SiteParams, lam: torch.Tensor, ndim: int) -> Folded:
    """`p` with k = lam * mult folded into Δ, for token activations of `ndim` dims. lam: [1] (every row alike:
    the result serves any batch) or [B] on the parameters' device."""
    k = lam * p.mult
    k = k.reshape(()) if k.numel() == 1 else k.view(-1, *([1] * (ndim - 1)))
    shift = (k * p.shift).contiguous()
    scale = None if p.scale is None else (k * p.scale).contiguous()
    w = None if p.w is None else p.w.view(1, -1)
    b = None if p.w is None else torch.full((1,), float(p.b), dtype=torch.float32, device=p.shift.device)
    return Folded(shift, scale, p.lo, p.hi, w, b, bool(p.relu), float(p.floor))


def rule_folded(h: torch.Tensor, f: Folded, a: torch.Tensor | None = None) -> torch.Tensor:
    """`rule` for eager token activations h [B, T, d] / [B, d] with lam * mult folded in (`fold`):
    y = z + phi(w . z + b) * (k Δ(z)). A bf16 / fp16 h is promoted inside the add of a plain site, and
    upcast once (and cast back) otherwise.

    `a` [N, 1], when given, is one more per-token factor of the gate (the serving op folds mult once per
    table row and passes each token's strength here): y = z + a * phi(w . z + b) * (k Δ(z))."""
    if f.plain and a is None:
        y = h + f.shift
        return y if y.dtype == h.dtype else y.to(h.dtype)
    z = h.float()  # h itself when h is fp32
    delta = displacement(z, f.shift, f.scale, f.lo, f.hi)
    if f.w is None:
        y = z + delta if a is None else torch.addcmul(z, a, delta)
    else:
        g = F.linear(z, f.w, f.b)  # [..., 1]: w . z + b in one addmm
        if f.relu:
            g = g.relu_()
        else:
            g = g.sigmoid_()
            if f.floor:
                g = g.sub_(f.floor).clamp_min_(0).mul_(1 / (1 - f.floor))
        y = torch.addcmul(z, g if a is None else g.mul_(a), delta)
    return y if y.dtype == h.dtype else y.to(h.dtype)
