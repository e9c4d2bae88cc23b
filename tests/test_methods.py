"""Every method ("how") and gate ("when") behind `dsas.fit`: closed forms checked against their definitions,
and every combination inside `generate` with the engine's guarantees, saved and loaded."""

from __future__ import annotations

import pytest
import torch
from conftest import make_engine_sets, make_tiny_model
from sklearn.linear_model import LogisticRegression

import dsas
from dsas.gates import SiteGate
from dsas.maps import ITIConfig, fit_iti, fit_linear_act, probe_1d
from dsas.record import record
from dsas.steer import steering

# ---- Linear-AcT ------------------------------------------------------------------------------------------


def test_linear_act_maps_gaussian_onto_gaussian():
    gen = torch.Generator().manual_seed(0)
    n = 20000
    src = torch.randn(n, 3, generator=gen, dtype=torch.float64) * torch.tensor(
        [2.0, 0.5, 1.0]
    ) + torch.tensor([1.0, -2.0, 0.0])
    tgt = torch.randn(n, 3, generator=gen, dtype=torch.float64) * torch.tensor(
        [0.5, 3.0, 1.0]
    ) + torch.tensor([-3.0, 4.0, 0.5])
    m = fit_linear_act(src.float(), tgt.float())
    moved = src.float() + m.displacement(src.float())
    torch.testing.assert_close(moved.double().mean(0), tgt.mean(0), atol=2e-4, rtol=0)
    torch.testing.assert_close(moved.double().std(0), tgt.std(0), rtol=3e-3, atol=0)


def test_linear_act_affine_image_is_exact_and_support_masks():
    gen = torch.Generator().manual_seed(1)
    src = torch.randn(64, 4, generator=gen)
    a, b = torch.tensor([3.0, 0.5, 1.0, 2.0]), torch.tensor([-2.0, 1.0, 0.0, 5.0])
    tgt = (a * src + b)[torch.randperm(64, generator=gen)]  # order does not matter: 1-D OT sorts
    m = fit_linear_act(src, tgt)
    assert m.scale is not None and m.lo is not None and m.hi is not None
    torch.testing.assert_close(m.scale, a - 1, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.shift, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.lo, src.min(0).values)
    torch.testing.assert_close(m.hi, src.max(0).values)
    outside = src.max(0).values + 1.0  # beyond the source support: identity (ml-act q_0_100)
    assert torch.equal(m.displacement(outside), torch.zeros(4))
    inner = fit_linear_act(src, tgt, support=(10.0, 90.0))
    assert inner.lo is not None
    torch.testing.assert_close(inner.lo, torch.quantile(src, 0.1, dim=0))
    none = fit_linear_act(src, tgt, support=None)
    assert none.lo is None and none.hi is None
    # Sets of different sizes are matched at common quantile levels: an affine image is still exact.
    sub = fit_linear_act(src, (a * src + b)[:48].repeat(2, 1)[:80])
    assert sub.scale is not None and torch.isfinite(sub.scale).all()


def test_linear_act_incremental_fits_on_upstream_steered_activations(tiny_tok, engine_sets, single_thread):
    model = make_tiny_model("llama", len(tiny_tok))
    inc = dsas.fit(model, tiny_tok, engine_sets, method="linear_act", gate="none", progress=False)
    flat = dsas.fit(
        model, tiny_tok, engine_sets, method="linear_act", gate="none", progress=False, incremental=False
    )
    first, third = inc.sites[0].name, inc.sites[2]
    for k in ("shift", "scale", "lo", "hi"):  # the first site sees no upstream steering
        torch.testing.assert_close(getattr(inc.maps[first], k), getattr(flat.maps[first], k))
    assert not torch.allclose(inc.maps[third.name].shift, flat.maps[third.name].shift)
    # Refit the third site by hand on activations recorded with the two sites before it steered.
    up = inc.sites[:2]
    k = inc.config["fit"]["skip_tokens"]  # the BOS token (skip_tokens="auto")
    assert k == 1
    with steering(model, up, inc.maps, {s.name: SiteGate() for s in up}, 1.0):
        x = record(model, tiny_tok, engine_sets.source, [third], progress=False, skip=k)[third.name]
    tgt = record(model, tiny_tok, engine_sets.target, [third], progress=False, skip=k)[third.name]
    ref = fit_linear_act(x, tgt)
    for k in ("shift", "scale", "lo", "hi"):
        torch.testing.assert_close(getattr(inc.maps[third.name], k), getattr(ref, k))


