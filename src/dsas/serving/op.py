"""The steering op: `torch.ops.dsas.steer`, one call per steered site, over persistent buffers.

For the flattened tokens of a step h [N, d] it computes `dsas.rule.rule` with every token's parameters gathered
from per-site tables by a per-token row index:

    vec [R, 5, d]: shift, scale, lo, hi, w       sca [R, 7]: b, mult, relu (0. / 1.), floor, 1 / n, adds, first
    rows [max_tokens] (int64): each token's table row     lam [max_tokens]: each token's strength

Row 0 is "unsteered": zero shift and scale, an unbounded support, w = 0, mult = 0, and lam = 0, so the delta is
an exact zero and an unsteered token leaves the op bit for bit as it came in. A constant gate (vanilla
steering) is w = 0, b = 1, relu: g = relu(1) = 1 exactly.

Pooled gates (`DSASConfig.scope="below"`) keep one number per token across the sites of a forward pass: sites
where some steerer's gates are pooled call `torch.ops.dsas.steer_pooled`, which also takes `pool [max_tokens]`
and updates it in place. For a pooled row, `1 / n` is one over the count of that steerer's regulators at or below
the site, `adds` whether the site has a regulator of its own (its logit w . z + b joins the pool), `first` whether
it is the steerer's first (the pool restarts there, so nothing carries over from the last pass); the gate reads
sigmoid(pool / n), floored. Rows that are not pooled (1 / n = 0) leave the pool alone and take the usual rule.

Opaque to torch.compile (a fake implementation gives the output's shape), with no host sync, no `.item()` and
no data-dependent shape: CUDA graphs capture it like any kernel, and steering changes are buffer *content*
changes (rows, lam refilled in place each step), never a recompile or a recapture.

Registered through `torch.library.Library` (define + one backend-independent kernel + a fake), the way vLLM
registers its own ops, not with the `custom_op` decorator: the decorator's Python dispatch layers cost ~10 us
per call on CPU, ~0.6 ms per decode step over 60 sites, where the kernel of an idle step is a ~2 us copy.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from dsas.rule import Folded, SiteParams, fold, rule, rule_folded

VEC_FIELDS = ("shift", "scale", "lo", "hi", "w")
SCA_FIELDS = ("b", "mult", "relu", "floor", "inv_n", "adds", "first")


_LIB = torch.library.Library("dsas", "DEF")
_LIB.define("steer(Tensor h, Tensor rows, Tensor lam, Tensor vec, Tensor sca) -> Tensor")
_LIB.define(
    "steer_pooled(Tensor h, Tensor rows, Tensor lam, Tensor vec, Tensor sca, Tensor(a!) pool) -> Tensor"
)


class Activity:
    """Whether the current step has a steered token: set on the host when the step's rows are filled.

    Eager calls of an all-unsteered step return a copy without computing the rule (CPU serving, eager CUDA).
    While a CUDA graph is being captured the flag is ignored and the full rule is recorded, so replays steer
    whatever the buffers say."""

    steered: bool = True
    row: int = -1
    """The one table row every steered token of the step uses (-1: several rows, or not known). Eager CPU calls
    then take `one_row`: the rule without the per-token gather."""
    lam: tuple[torch.Tensor | None, int, torch.Tensor | None] = (None, 0, None)
    """(lam, N, lam[:N] as an [N, 1] column view) for `one_row`: the buffer is refilled in place, so the view
    stays current across steps and is made again only when the token count or the buffer changes."""


def _capturing(h: torch.Tensor) -> bool:
    return h.is_cuda and torch.cuda.is_current_stream_capturing()


def steer(
    h: torch.Tensor, rows: torch.Tensor, lam: torch.Tensor, vec: torch.Tensor, sca: torch.Tensor
) -> torch.Tensor:
    """h [N, d] -> h' [N, d]; rows and lam are read for the first N tokens."""
    if not _capturing(h):
        if not Activity.steered:
            return h.clone()
        if Activity.row > 0 and not h.is_cuda:
            return one_row(h, lam, vec, sca, Activity.row)
    return (gathered_rule if h.is_cuda else _fused())(h, rows, lam, vec, sca)


