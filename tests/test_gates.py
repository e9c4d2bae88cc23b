"""The DSAS regulator: folding, accuracy modes, the accuracy gate and its policies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsas.gates import DSASConfig, SiteGate, fit_pipeline, fit_regulator, fold_pipeline


def _planted(n=32, d=40, sep=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    src = torch.randn(n, d, generator=g) + sep * u
    ctl = torch.randn(n, d, generator=g)
    return src, ctl


def test_folded_gate_equals_sklearn_predict_proba():
    src, ctl = _planted(sep=1.5)
    X = torch.cat([src, ctl]).double().numpy()
    y = np.r_[np.ones(32), np.zeros(32)]
    pipe = fit_pipeline(X, y, None, 5, 1.0)
    w, b = fold_pipeline(pipe)
    gate = SiteGate("sigmoid", torch.from_numpy(w).float(), b)
    z = torch.randn(100, 40) * 2
    ref = pipe.predict_proba(z.double().numpy())[:, 1]
    np.testing.assert_allclose(gate.value(z).numpy(), ref, atol=1e-5, rtol=0)
    fit = fit_regulator(src, ctl, DSASConfig())
    np.testing.assert_allclose(fit.gate.value(z).numpy(), ref, atol=1e-5, rtol=0)


def test_separable_site_is_active_and_noise_site_is_off():
    src, ctl = _planted(sep=6.0)
    good = fit_regulator(src, ctl, DSASConfig())
    assert good.accuracy == 1.0 and good.active and good.steered
    gs, gc = good.gate.value(src), good.gate.value(ctl)
    assert gs.mean() > 0.95 and gc.mean() < 0.05 and gs.min() > gc.max()
    noise = fit_regulator(*_planted(sep=0.0, seed=1), DSASConfig())
    assert noise.accuracy < 0.75 and not noise.active and not noise.steered


def test_inactive_policies_and_soft_gate():
    src, ctl = _planted(sep=0.0, seed=1)
    acc = fit_regulator(src, ctl, DSASConfig()).accuracy
    van = fit_regulator(src, ctl, DSASConfig(inactive="vanilla"))
    assert van.steered and van.gate.kind == "const" and van.gate.mult == 1.0
    keep = fit_regulator(src, ctl, DSASConfig(inactive="keep"))
    assert keep.steered and keep.gate.kind == "sigmoid"
    soft = fit_regulator(src, ctl, DSASConfig(soft=True))
    assert soft.gate.mult == pytest.approx(float(np.clip((acc - 0.5) / 0.25, 0, 1)))
    assert soft.steered == (soft.gate.mult > 0)


@pytest.mark.parametrize("mode", ["cv", "train", "holdout"])
def test_accuracy_modes(mode):
    src, ctl = _planted(sep=6.0)
    assert fit_regulator(src, ctl, DSASConfig(acc_mode=mode)).accuracy == 1.0
    src, ctl = _planted(sep=0.0, seed=2)
    acc = fit_regulator(src, ctl, DSASConfig(acc_mode=mode)).accuracy
    assert acc < 0.85 if mode != "train" else acc >= 0.5  # train accuracy is optimistic by design


def test_token_features_group_cv():
    g = torch.Generator().manual_seed(0)
    u = torch.zeros(16)
    u[0] = 5.0
    src = [torch.randn(int(k), 16, generator=g) + u for k in torch.randint(3, 9, (20,), generator=g)]
    ctl = [torch.randn(int(k), 16, generator=g) for k in torch.randint(3, 9, (20,), generator=g)]
    fit = fit_regulator(src, ctl, DSASConfig(features="tokens"))
    assert fit.accuracy > 0.95 and fit.active
    assert fit.gate.value(torch.cat(src)).mean() > 0.9 > 0.1 > fit.gate.value(torch.cat(ctl)).mean()


def test_temperature_and_offset_fold_in():
    src, ctl = _planted(sep=2.0)
    base = fit_regulator(src, ctl, DSASConfig())
    warm = fit_regulator(src, ctl, DSASConfig(temperature=2.0, offset=1.0))
    z = torch.randn(10, 40)
    s = z @ base.gate.w + base.gate.b
    torch.testing.assert_close(warm.gate.value(z), torch.sigmoid((s - 1.0) / 2.0), rtol=1e-5, atol=1e-6)


def test_config_validation():
    for bad in (
        dict(acc_mode="loo"),
        dict(features="max"),
        dict(inactive="on"),
        dict(pca_dim=0),
        dict(acc_threshold=0.2),
        dict(temperature=0),
    ):
        with pytest.raises(ValueError, match="DSASConfig"):
            DSASConfig(**bad)
    with pytest.raises(ValueError, match="needs a weight"):
        SiteGate("sigmoid")
    with pytest.raises(ValueError, match=r"DSASConfig\.floor"):
        DSASConfig(floor=1.0)
    with pytest.raises(ValueError, match="floor"):
        SiteGate("relu", torch.ones(2), floor=0.5)
    with pytest.raises(ValueError, match="calibrate_on"):
        DSASConfig(calibrate_on="prompts")


def test_control_fpr_calibrates_the_midpoint_on_the_control_set():
    """With control_fpr=p, a fraction p of control examples gets g > 0.5, whatever the regression's midpoint."""
    gen = torch.Generator().manual_seed(0)
    d = 8
    src = torch.randn(60, d, generator=gen) + 0.8
    ctl = torch.randn(200, d, generator=gen)
    for p in (0.05, 0.2):
        g = fit_regulator(src, ctl, DSASConfig(control_fpr=p)).gate
        on = (g.value(ctl) > 0.5).float().mean().item()
        assert abs(on - p) <= 1 / len(ctl)
    plain = fit_regulator(src, ctl, DSASConfig()).gate
    assert abs((plain.value(ctl) > 0.5).float().mean().item() - 0.2) > 0.05  # the option moved the midpoint
    toks_src = [torch.randn(5, d, generator=gen) + 0.8 for _ in range(20)]
    toks_ctl = [torch.randn(int(k), d, generator=gen) for k in torch.randint(2, 9, (40,), generator=gen)]
    g = fit_regulator(toks_src, toks_ctl, DSASConfig(features="tokens", control_fpr=0.1)).gate
    weights = torch.cat([torch.full((len(t),), 1 / len(t)) for t in toks_ctl])
    on = ((g.value(torch.cat(toks_ctl)) > 0.5).float() * weights).sum() / weights.sum()
    assert abs(float(on) - 0.1) < 0.05  # per-prompt weighted tokens


