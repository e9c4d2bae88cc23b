"""calibrate_strength: the strength it returns is within budget, and the next evaluated one beyond it is not."""

from __future__ import annotations

import pytest

import dsas
from dsas.eval.perplexity import perplexity

NEUTRAL = [
    "the city river history is long and the music of the year",
    "a man and a woman went to the market in the city",
    "the king of the country had a house near the river",
    "people eat bread and fruit at the school in the morning",
]


@pytest.fixture(scope="module")
def setup(tiny_tok, engine_sets):
    from conftest import make_tiny_llama

    model = make_tiny_llama(len(tiny_tok))
    # The BOS token in the means (skip_tokens=0): this random model's shift then crosses the budget well inside
    # the search range, which is what the bisection checks need (without it the shift saturates at 64).
    st = dsas.fit(model, tiny_tok, engine_sets, method="caa", gate="none", progress=False, skip_tokens=0)
    return model, tiny_tok, st


def test_calibrated_strength_is_the_edge_of_the_budget(setup):
    model, tok, st = setup
    iters = 5
    cal = dsas.calibrate_strength(
        st,
        model,
        tok,
        NEUTRAL,
        max_ppl_increase=0.05,
        start=0.5,
        max_strength=64.0,
        iters=iters,
        progress=False,
    )
    limit = cal.base_ppl * 1.05
    assert cal.base_ppl == perplexity(model, tok, NEUTRAL, progress=False)
    assert 0 < cal.strength < 64 and not cal.saturated
    # What it reports is what the steered model gives, and it is within budget ...
    with st.apply(model, strength=cal.strength):
        assert perplexity(model, tok, NEUTRAL, progress=False) == cal.ppl <= limit
    # ... and the closest strength above it that was evaluated is beyond budget, within the bisection's width.
    above = [lam for lam, p in cal.evaluated if lam > cal.strength]
    assert above and all(p > limit for lam, p in cal.evaluated if lam > cal.strength)
    nxt = min(above)
    assert nxt - cal.strength <= nxt / 2**iters
    assert cal.increase == pytest.approx(cal.ppl / cal.base_ppl - 1)
    assert len(cal.evaluated) <= 8 + iters  # start, 7 doublings to 64 (or fewer halvings), iters bisections


def test_a_loose_budget_saturates_at_max_strength(setup):
    model, tok, st = setup
    cal = dsas.calibrate_strength(
        st, model, tok, NEUTRAL, max_ppl_increase=1e9, max_strength=4.0, iters=3, progress=False
    )
    assert cal.saturated and cal.strength == 4.0
    assert [lam for lam, _ in cal.evaluated] == [1.0, 2.0, 4.0]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"max_ppl_increase": 0.0}, "positive fraction"),
        ({"max_ppl_increase": float("nan")}, "positive fraction"),
        ({"start": 8.0, "max_strength": 4.0}, "start <= max_strength"),
        ({"iters": -1}, "iters"),
    ],
)
def test_bad_options_are_refused(setup, kw, match):
    model, tok, st = setup
    with pytest.raises(ValueError, match=match):
        dsas.calibrate_strength(st, model, tok, NEUTRAL, progress=False, **kw)


def test_no_texts_is_refused(setup):
    model, tok, st = setup
    with pytest.raises(ValueError, match="at least one neutral text"):
        dsas.calibrate_strength(st, model, tok, [], progress=False)


@pytest.mark.slow
def test_dsas_allows_a_larger_strength_than_vanilla_on_the_real_model(smollm2):
    """The mechanism behind "better toxicity at matched perplexity": the gate leaves neutral text alone, so the
    budget admits a larger strength (measured: CAA 0.094 vs CAA + DSAS 0.188 at +5% on these 16 paragraphs)."""
    from dsas.eval.perplexity import load_wiki_paragraphs

    model, tok = smollm2
    sets = dsas.load_prompt_sets("toxicity", n=32)
    texts = load_wiki_paragraphs(n=16, seed=1)
    lam = {}
    for gate in ("none", "dsas"):
        st = dsas.fit(model, tok, sets, method="caa", gate=gate, progress=False)
        cal = dsas.calibrate_strength(st, model, tok, texts, max_ppl_increase=0.05, iters=3, progress=False)
        assert 0 < cal.increase <= 0.05 and not cal.saturated
        lam[gate] = cal.strength
    assert lam["dsas"] > 1.5 * lam["none"]


def test_a_steerer_without_steered_sites_warns_and_saturates(setup):
    import dataclasses

    model, tok, st = setup
    off = dataclasses.replace(st, steered=[])
    with pytest.warns(UserWarning, match="steers no site"):
        cal = dsas.calibrate_strength(off, model, tok, NEUTRAL, max_strength=2.0, progress=False)
    assert cal.saturated and cal.strength == 2.0 and cal.ppl == cal.base_ppl
