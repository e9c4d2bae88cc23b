"""The steering op: `torch.ops.dsas.steer`, one call per steered site, over persistent buffers.

For the flattened tokens of a step h [N, d] it computes `dsas.rule.rule` with every token's parameters gathered
from per-site tables by a per-token row index:

    vec [R, 5, d]: shift, scale, lo, hi, w       sca [R, 3]: b, mult, relu (0. / 1.)
    rows [max_tokens] (int64): each token's table row     lam [max_tokens]: each token's strength

Row 0 is "unsteered": zero shift and scale, an unbounded support, w = 0, mult = 0, and lam = 0, so the delta is
an exact zero and an unsteered token leaves the op bit for bit as it came in. A constant gate (vanilla
steering) is w = 0, b = 1, relu: g = relu(1) = 1 exactly.

Opaque to torch.compile (a fake implementation gives the output's shape), with no host sync, no `.item()` and
no data-dependent shape: CUDA graphs capture it like any kernel, and steering changes are buffer *content*
changes (rows, lam refilled in place each step), never a recompile or a recapture.
"""

from __future__ import annotations

from typing import Any

import torch

from dsas.rule import SiteParams, rule

VEC_FIELDS = ("shift", "scale", "lo", "hi", "w")
SCA_FIELDS = ("b", "mult", "relu")


class Activity:
    """Whether the current step has a steered token: set on the host when the step's rows are filled.

    Eager calls of an all-unsteered step return a copy without computing the rule (CPU serving, eager CUDA).
    While a CUDA graph is being captured the flag is ignored and the full rule is recorded, so replays steer
    whatever the buffers say."""

    steered: bool = True


def _capturing(h: torch.Tensor) -> bool:
    return h.is_cuda and torch.cuda.is_current_stream_capturing()


@torch.library.custom_op("dsas::steer", mutates_args=())
def steer(
    h: torch.Tensor, rows: torch.Tensor, lam: torch.Tensor, vec: torch.Tensor, sca: torch.Tensor
) -> torch.Tensor:
    """h [N, d] -> h' [N, d]; rows and lam are read for the first N tokens."""
    if not Activity.steered and not _capturing(h):
        return h.clone()
    return (gathered_rule if h.is_cuda else _fused())(h, rows, lam, vec, sca)


def gathered_rule(
    h: torch.Tensor, rows: torch.Tensor, lam: torch.Tensor, vec: torch.Tensor, sca: torch.Tensor
) -> torch.Tensor:
    """`rule` with each token's parameters gathered from the tables."""
    n = h.shape[0]
    r = rows[:n]
    v = vec[r]  # [N, 5, d]
    s = sca[r]  # [N, 3]
    p = SiteParams(v[:, 0], v[:, 1], v[:, 2], v[:, 3], v[:, 4], s[:, 0], s[:, 1], s[:, 2] > 0)
    y, _ = rule(h, p, lam[:n])
    return y


_FUSED: list[Any] = []


def _fused() -> Any:
    """`gathered_rule` compiled once (dynamic token count) into one fused CPU loop: eagerly the gather and the
    rule are ~15 small ops per site (~330 us at 16 tokens x 576 on one core), fused ~10x less. On CUDA the
    eager ops are captured into vLLM's graphs, where per-op launch cost does not recur."""
    if not _FUSED:
        _FUSED.append(torch.compile(gathered_rule, dynamic=True, fullgraph=True))
    return _FUSED[0]


@steer.register_fake
def _(
    h: torch.Tensor, rows: torch.Tensor, lam: torch.Tensor, vec: torch.Tensor, sca: torch.Tensor
) -> torch.Tensor:
    return torch.empty_like(h)


def unsteered_row(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 (and any steerer's row at a site it does not steer): an exact zero delta."""
    vec = torch.zeros(5, d)
    vec[2], vec[3] = -torch.inf, torch.inf
    return vec, torch.tensor([1.0, 0.0, 1.0])


def pack_site(p: SiteParams, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One steerer's parameters at one site as a table row (fp32): absent pieces become their neutral values
    (scale 0, support (-inf, inf), constant gate w = 0, b = 1, relu)."""
    vec, sca = unsteered_row(d)
    vec[0] = p.shift.float()
    if p.scale is not None:
        vec[1] = p.scale.float()
    if p.lo is not None and p.hi is not None:
        vec[2], vec[3] = p.lo.float(), p.hi.float()
    if p.w is not None:
        vec[4] = p.w.float()
        sca[0], sca[2] = float(p.b), float(bool(p.relu))
    sca[1] = float(p.mult)
    return vec, sca
