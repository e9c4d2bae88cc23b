"""End-to-end training (LinEAS, E2E-DSAS) checked against definitions on a planted problem."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from dsas.maps import resample_sorted
from dsas.record import record
from dsas.sites import Site
from dsas.train import E2EConfig, LinEASConfig, train_maps, w2_sorted

SRC_WORDS = ["stupid", "idiot", "hate", "bad", "enemy", "sad"]
TGT_WORDS = ["nice", "kind", "love", "good", "friend", "happy"]
CTL_WORDS = ["city", "river", "mountain", "music", "year", "church"]
D = 8
SITES = [Site("a"), Site("b")]


class Planted(nn.Module):
    """Embedding -> site "a" (identity) -> fixed linear mix + tanh -> site "b" (identity).

    Token activations at site a are the word embeddings, and every target word's embedding is a planted
    per-coordinate affine image (1 + δ*) ⊙ e + b* of its source word's. BOS is the map's fixed point, so target
    token-means are exactly the planted image of source token-means: LinEAS must find δ*, b* at site a and the
    identity at site b (whose inputs then already match the target's).
    """

    def __init__(self, emb: torch.Tensor, mix: torch.Tensor):
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(emb, freeze=True)
        self.a = nn.Identity()
        self.mix = nn.Linear(D, D, bias=False)
        self.mix.weight.data.copy_(mix)
        self.b = nn.Identity()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.b(torch.tanh(self.mix(self.a(self.emb(input_ids)))))


@pytest.fixture(scope="module")
def planted(tiny_tok):
    gen = torch.Generator().manual_seed(0)
    vocab = tiny_tok.get_vocab()
    emb = torch.randn(len(tiny_tok), D, generator=gen)
    delta = (0.3 + 0.3 * torch.rand(D, generator=gen)) * torch.where(torch.arange(D) % 2 == 0, 1.0, -1.0)
    shift = torch.randn(D, generator=gen)
    for s, t in zip(SRC_WORDS, TGT_WORDS, strict=True):
        emb[vocab[t]] = (1 + delta) * emb[vocab[s]] + shift
    emb[vocab["<s>"]] = -shift / delta  # fixed point of the planted map
    model = Planted(emb, torch.randn(D, D, generator=gen) / D**0.5).eval()
    rng = random.Random(0)
    src = [" ".join(rng.choice(SRC_WORDS) for _ in range(rng.randint(3, 7))) for _ in range(24)]
    tgt = [" ".join(TGT_WORDS[SRC_WORDS.index(w)] for w in s.split()) for s in src]
    ctl = [" ".join(rng.choice(CTL_WORDS) for _ in range(rng.randint(3, 7))) for _ in range(24)]
    target_means = record(model, tiny_tok, tgt, SITES, progress=False)
    return model, delta, shift, src, ctl, target_means


def test_w2_matches_definition_and_resamples():
    gen = torch.Generator().manual_seed(1)
    z, v = torch.randn(7, 3, generator=gen), torch.randn(7, 3, generator=gen)
    ref = sum(((torch.sort(z[:, j]).values - torch.sort(v[:, j]).values) ** 2).mean() for j in range(3))
    torch.testing.assert_close(w2_sorted(z, torch.sort(v, 0).values), ref)
    # Different sizes: both read at the common quantile levels (numpy's linear rule).
    v5 = torch.sort(torch.randn(5, 3, generator=gen), 0).values
    levels = torch.linspace(0, 1, 7, dtype=torch.float64)
    import numpy as np

    expect = torch.from_numpy(np.quantile(v5.double().numpy(), levels.numpy(), axis=0)).float()
    torch.testing.assert_close(resample_sorted(v5, 7), expect)
    ref2 = ((torch.sort(z, 0).values - expect) ** 2).mean(0).sum()
    torch.testing.assert_close(w2_sorted(z, v5), ref2)


@pytest.mark.parametrize(("optimizer", "steps", "tol"), [("lbfgs", 150, 2e-3), ("adam", 800, 2e-2)])
def test_lineas_recovers_planted_affine_map(planted, tiny_tok, optimizer, steps, tol, single_thread):
    model, delta, shift, src, _ctl, target_means = planted
    cfg = LinEASConfig(steps=steps, lr=0.05, patience=0, optimizer=optimizer)
    res = train_maps(model, tiny_tok, SITES, src, target_means, cfg, progress=False)
    assert res.evaluations == len(res.history) == steps
    a, b = res.maps["a"], res.maps["b"]
    assert a.scale is not None and b.scale is not None
    torch.testing.assert_close(a.scale, delta, atol=tol, rtol=0)
    torch.testing.assert_close(a.shift, shift, atol=tol, rtol=0)
    if optimizer == "lbfgs":  # Adam's tail is slow where sites trade off; L-BFGS gets the identity at b too
        torch.testing.assert_close(b.scale, torch.zeros(D), atol=5 * tol, rtol=0)
        torch.testing.assert_close(b.shift, torch.zeros(D), atol=5 * tol, rtol=0)
    h = torch.tensor(res.history)
    assert min(h) < 1e-4 * h[0]
    # Monotone on average: every tenth of the run ends lower than the one before.
    chunks = h[: len(h) // 10 * 10].view(10, -1).mean(1)
    assert (chunks[1:] < chunks[:-1]).all()
    # The model is left as it was: no hooks behind, its own requires_grad flags back, no gradient on it.
    assert not any(m._forward_hooks for m in model.modules())
    assert model.mix.weight.requires_grad and model.mix.weight.grad is None


def test_early_stop_on_plateau(planted, tiny_tok, single_thread):
    model, _delta, _shift, src, _ctl, target_means = planted
    cfg = LinEASConfig(steps=1000, optimizer="lbfgs", patience=10, tol=1e-2)
    res = train_maps(model, tiny_tok, SITES, src, target_means, cfg, progress=False)
    h = res.history
    best = [min(h[: i + 1]) for i in range(len(h))]
    assert res.best_step == h.index(best[-1]) and len(h) < 1000
    # Stopped at the first evaluation whose best is within 1% of the best 10 evaluations before, or where L-BFGS
    # itself converged at the fp32 floor (the objective repeats exactly).
    assert best[-1] > 0.99 * best[-11] or h[-1] == h[-2] == best[-1]
    assert all(best[i] <= 0.99 * best[i - 10] for i in range(10, len(h) - 1))


def test_proximal_steps_follow_their_definition():
    from dsas.train import SiteTrainer

    tr = SiteTrainer(
        nn.Identity(), [Site("x")], [3], torch.device("cpu"), None, True, [torch.tensor([1.0, 2.0, 4.0])]
    )
    tr.center[0] = torch.tensor([0.5, -1.0, 2.0])
    s0, b0 = torch.tensor([0.3, -0.01, 0.05]), torch.tensor([1.0, -0.02, 0.5])
    with torch.no_grad():
        tr.logscale[0].copy_(s0)
        tr.shift[0].copy_((b0 + torch.expm1(s0) * tr.center[0]) / tr.units[0])  # so that the actual b is b0
    torch.testing.assert_close(tr.actual_shift(0), b0)
    lr, l1, group = 0.1, 0.2, 0.5
    tr.prox(lr, l1, group)
    st = lambda v: torch.sign(v) * (v.abs() - lr * l1).clamp_min(0)  # noqa: E731
    s1, b1 = st(s0), st(b0)
    norm = torch.sqrt(s1.pow(2).sum() + b1.pow(2).sum())
    factor = 1 - lr * group / norm
    torch.testing.assert_close(tr.logscale[0].detach(), s1 * factor)
    torch.testing.assert_close(tr.actual_shift(0).detach(), b1 * factor)
    assert (
        float(tr.logscale[0][1].detach()) == 0.0 and float(tr.actual_shift(0)[1].detach()) == 0.0
    )  # ST to 0
    tr.prox(lr, 0.0, 1e6)  # a group prox larger than the norm puts the whole site at the identity
    assert torch.count_nonzero(tr.logscale[0]) == 0 and torch.count_nonzero(tr.actual_shift(0)) == 0


def test_group_sparsity_keeps_sites_at_identity(planted, tiny_tok, single_thread):
    model, _delta, _shift, src, _ctl, target_means = planted
    res = train_maps(
        model, tiny_tok, SITES, src, target_means, LinEASConfig(steps=20, lr=0.05, group=1e4), progress=False
    )
    for m in res.maps.values():
        assert m.scale is not None and torch.count_nonzero(m.scale) == 0 and torch.count_nonzero(m.shift) == 0
    with pytest.raises(ValueError, match="Adam"):
        LinEASConfig(optimizer="lbfgs", l1=0.1)


def test_pool_before_leaves_last_site_untrained(planted, tiny_tok, single_thread):
    model, _delta, _shift, src, _ctl, target_means = planted
    cfg = LinEASConfig(steps=100, optimizer="lbfgs", patience=0, pool_after=False)
    res = train_maps(model, tiny_tok, SITES, src, target_means, cfg, progress=False)
    b = res.maps["b"]
    assert b.scale is not None and torch.count_nonzero(b.scale) == 0  # read before its own map: no gradient
    assert torch.count_nonzero(b.shift) == 0
    assert min(res.history) < 0.9 * res.history[0]  # the rest is site a read before its map: constant


@pytest.mark.parametrize(("kind", "steps"), [("sigmoid", 800), ("relu", 400)])
def test_e2e_gate_learns_source_versus_control(planted, tiny_tok, kind, steps, single_thread):
    """No warm start: the gate is only pushed by the W2 term (source) and the retain term (control)."""
    model, _delta, _shift, src, ctl, target_means = planted
    cfg = LinEASConfig(steps=steps, lr=0.05, patience=0)
    e2e = E2EConfig(warm_start=False)  # the default, relative beta
    res = train_maps(
        model, tiny_tok, SITES, src, target_means, cfg, control=ctl, gate_kind=kind, e2e=e2e, progress=False
    )
    assert res.gates is not None
    g = res.gates["a"]
    vocab = tiny_tok.get_vocab()
    emb = model.emb.weight
    on_src = g.value(emb[[vocab[w] for w in SRC_WORDS]])
    on_ctl = g.value(emb[[vocab[w] for w in CTL_WORDS]])
    # Off on every control word, on for every source word. (Only g ⊙ Δ is identified on the source, so a
    # sigmoid gate need not saturate at 1: the map makes up the difference.)
    assert on_ctl.max() < 0.05 * on_src.min() and on_src.min() > 0.5
    # And the gated map moves the source onto the target.
    assert min(res.history) < 0.02 * res.history[0]


def test_default_step_budget(planted, tiny_tok, single_thread):
    """steps=None: 50 LinEAS steps, 25 E2E steps (each of which also runs the control prompts)."""
    model, _delta, _shift, src, ctl, target_means = planted
    cfg = LinEASConfig(patience=0)
    assert train_maps(model, tiny_tok, SITES, src, target_means, cfg, progress=False).evaluations == 50
    res = train_maps(
        model, tiny_tok, SITES, src, target_means, cfg, control=ctl, gate_kind="relu", progress=False
    )
    assert res.evaluations == 25 and res.summary()["evaluations"] == 25


@pytest.mark.parametrize("relative", [True, False])
def test_relative_beta_makes_the_e2e_objective_scale_free(planted, tiny_tok, relative, single_thread):
    """Activations c times larger: with `relative_beta` the whole objective scales by c^2 (W2 by c^2, the retain
    term by c, its unit W2(init)/D by c), so Adam takes the same steps and the gates come out the same; with the
    raw sum the retain term weighs c times less and the gates differ."""
    model, _delta, _shift, src, ctl, _ = planted
    cfg = LinEASConfig(steps=60, lr=0.05, patience=0)
    e2e = E2EConfig(beta=1.0, warm_start=False, relative_beta=relative)
    site = SITES[:1]
    vocab = tiny_tok.get_vocab()
    probe = [vocab[w] for w in SRC_WORDS + CTL_WORDS]
    gates = []
    for c in (1.0, 10.0):
        scaled = Planted(model.emb.weight * c, model.mix.weight).eval()
        tgt = [" ".join(TGT_WORDS[SRC_WORDS.index(w)] for w in s.split()) for s in src]
        means = record(scaled, tiny_tok, tgt, site, progress=False)
        res = train_maps(
            scaled, tiny_tok, site, src, means, cfg, control=ctl, gate_kind="sigmoid", e2e=e2e, progress=False
        )
        assert res.gates is not None
        gates.append(res.gates["a"].value(scaled.emb.weight[probe]))
    gap = float((gates[0] - gates[1]).abs().max())
    if relative:
        assert gap < 1e-3
    else:
        assert gap > 0.05
