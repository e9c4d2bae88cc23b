"""Seeded, batched continuations with plain HF `generate` (the AcT/LinEAS sampling protocol by default).

Steering-agnostic: wrap the call in `with steerer.apply(model, strength=s):` to generate steered text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from dsas.eval.common import pad_batch, pad_id
from dsas.record import context_length
from dsas.torchutil import model_device


def _encode_prompts(tokenizer: Any, prompts: Sequence[str], chat_template: bool) -> list[list[int]]:
    if not chat_template:
        return [list(tokenizer(p)["input_ids"]) for p in prompts]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "chat_template=True but the tokenizer has no chat template; pass chat_template=False"
        )
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    # The rendered template already holds its special tokens (BOS, role markers): do not add them twice.
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    for value in (getattr(gen_cfg, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def generate_continuations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 0.3,
    repetition_penalty: float = 1.2,
    seed: int = 0,
    chat_template: bool = False,
    progress: bool = True,
) -> list[str]:
    """Generate one continuation per prompt and return it without the prompt (one string per prompt, in order).

    Defaults follow the AcT/LinEAS toxicity protocol (32 new tokens, temperature 1.0, top_p 0.3, repetition
    penalty 1.2); `do_sample=False` decodes greedily. Prompts are left-padded in batches of `batch_size`, so each
    row's last prompt token sits at the end of the batch and generation continues it directly (KV cache on).

    Reproducibility: before batch `i` the RNG is seeded with `seed + i` inside a forked RNG state, so a rerun
    with the same prompts, `batch_size` and `seed` gives identical text, a batch's text does not depend on
    which batches ran before it, and the caller's global RNG state is left as it was.
    Text stops at the first EOS; special tokens are dropped when decoding.
    """
    prompts = list(prompts)
    if not prompts:
        return []
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    encoded = _encode_prompts(tokenizer, prompts, chat_template)
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError(
            "a prompt encodes to zero tokens; give it some text or use a tokenizer that adds BOS"
        )
    ctx = context_length(model)
    longest = max(range(len(encoded)), key=lambda i: len(encoded[i]))
    if ctx is not None and len(encoded[longest]) + max_new_tokens > ctx:
        raise ValueError(
            f"prompt {longest} has {len(encoded[longest])} tokens; with max_new_tokens={max_new_tokens} that "
            f"exceeds the model's context of {ctx} tokens. Shorten the prompt or lower max_new_tokens."
        )
    pad = pad_id(tokenizer)
    eos = _eos_ids(model, tokenizer)
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "repetition_penalty": repetition_penalty,
        "pad_token_id": pad,
        "use_cache": True,
    }
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p)
    else:
        # Explicit neutral values stop HF from warning about sampling flags in the model's generation_config.
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    if eos:
        gen_kwargs["eos_token_id"] = sorted(eos)

    rng_devices = [device.index or 0] if device.type == "cuda" else []
    outputs: list[str] = []
    n_batches = (len(prompts) + batch_size - 1) // batch_size
    for b in tqdm(range(n_batches), desc="generate", disable=not progress, leave=False):
        chunk = encoded[b * batch_size : (b + 1) * batch_size]
        input_ids, mask = pad_batch(chunk, pad, side="left", device=device)
        with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
            torch.manual_seed(seed + b)
            out = model.generate(input_ids=input_ids, attention_mask=mask, **gen_kwargs)
        for row in out[:, input_ids.shape[1] :].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            outputs.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return outputs