def test_a_floor_with_control_fpr_keeps_the_gate_exactly_shut_on_the_rest_of_the_control_set():
    """floor + control_fpr=p: the gate is open at all (g > 0) on a fraction p of control examples, exactly 0 on
    the others; calibrate_on="tokens" counts the control prompts' tokens (weighted per prompt) instead of the
    token-mean examples the regulator was trained on."""
    gen = torch.Generator().manual_seed(0)
    d = 8
    src = torch.randn(60, d, generator=gen) + 0.8
    ctl = torch.randn(200, d, generator=gen)
    g = fit_regulator(src, ctl, DSASConfig(control_fpr=0.1, floor=0.5)).gate
    assert g.floor == 0.5
    on = g.value(ctl) > 0
    assert abs(on.float().mean().item() - 0.1) <= 1 / len(ctl)
    toks = [torch.randn(int(k), d, generator=gen) * 2 for k in torch.randint(2, 9, (200,), generator=gen)]
    means = torch.stack([t.mean(0) for t in toks])
    cfg = DSASConfig(control_fpr=0.1, floor=0.5, calibrate_on="tokens")
    g = fit_regulator(src, means, cfg, control_tokens=toks).gate
    weights = torch.cat([torch.full((len(t),), 1 / len(t)) for t in toks])
    on_tok = float(((g.value(torch.cat(toks)) > 0).float() * weights).sum() / weights.sum())
    assert abs(on_tok - 0.1) < 0.02
    # Token-mean examples are less spread than single tokens: calibrated on tokens, fewer means pass.
    assert (g.value(means) > 0).float().mean().item() < 0.05
    with pytest.raises(ValueError, match="token activations"):
        fit_regulator(src, means, cfg)


def test_auto_scope_pools_for_text_and_stays_per_token_for_images_or_kept_sites():
    from dsas.gates import resolve_scope

    assert resolve_scope(DSASConfig(), text=True).scope == "below+prefix"
    assert resolve_scope(DSASConfig(), text=False).scope == "token"
    assert resolve_scope(DSASConfig(inactive="vanilla"), text=True).scope == "token"
    assert resolve_scope(DSASConfig(scope="prefix"), text=True).scope == "prefix"
    src, ctl = _planted()
    assert fit_regulator(src, ctl, DSASConfig()).gate.scope == "token"  # a lone regulator reads its own token


def test_the_removal_preset_is_the_documented_option_set():
    cfg = DSASConfig.removal(control_fpr=0.1)
    assert (cfg.scope, cfg.split, cfg.floor, cfg.control_fpr, cfg.calibrate_on, cfg.negatives) == (
        "below+prefix",
        0.5,
        0.5,
        0.1,
        "tokens",
        "control+target",
    )
