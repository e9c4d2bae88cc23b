"""The serving op and its buffers, without an engine: the rule per token, exact zero rows, torch.compile."""

from __future__ import annotations

import pytest

# Skipped where vLLM is not installed (the main .venv): these tests run in .venv-vllm.
pytest.importorskip("vllm.entrypoints.llm")

import torch

from dsas.rule import SiteParams, rule
from dsas.serving.op import Activity, pack_site, row_params, steer, unsteered_row
from dsas.serving.spec import RequestSteering, parse_request, parse_steerers
from dsas.serving.state import ServingState, SiteTable

D = 16


def _sites() -> list[SiteParams]:
    g = torch.Generator().manual_seed(0)
    r = lambda: torch.randn(D, generator=g)  # noqa: E731
    return [
        SiteParams(r(), w=r(), b=0.3, mult=1.0),  # DSAS: sigmoid gate
        SiteParams(
            r(), scale=0.1 * r(), lo=-torch.ones(D), hi=torch.ones(D), w=r(), b=-0.2, mult=2.0, relu=True
        ),
        SiteParams(r(), mult=1.0),  # vanilla: constant gate
        SiteParams(r(), w=r(), b=0.5, mult=1.0, floor=0.6),  # a floored sigmoid: exactly 0 on some tokens
    ]


def _table(sites: list[SiteParams]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [unsteered_row(D), *(pack_site(p, D) for p in sites)]
    return torch.stack([v for v, _ in rows]), torch.stack([s for _, s in rows])


def test_each_token_gets_its_rows_rule_and_row_zero_is_exact():
    sites = _sites()
    vec, sca = _table(sites)
    h = torch.randn(7, D, generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([0, 1, 2, 3, 4, 0, 3, 4, 0], dtype=torch.int64)  # longer than the step: padding
    lam = torch.tensor([0.0, 1.0, 4.0, 2.0, 0.5, 0.0, 3.0, 2.0, 0.0])
    y = steer(h, rows, lam, vec, sca)
    for t in range(7):
        r = int(rows[t])
        if r == 0:
            assert torch.equal(y[t], h[t])
        else:
            ref, _ = rule(h[t : t + 1], sites[r - 1], lam[t : t + 1])
            torch.testing.assert_close(y[t : t + 1], ref, rtol=1e-6, atol=1e-6)
    Activity.steered = False
    try:
        assert torch.equal(steer(h, rows, lam, vec, sca), h)
    finally:
        Activity.steered = True


@pytest.mark.parametrize("row", [1, 2, 3, 4])
def test_a_step_with_one_steerer_takes_the_folded_form(row):
    """When every steered token of a step uses one row (the host says so), the op runs the eager folded rule
    without gathering: the same result as the per-token rule, unsteered tokens (strength 0) bit for bit."""
    sites = _sites()
    vec, sca = _table(sites)
    h = torch.randn(6, D, generator=torch.Generator().manual_seed(2))
    rows = torch.tensor([row, 0, row, row, 0, row, 0], dtype=torch.int64)
    lam = torch.tensor([1.0, 0.0, 4.0, 2.0, 0.0, 0.5, 0.0])
    Activity.row = row
    try:
        y = steer(h, rows, lam, vec, sca)
    finally:
        Activity.row = -1
    ref = steer(h, rows, lam, vec, sca)  # the gathered per-token rule
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(y[[1, 4]], h[[1, 4]])
    p = row_params(vec, sca, row)
    assert (p.w is None) == (row == 3) and (p.scale is None) == (row != 2) and (p.lo is None) == (row != 2)
    assert p.floor == pytest.approx(0.6 if row == 4 else 0.0)


def test_fill_says_when_one_steerer_serves_the_step():
    rows, lam = torch.zeros(10, dtype=torch.int64), torch.zeros(10)
    state = ServingState(("a", "b"), {"m": SiteTable(*_table(_sites()[:2]))}, rows, lam, rows, lam)
    state.fill([(3, RequestSteering("b", 2.0)), (1, None), (2, RequestSteering("b", 0.5))])
    assert state.single_row == 2
    state.fill([(3, RequestSteering("b", 2.0)), (2, RequestSteering("a", 0.5))])
    assert state.single_row == -1
    state.fill([(2, None)])
    assert state.single_row == -1


def test_the_op_compiles_without_graph_breaks_and_follows_buffer_contents():
    vec, sca = _table(_sites())
    rows = torch.zeros(8, dtype=torch.int64)
    lam = torch.zeros(8)
    lin = torch.nn.Linear(D, D)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.dsas.steer(lin(x), rows, lam, vec, sca) * 2

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    x = torch.randn(5, D)
    with torch.no_grad():
        assert torch.equal(compiled(x), lin(x) * 2)
        rows[:5] = torch.tensor([1, 2, 3, 0, 1])
        lam[:5] = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0])
        torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)
        assert not torch.equal(compiled(x), lin(x) * 2)


