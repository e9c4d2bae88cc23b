"""save -> load reproduces outputs; a steerer refuses a model it was not fitted on; no pickle."""

from __future__ import annotations

import json

import pytest
import torch

import dsas
from dsas.artifact import CONFIG_NAME, TENSORS_NAME

PROMPTS = ["you stupid idiot and", "the city river history is"]


@pytest.fixture(scope="module")
def model(tiny_tok):
    from conftest import make_tiny_model

    return make_tiny_model("qwen2", len(tiny_tok))


@pytest.mark.parametrize("gate", ["none", "dsas"])
def test_save_load_reproduces_outputs(model, left_tok, engine_sets, tmp_path, gate):
    opts = dict(acc_threshold=0.5, pca_dim=3) if gate == "dsas" else {}
    st = dsas.fit(model, left_tok, engine_sets, gate=gate, progress=False, **opts)
    enc = left_tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with st.apply(model, strength=5.0, trace=True) as t1:
        a = model.generate(**enc, **kw)
    st.save(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [CONFIG_NAME, TENSORS_NAME]
    cfg = json.loads((tmp_path / "s" / CONFIG_NAME).read_text())
    assert cfg["schema_version"] == 1 and cfg["config"]["gate"] == gate
    assert cfg["fingerprint"]["hidden_size"] == 32 and cfg["fingerprint"]["num_layers"] == 3
    if gate == "dsas":
        assert cfg["config"]["options"]["dsas"]["pca_dim"] == 3
        assert all("accuracy" in s["stats"] for s in cfg["sites"])
    back = dsas.Steerer.load(tmp_path / "s", model=model)
    assert back.site_names == st.site_names and back.steered == st.steered
    assert back.report() == st.report()
    with back.apply(model, strength=5.0, trace=True) as t2:
        b = model.generate(**enc, **kw)
    assert torch.equal(a, b)
    for k, v in t1.scales.items():
        # Identical parameters; the fp32 dot product may round differently with the loaded buffers' alignment.
        torch.testing.assert_close(v, t2.scales[k], rtol=1e-6, atol=1e-6, equal_nan=True)


def test_other_model_is_refused(model, tiny_tok, engine_sets, tmp_path):
    from conftest import make_tiny_model

    st = dsas.fit(model, tiny_tok, engine_sets, gate="none", progress=False)
    st.save(tmp_path / "s")
    wider = make_tiny_model("qwen2", len(tiny_tok), hidden=48)
    with pytest.raises(ValueError, match="hidden_size: fitted on 32, this model has 48"):
        dsas.Steerer.load(tmp_path / "s", model=wider)
    other = make_tiny_model("gpt2", len(tiny_tok))
    back = dsas.Steerer.load(tmp_path / "s")
    with pytest.raises(ValueError, match="different model"), back.apply(other, strength=1.0):
        pass
    assert not any(m._forward_hooks for m in other.modules())


def test_bad_artifacts(tmp_path, model, tiny_tok, engine_sets):
    with pytest.raises(FileNotFoundError, match="not a dsas steerer"):
        dsas.Steerer.load(tmp_path)
    st = dsas.fit(model, tiny_tok, engine_sets, gate="none", progress=False)
    st.save(tmp_path / "s")
    p = tmp_path / "s" / CONFIG_NAME
    cfg = json.loads(p.read_text())
    cfg["schema_version"] = 99
    p.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="schema_version 99"):
        dsas.Steerer.load(tmp_path / "s")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        st.save(tmp_path / "file")


def test_other_size_of_the_same_architecture_is_refused_up_front(model, tiny_tok, engine_sets):
    """Same class, width and depth, another MLP width: refused before any hook runs, naming the field."""
    import copy

    st = dsas.fit(model, tiny_tok, engine_sets, gate="none", progress=False)
    assert st.fingerprint["shape"]["intermediate_size"] == model.config.intermediate_size
    cfg = copy.deepcopy(model.config)
    cfg.intermediate_size = 3 * model.config.intermediate_size
    other = type(model)(cfg).eval()
    with pytest.raises(ValueError, match="intermediate_size: fitted on 64, this model has 192"):
        st.check_model(other)
    # Resizing the embeddings does not touch the sites: still accepted.
    same = copy.deepcopy(model)
    same.resize_token_embeddings(len(tiny_tok) + 8)
    st.check_model(same)
