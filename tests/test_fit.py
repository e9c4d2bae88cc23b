"""`dsas.fit`: options routing and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch

import dsas


@pytest.fixture(scope="module")
def model(tiny_tok):
    from conftest import make_tiny_model

    return make_tiny_model("llama", len(tiny_tok))


def test_options_are_routed_and_recorded(model, tiny_tok, engine_sets):
    st = dsas.fit(model, tiny_tok, engine_sets, pca_dim=2, acc_threshold=0.6, batch_size=4, progress=False)
    assert st.config["options"]["dsas"]["pca_dim"] == 2 and st.config["fit"]["batch_size"] == 4
    assert all(st.stats[s]["pca_components"] == 2 for s in st.site_names)
    cfg = dsas.DSASConfig(pca_dim=3)
    st = dsas.fit(model, tiny_tok, engine_sets, dsas=cfg, acc_threshold=0.5, progress=False)
    assert (
        st.config["options"]["dsas"]["pca_dim"] == 3 and st.config["options"]["dsas"]["acc_threshold"] == 0.5
    )
    assert st.steered == st.site_names  # threshold 0.5 keeps every site


def test_sites_and_layers_options(model, tiny_tok, engine_sets):
    st = dsas.fit(model, tiny_tok, engine_sets, sites="blocks", layers=[1], gate="none", progress=False)
    assert st.site_names == ["model.layers.1"]
    rows = st.report()
    assert rows[0]["kind"] == "block" and rows[0]["shift_norm"] > 0


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (dsas.PromptSets([], ["a"], ["b"]), "source has 0 prompt"),
        (dsas.PromptSets(["a city"], ["a river", "the sun"], ["x", "y"]), "source has 1 prompt"),
        (dsas.PromptSets(["a", "b"], ["c", "d"], ["e"]), "control has 1 prompt"),
        (dsas.PromptSets(["a", " "], ["c", "d"], ["e", "f"]), "empty prompt"),
    ],
)
def test_bad_sets(model, tiny_tok, sets, match):
    with pytest.raises(ValueError, match=match):
        dsas.fit(model, tiny_tok, sets, progress=False)


def test_control_not_needed_without_gate(model, tiny_tok):
    sets = dsas.PromptSets(["you stupid idiot", "bad enemy"], ["nice kind friend", "good love"])
    st = dsas.fit(model, tiny_tok, sets, gate="none", progress=False)
    assert st.steered == st.site_names


def test_unknown_names(model, tiny_tok, engine_sets):
    with pytest.raises(ValueError, match="Unknown method 'cca'"):
        dsas.fit(model, tiny_tok, engine_sets, method="cca")
    with pytest.raises(ValueError, match="Unknown gate"):
        dsas.fit(model, tiny_tok, engine_sets, gate="sometimes")
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['pca_dims'\]"):
        dsas.fit(model, tiny_tok, engine_sets, pca_dims=3)
    with pytest.raises(TypeError, match="must be a DSASConfig"):
        dsas.fit(model, tiny_tok, engine_sets, dsas={"pca_dim": 3})
    with pytest.raises(ValueError, match="Unknown site"):
        dsas.fit(model, tiny_tok, engine_sets, sites=["model.layers.9.mlp"])


def test_no_active_site_warns(model, tiny_tok):
    same = ["the city river", "a history of music", "the king and the queen", "a market year"] * 3
    sets = dsas.PromptSets(same, same, list(same))
    with pytest.warns(UserWarning, match="changes nothing"):
        st = dsas.fit(model, tiny_tok, sets, progress=False)
    assert st.steered == []


def test_strength_validation(model, tiny_tok, engine_sets):
    st = dsas.fit(model, tiny_tok, engine_sets, gate="none", progress=False)
    for bad in ([], [float("nan")]):
        with pytest.raises(ValueError, match="strength"), st.apply(model, strength=bad):
            pass


def test_a_shared_option_name_must_say_which_config(model, tiny_tok, engine_sets):
    """`C` is both ITI's probe strength and the DSAS regulator's: never silently given to one of them."""
    with pytest.raises(
        TypeError, match=r"several configs.*iti=ITIConfig\(C=\.\.\.\).*dsas=DSASConfig\(C=\.\.\.\)"
    ):
        dsas.fit(model, tiny_tok, engine_sets, method="iti", gate="dsas", C=0.5, progress=False)
    with pytest.raises(TypeError, match="several configs"):
        dsas.fit(model, tiny_tok, engine_sets, method="iti", gate="threshold", holdout=0.3, progress=False)
    st = dsas.fit(
        model, tiny_tok, engine_sets, method="iti", gate="dsas", progress=False,
        **{"dsas.C": 0.5, "iti.C": 2.0, "acc_threshold": 0.5},
    )  # fmt: skip
    assert st.config["options"]["dsas"]["C"] == 0.5 and st.config["options"]["iti"]["C"] == 2.0
    with pytest.raises(TypeError, match="Unknown option"):
        dsas.fit(model, tiny_tok, engine_sets, method="iti", gate="dsas", **{"dsas.top_k": 3}, progress=False)


def test_one_seed_reaches_every_component(model, tiny_tok, engine_sets):
    """The regulator's CV folds follow FitConfig.seed (DSASConfig has no seed of its own to fall out of step)."""
    assert "seed" not in {f.name for f in __import__("dataclasses").fields(dsas.DSASConfig)}
    accs = {}
    for seed in (0, 7):
        st = dsas.fit(model, tiny_tok, engine_sets, seed=seed, acc_threshold=0.5, progress=False)
        assert st.config["fit"]["seed"] == seed
        accs[seed] = [r["accuracy"] for r in st.report()]
    assert accs[0] != accs[7]  # the folds moved with the seed
    again = dsas.fit(model, tiny_tok, engine_sets, seed=7, acc_threshold=0.5, progress=False)
    assert [r["accuracy"] for r in again.report()] == accs[7]


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"temperature": float("nan")}, "DSASConfig.temperature"),
        ({"offset": float("inf")}, "DSASConfig.offset"),
        ({"pca_dim": "5"}, "DSASConfig.pca_dim"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_option_values_fail_before_fitting(model, tiny_tok, engine_sets, opts, match):
    with pytest.raises(ValueError, match=match):
        dsas.fit(model, tiny_tok, engine_sets, progress=False, **opts)


def test_source_equal_to_target_warns_that_nothing_changes(model, tiny_tok, engine_sets):
    same = dsas.PromptSets(engine_sets.source, list(engine_sets.source), engine_sets.control)
    with pytest.warns(UserWarning, match="map is zero"):
        dsas.fit(model, tiny_tok, same, gate="none", progress=False)


def test_target_prompts_can_join_the_regulators_negatives(model, tiny_tok, engine_sets):
    """negatives="control+target": the regulator is fitted against control and target prompts alike, so its logit
    drops on the target (what the source is steered to need not be steered) and it still separates the source."""
    from dsas.record import record

    kw = dict(progress=False, acc_threshold=0.5, seed=0)
    plain = dsas.fit(model, tiny_tok, engine_sets, **kw)
    both = dsas.fit(model, tiny_tok, engine_sets, negatives="control+target", **kw)
    assert both.config["options"]["dsas"]["negatives"] == "control+target"
    sites = [s for s in both.sites if s.name in both.steered and s.name in plain.steered]
    assert sites
    acts = {
        k: record(model, tiny_tok, getattr(engine_sets, k), sites, progress=False)
        for k in ("source", "target")
    }
    for s in sites:
        g0, g1 = plain.gates[s.name], both.gates[s.name]
        assert g1.value(acts["target"][s.name]).mean() < g0.value(acts["target"][s.name]).mean()
        assert g1.value(acts["source"][s.name]).mean() > g1.value(acts["target"][s.name]).mean()


def test_latched_gates_calibrate_on_the_running_means_they_read(model, tiny_tok, engine_sets):
    """control_fpr with calibrate_on="tokens" counts what the gate reads at each control token: for the running-
    mean scope, the mean of the prompt so far (what it reads while the prompt is read), not the token alone."""
    import torch

    from dsas.record import record

    opts = dict(acc_threshold=0.5, floor=0.5, control_fpr=0.3, calibrate_on="tokens", progress=False)
    st = dsas.fit(model, tiny_tok, engine_sets, scope="below+prefix", **opts)
    sites = [s for s in st.sites if st.gates[s.name].kind == "sigmoid"]
    assert sites
    acts = record(model, tiny_tok, engine_sets.control, sites, pool="all", progress=False)
    k = st.config["fit"]["skip_tokens"]
    assert k == 1  # the BOS token, left out by skip_tokens="auto": counted nowhere, read by no running mean
    for s in sites:
        toks = [t[k:] for t in acts[s.name]]
        means = torch.cat([t.cumsum(0) / torch.arange(1, len(t) + 1).unsqueeze(1) for t in toks])
        w = torch.cat([torch.full((len(t),), 1 / len(t)) for t in toks])
        on = float(((st.gates[s.name].value(means) > 0).float() * w).sum() / w.sum())
        assert abs(on - 0.3) < 1 / len(toks), s.name
    # Read per token, those offsets no longer count what they were placed on: with_scope says so and names the
    # refit; gates without a token-counted control_fpr convert silently (exactly).
    with pytest.warns(UserWarning, match=r"refit with scope='below' \(`dsas fit --option scope=below`\)"):
        below = st.with_scope("below")
    import warnings

    # Back to the reading the offsets were counted on: exact again, no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert below.with_scope("below+prefix").config["options"]["dsas"]["fitted_scope"] == "below+prefix"
    with pytest.warns(UserWarning, match=r"calibrated on control tokens read as scope='below\+prefix'"):
        below.with_scope("below+prefix").with_scope("below")

    plain = dsas.fit(model, tiny_tok, engine_sets, scope="below+prefix", acc_threshold=0.5, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.with_scope("below").with_scope("below+prefix")


def test_split_calibrates_the_pool_it_decides_with(model, tiny_tok, engine_sets):
    """Under `split`, control_fpr places the one pooled decision, not each regulator: the running mean of the
    readers' mean logit opens (> the floor) on that share of the control prompts' tokens (each prompt weighted
    once; the removal preset's target prompts train the regulators but are not counted), as the gate reads
    them at run time."""
    import torch

    from dsas.record import record

    p = 0.3
    cfg = dsas.DSASConfig.removal(control_fpr=p, acc_threshold=0.5)
    st = dsas.fit(model, tiny_tok, engine_sets, progress=False, dsas=cfg)
    readers = [n for n in st.steered if st.gates[n].mult == 0.0]
    assert len(readers) >= 2  # a pool of several, which spreads less than any one regulator
    sites = [s for s in st.sites if s.name in readers]
    texts = engine_sets.control
    acts = record(model, tiny_tok, texts, sites, pool="all", progress=False)
    k = st.config["fit"]["skip_tokens"]  # the BOS token (skip_tokens="auto")
    pool = sum(
        torch.cat([t[k:].double() @ st.gates[n].w.double() + st.gates[n].b for t in acts[n]]) for n in readers
    ) / len(readers)
    lens = [len(t) - k for t in acts[readers[0]]]
    means = torch.cat(
        [c.cumsum(0) / torch.arange(1, len(c) + 1) for c in pool.split(lens)]
    )  # what the latched gate reads at each token
    w = torch.cat([torch.full((n,), 1 / n) for n in lens])
    opened = float(((means > 0).double() * w).sum() / w.sum())  # floor 0.5: open when the logit is > 0
    # Within one token's weight of p (each regulator placed at p alone, their pool opens on fewer).
    assert abs(opened - p) <= max(1 / n for n in lens) / len(texts)


def test_skip_tokens_fits_without_the_first_tokens_and_gates_read_it(model, tiny_tok, engine_sets, tmp_path):
    """CAA's shift is the mean difference of token-means that leave the first token (the attention sink) out; the
    gates and the saved artifact carry the same skip for the running means they read at run time."""
    from dsas.record import record

    st = dsas.fit(model, tiny_tok, engine_sets, progress=False, acc_threshold=0.5, skip_tokens=1)
    assert st.config["fit"]["skip_tokens"] == 1
    assert {st.gates[n].skip for n in st.steered} == {1}
    acts = {
        k: record(model, tiny_tok, getattr(engine_sets, k), st.sites, pool="all", progress=False)
        for k in ("source", "target")
    }
    for s in st.sites:
        mu = {k: torch.stack([t[1:].mean(0) for t in v[s.name]]).mean(0) for k, v in acts.items()}
        torch.testing.assert_close(st.maps[s.name].shift, mu["target"] - mu["source"], rtol=1e-4, atol=1e-5)
    plain = dsas.fit(model, tiny_tok, engine_sets, progress=False, acc_threshold=0.5, skip_tokens=0)
    assert not torch.allclose(plain.maps[st.sites[-1].name].shift, st.maps[st.sites[-1].name].shift)
    st.save(tmp_path / "s")
    back = dsas.Steerer.load(tmp_path / "s", model=model)
    assert [back.gates[n].skip for n in back.steered] == [st.gates[n].skip for n in st.steered]
    with pytest.raises(ValueError, match="skip_tokens must be >= 0"):
        dsas.fit(model, tiny_tok, engine_sets, progress=False, skip_tokens=-1)


def test_skip_tokens_auto_leaves_out_the_attention_sink_and_nothing_else(model, tiny_tok, engine_sets):
    """The default `skip_tokens="auto"` skips the attention sink, the first token: the BOS token the tokenizer
    prepends, or the first real token where it prepends none. Either way the fit is the `skip_tokens=1` fit bit
    for bit and saves 1; an explicit `skip_tokens=0` (the paper's token-mean) saves the same config as before the
    option existed, so caches keyed by it stay valid."""
    from conftest import make_tiny_tokenizer

    from dsas.fit import FitConfig, prepended_specials, resolve_fit_config

    plain_tok = make_tiny_tokenizer(bos=False)
    assert prepended_specials(tiny_tok) == 1 and prepended_specials(plain_tok) == 0
    assert resolve_fit_config(FitConfig(), tiny_tok).skip_tokens == 1
    assert resolve_fit_config(FitConfig(), plain_tok).skip_tokens == 1
    assert resolve_fit_config(FitConfig(), None).skip_tokens == 0  # images
    with pytest.raises(RuntimeError, match="unresolved"):
        _ = FitConfig().skip
    kw = dict(progress=False, acc_threshold=0.5)
    for tok in (tiny_tok, plain_tok):
        auto, explicit = (
            dsas.fit(model, tok, engine_sets, **kw),
            dsas.fit(model, tok, engine_sets, skip_tokens=1, **kw),
        )
        assert auto.steered == explicit.steered
        assert (
            auto.config["fit"]
            == explicit.config["fit"]
            == {"batch_size": 16, "max_length": 128, "seed": 0, "skip_tokens": 1}
        )
        assert {auto.gates[n].skip for n in auto.steered} == {1}
        for n in auto.steered:
            assert torch.equal(auto.maps[n].shift, explicit.maps[n].shift)
            assert (
                torch.equal(auto.gates[n].w, explicit.gates[n].w) and auto.gates[n].b == explicit.gates[n].b
            )
    paper = dsas.fit(model, plain_tok, engine_sets, skip_tokens=0, **kw)
    assert paper.config["fit"] == {"batch_size": 16, "max_length": 128, "seed": 0}
    assert {paper.gates[n].skip for n in paper.steered} == {0}


def test_skip_tokens_reaches_lineas_training(model, tiny_tok, engine_sets):
    """LinEAS compares the steered source token-means with the target's: with `skip_tokens` both leave the first
    token out, so the start of training (identity maps) measures a different objective."""
    kw = dict(method="lineas", gate="none", progress=False, steps=3)
    a = dsas.fit(model, tiny_tok, engine_sets, skip_tokens=0, **kw)
    b = dsas.fit(model, tiny_tok, engine_sets, skip_tokens=1, **kw)
    assert b.config["fit"]["skip_tokens"] == 1
    assert a.config["training"]["objective_start"] != pytest.approx(b.config["training"]["objective_start"])
    assert all(torch.isfinite(m.shift).all() for m in b.maps.values())
