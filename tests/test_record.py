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
