"""Helpers shared by the metrics: device lookup, manual padding, length-sorted batching."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch


def pad_id(tokenizer: Any) -> int:
    """Token id used for padding; falls back to EOS (then 0) because many causal-LM tokenizers have no pad token.

    Padded positions are always masked, so the choice only has to be a valid id."""
    for pid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(pid, int):
            return pid
    return 0


def pad_batch(
    ids: Sequence[Sequence[int]], pad: int, *, side: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists to one `[B, T]` tensor plus its attention mask.

    Padding by hand (instead of `tokenizer.pad`) leaves the caller's tokenizer `padding_side` untouched."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        if not seq:
            continue
        sl = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        input_ids[row, sl] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, sl] = 1
    return input_ids.to(device), mask.to(device)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (longest first), which minimises padding work.

    Results are mapped back by index, so the order never shows in the output."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probability of every token given its prefix, `[B, T-1]` (entry t scores token t+1), fp32.

    One teacher-forced pass with position ids from the mask, so real tokens sit at 0..n-1 on either padding side
    (models with absolute positions would otherwise score a left-padded row at shifted positions)."""
    from dsas.record import accepts_position_ids, position_ids_from_mask

    extra = {"position_ids": position_ids_from_mask(mask)} if accepts_position_ids(model) else {}
    logits = model(input_ids=input_ids, attention_mask=mask, **extra).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return -nll
