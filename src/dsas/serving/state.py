"""Per-worker steering state: the operator's steerers as per-site tables, and the per-token buffers.

Everything is allocated once, when the model loads (before vLLM compiles the model and captures CUDA graphs);
afterwards only buffer contents change. Table rows are fixed at load, one per operator-loaded steerer (row 0 is
unsteered), and strength is a per-token value, so there is no slot to run out of: any mix of steerers and
strengths fits any batch. Requests are counted per steerer while they run (`active`) and forgotten when they
finish."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from dsas.artifact import check_fingerprint
from dsas.rule import RUNNING_MEAN_SCOPES, SiteParams
from dsas.serving.op import pack_site, unsteered_row
from dsas.serving.sites import SITE_PATTERNS, vllm_site_name
from dsas.serving.spec import RequestSteering
from dsas.sites import SHAPE_KEYS, compare_weight_signatures, weight_signature
from dsas.steerer import Steerer


class _EmbeddingOnly(nn.Module):
    """Shows `weight_signature` only the served model's input embedding (vLLM fuses and renames the block
    weights, so only the embedding rows are comparable with the HF model's signature)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self._weight = weight

    def get_input_embeddings(self) -> Any:
        return SimpleNamespace(weight=self._weight)


def served_fingerprint(hf_config: Any, embed_weight: torch.Tensor | None) -> dict[str, Any]:
    """What `check_fingerprint` compares, read from the served model's HF config (and embedding, when whole)."""
    arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
    n_layers = getattr(hf_config, "num_hidden_layers", None)
    shape: dict[str, Any] = {}
    for k in SHAPE_KEYS:
        v = getattr(hf_config, k, None)
        if isinstance(v, int | str) or (isinstance(v, list | tuple) and all(isinstance(x, int) for x in v)):
            shape[k] = list(v) if isinstance(v, list | tuple) else v
    names = {
        f"model.layers.{i}.{part}"
        for i in range(n_layers or 0)
        for part in ("self_attn", "mlp", "post_attention_layernorm", "post_feedforward_layernorm")
    }
    sig = weight_signature(_EmbeddingOnly(embed_weight)) if embed_weight is not None else None
    return {
        "architecture": arch,
        "model_type": getattr(hf_config, "model_type", None),
        "hidden_size": getattr(hf_config, "hidden_size", None),
        "num_layers": n_layers,
        "shape": shape,
        "module_names": names,
        "weights": sig,
    }


def load_steerers(
    paths: Mapping[str, Path], hf_config: Any, embed_weight: torch.Tensor | None
) -> dict[str, Steerer]:
    """Load every operator-named steerer and check it against the served model; ValueError naming the steerer
    and the mismatch, so the server does not start half-configured."""
    actual = served_fingerprint(hf_config, embed_weight)
    arch = actual["architecture"]
    if arch not in SITE_PATTERNS:
        vllm_site_name(arch, "")  # raises the refusal listing the supported architectures
    out: dict[str, Steerer] = {}
    for name, path in paths.items():
        try:
            st = Steerer.load(path)
            if st.condition is not None:
                raise ValueError(
                    "its gate is the prompt-level threshold condition, which needs the whole prompt before "
                    "steering and cannot be served per token; serve a per-token gate (dsas, e2e-*, none)"
                )
            scope = {s: getattr(st.gates[s], "scope", "token") for s in st.steered}
            running = {s: x for s, x in scope.items() if x in RUNNING_MEAN_SCOPES}
            if running:
                names = list(running)
                raise ValueError(
                    f"its gates at {names[:2]}{' ...' if len(names) > 2 else ''} read the running mean over the "
                    f"sequence ({', '.join(f'scope={x!r}' for x in sorted(set(running.values())))}), "
                    "a per-sequence state the per-token serving op does not keep; serve "
                    "`Steerer.load(path).with_scope('below')` saved to a new folder (pooled gates; "
                    "with_scope('token') for per-site ones: the same regulators read per token, no refit), or fit "
                    "with `dsas fit --option scope=below`"
                )
            exp = dict(st.fingerprint)
            if isinstance(exp.get("weights"), dict) and isinstance(actual["weights"], dict):
                # Only the embedding rows are comparable (see _EmbeddingOnly); compare those.
                ev = {k: v for k, v in exp["weights"].get("values", {}).items() if k.startswith("embed[")}
                exp["weights"] = {**exp["weights"], "values": ev}
                why = compare_weight_signatures(exp["weights"], actual["weights"]) if ev else None
                if why is not None:
                    raise ValueError(f"it was fitted on other weights than the served model's ({why})")
            check_fingerprint(exp, actual, check_weights=False)
            for s in st.steered:
                vllm_site_name(arch, s)
        except (OSError, ValueError) as err:
            raise ValueError(f"dsas steerer {name!r} ({path}) cannot steer the served model: {err}") from err
        out[name] = st
    return out


@dataclass
class SiteTable:
    """One steered site: its packed parameter table (row r = steerer r; row 0 unsteered)."""

    vec: torch.Tensor
    sca: torch.Tensor

    @property
    def pooled(self) -> bool:
        """Some steerer's gate at this site is pooled: the site calls `steer_pooled`."""
        return bool((self.sca[:, 4] > 0).any())


