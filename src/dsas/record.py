"""Record activations at sites, with padding-aware pooling.

Pooling follows the AcT/LinEAS convention: a prompt is summarised by the mean of its real (non-padding) token
activations (`t̄_l(x)` in the paper). `"last"` keeps the last real token; `"all"` keeps every real token.
Results are fp32 on the CPU, whatever the model's dtype and device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dsas.sites import Site, get_module, output_tensor

POOLS = ("mean", "last", "all")


class _Done(Exception):
    """Raised from the last site's hook to skip the rest of the forward pass (e.g. the LM head)."""


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
                raise _Done

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
    with suppress(_Done):
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


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def tokenize(
    tokenizer: Any, texts: Sequence[str], max_length: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Batch-tokenize with padding (the tokenizer's side) and truncation; adds a pad token if missing."""
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


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
) -> dict[str, Any]:
    """Activations at `sites` for `texts`.

    pool="mean"|"last": {site: Tensor[n, d]}; pool="all": {site: list of Tensor[K_i, d]} (real tokens only).
    Upstream steering hooks, if any are active, are seen: this records what the site receives now.
    """
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r} is not one of {POOLS}.")
    if not texts:
        raise ValueError("No texts to record: pass at least one prompt.")
    dev = model_device(model)
    out: dict[str, list[Any]] = {s.name: [] for s in sites}
    batches = range(0, len(texts), batch_size)
    with capture(model, sites, stop_early=True) as store:
        for i in tqdm(batches, desc=desc, disable=not progress, leave=False):
            enc = tokenize(tokenizer, texts[i : i + batch_size], max_length, dev)
            store.clear()
            run_capturing(model, **enc)
            mask = enc["attention_mask"]
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