_LIB.impl("steer", steer, "CompositeExplicitAutograd")


def steer_pooled(
    h: torch.Tensor,
    rows: torch.Tensor,
    lam: torch.Tensor,
    vec: torch.Tensor,
    sca: torch.Tensor,
    pool: torch.Tensor,
) -> torch.Tensor:
    """`steer` at a site where some rows' gates are pooled; updates pool[:N] in place."""
    if not _capturing(h) and not Activity.steered:
        return h.clone()
    y, acc = (pooled_rule if h.is_cuda else _fused(pooled_rule))(h, rows, lam, vec, sca, pool)
    pool[: h.shape[0]].copy_(acc)
    return y


_LIB.impl("steer_pooled", steer_pooled, "CompositeExplicitAutograd")


_ROWS: dict[int, tuple[weakref.ref[torch.Tensor], dict[int, tuple[SiteParams, Folded]]]] = {}
"""id(table) -> (the table, its rows as SiteParams and folded). Keyed by id with the weak reference checked:
tensors compare elementwise, so they cannot be keys that a dict compares."""


def _row(vec: torch.Tensor, sca: torch.Tensor, r: int) -> tuple[SiteParams, Folded]:
    entry = _ROWS.get(id(vec))
    if entry is None or entry[0]() is not vec:
        key = id(vec)
        entry = _ROWS[key] = (weakref.ref(vec, lambda _r: _ROWS.pop(key, None)), {})
    per_table = entry[1]
    cached = per_table.get(r)
    if cached is None:
        v, c = vec[r], sca[r]
        if float(c[4]):
            raise ValueError("a pooled row is served by steer_pooled, not the one-row form")
        gated = bool(v[4].any()) or float(c[0]) != 1.0 or float(c[2]) == 0.0
        support = bool(torch.isfinite(v[2]).any() or torch.isfinite(v[3]).any())
        p = SiteParams(
            v[0],
            v[1] if bool(v[1].any()) else None,
            v[2] if support else None,
            v[3] if support else None,
            v[4] if gated else None,
            float(c[0]),
            float(c[1]),
            bool(c[2] > 0),
            floor=float(c[3]),
        )
        # mult folded once (strength 1); each step's per-token strengths enter `rule_folded` as `a`.
        cached = per_table[r] = (p, fold(p, torch.ones(1, device=vec.device), 2))
    return cached


def row_params(vec: torch.Tensor, sca: torch.Tensor, r: int) -> SiteParams:
    """Table row r as `SiteParams` (views), with neutral pieces left out so the folded rule skips them. Cached per
    table: tables are written once, at load."""
    return _row(vec, sca, r)[0]


def one_row(h: torch.Tensor, lam: torch.Tensor, vec: torch.Tensor, sca: torch.Tensor, r: int) -> torch.Tensor:
    """The rule when every steered token of the step uses table row r: the eager folded form (`rule_folded`, as
    HF `generate` runs it) over the whole batch, each token's strength a factor of its gate; unsteered tokens
    have strength 0, an exact zero delta. Four kernels for a DSAS site (addmm, sigmoid_, mul_, addcmul), one
    (addcmul) for a constant gate."""
    n = h.shape[0]
    buf, cached_n, col = Activity.lam
    if buf is not lam or cached_n != n or col is None:
        col = lam[:n].view(n, 1)
        Activity.lam = (lam, n, col)
    return rule_folded(h, _row(vec, sca, r)[1], col)


def gathered_rule(
    h: torch.Tensor, rows: torch.Tensor, lam: torch.Tensor, vec: torch.Tensor, sca: torch.Tensor
) -> torch.Tensor:
    """`rule` with each token's parameters gathered from the tables."""
    v, s = _gather(h, rows, vec, sca)
    y, _ = rule(h, _gathered_params(v, s, s[:, 0]), lam[: h.shape[0]])
    return y


