"""Steering maps ("how"): every method reduces to a per-site displacement Δ_l(z) = T_l(z) - z.

One affine form covers the paper's methods, so the run-time hook has a single code path:

    Δ(z) = scale ⊙ z + shift                (inside the support lo <= z <= hi, else 0, when a support is set)

* CAA:        shift = mean(target) - mean(source), scale = None
* ITI:        shift = σ θ ⊙ m (mass-mean direction times its std, masked to the top-k units)
* LinEAS:     T(z) = (1 + δ) ⊙ z + b  ->  scale = δ, shift = b
* Linear-AcT: per-unit 1-D OT line ω z + b, applied inside the source support -> scale = ω - 1, shift = b
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SiteMap:
    """Displacement of one site, fp32: Δ(z) = scale ⊙ z + shift (masked to [lo, hi] when given)."""

    shift: torch.Tensor
    scale: torch.Tensor | None = None
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None

    def displacement(self, z: torch.Tensor) -> torch.Tensor:
        """Reference (unfused) Δ(z) for z[..., d]; the hooks in steer.py compute the same thing."""
        d = self.shift.expand_as(z) if self.scale is None else self.scale * z + self.shift
        if self.lo is not None and self.hi is not None:
            d = torch.where((z >= self.lo) & (z <= self.hi), d, torch.zeros_like(d))
        return d

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
