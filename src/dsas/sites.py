"""Intervention sites: which module outputs get steered.

A site is a module name (as in `model.named_modules()`), optionally with `:i` to pick element `i` of a tuple
output (ml-act's convention). The default, `"auto"`, is the *residual increments* of every decoder block: the
attention output and the MLP output (Gemma's post-attention / post-feedforward norms), so that strength 1 moves
source statistics onto the target instead of compounding a shift along the residual stream (DESIGN.md).

Blocks are found without per-architecture tables: the decoder-block list is the longest `nn.ModuleList` whose
children share one class (Llama, Qwen2, Gemma2/3, Mistral, Phi, GPT-2, GPT-NeoX, ... all fit).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
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
            matched = [n for n in names if pat.fullmatch(n)]
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
    if layers is not None:
        n = len(find_blocks(model)[1])
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


def _unknown(spec: str, names: list[str], why: str) -> str:
    close = difflib.get_close_matches(spec, names, n=5, cutoff=0.5)
    hint = f" Close candidates: {close}." if close else ""
    return (
        f"Unknown site {spec!r}: {why}.{hint} Use 'auto', 'blocks', 'attn', 'mlp', a regex over module "
        "names (see model.named_modules()), or a list of exact module names."
    )


def get_module(model: nn.Module, site: Site | str) -> nn.Module:
    name = site.module_name if isinstance(site, Site) else site.split(":")[0]
    return model.get_submodule(name)


def output_tensor(out: Any, index: int | None = None) -> torch.Tensor:
    """The tensor to steer inside a module output (a tensor, or a tuple/list whose element `index` or 0)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out:
        t = out[index or 0]
        if isinstance(t, torch.Tensor):
            return t
    raise TypeError(
        f"Site output of type {type(out).__name__} holds no tensor at index {index or 0}; "
        "pick another site or a tuple index with 'name:i'."
    )


def replace_output(out: Any, new: torch.Tensor, index: int | None = None) -> Any:
    """The module output with the steered tensor put back in place (tuples stay tuples)."""
    if isinstance(out, torch.Tensor):
        return new
    items = list(out)
    items[index or 0] = new
    return tuple(items) if isinstance(out, tuple) else items


def fingerprint(model: nn.Module, sites: Sequence[Site]) -> dict[str, Any]:
    """What a steerer records about the model it was fitted on, checked again before it is applied."""
    cfg = getattr(model, "config", None)
    arch = (getattr(cfg, "architectures", None) or [type(model).__name__])[0]
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