@dataclass
class ServingState:
    """The tables of every steered site and the per-token buffers the op reads."""

    names: tuple[str, ...]
    """Steerer names; steerer `names[i]` is table row i + 1."""
    tables: dict[str, SiteTable]
    """vLLM module name -> its table."""
    rows: torch.Tensor
    lam: torch.Tensor
    _host_rows: torch.Tensor = field(repr=False)
    _host_lam: torch.Tensor = field(repr=False)
    extent: int = 0
    """Tokens written by the last fill (all later entries are row 0 / lam 0)."""
    single_row: int = -1
    """The one steerer row every steered token of the last fill uses, or -1 (none, or several)."""
    active: Counter[str] = field(default_factory=Counter)
    """Running requests per steerer."""
    requests: dict[str, RequestSteering | None] = field(default_factory=dict)
    """Running request id -> its parsed steering (parsed once, dropped when it finishes)."""
    pool: torch.Tensor | None = None
    """[max_tokens] fp32: each token's running sum of pooled regulator logits within a forward pass (None: no
    steerer has pooled gates)."""

    @classmethod
    def build(
        cls, steerers: Mapping[str, Steerer], arch: str, hidden: int, max_tokens: int, device: torch.device
    ) -> ServingState:
        names = tuple(steerers)
        sites: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for row, name in enumerate(names, start=1):
            st = steerers[name]
            regulators = 0  # of this steerer at or below the site, in model order (pooled gates)
            for s in st.steered:
                mod = vllm_site_name(arch, s)
                entries = sites.setdefault(mod, [unsteered_row(hidden) for _ in range(len(names) + 1)])
                p = SiteParams.build(st.maps[s], st.gates[s])
                count = None
                if p.pool:
                    regulators += p.w is not None
                    if not regulators:
                        raise ValueError(f"steerer {name!r}: pooled site {s} has no regulator at or below it")
                    count = (regulators, p.w is not None and regulators == 1)
                entries[row] = pack_site(p, hidden, count)
        tables = {
            mod: SiteTable(
                torch.stack([v for v, _ in entries]).to(device),
                torch.stack([c for _, c in entries]).to(device),
            )
            for mod, entries in sorted(sites.items())
        }
        pin = device.type == "cuda"
        host_rows = torch.zeros(max_tokens, dtype=torch.int64, pin_memory=pin)
        host_lam = torch.zeros(max_tokens, dtype=torch.float32, pin_memory=pin)
        on_host = device.type == "cpu"
        rows = host_rows if on_host else torch.zeros(max_tokens, dtype=torch.int64, device=device)
        lam = host_lam if on_host else torch.zeros(max_tokens, dtype=torch.float32, device=device)
        pooled = any(t.pooled for t in tables.values())
        pool = torch.zeros(max_tokens, dtype=torch.float32, device=device) if pooled else None
        return cls(names, tables, rows, lam, host_rows, host_lam, pool=pool)

    def row_of(self, steering: RequestSteering | None) -> tuple[int, float]:
        if steering is None:
            return 0, 0.0
        return self.names.index(steering.steerer) + 1, steering.strength

    def fill(self, spans: Iterable[tuple[int, RequestSteering | None]]) -> bool:
        """Refill the per-token buffers in place for one step: `spans` is each scheduled request's token count
        and steering, in the flattened token order of the step. Returns whether any token is steered.

        Host work is a few numpy writes; the device copy is asynchronous (pinned memory) and there is none at
        all when neither this step nor the last one steered anything."""
        counts, rows, lams = [], [], []
        for n, steering in spans:
            r, lam = self.row_of(steering)
            counts.append(n)
            rows.append(r)
            lams.append(lam)
        total = int(sum(counts))
        used = {r for r in rows if r}
        steered = bool(used)
        self.single_row = next(iter(used)) if len(used) == 1 else -1
        if total > self.rows.numel():
            raise RuntimeError(f"dsas: a step of {total} tokens exceeds the {self.rows.numel()} allocated")
        if not steered and self.extent == 0:
            return False
        hr, hl = self._host_rows.numpy(), self._host_lam.numpy()
        end = max(total, self.extent)
        hr[:end] = 0
        hl[:end] = 0.0
        if steered:
            hr[:total] = np.repeat(np.asarray(rows, dtype=np.int64), counts)
            hl[:total] = np.repeat(np.asarray(lams, dtype=np.float32), counts)
        if self.rows is not self._host_rows:
            self.rows[:end].copy_(self._host_rows[:end], non_blocking=True)
            self.lam[:end].copy_(self._host_lam[:end], non_blocking=True)
        self.extent = total if steered else 0
        return steered

    def admit(self, req_id: str, steering: RequestSteering | None) -> None:
        self.requests[req_id] = steering
        if steering is not None:
            self.active[steering.steerer] += 1

    def finish(self, req_ids: Iterable[str]) -> None:
        for rid in req_ids:
            steering = self.requests.pop(rid, None)
            if steering is not None:
                self.active[steering.steerer] -= 1
                if self.active[steering.steerer] == 0:
                    del self.active[steering.steerer]