@pytest.mark.parametrize("method", ["caa", "iti"])
def test_incremental_maps_move_steered_source_means_onto_the_target(
    tiny_tok, engine_sets, method, single_thread
):
    """With incremental=True, strength 1 (no gate) puts the source token-means onto the target's at every site
    (CAA exactly; ITI along its kept units), instead of compounding the upstream shifts."""
    model = make_tiny_model("llama", len(tiny_tok))
    kw = {"top_frac": 1.0} if method == "iti" else {}
    inc = dsas.fit(
        model, tiny_tok, engine_sets, method=method, gate="none", incremental=True, progress=False, **kw
    )
    flat = dsas.fit(model, tiny_tok, engine_sets, method=method, gate="none", progress=False, **kw)
    assert inc.config["options"][method]["incremental"] is True
    k = inc.config["fit"]["skip_tokens"]  # token-means without the BOS token (skip_tokens="auto")
    tgt = record(model, tiny_tok, engine_sets.target, inc.sites, progress=False, skip=k)
    gaps = {}
    for name, st in (("inc", inc), ("flat", flat)):
        with st.apply(model, 1.0):
            src = record(model, tiny_tok, engine_sets.source, st.sites, progress=False, skip=k)
        gaps[name] = [float((src[s.name].mean(0) - tgt[s.name].mean(0)).norm()) for s in st.sites]
    first = inc.site_names[0]
    assert torch.equal(inc.maps[first].shift, flat.maps[first].shift)  # nothing upstream of the first site
    if method == "caa":
        assert max(gaps["inc"]) < 1e-4
    assert sum(gaps["inc"]) < 0.5 * sum(gaps["flat"])


# ---- ITI ---------------------------------------------------------------------------------------------------


def test_probe_1d_is_sklearn_logistic_regression():
    gen = torch.Generator().manual_seed(2)
    y = torch.cat([torch.zeros(18), torch.ones(22)])
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64) + y[:, None] * torch.linspace(0, 2, 6)
    x[:, 0] = 5 * y  # separable column: only the L2 penalty keeps w finite
    w, b = probe_1d(x, y, C=0.7)
    for j in range(6):
        lr = LogisticRegression(
            C=0.7, class_weight="balanced", solver="newton-cholesky", tol=1e-12, max_iter=500
        )
        lr.fit(x[:, j : j + 1].numpy(), y.numpy())
        assert float(w[j]) == pytest.approx(float(lr.coef_[0, 0]), abs=1e-5)
        assert float(b[j]) == pytest.approx(float(lr.intercept_[0]), abs=1e-5)


def _planted_units(d=40, n=32, units=(3, 17, 29), seed=3):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(n, d, generator=gen)
    tgt = torch.randn(n, d, generator=gen)
    tgt[:, list(units)] += 3.0
    return src, tgt


def test_iti_keeps_the_planted_units_and_follows_the_definition():
    src, tgt = _planted_units()
    m, stats = fit_iti(src, tgt, ITIConfig(top_k=3))
    assert set(torch.nonzero(m.shift).flatten().tolist()) == {3, 17, 29}
    assert stats["iti_acc_kept_mean"] >= 0.85  # Bayes accuracy of a 3-sigma shift: 0.93
    mask = torch.zeros(40)
    mask[[3, 17, 29]] = 1
    v = (tgt.double().mean(0) - src.double().mean(0)) * mask
    theta = v / v.norm()
    sigma = (torch.cat([src, tgt]).double() @ theta).std(unbiased=False)
    torch.testing.assert_close(m.shift, (sigma * theta).float())
    assert m.scale is None  # a constant shift: Δ(z) = σ θ ⊙ m
    # top_frac picks ceil(frac * d) units: the planted ones come first.
    m2, _ = fit_iti(src, tgt, ITIConfig(top_frac=0.1))
    assert torch.count_nonzero(m2.shift) == 4 and {3, 17, 29} <= set(
        torch.nonzero(m2.shift).flatten().tolist()
    )


def test_iti_heads():
    gen = torch.Generator().manual_seed(4)
    src, tgt = torch.randn(32, 40, generator=gen), torch.randn(32, 40, generator=gen)
    tgt[:, 10:15] += 2.0  # head 2 of 8 (5 units each)
    m, _ = fit_iti(src, tgt, ITIConfig(top_k=1, unit="head"), heads=8)
    assert set(torch.nonzero(m.shift).flatten().tolist()) <= set(range(10, 15))
    vh = tgt[:, 10:15].double().mean(0) - src[:, 10:15].double().mean(0)
    theta = vh / vh.norm()
    sigma = (torch.cat([src, tgt])[:, 10:15].double() @ theta).std(unbiased=False)
    torch.testing.assert_close(m.shift[10:15], (sigma * theta).float())
    with pytest.raises(ValueError, match="divides"):
        fit_iti(src, tgt, ITIConfig(unit="head"), heads=7)


