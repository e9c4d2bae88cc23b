"""HF site names (what `dsas.fit` records) -> module names in vLLM's model tree.

The default sites are the residual increments: each block's attention output and MLP output (Gemma 2/3: the
post-attention and post-feedforward norms). vLLM's implementations of the architectures below keep HF's module
names for exactly these modules and return the same tensor from them ([tokens, hidden], replicated across
tensor-parallel ranks after the row-parallel output projection), so a steerer fitted on the HF model applies
unchanged. Other architectures are refused rather than guessed."""

from __future__ import annotations

import re

_BLOCK = r"model\.layers\.(\d+)"
_LLAMA_LIKE = (rf"^{_BLOCK}\.(self_attn|mlp)$",)
_GEMMA = (rf"^{_BLOCK}\.(post_attention_layernorm|post_feedforward_layernorm)$",)

SITE_PATTERNS: dict[str, tuple[str, ...]] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "Gemma2ForCausalLM": _GEMMA,
    "Gemma3ForCausalLM": _GEMMA,
}
"""Per architecture, the HF site names vLLM serves under the same module name."""

SUPPORTED_ARCHITECTURES = tuple(SITE_PATTERNS)


def vllm_site_name(architecture: str, hf_name: str) -> str:
    """The vLLM module to steer for the HF site `hf_name`; ValueError for an unsupported architecture or site."""
    patterns = SITE_PATTERNS.get(architecture)
    if patterns is None:
        raise ValueError(
            f"dsas serving has no site mapping for architecture {architecture!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}. Steer it with the HF path (Steerer.apply) instead."
        )
    module = hf_name.split(":")[0]
    if not any(re.match(p, module) for p in patterns):
        raise ValueError(
            f"Site {hf_name!r} cannot be served on {architecture}: dsas serving steers the residual increments "
            "(dsas.fit's default sites='auto'). Refit with sites='auto', 'attn' or 'mlp'."
        )
    return module
