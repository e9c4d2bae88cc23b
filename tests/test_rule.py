"""The rule, every form of it, against an independent reference written out here (not dsas' own helpers)."""

from __future__ import annotations

import pytest
import torch

from dsas.rule import SiteParams, displacement, fold, gate, rule, rule_folded


def reference(z, lam, shift, scale=None, lo=None, hi=None, w=None, b=0.0, mult=1.0, relu=False, floor=0.0):
    """z' = z + lam * g(z) * Δ(z), one token at a time, in float64."""
    z64 = z.double().contiguous()
    out = torch.empty(z64.shape, dtype=torch.float64)
    a_out = torch.empty(z.shape[:-1], dtype=torch.float64)
    flat, flat_out, flat_a = z64.reshape(-1, z.shape[-1]), out.view(-1, z.shape[-1]), a_out.view(-1)
    rows = z.shape[0]
    per_row = flat.shape[0] // rows
    for t in range(flat.shape[0]):
        x = flat[t]
        delta = shift.double() + (0 if scale is None else scale.double() * x)
        if lo is not None:
            delta = delta * ((x >= lo.double()) & (x <= hi.double())).double()
        if w is None:
            g = mult
        else:
            s = float(x @ w.double()) + b
            sig = float(1 / (1 + torch.exp(torch.tensor(-s, dtype=torch.float64))))
            g = mult * (max(s, 0.0) if relu else max(sig - floor, 0.0) / (1 - floor))
        a = float(lam[t // per_row]) * float(g)
        flat_a[t] = a
        flat_out[t] = x + a * delta
    return out, a_out


def _params(d, kind, seed=0, support=True):
    gen = torch.Generator().manual_seed(seed)
    shift, scale = torch.randn(d, generator=gen), torch.randn(d, generator=gen) * 0.1
    lo = hi = None
    if support:
        lo, hi = torch.full((d,), -1.0), torch.full((d,), 1.0)
    w = None if kind == "const" else torch.randn(d, generator=gen) * 0.3
    floor = 0.6 if kind == "floored" else 0.0
    return SiteParams(shift, scale, lo, hi, w, 0.3, 0.7, kind == "relu", floor=floor)


KINDS = ["const", "sigmoid", "relu", "floored"]


@pytest.mark.parametrize("kind", KINDS)
def test_rule_matches_the_reference(kind):
    d = 16
    z = torch.randn(2, 5, d, generator=torch.Generator().manual_seed(1))
    p = _params(d, kind)
    lam = torch.tensor([0.5, 2.0])
    y, a = rule(z, p, lam)
    ry, ra = reference(z, lam, p.shift, p.scale, p.lo, p.hi, p.w, p.b, p.mult, p.relu, float(p.floor))
    if kind == "floored":  # some tokens exactly closed, some open
        assert 0 < int((a == 0).sum()) < a.numel()
    torch.testing.assert_close(a.double(), ra, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("support", [False, True])
def test_folded_form_equals_the_rule(kind, per_row, support):
    d = 16
    z = torch.randn(3, 4, d, generator=torch.Generator().manual_seed(2))
    p = _params(d, kind, support=support)
    lam = torch.tensor([0.5, 2.0, 4.0]) if per_row else torch.tensor([3.0])
    y_ref, _ = rule(z, p, lam.expand(3))
    y = rule_folded(z, fold(p, lam, z.dim()))
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    if not per_row:  # one fold serves every batch size and rank
        z2 = torch.randn(5, d)
        torch.testing.assert_close(rule_folded(z2, fold(p, lam, 3)), rule(z2, p, lam.expand(5))[0])


def test_folded_plain_site_is_one_add_in_bf16():
    d = 8
    p = SiteParams(torch.randn(d))
    z = torch.randn(2, 3, d).to(torch.bfloat16)
    f = fold(p, torch.tensor([2.0]), 3)
    assert f.plain
    y = rule_folded(z, f)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, (z.float() + 2.0 * p.shift).to(torch.bfloat16))


def test_per_token_parameters_serve_a_flattened_batch():
    """Serving gathers each token's parameters ([N, d], [N] scalars): the rule takes them as they are."""
    d, n = 8, 6
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(n, d, generator=gen)
    slots = [_params(d, k, seed=i) for i, k in enumerate(("sigmoid", "relu", "const", "floored"))]
    which = [0, 1, 2, 3, 2, 3]
    ws = [s.w if s.w is not None else torch.zeros(d) for s in slots]
    bs = [s.b if s.w is not None else 1.0 for s in slots]  # const gate = relu(0 . z + 1) = 1
    relus = [bool(s.relu) or s.w is None for s in slots]
    p = SiteParams(
        torch.stack([slots[i].shift for i in which]),
        torch.stack([slots[i].scale for i in which]),
        torch.stack([slots[i].lo for i in which]),
        torch.stack([slots[i].hi for i in which]),
        torch.stack([ws[i] for i in which]),
        torch.tensor([bs[i] for i in which]),
        torch.tensor([slots[i].mult for i in which]),
        torch.tensor([relus[i] for i in which]),
        floor=torch.tensor([float(slots[i].floor) for i in which]),
    )
    lam = torch.tensor([1.0, 2.0, 3.0, 0.5, 0.0, 4.0])
    y, _ = rule(z, p, lam)
    for t, i in enumerate(which):
        yt, _ = rule(z[t : t + 1], slots[i], lam[t : t + 1])
        torch.testing.assert_close(y[t : t + 1], yt, rtol=1e-6, atol=1e-6)


def test_feature_maps_are_steered_per_location():
    c = 8
    x = torch.randn(2, c, 3, 4, generator=torch.Generator().manual_seed(4))
    p = _params(c, "sigmoid", support=False)
    lam = torch.tensor([1.0, 3.0])
    y, a = rule(x, p, lam)
    assert a.shape == (2, 3, 4) and y.shape == x.shape
    ry, ra = reference(x.movedim(1, -1), lam, p.shift, p.scale, None, None, p.w, p.b, p.mult, p.relu)
    torch.testing.assert_close(y.double(), ry.movedim(-1, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.double(), ra, rtol=1e-6, atol=1e-6)


def test_strength_zero_is_the_identity_in_every_dtype():
    p = _params(8, "sigmoid")
    for dt in (torch.float64, torch.float32, torch.bfloat16):
        z = torch.randn(2, 3, 8).to(dt)
        assert torch.equal(rule(z, p, torch.zeros(2))[0], z)
        if dt != torch.float64:
            assert torch.equal(rule_folded(z, fold(p, torch.zeros(1), 3)), z)


def test_displacement_and_gate_pieces():
    z = torch.tensor([[0.5, 2.0]])
    d = displacement(
        z, torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]), torch.tensor([-1.0, -1.0]), torch.ones(2)
    )
    assert d.tolist() == [[2.0, 0.0]]  # 2 * 0.5 + 1 inside the support, 0 outside
    assert gate(z, None, mult=0.5).tolist() == [0.5]
    assert gate(z, torch.tensor([1.0, 0.0]), -0.5, 2.0, relu=True).tolist() == [0.0]


def test_a_floor_closes_the_gate_exactly_and_keeps_a_full_gate_at_one():
    """g = max(0, (sigmoid - f) / (1 - f)): 0 at and under the floor, 1 stays 1, continuous in between."""
    w = torch.tensor([1.0])
    z = torch.tensor([[-3.0], [0.0], [0.40], [1.0], [40.0]])  # sigmoid(0.40) = 0.5987 < 0.6
    g = gate(z, w, floor=0.6)
    assert g[:3].tolist() == [0.0, 0.0, 0.0]
    assert abs(g[-1].item() - 1.0) < 1e-6
    assert abs(g[3].item() - (torch.sigmoid(torch.tensor(1.0)).item() - 0.6) / 0.4) < 1e-6
    assert torch.equal(gate(z, w, floor=0.0), torch.sigmoid(z[:, 0]))  # no floor: the paper's sigmoid