def test_iti_heads_through_fit(tiny_tok, engine_sets, single_thread):
    model = make_tiny_model("llama", len(tiny_tok))  # 4 heads of 8 units, read from the model's config
    st = dsas.fit(
        model, tiny_tok, engine_sets, method="iti", gate="none", progress=False, unit="head", top_k=1
    )
    for name in st.site_names:
        nz = torch.nonzero(st.maps[name].shift).flatten()
        assert len(nz) > 0 and len(set((nz // 8).tolist())) == 1  # one head block per site
    assert st.config["options"]["iti"]["unit"] == "head"


def test_method_configs_validate():
    for bad in (dict(unit="neuron"), dict(top_k=0), dict(top_frac=0.0), dict(holdout=1.0)):
        with pytest.raises(ValueError):
            ITIConfig(**bad)
    with pytest.raises(ValueError, match="percentiles"):
        dsas.fit(None, None, make_engine_sets(), method="linear_act", q_lo=50, q_hi=10)


def test_e2e_gate_needs_lineas(tiny_tok, engine_sets):
    with pytest.raises(ValueError, match="method in \\['lineas'\\]"):
        dsas.fit(
            make_tiny_model("llama", len(tiny_tok)), tiny_tok, engine_sets, method="caa", gate="e2e-relu"
        )


# ---- every method x gate inside generate -----------------------------------------------------------------

PROMPTS = ["you stupid idiot and", "the city river history is", "a nice kind friend"]
COMBOS = [
    (m, g)
    for m in ("caa", "iti", "lineas", "linear_act")
    for g in ("none", "dsas", "threshold", "e2e-sigmoid", "e2e-relu")
    if not g.startswith("e2e") or m == "lineas"
]
CASES = [("llama", m, g) for m, g in COMBOS] + [
    ("gpt2", "lineas", g) for g in ("none", "e2e-sigmoid", "e2e-relu")
]
OPTIONS = {"lineas": {"steps": 40, "lr": 0.05}, "dsas": {"acc_threshold": 0.5}}


@pytest.fixture(scope="module")
def models(tiny_tok):
    return {a: make_tiny_model(a, len(tiny_tok)) for a in ("llama", "gpt2")}


def _logits(model, tok, texts=PROMPTS):
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


@pytest.mark.parametrize(("arch", "method", "gate"), CASES)
def test_combination_in_generate(
    arch, method, gate, models, tiny_tok, left_tok, engine_sets, tmp_path, single_thread
):
    model = models[arch]
    kw = {**OPTIONS.get(method, {}), **OPTIONS.get(gate, {})}
    st = dsas.fit(model, tiny_tok, engine_sets, method=method, gate=gate, progress=False, **kw)
    assert st.method == method and st.gate == gate and st.steered
    if method == "lineas":  # the training curve's ends are kept in the config (and saved)
        tr = st.config["training"]
        assert 1 <= tr["evaluations"] <= 40 and tr["objective_best"] <= tr["objective_start"]
    if method == "iti":
        assert all(r["iti_kept"] == 4 for r in st.report())  # ceil(0.125 * 32) units per site
    if gate.startswith("e2e"):
        assert all(r["gate_control"] >= 0 and r["gate_source"] >= 0 for r in st.report())
    ref = _logits(model, tiny_tok)
    with st.apply(model, strength=0.0):
        assert torch.equal(_logits(model, tiny_tok), ref)  # strength 0: bit-identical
    with st.apply(model, strength=8.0):
        strong = _logits(model, tiny_tok)
    assert not torch.allclose(strong, ref)  # it does steer

    enc = left_tok(PROMPTS, return_tensors="pt", padding=True)
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)  # no early EOS
    with st.apply(model, strength=4.0, trace=True) as t1:
        cached = model.generate(**enc, use_cache=True, **gen)
    with st.apply(model, strength=4.0, trace=True) as t2:
        uncached = model.generate(**enc, use_cache=False, **gen)
    assert torch.equal(cached, uncached)
    real = t1.mask.bool()
    for k, v in t1.scales.items():
        torch.testing.assert_close(v[real], t2.scales[k][real], rtol=1e-4, atol=1e-5)
    for i, p in enumerate(PROMPTS):  # left-padded batch = each row alone
        with st.apply(model, strength=4.0, trace=True) as ta:
            alone = model.generate(**left_tok([p], return_tensors="pt"), **gen)
        assert torch.equal(cached[i, -alone.shape[1] :], alone[0])
        for k, v in ta.scales.items():
            torch.testing.assert_close(t1.scales[k][i][real[i]], v[0], rtol=1e-4, atol=1e-5)

    st.save(tmp_path / "st")
    back = dsas.Steerer.load(tmp_path / "st", model)
    assert back.config == st.config and back.steered == st.steered and back.report() == st.report()
    for k in st.site_names:  # identical parameters
        assert st.maps[k].tensors().keys() == back.maps[k].tensors().keys()
        assert all(torch.equal(v, back.maps[k].tensors()[n]) for n, v in st.maps[k].tensors().items())
        g, h = st.gates[k], back.gates[k]
        assert (g.kind, g.b, g.mult) == (h.kind, h.b, h.mult)
        assert (g.w is None and h.w is None) or torch.equal(g.w, h.w)
    with back.apply(model, strength=4.0):
        assert torch.equal(model.generate(**enc, **gen), cached)  # identical outputs after load
    with back.apply(model, strength=8.0):
        # Bit for bit: steering copies the loaded parameters into fresh (aligned) memory, as fitted ones are.
        assert torch.equal(_logits(model, tiny_tok), strong)
