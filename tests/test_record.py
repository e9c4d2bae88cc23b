"""Recording with padding-aware pooling: padding side and batching never change the statistics."""

from __future__ import annotations

import pytest
import torch

from dsas.record import pool_tokens, record
from dsas.sites import resolve_sites

TEXTS = ["you stupid idiot and the", "a city", "the river history is a long story of the king"]


@pytest.fixture(scope="module")
def model(tiny_tok):
    from conftest import make_tiny_model

    return make_tiny_model("llama", len(tiny_tok))


def _alone(model, tok, sites, pool):
    rows = [record(model, tok, [t], sites, pool=pool, progress=False) for t in TEXTS]
    return {s.name: torch.cat([r[s.name] for r in rows]) for s in sites}


@pytest.mark.parametrize("pool", ["mean", "last"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_pooling_ignores_padding(model, tiny_tok, pool, side):
    sites = resolve_sites(model, "auto")
    ref = _alone(model, tiny_tok, sites, pool)
    tiny_tok.padding_side = side
    try:
        got = record(model, tiny_tok, TEXTS, sites, pool=pool, batch_size=2, progress=False)
    finally:
        tiny_tok.padding_side = "right"
    for s in sites:
        assert got[s.name].dtype == torch.float32 and got[s.name].device.type == "cpu"
        torch.testing.assert_close(got[s.name], ref[s.name], rtol=1e-4, atol=1e-5)


def test_mean_equals_manual_forward(model, tiny_tok):
    site = resolve_sites(model, ["model.layers.1.mlp"])
    enc = tiny_tok([TEXTS[2]], return_tensors="pt")
    store = {}
    h = model.model.layers[1].mlp.register_forward_hook(lambda m, i, o: store.setdefault("h", o))
    with torch.no_grad():
        model(**enc)
    h.remove()
    got = record(model, tiny_tok, [TEXTS[2]], site, progress=False)["model.layers.1.mlp"]
    torch.testing.assert_close(got[0], store["h"][0].mean(0))


def test_all_tokens_keeps_real_tokens_only(model, tiny_tok):
    sites = resolve_sites(model, "mlp")
    got = record(model, tiny_tok, TEXTS, sites, pool="all", progress=False)
    lengths = [len(tiny_tok(t)["input_ids"]) for t in TEXTS]
    mean = record(model, tiny_tok, TEXTS, sites, pool="mean", progress=False)
    for s in sites:
        assert [t.shape[0] for t in got[s.name]] == lengths
        torch.testing.assert_close(torch.stack([t.mean(0) for t in got[s.name]]), mean[s.name])


def test_nan_activations_are_refused(tiny_tok):
    from conftest import make_tiny_model

    bad = make_tiny_model("llama", len(tiny_tok))
    with torch.no_grad():
        bad.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"Non-finite.*float32 or bfloat16"):
        record(bad, tiny_tok, TEXTS, resolve_sites(bad), progress=False)


def test_pool_tokens_feature_maps_and_errors():
    x = torch.arange(24.0).view(1, 2, 3, 4)
    torch.testing.assert_close(pool_tokens(x, None, "mean"), x.mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="pool="):
        pool_tokens(torch.zeros(1, 2, 3), None, "max")


def _tensors(steerer, path):
    from safetensors.torch import load_file

    steerer.save(path)
    return load_file(str(path / "dsas_steerer.safetensors"))


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
@pytest.mark.parametrize("method,gate", [("caa", "dsas"), ("lineas", "none")])
def test_fit_does_not_depend_on_the_padding_side(arch, method, gate, engine_sets, tmp_path, single_thread):
    """Absolute-position models: a left-padded prompt must be recorded (and trained on) at the positions of a
    right-padded one, so the CAA vectors, the regulator and trained maps come out the same."""
    from conftest import make_tiny_model, make_tiny_tokenizer

    import dsas

    got = {}
    for side in ("left", "right"):
        tok = make_tiny_tokenizer()
        tok.padding_side = side
        model = make_tiny_model(arch, len(tok))
        opts = {"steps": 3} if method == "lineas" else {"acc_threshold": 0.5}
        st = dsas.fit(model, tok, engine_sets, method=method, gate=gate, progress=False, batch_size=5, **opts)
        got[side] = _tensors(st, tmp_path / side)
    assert got["left"].keys() == got["right"].keys() and got["left"]
    for k, v in got["left"].items():
        torch.testing.assert_close(v, got["right"][k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_position_ids_follow_the_mask():
    from dsas.record import position_ids_from_mask

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 1, 1, 1]]


def test_prompt_longer_than_the_context_is_truncated_with_a_warning(tiny_tok, single_thread):
    from conftest import make_tiny_model

    model = make_tiny_model("gpt2", len(tiny_tok))  # n_positions=128
    sites = resolve_sites(model, "mlp")
    long = " ".join(["the city"] * 100)  # 201 tokens
    with pytest.warns(UserWarning, match="longer than the model's context of 128 tokens"):
        got = record(model, tiny_tok, [long, "a city"], sites, progress=False)
    short = record(model, tiny_tok, ["a city"], sites, progress=False)
    for s in sites:
        assert torch.isfinite(got[s.name]).all()
        torch.testing.assert_close(got[s.name][1:], short[s.name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_batch_size_is_a_clear_error(model, tiny_tok, bad):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        record(model, tiny_tok, TEXTS, resolve_sites(model, "mlp"), batch_size=bad, progress=False)


def test_drop_first_leaves_out_the_first_real_tokens_of_longer_rows():
    from dsas.record import drop_first

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 1]])
    assert torch.equal(drop_first(mask, 0), mask)
    assert torch.equal(drop_first(mask, 1), torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]]))
    assert torch.equal(drop_first(mask, 2), torch.tensor([[0, 0, 0, 0, 1], [0, 0, 1, 0, 0], [0, 0, 0, 0, 1]]))
    assert drop_first(mask, 1).dtype == mask.dtype


@pytest.mark.parametrize("side", ["left", "right"])
def test_skip_leaves_the_first_tokens_out_of_every_pool(model, tiny_tok, side):
    sites = resolve_sites(model, "mlp")
    full = record(model, tiny_tok, TEXTS, sites, pool="all", progress=False)
    tiny_tok.padding_side = side
    try:
        mean = record(model, tiny_tok, TEXTS, sites, pool="mean", batch_size=3, progress=False, skip=1)
        every = record(model, tiny_tok, TEXTS, sites, pool="all", batch_size=3, progress=False, skip=1)
        last = record(model, tiny_tok, TEXTS, sites, pool="last", batch_size=3, progress=False, skip=1)
        plain_last = record(model, tiny_tok, TEXTS, sites, pool="last", batch_size=3, progress=False)
    finally:
        tiny_tok.padding_side = "right"
    for s in sites:
        torch.testing.assert_close(mean[s.name], torch.stack([t[1:].mean(0) for t in full[s.name]]))
        for got, ref in zip(every[s.name], full[s.name], strict=True):
            torch.testing.assert_close(got, ref[1:])
        torch.testing.assert_close(last[s.name], plain_last[s.name])
    with pytest.raises(ValueError, match="skip must be an int >= 0"):
        record(model, tiny_tok, TEXTS, sites, skip=-1, progress=False)