def test_fill_writes_the_step_layout_and_clears_what_the_last_step_left():
    rows, lam = torch.zeros(10, dtype=torch.int64), torch.zeros(10)
    state = ServingState(
        ("a", "b"), {"m": SiteTable(*_table(_sites()[:2]))}, rows, lam, rows, lam
    )  # CPU layout
    assert state.fill([(3, RequestSteering("b", 2.0)), (1, None), (2, RequestSteering("a", 0.5))])
    assert state.rows.tolist() == [2, 2, 2, 0, 1, 1, 0, 0, 0, 0]
    assert state.lam.tolist() == [2.0, 2.0, 2.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert not state.fill([(2, None)])
    assert state.rows.tolist() == [0] * 10 and state.lam.tolist() == [0.0] * 10
    state.admit("r1", RequestSteering("a", 1.0))
    state.admit("r2", None)
    assert state.active == {"a": 1}
    state.finish(["r1", "r2", "unknown"])
    assert not state.active and not state.requests


def test_request_and_operator_parsing():
    assert parse_steerers(" tox=runs/tox , van=/x ")["van"].as_posix() == "/x"
    for bad in ("tox", "=x", "t ox=x", "a=x,a=y", ","):
        with pytest.raises(ValueError):
            parse_steerers(bad)
    names = ("tox",)
    assert parse_request(None, names) is None and parse_request({"other": 1}, names) is None
    assert parse_request({"dsas_steerer": "tox"}, names) == RequestSteering("tox", 1.0)
    assert parse_request({"dsas_steerer": "tox", "dsas_strength": 3}, names) == RequestSteering("tox", 3.0)
    for bad, msg in (
        ({"dsas_steerer": "x"}, "Unknown steerer 'x'"),
        ({"dsas_steerer": "tox", "dsas_strength": float("inf")}, "finite"),
        ({"dsas_steerer": "tox", "dsas_strength": True}, "finite"),
        ({"dsas_steerer": ["tox"]}, "Unknown steerer"),
        ({"dsas_strength": 1.0}, "without"),
        ({"dsas_steer": "tox"}, "Unknown steering argument"),
    ):
        with pytest.raises(ValueError, match=msg):
            parse_request(bad, names)


@pytest.mark.parametrize("first_mult", [1.0, 0.0])
def test_pooled_rows_read_the_mean_logit_of_their_steerers_regulators_so_far(first_mult):
    """Three sites in forward order; steerer 1 pooled (regulator, borrower, regulator), steerer 2 a per-token
    sigmoid gate at every site, row 0 unsteered, all in one step. Each pooled token's gate at site k is
    sigmoid(mean of its steerer's regulator logits at or below k), floored; the pool restarts at the first
    regulator, so a stale pool from an earlier pass changes nothing. With `first_mult` 0 the first site is a
    reader of `DSASConfig.split`: its logit joins the pool, its output is left exactly as it is."""
    from dsas.serving.op import steer_pooled

    g = torch.Generator().manual_seed(5)
    r = lambda: torch.randn(D, generator=g)  # noqa: E731
    pooled = [
        SiteParams(r(), w=0.3 * r(), b=0.2, mult=first_mult, floor=0.5, pool=True),
        SiteParams(r(), floor=0.5, pool=True),
        SiteParams(r(), w=0.3 * r(), b=-0.1, floor=0.5, pool=True),
    ]
    counts = [(1, True), (1, False), (2, False)]
    plain = [SiteParams(r(), w=r(), b=0.1) for _ in range(3)]
    tables = []
    for k in range(3):
        entries = [unsteered_row(D), pack_site(pooled[k], D, counts[k]), pack_site(plain[k], D)]
        tables.append((torch.stack([v for v, _ in entries]), torch.stack([c for _, c in entries])))
    n = 6
    rows = torch.tensor([1, 2, 0, 1, 1, 2, 0, 0], dtype=torch.int64)
    lam = torch.tensor([2.0, 1.0, 0.0, 4.0, 0.5, 3.0, 0.0, 0.0])
    pool = torch.full((8,), 123.0)  # what an earlier pass left
    hs = [torch.randn(n, D, generator=g) for _ in range(3)]  # each site's output (the op's input)
    sums = torch.zeros(n)
    for k in range(3):
        y = steer_pooled(hs[k], rows, lam, *tables[k], pool)
        p = pooled[k]
        if p.w is not None:
            sums = sums + hs[k] @ p.w + float(p.b)
        mean = sums / counts[k][0]
        for t in range(n):
            row = int(rows[t])
            if row == 0:
                assert torch.equal(y[t], hs[k][t])
                continue
            if row == 1 and p.mult == 0:
                assert torch.equal(y[t], hs[k][t])
                continue
            if row == 1:
                read = SiteParams(p.shift, w=torch.zeros(D), floor=0.5)
                ref, _ = rule(hs[k][t : t + 1], read, lam[t : t + 1], mean[t : t + 1])
            else:
                ref, _ = rule(hs[k][t : t + 1], plain[k], lam[t : t + 1])
            torch.testing.assert_close(y[t : t + 1], ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(pool[6:], torch.full((2,), 123.0))  # past the step's tokens: untouched
    # Compiled (dynamic token count, as vLLM compiles the model), the op mutates the pool just the same.
    pool2 = torch.full((8,), 123.0)

    def f(x0: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor) -> list[torch.Tensor]:
        return [
            torch.ops.dsas.steer_pooled(x, rows, lam, *tables[k], pool2) for k, x in enumerate((x0, x1, x2))
        ]

    eager = f(*hs)
    pool_eager = pool2.clone()
    pool2.fill_(123.0)
    out = torch.compile(f, fullgraph=True, dynamic=True)(*hs)
    for a, b in zip(out, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pool2, pool_eager)
