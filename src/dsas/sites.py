"""Intervention sites: which module outputs get steered.

A site is a module name (as in `model.named_modules()`), optionally with `:i` to pick element `i` of a tuple
output (ml-act's convention). The default, `"auto"`, is the *residual increments* of every decoder block: the
attention output and the MLP output (Gemma's post-attention / post-feedforward norms), so that strength 1 moves
source statistics onto the target instead of compounding a shift along the residual stream (DESIGN.md).

Blocks are found without per-architecture tables: the decoder-block list is the longest `nn.ModuleList` whose
children share one class (Llama, Qwen2, Gemma2/3, Mistral, Phi, GPT-2, GPT-NeoX, ... all fit).

Site names are resolved through known wrapper prefixes (PEFT's `base_model.model.`, torch.compile's `_orig_mod.`,
DDP's `module.`), so a steerer fitted on a base model steers its `PeftModel`, its `merge_and_unload()` result or its
compiled module, and the other way round.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

KINDS = ("auto", "blocks", "attn", "mlp")
_ATTN = re.compile(r"^(self_attn|attn|attention|self_attention|mixer)$")
_MLP = re.compile(r"^(mlp|feed_forward|ffn|ff|block_sparse_moe)$")


@dataclass(frozen=True)
class Site:
    """One intervention site.

    name:  module name plus optional `:i` tuple index, e.g. "model.layers.3.self_attn".
    kind:  "attn" | "mlp" | "block" | "module" (a user-chosen module).
    layer: index of the decoder block it belongs to, if known.
    """

    name: str
    kind: str = "module"
    layer: int | None = None

    @property
    def module_name(self) -> str:
        return self.name.split(":")[0]

    @property
    def index(self) -> int | None:
        """Tuple element to steer; None means element 0 of a tuple, or the tensor itself."""
        parts = self.name.split(":")
        return int(parts[1]) if len(parts) > 1 else None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-block list: the longest ModuleList whose children all share one class."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            classes = {type(m) for m in mod}
            if len(classes) == 1 and (best is None or len(mod) > len(best[1])):
                best = (name, mod)
    if best is None:
        raise ValueError(
            f"Could not find a list of decoder blocks in {type(model).__name__}. "
            "Pass sites= as a regex or a list of module names."
        )
    return best


def _increments(block_name: str, block: nn.Module, layer: int) -> list[Site]:
    """The attention and MLP outputs that a block adds to the residual stream."""
    children = dict(block.named_children())
    if "post_feedforward_layernorm" in children and "post_attention_layernorm" in children:
        # Gemma 2/3: the normed sub-layer outputs are what is added to the residual.
        return [
            Site(f"{block_name}.post_attention_layernorm", "attn", layer),
            Site(f"{block_name}.post_feedforward_layernorm", "mlp", layer),
        ]
    attn = [n for n in children if _ATTN.match(n)]
    mlp = [n for n in children if _MLP.match(n)]
    if len(attn) != 1 or len(mlp) != 1:
        raise ValueError(
            f"Could not identify the attention and MLP sub-modules of {block_name} "
            f"(children: {sorted(children)}). Pass sites= as a regex or a list of module names."
        )
    return [Site(f"{block_name}.{attn[0]}", "attn", layer), Site(f"{block_name}.{mlp[0]}", "mlp", layer)]


def resolve_sites(
    model: nn.Module, sites: str | Sequence[str] = "auto", layers: Sequence[int] | None = None
) -> list[Site]:
    """Turn a site spec into an ordered list of Sites (model order).

    sites: "auto" (attention + MLP outputs of every block), "blocks" (block outputs), "attn", "mlp",
           a regex matched in full against module names, or a list of module names (optionally `name:i`).
    layers: keep only sites in these block indices (negative indices count from the end).
    """
    names = [n for n, _ in model.named_modules() if n]
    order = {n: i for i, n in enumerate(names)}
    out: list[Site]
    if isinstance(sites, str) and sites in KINDS:
        block_name, blocks = find_blocks(model)
        out = []
        for i, block in enumerate(blocks):
            bname = f"{block_name}.{i}" if block_name else str(i)
            if sites == "blocks":
                out.append(Site(bname, "block", i))
            else:
                inc = _increments(bname, block, i)
                out.extend(s for s in inc if sites == "auto" or s.kind == sites)
    elif isinstance(sites, str):
        if sites.split(":")[0] in order:
            out = [_classify(model, sites)]
        else:
            try:
                pat = re.compile(sites)
            except re.error as e:
                raise ValueError(f"sites={sites!r} is neither a module name nor a valid regex: {e}") from e
            hits = [n for n in names if pat.fullmatch(n)]
            # A regex may sweep up the block list itself; only modules that run can be sites.
            matched = [n for n in hits if not _is_container(model.get_submodule(n))] or hits
            if not matched:
                raise ValueError(_unknown(sites, names, "no module name matches this regex"))
            out = [_classify(model, n) for n in matched]
    else:
        sites = list(sites)
        if not sites or not all(isinstance(s, str) for s in sites):
            raise ValueError(f"sites= must be a non-empty list of module names, a regex, or one of {KINDS}.")
        for s in sites:
            if s.split(":")[0] not in order:
                raise ValueError(_unknown(s, names, "no module has this name"))
        out = sorted((_classify(model, s) for s in sites), key=lambda s: order[s.module_name])
    containers = [x.module_name for x in out if _is_container(model.get_submodule(x.module_name))]
    if containers:
        c = containers[0]
        mod = model.get_submodule(c)
        first = next(iter(mod._modules), "0")
        raise ValueError(
            f"Site {c!r} is a {type(mod).__name__} of {len(mod._modules)} modules, which never runs itself: pass one of "
            f"its elements (e.g. {c}.{first}), a regex such as {re.escape(c)}\\.\\d+, or sites='blocks'."
        )
    if layers is not None:
        n = len(find_blocks(model)[1])
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n]
        if bad:
            raise ValueError(
                f"layers={list(layers)!r}: {bad[0]!r} is not a block index of this model, which has {n} blocks "
                f"(0..{n - 1}, or -{n}..-1 from the end)."
            )
        keep = {i % n for i in layers}
        out = [s for s in out if s.layer in keep]
    if not out:
        raise ValueError(f"sites={sites!r} with layers={layers!r} selects no site.")
    if len({s.name for s in out}) != len(out):
        raise ValueError("sites= lists the same site twice.")
    return out


def _classify(model: nn.Module, name: str) -> Site:
    """Attach kind and layer to a user-given module name when it lies inside a decoder block."""
    try:
        block_name, _blocks = find_blocks(model)
    except ValueError:
        return Site(name, "module", None)
    m = re.match(rf"^{re.escape(block_name)}\.(\d+)(\.(.*))?$", name.split(":")[0])
    if not m:
        return Site(name, "module", None)
    layer, rest = int(m.group(1)), m.group(3)
    if rest is None:
        return Site(name, "block", layer)
    head = rest.split(".")[0]
    kind = "attn" if _ATTN.match(head) else "mlp" if _MLP.match(head) else "module"
    return Site(name, kind, layer)


def _is_container(mod: nn.Module) -> bool:
    return isinstance(mod, nn.ModuleList | nn.ModuleDict)


def _unknown(spec: str, names: list[str], why: str) -> str:
    close = difflib.get_close_matches(spec, names, n=5, cutoff=0.5)
    hint = f" Close candidates: {close}." if close else ""
    return (
        f"Unknown site {spec!r}: {why}.{hint} Use 'auto', 'blocks', 'attn', 'mlp', a regex over module "
        "names (see model.named_modules()), or a list of exact module names."
    )


WRAPPER_PREFIXES = ("base_model.model.", "_orig_mod.", "module.")
"""Module-name prefixes that wrappers add in front of the wrapped model's names: PEFT's PeftModel, torch.compile's
OptimizedModule, DistributedDataParallel / DataParallel."""


def _name_candidates(name: str) -> Iterator[str]:
    """`name` itself, then its core (known wrapper prefixes stripped) under zero, one or two wrapper prefixes."""
    yield name
    core = name
    while (p := next((p for p in WRAPPER_PREFIXES if core.startswith(p)), None)) is not None:
        core = core[len(p) :]
    yield core
    for p in WRAPPER_PREFIXES:
        yield p + core
    for p in WRAPPER_PREFIXES:
        for q in WRAPPER_PREFIXES:
            if p != q:
                yield p + q + core


def resolve_name(name: str, exists: Container[str] | Callable[[str], bool]) -> str | None:
    """The module name under which `name` (a saved site's module name) exists in a model, trying known wrapper
    prefixes; None if it exists under none. `exists`: the model's module names, or a predicate."""
    test = exists if callable(exists) else exists.__contains__
    return next((c for c in _name_candidates(name) if test(c)), None)


def _walk(model: nn.Module, name: str) -> nn.Module | None:
    """The registered submodule at `name`, or None; unlike `get_submodule`, follows no properties or
    `__getattr__` forwarding (PEFT forwards `model` to the wrapped model, which would mis-resolve names)."""
    mod: nn.Module | None = model
    for part in name.split(".") if name else ():
        mod = mod._modules.get(part) if mod is not None else None
    return mod


def get_module(model: nn.Module, site: Site | str) -> nn.Module:
    """The module of `site` in `model`, resolved through wrapper prefixes (a steerer fitted on a base model finds
    its sites in the PeftModel, and the other way round)."""
    name = site.module_name if isinstance(site, Site) else site.split(":")[0]
    found = resolve_name(name, lambda n: _walk(model, n) is not None)
    if found is None:
        return model.get_submodule(name)  # the standard error
    mod = _walk(model, found)
    assert mod is not None
    return mod


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside PEFT / torch.compile / DDP wrappers (for names that must not depend on the wrapper)."""
    inner: Any = model
    for _ in range(8):
        if callable(getattr(inner, "get_base_model", None)):
            nxt = inner.get_base_model()
        elif isinstance(getattr(inner, "_orig_mod", None), nn.Module):
            nxt = inner._orig_mod
        elif isinstance(inner, nn.DataParallel | nn.parallel.DistributedDataParallel):
            nxt = inner.module
        else:
            break
        if nxt is inner:
            break
        inner = nxt
    return inner


def fingerprint(model: nn.Module, sites: Sequence[Site]) -> dict[str, Any]:
    """What a steerer records about the model it was fitted on, checked again before it is applied: config shape,
    site names and a small sample of the weights (`weight_signature`)."""
    cfg = getattr(model, "config", None)
    arch = (getattr(cfg, "architectures", None) or [type(unwrap_model(model)).__name__])[0]
    hidden = (
        getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "d_model", None)
    )
    try:
        n_layers = len(find_blocks(model)[1])
    except ValueError:
        n_layers = None
    return {
        "architecture": arch,
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": hidden,
        "num_layers": n_layers,
        "shape": _config_shape(cfg),
        "sites": [s.name for s in sites],
        "weights": weight_signature(model),
    }


SHAPE_KEYS = (
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    # diffusers denoisers (their config is a dict, with no hidden_size)
    "block_out_channels",
    "layers_per_block",
    "in_channels",
    "out_channels",
    "cross_attention_dim",
    "attention_head_dim",
    "num_layers",
    "joint_attention_dim",
)
"""Config fields that fix activation shapes at the sites; compared before a steerer is applied, so that a steerer
fitted on another size of the same architecture is refused up front (not at the first hook call). vocab_size is
left out on purpose: resizing the embeddings does not change the sites."""


def _config_shape(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    get = cfg.get if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    out: dict[str, Any] = {}
    for k in SHAPE_KEYS:
        v = get(k)
        if isinstance(v, int | str) or (isinstance(v, list | tuple) and all(isinstance(x, int) for x in v)):
            out[k] = list(v) if isinstance(v, list | tuple) else v
    return out


# ---- weight signature --------------------------------------------------------------------------------------

SIGNATURE_METHOD = "slices-v1"
_SAMPLES = 8
"""Values read per tensor (evenly spaced over its flattened elements)."""
_EMBED_ROWS = tuple(2**k - 1 for k in range(1, 11))
"""Embedding rows sampled: fixed indices below 1024, so resizing the vocabulary (new rows at the end) keeps them."""
SIGNATURE_RTOL, SIGNATURE_ATOL = 2.0**-6, 1e-6
"""Tolerance of the weight comparison: loose enough for the same checkpoint in bf16/fp16 (relative rounding
<= 2**-8), tight enough for other weights (random init, another checkpoint, most full fine-tunes)."""
_ADAPTER_PART = re.compile(r"^(lora_\w+|modules_to_save|hada_\w+|lokr_\w+|ia3_\w+|oft_\w+|vera_\w+)$")
_WRAPPER_PART = frozenset({"base_layer", "original_module"})


def _canonical_param(name: str) -> str | None:
    """A parameter's name without adapter wrapping (PEFT's `base_layer` / `original_module`); None for adapter
    weights, which are not the base model's."""
    parts = name.split(".")
    if any(_ADAPTER_PART.match(p) for p in parts):
        return None
    return ".".join(p for p in parts if p not in _WRAPPER_PART)


