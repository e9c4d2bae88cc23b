"""Record activations at sites, with padding-aware pooling.

Pooling follows the AcT/LinEAS convention: a prompt is summarised by the mean of its real (non-padding) token
activations (`t̄_l(x)` in the paper). `"last"` keeps the last real token; `"all"` keeps every real token.
Results are fp32 on the CPU, whatever the model's dtype and device.

Every pass gets position ids computed from the attention mask (as `generate` does), so models with absolute
positions (GPT-2, GPT-NeoX, ...) see a left-padded prompt at the positions a right-padded one gets: recordings, and
so fitted steerers, do not depend on the tokenizer's padding side.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dsas.sites import Site, get_module, unwrap_model
from dsas.torchutil import StopForward, model_device, output_tensor

POOLS = ("mean", "last", "all")


@contextmanager
def capture(
    model: nn.Module, sites: Sequence[Site], stop_early: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Store each site's output tensor (detached) of the next forward passes into the yielded dict.

    With `stop_early`, the forward pass is cut once every site has fired; wrap the call in `run_capturing`.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    want = {s.name for s in sites}

    def make(site: Site) -> Any:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            store[site.name] = output_tensor(out, site.index).detach()
            if stop_early and want <= store.keys():
                raise StopForward

        return hook

    try:
        for s in sites:
            handles.append(get_module(model, s).register_forward_hook(make(s)))
        yield store
    finally:
        for h in handles:
            h.remove()


def run_capturing(fn: Any, *args: Any, **kwargs: Any) -> None:
    """Call `fn` and swallow the early-stop signal raised by `capture(stop_early=True)`."""
    with suppress(StopForward):
        fn(*args, **kwargs)


def pool_tokens(h: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """Pool [B, T, d] activations over real tokens: "mean" or "last" -> [B, d].

    4-D feature maps [B, C, H, W] are pooled over space (each location is a token).
    """
    if h.dim() == 4:
        return h.float().mean(dim=(2, 3)) if how == "mean" else h.float().flatten(2)[..., -1]
    if h.dim() == 2:
        return h.float()
    h = h.float()
    if mask is None:
        mask = torch.ones(h.shape[:2], device=h.device)
    m = mask.to(h.device, torch.float32)
    if how == "mean":
        return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
    if how == "last":
        t = h.shape[1]
        last = t - 1 - torch.flip(m, dims=[1]).argmax(dim=1)
        return h[torch.arange(h.shape[0], device=h.device), last]
    raise ValueError(f"pool={how!r} is not one of {POOLS}.")


def drop_first(mask: torch.Tensor, k: int) -> torch.Tensor:
    """`mask` [B, T] with the first `k` real tokens of each row set to 0, in rows that have more than `k` real
    tokens (a shorter prompt keeps all of its tokens rather than none). `FitConfig.skip_tokens`: the first token
    of a sequence is the attention sink, whose activations are ~15x any other's on SmolLM2 and would dominate
    every token-mean."""
    if k <= 0:
        return mask
    m = mask.to(torch.float32)
    n = m.sum(1, keepdim=True)
    early = (m.cumsum(1) <= k) & (n > k)
    return torch.where(early, torch.zeros_like(m), m).to(mask.dtype)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position of each token among the real tokens of its row (padding gets 0), as HF `generate` computes it.

    With these, a prompt's real tokens sit at 0..n-1 whichever side it is padded on."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def accepts_position_ids(model: nn.Module) -> bool:
    """Whether `model(...)` takes `position_ids` (asked of the model inside PEFT / torch.compile wrappers, which
    pass keyword arguments through)."""
    try:
        params = inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return False
    return "position_ids" in params


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's position encoding covers, from its config (None if it names none)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        v = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def tokenize(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    device: torch.device,
    *,
    position_ids: bool = True,
) -> dict[str, torch.Tensor]:
    """Batch-tokenize with padding (the tokenizer's side) and truncation; adds a pad token if missing.

    The dict holds `input_ids`, `attention_mask` and (unless `position_ids=False`) `position_ids` from the mask,
    so `model(**enc)` sees the same positions whichever side the tokenizer pads on. Truncation also stops at the
    tokenizer's `model_max_length` when that is set to a real length."""
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**7:
        max_length = min(max_length, limit)
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    out = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    if position_ids:
        out["position_ids"] = position_ids_from_mask(out["attention_mask"])
    return out


def _fit_context(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int, what: str) -> int:
    """`max_length` capped at the model's context, warning when a prompt is cut to fit (instead of an index
    error deep inside the position embedding)."""
    ctx = context_length(model)
    if ctx is None or ctx >= max_length:
        return max_length
    lengths = [len(ids) for ids in tokenizer(list(texts))["input_ids"]]
    over = [i for i, n in enumerate(lengths) if n > ctx]
    if over:
        warnings.warn(
            f"{len(over)} prompt(s) for {what} are longer than the model's context of {ctx} tokens (e.g. prompt "
            f"{over[0]}, {lengths[over[0]]} tokens); they are truncated to their first {ctx} tokens. Shorten them "
            "to keep every token.",
            stacklevel=3,
        )
    return ctx


def check_finite(acts: dict[str, torch.Tensor], what: str) -> None:
    bad = [k for k, v in acts.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(
            f"Non-finite (NaN/inf) activations recorded for {what} at {len(bad)} site(s), e.g. {bad[:3]}. "
            "The model overflowed: load it in float32 or bfloat16 instead of float16, or check its weights."
        )


@torch.no_grad()
def record(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    sites: Sequence[Site],
    *,
    pool: str = "mean",
    batch_size: int = 16,
    max_length: int = 256,
    progress: bool = True,
    desc: str = "recording",
    skip: int = 0,
) -> dict[str, Any]:
    """Activations at `sites` for `texts`.

    pool="mean"|"last": {site: Tensor[n, d]}; pool="all": {site: list of Tensor[K_i, d]} (real tokens only).
    skip: leave the first `skip` real tokens of each prompt out of "mean" and "all" (`drop_first`).
    Upstream steering hooks, if any are active, are seen: this records what the site receives now.
    """
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r} is not one of {POOLS}.")
    if not texts:
        raise ValueError("No texts to record: pass at least one prompt.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}.")
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise ValueError(f"skip must be an int >= 0, got {skip!r}.")
    dev = model_device(model)
    max_length = _fit_context(model, tokenizer, texts, max_length, desc)
    with_positions = accepts_position_ids(model)
    out: dict[str, list[Any]] = {s.name: [] for s in sites}
    batches = range(0, len(texts), batch_size)
    with capture(model, sites, stop_early=True) as store:
        for i in tqdm(batches, desc=desc, disable=not progress, leave=False):
            enc = tokenize(tokenizer, texts[i : i + batch_size], max_length, dev, position_ids=with_positions)
            store.clear()
            run_capturing(model, **enc)
            mask = enc["attention_mask"]
            if pool != "last":
                mask = drop_first(mask, skip)
            for s in sites:
                h = store[s.name]
                if pool == "all":
                    hf = h.float().cpu()
                    mk = mask.bool().cpu()
                    out[s.name].extend(hf[j][mk[j]] for j in range(hf.shape[0]))
                else:
                    out[s.name].append(pool_tokens(h, mask, pool).cpu())
    if pool == "all":
        result: dict[str, Any] = {k: v for k, v in out.items()}
        check_finite({k: torch.cat(v) for k, v in result.items()}, desc)
        return result
    pooled = {k: torch.cat(v) for k, v in out.items()}
    check_finite(pooled, desc)
    return pooled
