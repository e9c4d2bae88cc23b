"""Site discovery on five architectures, overrides, and clear errors."""

from __future__ import annotations

import pytest
import torch

from dsas.sites import find_blocks, resolve_sites
from dsas.torchutil import output_tensor, replace_output

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


def test_a_block_list_is_not_a_site(llama):
    """A ModuleList never runs, so its hook would never fire: name an element instead."""
    with pytest.raises(ValueError, match=r"'model.layers' is a ModuleList of 3 modules.*model.layers.0"):
        resolve_sites(llama, ["model.layers"])
    with pytest.raises(ValueError, match="ModuleList"):
        resolve_sites(llama, "model.layers")
    # A regex that also matches the list keeps only modules that run.
    assert [s.name for s in resolve_sites(llama, r"model\.layers(\.\d+)?")] == [
        f"model.layers.{i}" for i in range(3)
    ]


@pytest.mark.parametrize("layers", [[3], [-4], [0, 40], ["1"]])
def test_out_of_range_layers_are_refused_not_wrapped(llama, layers):
    with pytest.raises(ValueError, match=r"is not a block index of this model, which has 3 blocks"):
        resolve_sites(llama, "auto", layers=layers)
    assert {s.layer for s in resolve_sites(llama, "auto", layers=[-1, 0])} == {0, 2}


def test_get_module_resolves_wrapper_prefixes(llama):
    from dsas.sites import get_module, resolve_name

    mlp = llama.model.layers[1].mlp
    assert get_module(llama, "base_model.model.model.layers.1.mlp") is mlp
    assert get_module(llama, "_orig_mod.model.layers.1.mlp:0") is mlp

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    assert get_module(Wrapper(llama), "model.layers.1.mlp") is mlp
    names = {n for n, _ in Wrapper(llama).named_modules()}
    assert resolve_name("base_model.model.model.layers.1.mlp", names) == "module.model.layers.1.mlp"
    assert resolve_name("model.layers.9.mlp", names) is None
    with pytest.raises(AttributeError):
        get_module(llama, "model.layers.1.mlpp")


# ---- weight signature --------------------------------------------------------------------------------------


def _fp(model):
    from dsas.sites import fingerprint

    fp = fingerprint(model, resolve_sites(model, "auto"))
    fp["module_names"] = {n for n, _ in model.named_modules()}
    return fp


def test_same_config_other_weights_is_refused(tiny_tok, engine_sets, tmp_path, single_thread):
    """Random init with another seed has the same config: only the weights tell it apart."""
    from conftest import make_tiny_model

    import dsas

    model = make_tiny_model("llama", len(tiny_tok))
    st = dsas.fit(model, tiny_tok, engine_sets, gate="none", progress=False)
    st.save(tmp_path / "s")
    assert st.fingerprint["weights"]["values"]
    other = make_tiny_model("llama", len(tiny_tok), seed=1)
    with pytest.raises(ValueError, match=r"same shape, other weights .*check_weights=False"):
        dsas.Steerer.load(tmp_path / "s", model=other)
    dsas.Steerer.load(tmp_path / "s", model=make_tiny_model("llama", len(tiny_tok)))  # same weights: fine


def test_weight_check_opt_out_and_legacy_fingerprints(tiny_tok):
    from conftest import make_tiny_model

    from dsas.artifact import check_fingerprint

    fitted, other = (
        _fp(make_tiny_model("gpt2", len(tiny_tok))),
        _fp(make_tiny_model("gpt2", len(tiny_tok), seed=3)),
    )
    with pytest.raises(ValueError, match=r"other weights \(embed\[1\]"):
        check_fingerprint(fitted, other)
    check_fingerprint(fitted, other, check_weights=False)
    legacy = {k: v for k, v in fitted.items() if k != "weights"}  # saved before signatures existed
    check_fingerprint(legacy, other)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_signature_survives_dtype_and_vocab_resize(tiny_tok, dtype):
    import copy

    from conftest import make_tiny_model

    from dsas.artifact import check_fingerprint

    model = make_tiny_model("qwen2", len(tiny_tok))
    fitted = _fp(model)
    check_fingerprint(fitted, _fp(copy.deepcopy(model).to(dtype)))
    resized = copy.deepcopy(model)
    resized.resize_token_embeddings(len(tiny_tok) + 300)
    check_fingerprint(fitted, _fp(resized))


def test_weight_signature_sees_a_change_in_the_last_block(llama):
    import copy

    from dsas.sites import compare_weight_signatures, weight_signature

    changed = copy.deepcopy(llama)
    with torch.no_grad():
        changed.model.layers[-1].mlp.down_proj.weight.mul_(1.05)
    why = compare_weight_signatures(weight_signature(llama), weight_signature(changed))
    assert why is not None and why.startswith("blocks.2.mlp.down_proj.weight")
    assert weight_signature(torch.nn.Module()) is None
    with torch.device("meta"):
        from conftest import make_tiny_model

        assert weight_signature(make_tiny_model("llama", 50)) is None
