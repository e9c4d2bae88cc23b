"""save -> load reproduces outputs; a steerer refuses a model it was not fitted on; no pickle."""

from __future__ import annotations

import json
import re

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


# -- integrity: a pair written together, checked on load ------------------------------------------------------


def _two_steerers(model, tok, sets):
    a = dsas.fit(model, tok, sets, gate="none", progress=False)
    b = dsas.fit(model, tok, sets, gate="dsas", acc_threshold=0.5, progress=False)
    return a, b


def _same(x: dsas.Steerer, y: dsas.Steerer) -> bool:
    from dsas.artifact import content_hash

    return content_hash(*_payload(x)) == content_hash(*_payload(y))


def _payload(st, tmp=None):
    import tempfile

    from dsas.artifact import read_artifact

    with tempfile.TemporaryDirectory() as d:
        st.save(d)
        return read_artifact(d)


def test_tensor_file_from_another_save_is_refused(model, tiny_tok, engine_sets, tmp_path):
    a, b = _two_steerers(model, tiny_tok, engine_sets)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    (tmp_path / "a" / TENSORS_NAME).write_bytes((tmp_path / "b" / TENSORS_NAME).read_bytes())
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "a" / TENSORS_NAME)) + ".*sha256"):
        dsas.Steerer.load(tmp_path / "a")


@pytest.mark.parametrize("crash_at", [0, 1, 2])
def test_save_interrupted_at_any_step_loads_old_or_new(
    model, tiny_tok, engine_sets, tmp_path, monkeypatch, crash_at
):
    """Every os.replace of a save is a point where kill -9 can land: stop there, and a load sees a whole
    steerer (the old one before the switch, the new one after), and the next save leaves no stray file."""
    import os

    import dsas.artifact

    a, b = _two_steerers(model, tiny_tok, engine_sets)
    a.save(tmp_path / "s")
    real, calls = os.replace, []

    def crash(src, dst):
        if len(calls) == crash_at:
            raise KeyboardInterrupt("killed")
        calls.append(dst)
        real(src, dst)

    monkeypatch.setattr(dsas.artifact.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        b.save(tmp_path / "s")
    monkeypatch.setattr(dsas.artifact.os, "replace", real)
    back = dsas.Steerer.load(tmp_path / "s", model=model)
    assert _same(back, a) or _same(back, b)
    assert not (_same(back, a) and _same(back, b))
    b.save(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [CONFIG_NAME, TENSORS_NAME]
    assert _same(dsas.Steerer.load(tmp_path / "s"), b)


def test_stray_tmp_files_are_removed_by_the_next_save(model, tiny_tok, engine_sets, tmp_path):
    st = dsas.fit(model, tiny_tok, engine_sets, gate="none", progress=False)
    st.save(tmp_path / "s")
    (tmp_path / "s" / "tmpab12cd.tmp").write_bytes(b"half a file")  # what older interrupted saves left
    (tmp_path / "s" / ".tmpHvZA2p").write_bytes(b"half a file")
    st.save(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [CONFIG_NAME, TENSORS_NAME]


def test_edited_config_is_refused_naming_the_file(model, tiny_tok, engine_sets, tmp_path):
    st = dsas.fit(model, tiny_tok, engine_sets, gate="dsas", acc_threshold=0.5, progress=False)
    st.save(tmp_path / "s")
    p = tmp_path / "s" / CONFIG_NAME
    cfg = json.loads(p.read_text())
    cfg["sites"][0]["gate"]["b"] += 1.0
    p.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=re.escape(str(p)) + ".*changed after it was saved"):
        dsas.Steerer.load(tmp_path / "s")
    del cfg["integrity"]  # an edit made on purpose: the checks are dropped with the record
    p.write_text(json.dumps(cfg))
    assert dsas.Steerer.load(tmp_path / "s").gates[st.site_names[0]].b == st.gates[st.site_names[0]].b + 1.0


def test_damaged_config_names_the_file(model, tiny_tok, engine_sets, tmp_path):
    st = dsas.fit(model, tiny_tok, engine_sets, gate="none", progress=False)
    st.save(tmp_path / "s")
    p = tmp_path / "s" / CONFIG_NAME
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(ValueError, match=re.escape(f"{p} is not valid JSON")):
        dsas.Steerer.load(tmp_path / "s")
    p.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=re.escape(f"{p} is not valid JSON")):
        dsas.Steerer.load(tmp_path / "s")


def _legacy_copy(src, dst, edit):
    """A steerer folder as an earlier dsas wrote it (no integrity record), with `edit` applied to its tensors."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / CONFIG_NAME).read_text())
    del cfg["integrity"]
    (dst / CONFIG_NAME).write_text(json.dumps(cfg))
    t = load_file(str(dst / TENSORS_NAME))
    edit(t)
    save_file(t, str(dst / TENSORS_NAME))
    return dst


def test_non_finite_payload_is_refused_naming_the_file(model, tiny_tok, engine_sets, tmp_path):
    st = dsas.fit(model, tiny_tok, engine_sets, gate="none", progress=False)
    st.save(tmp_path / "s")
    site = st.site_names[1]

    def poison(t):
        t[f"{site}/map.shift"][3] = float("nan")

    bad = _legacy_copy(tmp_path / "s", tmp_path / "nan", poison)
    with pytest.raises(ValueError, match=rf"{bad / TENSORS_NAME}: {site}/map.shift holds NaN or inf"):
        dsas.Steerer.load(bad)
    st.maps[site].shift[0] = float("inf")
    with pytest.raises(ValueError, match=rf"{site}/map.shift holds NaN or inf"):
        st.save(tmp_path / "inf")


def test_wrong_tensor_size_is_refused_naming_the_file(model, tiny_tok, engine_sets, tmp_path):
    st = dsas.fit(model, tiny_tok, engine_sets, gate="dsas", acc_threshold=0.5, progress=False)
    st.save(tmp_path / "s")
    site = st.site_names[0]

    def shorten(t):
        t[f"{site}/map.shift"] = t[f"{site}/map.shift"][:-1].clone()

    bad = _legacy_copy(tmp_path / "s", tmp_path / "short", shorten)
    with pytest.raises(ValueError, match=rf"{bad / TENSORS_NAME}: {site}/map.shift has 31 values; .*32"):
        dsas.Steerer.load(bad)

    def stray(t):
        t["model.layers.9.mlp/map.shift"] = torch.zeros(32)

    bad = _legacy_copy(tmp_path / "s", tmp_path / "stray", stray)
    with pytest.raises(ValueError, match=rf"{bad / TENSORS_NAME}: .*model.layers.9.mlp.* not listed"):
        dsas.Steerer.load(bad)


def test_content_hash_follows_content_not_bookkeeping(model, tiny_tok, engine_sets, tmp_path):
    from dsas.artifact import content_hash, read_artifact

    a, b = _two_steerers(model, tiny_tok, engine_sets)
    a.save(tmp_path / "a")
    h = content_hash(*read_artifact(tmp_path / "a"))
    assert len(h) == 64 and h == content_hash(*_payload(dsas.Steerer.load(tmp_path / "a")))
    a.config["fit_seconds"] = 123.0  # timing differs between identical refits
    assert content_hash(*_payload(a)) == h
    assert content_hash(*_payload(b)) != h
    a.maps[a.site_names[0]].shift[0] += 1e-6
    assert content_hash(*_payload(a)) != h
