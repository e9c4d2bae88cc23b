"""Site mapping and the start-up checks, without an engine: HF site names -> vLLM modules, refusals."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

# Skipped where vLLM is not installed (the main .venv): these tests run in .venv-vllm.
pytest.importorskip("vllm.entrypoints.llm")

import torch
import transformers as tf

import dsas
from dsas.serving.sites import SUPPORTED_ARCHITECTURES, vllm_site_name
from dsas.serving.state import load_steerers

SHAPE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
CASES = {
    "LlamaForCausalLM": ("LlamaConfig", "llama", "LlamaDecoderLayer"),
    "MistralForCausalLM": ("MistralConfig", "mistral", "MistralDecoderLayer"),
    "Qwen2ForCausalLM": ("Qwen2Config", "qwen2", "Qwen2DecoderLayer"),
    "Gemma2ForCausalLM": ("Gemma2Config", "gemma2", "Gemma2DecoderLayer"),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", "gemma3", "Gemma3DecoderLayer"),
}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_default_hf_sites_map_onto_modules_vllm_builds(arch: str):
    import importlib

    cfg_name, module, layer_cls = CASES[arch]
    torch.manual_seed(0)
    model = getattr(tf, arch)(getattr(tf, cfg_name)(**SHAPE)).eval()
    sites = dsas.resolve_sites(model, "auto")
    assert len(sites) == 2 * SHAPE["num_hidden_layers"]
    # vLLM's decoder layer of this architecture assigns a submodule under each mapped name.
    cls = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), layer_cls)
    source = "".join(inspect.getsource(c) for c in cls.__mro__ if c.__module__.startswith("vllm."))
    for s in sites:
        name = vllm_site_name(arch, s.name)
        assert name == s.name
        assert f"self.{name.rsplit('.', 1)[1]} = " in source


def test_unsupported_architectures_and_sites_are_refused_with_what_is_supported():
    with pytest.raises(ValueError, match="no site mapping for architecture 'GPT2LMHeadModel'") as err:
        vllm_site_name("GPT2LMHeadModel", "transformer.h.0.attn")
    assert all(a in str(err.value) for a in SUPPORTED_ARCHITECTURES)
    with pytest.raises(ValueError, match="residual increments"):
        vllm_site_name("LlamaForCausalLM", "model.layers.0")


def test_a_steerer_for_another_model_is_refused_naming_it_and_the_mismatch(steerer_dirs: dict[str, Path]):
    cfg = tf.AutoConfig.from_pretrained(_checkpoint())
    emb = _embedding()
    assert set(load_steerers({"tox": steerer_dirs["tox"]}, cfg, emb)) == {"tox"}  # the served model itself
    wide = tf.AutoConfig.from_pretrained(_checkpoint(), hidden_size=640)
    with pytest.raises(ValueError, match=r"steerer 'tox' .*hidden_size: fitted on 576, this model has 640"):
        load_steerers({"tox": steerer_dirs["tox"]}, wide, None)
    with pytest.raises(ValueError, match=r"steerer 'tox' .* other weights"):
        load_steerers({"tox": steerer_dirs["tox"]}, cfg, emb + 0.1)
    with pytest.raises(ValueError, match="steerer 'gone'"):
        load_steerers({"gone": steerer_dirs["tox"].parent / "missing"}, cfg, None)


@pytest.mark.parametrize(
    ("source", "scope", "per_token"), [("tox", "prefix", "token"), ("pool", "below+prefix", "below")]
)
def test_running_mean_gates_are_refused_and_served_per_token(
    steerer_dirs: dict[str, Path], tmp_path: Path, source: str, scope: str, per_token: str
):
    st = dsas.Steerer.load(steerer_dirs[source])
    for name in st.steered:
        st.gates[name] = dataclasses.replace(st.gates[name], scope=scope)
    st.save(tmp_path / "prefix")
    cfg = tf.AutoConfig.from_pretrained(_checkpoint())
    with pytest.raises(ValueError, match=rf"steerer 'p' .*scope='{re.escape(scope)}'.*with_scope"):
        load_steerers({"p": tmp_path / "prefix"}, cfg, None)
    # The fix the message names: the same regulators read per token.
    st.with_scope(per_token).save(tmp_path / "served")
    assert set(load_steerers({"p": tmp_path / "served"}, cfg, None)) == {"p"}


def _checkpoint() -> str:
    from dsas.serving.launch import resolve_model

    return resolve_model("smollm2-135m")


def _embedding() -> torch.Tensor:
    model, _ = dsas.load_model("smollm2-135m")
    return model.get_input_embeddings().weight.detach()
