"""The CAST-style threshold gate: fitted condition, and its prompt-level decision held through generation."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

import dsas
from dsas.condition import ThresholdConfig, condition_scores, fit_threshold
from dsas.record import record
from dsas.sites import Site

PROMPTS = ["stupid idiot hate enemy", "the city river history is", "a bad mountain music"]


def test_fit_threshold_finds_the_planted_direction():
    gen = torch.Generator().manual_seed(0)
    d = 24
    planted = torch.zeros(d)
    planted[5] = 1.0
    base = torch.randn(d, generator=gen) * 3  # a common offset, as real token-means have
    src = base + torch.randn(32, d, generator=gen) * 0.3 + 2.0 * planted
    ctl = base + torch.randn(32, d, generator=gen) * 0.3
    for how in ("pc1", "mean"):
        direction, threshold, stats = fit_threshold(src, ctl, ThresholdConfig(direction=how))
        assert float(direction @ planted) > 0.95 and direction.norm() == pytest.approx(1.0, abs=1e-6)
        assert stats["condition_f1_holdout"] == 1.0
        fire_src = condition_scores(src, direction) >= threshold
        fire_ctl = condition_scores(ctl, direction) >= threshold
        assert fire_src.all() and not fire_ctl.any()
    with pytest.raises(ValueError):
        ThresholdConfig(direction="pc2")


@pytest.fixture(scope="module")
def model(tiny_tok):
    return make_tiny_model("llama", len(tiny_tok))


@pytest.fixture(scope="module")
def sets():
    """Hostile vs neutral sentences without shared filler words: separable at the condition site."""
    import random

    rng = random.Random(0)
    pools = {
        "source": ["stupid", "idiot", "hate", "bad", "enemy"],
        "target": ["nice", "kind", "love", "good", "friend"],
        "control": ["city", "river", "mountain", "history", "music", "year"],
    }
    return dsas.PromptSets(
        **{
            k: [" ".join(rng.choice(v) for _ in range(rng.randint(3, 7))) for _ in range(16)]
            for k, v in pools.items()
        }
    )


@pytest.fixture(scope="module")
def steerer(model, tiny_tok, sets):
    # The token-mean over every token, BOS included (skip_tokens=0): the decision below is checked against
    # `record`'s plain means. With the default "auto" the BOS is left out: test_skip_tokens_reaches_the_condition.
    return dsas.fit(model, tiny_tok, sets, method="caa", gate="threshold", progress=False, skip_tokens=0)


def test_condition_site_is_saved_resolved(steerer):
    assert steerer.config["options"]["threshold"]["site"] == "model.layers.1"  # middle of 3 blocks
    cond = steerer.condition
    assert cond is not None and cond.site == "model.layers.1"
    assert cond.direction.norm() == pytest.approx(1.0, abs=1e-5)
    assert all(g.kind == "const" and g.w is None for g in steerer.gates.values())  # "when" is the condition's
    assert steerer.stats[steerer.site_names[0]]["condition_site"] == "model.layers.1"


def test_fires_on_source_and_not_on_control(steerer, model, tiny_tok, sets):
    row = steerer.report()[0]
    assert row["condition_fire_source"] >= 0.9 and row["condition_fire_control"] <= 0.1
    # At run time: a row's scale is lam on every token of a steered site when its prompt fires, else 0.
    texts = sets.source + sets.control
    enc = tiny_tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad(), steerer.apply(model, strength=3.0, trace=True) as tr:
        model(**enc)
    last = tr.scales[steerer.site_names[-1]]  # downstream of the condition site: steered from the prompt on
    real = enc["attention_mask"].bool()
    fired = last[:, 0] > 0
    for i in range(len(texts)):
        assert torch.equal(last[i][real[i]], torch.full((int(real[i].sum()),), 3.0 if fired[i] else 0.0))
    n = len(sets.source)
    assert fired[:n].float().mean() >= 0.9 and fired[n:].float().mean() <= 0.1


def test_decision_is_the_prompt_cosine_at_the_condition_site(steerer, model, tiny_tok):
    cond = steerer.condition
    means = record(model, tiny_tok, PROMPTS, [Site("model.layers.1")], progress=False)["model.layers.1"]
    expect = (condition_scores(means, cond.direction) >= cond.threshold).float()
    enc = tiny_tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), steerer.apply(model, strength=1.0, trace=True) as tr:
        model(**enc)
    got = tr.scales[steerer.site_names[-1]][:, 0]
    assert torch.equal(got, expect)
    assert expect.sum() >= 1 and expect.sum() < len(PROMPTS)  # the check discriminates


def test_skip_tokens_reaches_the_condition(model, tiny_tok, sets):
    """With the default skip_tokens="auto" the condition reads the token-mean without the BOS token, at fit and at
    run time alike."""
    st = dsas.fit(model, tiny_tok, sets, method="caa", gate="threshold", progress=False)
    cond = st.condition
    assert cond.skip == 1
    means = record(model, tiny_tok, PROMPTS, [Site(cond.site)], progress=False, skip=1)[cond.site]
    expect = (condition_scores(means, cond.direction) >= cond.threshold).float()
    enc = tiny_tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), st.apply(model, strength=1.0, trace=True) as tr:
        model(**enc)
    assert torch.equal(tr.scales[st.site_names[-1]][:, -1], expect)


def test_upstream_sites_wait_for_the_decision(steerer, model, left_tok):
    """Sites before the condition site leave the prompt tokens alone and steer every generated token."""
    enc = left_tok(PROMPTS, return_tensors="pt", padding=True)
    p = enc["input_ids"].shape[1]
    with steerer.apply(model, strength=2.0, trace=True) as tr:
        out = model.generate(**enc, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    fired = tr.scales[steerer.site_names[-1]][:, -1] > 0
    for name, scale in tr.scales.items():
        layer = int(name.split(".")[2])
        assert scale.shape == (3, out.shape[1] - 1)
        gen_part = scale[:, p:]
        assert torch.equal(gen_part, 2.0 * fired[:, None].float().expand_as(gen_part))
        prompt_part = scale[:, :p][enc["attention_mask"].bool()]
        if layer <= 1:  # inside or before block 1, whose output is the condition site
            assert torch.equal(prompt_part, torch.zeros_like(prompt_part))


def test_condition_is_saved_as_its_own_tensor(steerer, model, tiny_tok, tmp_path):
    from safetensors.torch import load_file

    steerer.save(tmp_path / "thr")
    assert "condition/direction" in load_file(str(tmp_path / "thr" / "dsas_steerer.safetensors"))
    back = dsas.Steerer.load(tmp_path / "thr", model=model)
    assert back.condition is not None and torch.equal(back.condition.direction, steerer.condition.direction)
    assert (
        back.condition.threshold == steerer.condition.threshold
        and back.condition.site == steerer.condition.site
    )
    enc = tiny_tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        with steerer.apply(model, 2.0):
            a = model(**enc).logits
        with back.apply(model, 2.0):
            b = model(**enc).logits
    assert torch.equal(a, b)


def test_plain_steering_over_a_threshold_steerer_is_vanilla(steerer, model, tiny_tok):
    """The stored gates are constant: used without the condition, they steer every row (documented fallback)."""
    from dsas.steer import steering

    enc = tiny_tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), steering(model, steerer.sites, steerer.maps, steerer.gates, 2.0, trace=True) as tr:
        model(**enc)
    for v in tr.scales.values():
        assert torch.equal(v, torch.full_like(v, 2.0))


def test_skip_tokens_decides_on_the_mean_without_the_first_tokens(model, tiny_tok, left_tok, sets, tmp_path):
    """With `skip_tokens=1` the condition is fitted on, and decides on, token-means that leave out the first real
    token, on left-padded rows too; the artifact keeps the skip."""
    st = dsas.fit(model, tiny_tok, sets, method="caa", gate="threshold", progress=False, skip_tokens=1)
    cond = st.condition
    assert cond is not None and cond.skip == 1
    site = [Site(cond.site)]
    means = record(model, tiny_tok, PROMPTS, site, progress=False, skip=1)[cond.site]
    assert not torch.allclose(means, record(model, tiny_tok, PROMPTS, site, progress=False)[cond.site])
    expect = (condition_scores(means, cond.direction) >= cond.threshold).float()
    enc = left_tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), st.apply(model, strength=1.0, trace=True) as tr:
        model(**enc)
    assert torch.equal(tr.scales[st.site_names[-1]][:, -1], expect)
    st.save(tmp_path / "t")
    assert dsas.Steerer.load(tmp_path / "t", model=model).condition.skip == 1
