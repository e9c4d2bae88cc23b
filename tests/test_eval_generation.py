"""generate_continuations: prompt stripping, seeding, left padding, chat template, EOS cut."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dsas.eval import generate_continuations

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["the cat", "a big old red house on the hill of the king", "hello", "the river and the mountain"]


def manual_greedy(model, ids: list[int], n: int) -> list[int]:
    """Reference greedy decoding without cache, padding or `generate`."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            nxt = int(logits.argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


def test_greedy_matches_reference_and_strips_prompt(tiny_lm, tiny_tok):
    got = generate_continuations(
        tiny_lm, tiny_tok, PROMPTS, do_sample=False, repetition_penalty=1.0, max_new_tokens=6, progress=False
    )
    for prompt, text in zip(PROMPTS, got, strict=True):
        ref = manual_greedy(tiny_lm, tiny_tok(prompt)["input_ids"], 6)
        assert text == tiny_tok.decode(ref, skip_special_tokens=True)
        assert len(text.split()) == 6  # only the 6 new words, no prompt words


def test_left_padding_matches_row_alone(tiny_lm, tiny_tok):
    # default repetition penalty on: padding must not leak into it either
    batched = generate_continuations(
        tiny_lm, tiny_tok, PROMPTS, do_sample=False, max_new_tokens=8, progress=False
    )
    alone = [
        generate_continuations(tiny_lm, tiny_tok, [p], do_sample=False, max_new_tokens=8, progress=False)[0]
        for p in PROMPTS
    ]
    assert batched == alone


def test_sampling_is_seeded_and_batch_order_free(tiny_lm, tiny_tok):
    kw: dict[str, Any] = dict(max_new_tokens=8, batch_size=2, top_p=1.0, progress=False)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate_continuations(tiny_lm, tiny_tok, PROMPTS, seed=0, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # caller's RNG untouched
    assert generate_continuations(tiny_lm, tiny_tok, PROMPTS, seed=0, **kw) == a
    # batch 1 of the full run is seeded with seed + 1: running it on its own with seed=1 reproduces it
    assert generate_continuations(tiny_lm, tiny_tok, PROMPTS[2:], seed=1, **kw) == a[2:]
    assert generate_continuations(tiny_lm, tiny_tok, PROMPTS, seed=7, **kw) != a


def test_chat_template_wraps_prompt_as_user_turn(tiny_lm, tiny_tok):
    got = generate_continuations(
        tiny_lm,
        tiny_tok,
        ["the cat"],
        do_sample=False,
        repetition_penalty=1.0,
        chat_template=True,
        max_new_tokens=5,
        progress=False,
    )[0]
    ids = tiny_tok("user : the cat assistant :", add_special_tokens=False)["input_ids"]
    assert tiny_tok.convert_ids_to_tokens(ids) == ["user", ":", "the", "cat", "assistant", ":"]
    assert got == tiny_tok.decode(manual_greedy(tiny_lm, ids, 5), skip_special_tokens=True)
    plain = generate_continuations(
        tiny_lm, tiny_tok, ["the cat"], do_sample=False, max_new_tokens=5, progress=False
    )[0]
    assert got != plain


def test_chat_template_missing_raises(tiny_lm, tiny_tok):
    saved = tiny_tok.chat_template
    tiny_tok.chat_template = None
    try:
        with pytest.raises(ValueError, match="no chat template"):
            generate_continuations(tiny_lm, tiny_tok, ["x"], chat_template=True, progress=False)
    finally:
        tiny_tok.chat_template = saved


def test_text_stops_at_eos(tiny_lm, tiny_tok):
    ids = tiny_tok("the cat")["input_ids"]
    ref = manual_greedy(tiny_lm, ids, 6)
    stop = ref[3]
    tiny_lm.generation_config.eos_token_id = [tiny_tok.eos_token_id, stop]
    got = generate_continuations(
        tiny_lm,
        tiny_tok,
        ["the cat"],
        do_sample=False,
        repetition_penalty=1.0,
        max_new_tokens=6,
        progress=False,
    )[0]
    assert got == tiny_tok.decode(ref[: ref.index(stop)], skip_special_tokens=True)


def test_prompt_past_the_context_is_a_clear_error(tiny_tok):
    """GPT-2 has 128 learned positions here: say so up front instead of an index error mid-generation."""
    from conftest import make_tiny_model

    model = make_tiny_model("gpt2", len(tiny_tok))
    long = " ".join(["the city"] * 60)  # 121 tokens
    with pytest.raises(
        ValueError, match=r"prompt 1 has 121 tokens; with max_new_tokens=16 .* context of 128"
    ):
        generate_continuations(model, tiny_tok, ["a city", long], max_new_tokens=16, progress=False)
    assert len(generate_continuations(model, tiny_tok, [long], max_new_tokens=4, progress=False)) == 1