def _gather(
    h: torch.Tensor, rows: torch.Tensor, vec: torch.Tensor, sca: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The table rows of the step's N tokens: vec [N, 5, d], sca [N, 7]."""
    r = rows[: h.shape[0]]
    return vec[r], sca[r]


def _gathered_params(v: torch.Tensor, s: torch.Tensor, b: float | torch.Tensor) -> SiteParams:
    """Per-token `SiteParams` from gathered rows, with gate bias `b`."""
    return SiteParams(v[:, 0], v[:, 1], v[:, 2], v[:, 3], v[:, 4], b, s[:, 1], s[:, 2] > 0, floor=s[:, 3])


def pooled_rule(
    h: torch.Tensor,
    rows: torch.Tensor,
    lam: torch.Tensor,
    vec: torch.Tensor,
    sca: torch.Tensor,
    pool: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gathered_rule` where pooled rows read the pool's mean logit; returns (h', the pool's new first N)."""
    n = h.shape[0]
    v, s = _gather(h, rows, vec, sca)
    own = (h.float() * v[:, 4]).sum(-1) + s[:, 0]  # w . z + b; a constant gate's is 1
    pooled = s[:, 4] > 0
    old = pool[:n]
    acc = torch.where(s[:, 6] > 0, 0.0, old) + torch.where(s[:, 5] > 0, own, 0.0)
    logit = torch.where(pooled, acc * s[:, 4], own)
    y, _ = rule(h, _gathered_params(v, s, 0.0), lam[:n], logit)  # the logit holds the biases already
    return y, torch.where(pooled, acc, old)


_FUSED: dict[Any, Any] = {}


def _fused(fn: Any = gathered_rule) -> Any:
    """`fn` compiled once (dynamic token count) into one fused CPU loop: eagerly the gather and the rule are ~15
    small ops per site (~330 us at 16 tokens x 576 on one core), fused ~10x less. On CUDA the eager ops are
    captured into vLLM's graphs, where per-op launch cost does not recur."""
    if fn not in _FUSED:
        _FUSED[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _FUSED[fn]


@torch.library.register_fake("dsas::steer")
def _(
    h: torch.Tensor, rows: torch.Tensor, lam: torch.Tensor, vec: torch.Tensor, sca: torch.Tensor
) -> torch.Tensor:
    return torch.empty_like(h)


@torch.library.register_fake("dsas::steer_pooled")
def _(h: torch.Tensor, *_tables: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(h)


def unsteered_row(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 (and any steerer's row at a site it does not steer): an exact zero delta."""
    vec = torch.zeros(5, d)
    vec[2], vec[3] = -torch.inf, torch.inf
    return vec, torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])


def pack_site(
    p: SiteParams, d: int, pool: tuple[int, bool] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One steerer's parameters at one site as a table row (fp32): absent pieces become their neutral values
    (scale 0, support (-inf, inf), constant gate w = 0, b = 1, relu). A pooled site (`p.pool`) needs `pool`: the
    count of the steerer's regulators at or below it, and whether it is the first of them."""
    vec, sca = unsteered_row(d)
    vec[0] = p.shift.float()
    if p.scale is not None:
        vec[1] = p.scale.float()
    if p.lo is not None and p.hi is not None:
        vec[2], vec[3] = p.lo.float(), p.hi.float()
    if p.w is not None:
        vec[4] = p.w.float()
        sca[0], sca[2], sca[3] = float(p.b), float(bool(p.relu)), float(p.floor)
    sca[1] = float(p.mult)
    if p.pool:  # a sigmoid of the pool's mean: no bias of its own unless it adds its regulator
        if pool is None:
            raise ValueError("a pooled site's row needs its regulator count and whether it is the first")
        n, first = pool
        adds = p.w is not None
        sca[0], sca[2], sca[3] = (float(p.b) if adds else 0.0), 0.0, float(p.floor)
        sca[4], sca[5], sca[6] = 1.0 / n, float(adds), float(first)
    return vec, sca