def _spaced(n: int) -> list[int]:
    """Up to `_SAMPLES` evenly spaced indices into n elements, first and last included."""
    return sorted({j * (n - 1) // (_SAMPLES - 1) for j in range(_SAMPLES)}) if n > 0 else []


def weight_signature(model: nn.Module) -> dict[str, Any] | None:
    """A few fixed values of the input embedding and of the first and last block's parameters, in float32.

    Cheap (a few hundred numbers) and wrapper-independent: PEFT adapters are left out and their base weights read,
    so a LoRA-wrapped model (and the merge of an untrained LoRA) has its base model's signature. None when the
    weights cannot be read (meta / offloaded tensors), which skips the check."""
    picks: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    get_emb = getattr(model, "get_input_embeddings", None)
    try:
        emb = get_emb() if callable(get_emb) else None
    except (NotImplementedError, AttributeError):
        emb = None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        rows = [r for r in _EMBED_ROWS if r < weight.shape[0]]
        for r in rows:
            picks.append((f"embed[{r}]", weight[r], torch.tensor(_spaced(weight.shape[1]))))
    try:
        _, blocks = find_blocks(model)
        chosen = sorted({0, len(blocks) - 1})
        groups = [(f"blocks.{i}", blocks[i]) for i in chosen]
    except ValueError:
        groups = [("model", model)]
    for label, mod in groups:
        params: dict[str, torch.Tensor] = {}
        for pname, param in mod.named_parameters():
            canon = _canonical_param(pname)
            if canon is not None:
                params.setdefault(canon, param)
        names = sorted(params)
        if label == "model":
            names = names[:1] + names[-1:]
        for canon in names:
            flat = params[canon].detach().reshape(-1)
            picks.append((f"{label}.{canon}", flat, torch.tensor(_spaced(flat.numel()))))
    if not picks:
        return None
    try:
        if any(t.is_meta for _, t, _ in picks):
            return None
        dev = picks[0][1].device
        vals = [t[idx.to(t.device)].to(dev, torch.float32) for _, t, idx in picks]
        flat_vals = torch.cat(vals).cpu().tolist()
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    out: dict[str, list[float]] = {}
    pos = 0
    for (label, _t, idx), _v in zip(picks, vals, strict=True):
        out[label] = [float(f"{x:.9g}") for x in flat_vals[pos : pos + len(idx)]]
        pos += len(idx)
    return {"method": SIGNATURE_METHOD, "values": out}


def compare_weight_signatures(expected: dict[str, Any], actual: dict[str, Any]) -> str | None:
    """None if the two signatures agree (to bf16/fp16 rounding), else what differs."""
    if expected.get("method") != actual.get("method"):
        return None  # another sampling scheme: nothing comparable
    ev, av = expected.get("values") or {}, actual.get("values") or {}
    common = [k for k in ev if k in av and len(ev[k]) == len(av[k])]
    if not common:
        return "no sampled weight in common"
    for k in common:
        for e, a in zip(ev[k], av[k], strict=True):
            if (
                not (math.isfinite(e) and math.isfinite(a))
                or abs(a - e) > SIGNATURE_RTOL * abs(e) + SIGNATURE_ATOL
            ):
                return f"{k}: fitted with value {e:.6g}, this model has {a:.6g}"
    return None
