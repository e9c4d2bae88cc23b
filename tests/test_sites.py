"""Site discovery on five architectures, overrides, and clear errors."""

from __future__ import annotations

import pytest
import torch

from dsas.sites import find_blocks, output_tensor, replace_output, resolve_sites

EXPECTED_AUTO = {
    "llama": ("model.layers.{}.self_attn", "model.layers.{}.mlp"),
    "qwen2": ("model.layers.{}.self_attn", "model.layers.{}.mlp"),
    "gemma2": ("model.layers.{}.post_attention_layernorm", "model.layers.{}.post_feedforward_layernorm"),
    "gpt2": ("transformer.h.{}.attn", "transformer.h.{}.mlp"),
    "gpt_neox": ("gpt_neox.layers.{}.attention", "gpt_neox.layers.{}.mlp"),
}


def test_auto_sites_are_residual_increments(arch, arch_model):
    sites = resolve_sites(arch_model)
    attn, mlp = EXPECTED_AUTO[arch]
    assert [s.name for s in sites] == [p.format(i) for i in range(3) for p in (attn, mlp)]
    assert [s.kind for s in sites] == ["attn", "mlp"] * 3
    assert [s.layer for s in sites] == [0, 0, 1, 1, 2, 2]


def test_kinds_blocks_and_layers(arch, arch_model):
    block_name, blocks = find_blocks(arch_model)
    assert len(blocks) == 3
    assert [s.name for s in resolve_sites(arch_model, "blocks")] == [f"{block_name}.{i}" for i in range(3)]
    assert all(s.kind == "attn" for s in resolve_sites(arch_model, "attn"))
    assert [s.layer for s in resolve_sites(arch_model, "mlp", layers=[0, -1])] == [0, 2]


@pytest.fixture(scope="module")
def llama(tiny_tok):
    from conftest import make_tiny_model

    return make_tiny_model("llama", len(tiny_tok))


def test_regex_and_name_lists(llama):
    arch_model = llama
    sites = resolve_sites(arch_model, r"model\.layers\.[01]\.mlp")
    assert [s.name for s in sites] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(s.kind == "mlp" for s in sites)
    # A list is returned in model order whatever the order given.
    names = ["model.layers.2.self_attn", "model.layers.0.self_attn:0"]
    assert [s.name for s in resolve_sites(arch_model, names)] == names[::-1]
    assert resolve_sites(arch_model, ["model.layers.0.self_attn:0"])[0].index == 0


def test_unknown_sites_list_candidates(llama):
    arch_model = llama
    with pytest.raises(ValueError, match=r"Close candidates: \['model.layers.0.mlp'"):
        resolve_sites(arch_model, ["model.layers.0.mlpp"])
    with pytest.raises(ValueError, match="no module name matches"):
        resolve_sites(arch_model, r"decoder\.blocks\.\d+")
    with pytest.raises(ValueError, match="selects no site"):
        resolve_sites(arch_model, "auto", layers=[])
    with pytest.raises(ValueError, match="same site twice"):
        resolve_sites(arch_model, ["model.layers.0.mlp", "model.layers.0.mlp"])


def test_tuple_and_tensor_outputs():
    t = torch.zeros(2, 3)
    new = torch.ones(2, 3)
    assert replace_output(t, new) is new
    out = replace_output((t, "weights"), new)
    assert isinstance(out, tuple) and out[0] is new and out[1] == "weights"
    assert output_tensor((None, t), 1) is t
    with pytest.raises(TypeError, match="holds no tensor"):
        output_tensor((None, t), 0)
