"""Shared offline fixtures: a word-level tokenizer and a random-init tiny Llama (no hub access needed)."""

from __future__ import annotations

import pytest
import torch

# ---- tiny_tok / tiny_lm (eval tests; reusable by any test that needs a small causal LM) ----

_TINY_TEXT = """
the a an of and to in is was it that this for on with as by at from or be are not but have has had
he she they we you i his her their our my your its who which what when where why how one two three
man woman people city country river mountain king queen war music film book game animal plant fruit
pear pears apple apples banana bananas orange tree forest water fire earth air sun moon star sky
red green blue big small old new good bad happy sad fast slow hot cold long short high low
eat eats ate run runs ran see sees saw make makes made go goes went say says said love hate like
stupid idiot nice kind friend enemy hello world yes no question answer passage title choice
cat dog bird fish horse cow house car road school church market food bread milk wine beer
first last year day night time story name place part group family member state
"""
_TINY_WORDS = _TINY_TEXT.split()
TINY_VOCAB: dict[str, int] = {"[PAD]": 0, "[UNK]": 1, "<s>": 2, "</s>": 3}
for _w in [*_TINY_WORDS, ".", ",", ":", "?", "!", "'", "-", "___", "user", "assistant"]:
    TINY_VOCAB.setdefault(_w, len(TINY_VOCAB))


def make_tiny_tokenizer(bos: bool = True):
    """Word-level tokenizer (whitespace + punctuation split, BOS prepended unless `bos` is false, `[PAD]` padding,
    chat template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(TINY_VOCAB, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", TINY_VOCAB["<s>"])]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="[PAD]", unk_token="[UNK]"
    )
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    return tok


def make_tiny_llama(vocab_size: int, seed: int = 0, initializer_range: float = 0.3):
    """Random-init 2-layer Llama (hidden 32). The large init range gives peaked logits, so greedy decoding has
    clear winners and numerical noise (padding, batch shape) cannot flip a token."""
    return make_tiny_model("llama", vocab_size, seed, layers=2, initializer_range=initializer_range)


@pytest.fixture
def single_thread():
    """Run torch on one thread for the test. Tiny models gain nothing from threads, and on a shared, loaded
    machine multi-thread spin-waiting made them ~100x slower (measured: 0.4 s vs 1 ms per forward)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tok():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_lm(tiny_tok):
    return make_tiny_llama(len(tiny_tok))


# ---- engine fixtures: random-init tiny models of several architectures ----

ARCHS = ("llama", "qwen2", "gemma2", "gpt2", "gpt_neox")


# arch -> (config class, model class, config fields beyond the shared ones). Field names follow each config.
_ARCH_TABLE = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"num_key_value_heads": 2, "head_dim": 8, "sliding_window": 64},
    ),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_positions": 128}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"max_position_embeddings": 128}),
}


def make_tiny_model(
    arch: str,
    vocab_size: int,
    seed: int = 0,
    layers: int = 3,
    hidden: int = 32,
    initializer_range: float = 0.3,
):
    """A random-init causal LM of `arch` (fp32, eval mode) with a peaked init so greedy decoding is stable."""
    import transformers as tf

    cfg_cls, model_cls, extra = _ARCH_TABLE[arch]
    shape = (
        {"n_embd": hidden, "n_layer": layers, "n_head": 4}
        if arch == "gpt2"
        else {
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
        }
    )
    ids = {"bos_token_id": TINY_VOCAB["<s>"], "eos_token_id": TINY_VOCAB["</s>"], "pad_token_id": 0}
    cfg = getattr(tf, cfg_cls)(
        vocab_size=vocab_size, initializer_range=initializer_range, **shape, **extra, **ids
    )
    torch.manual_seed(seed)
    return getattr(tf, model_cls)(cfg).eval()


def make_engine_sets(n: int = 16, seed: int = 0):
    """Source (hostile words), target (kind words) and control (neutral nouns) sentences over the tiny vocab."""
    import random

    from dsas import PromptSets

    rng = random.Random(seed)
    filler = ["the", "a", "you", "is", "and"]
    pools = {
        "source": ["stupid", "idiot", "hate", "bad", "enemy", "sad"],
        "target": ["nice", "kind", "love", "good", "friend", "happy"],
        "control": ["city", "river", "mountain", "history", "music", "year", "church", "market"],
    }

    def sent(pool: list[str]) -> str:
        return " ".join(rng.choice(pool + filler) for _ in range(rng.randint(4, 9)))

    return PromptSets(**{k: [sent(v) for _ in range(n)] for k, v in pools.items()}, name="tiny")


HARD_GATES = dict(floor=0.5, control_fpr=0.3, calibrate_on="tokens")
"""Floored gates, exactly 0 on all but 30% of the control prompts' tokens (tiny sets: enough open to test)."""


@pytest.fixture(scope="session")
def engine_sets():
    return make_engine_sets()


@pytest.fixture(params=ARCHS, scope="module")
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def arch_model(arch, tiny_tok):
    """Shared per test module: tests must not modify the model (steering hooks are removed on exit)."""
    return make_tiny_model(arch, len(tiny_tok))


@pytest.fixture(scope="session")
def left_tok():
    tok = make_tiny_tokenizer()
    tok.padding_side = "left"
    return tok


# ---- smollm2 fixtures: the real embedded model, converted once per session (tests/test_models.py) ----
# The first load dequantizes the GGUF and writes the safetensors cache (~30 s), so every slow test that needs
# SmolLM2 should use `smollm2` (shared, do not modify it) rather than call dsas.models.load_model itself.


@pytest.fixture(scope="session")
def smollm2_cache_dir(tmp_path_factory):
    """A fresh dsas cache for the session, so the first load really converts the GGUF."""
    return tmp_path_factory.mktemp("dsas-cache")


@pytest.fixture(scope="session")
def smollm2_first_load(smollm2_cache_dir):
    """(model, tokenizer, seconds) of the first, converting load of the embedded model."""
    import time

    from dsas.models import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see `single_thread`: much faster than two contended threads on a shared box
    try:
        start = time.perf_counter()
        model, tokenizer = load_model("smollm2-135m", cache_dir=smollm2_cache_dir)
        return model, tokenizer, time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2(smollm2_first_load):
    """(model, tokenizer): SmolLM2-135M-Instruct, fp32, CPU, eval mode, left padding. Shared: do not modify."""
    model, tokenizer, _ = smollm2_first_load
    return model, tokenizer
