"""`dsas.fit`: one pipeline for text and images. Record activations once, fit the map ("how") and the gate
("when") per site, return a `Steerer`.

    data    = what to record from: `PromptSets` (+ tokenizer) for a language model, `ImageSets` for a denoiser;
              it knows how to record itself at a list of sites (`FitData.record`).
    method  = fn(ctx) -> {site: SiteMap}                 register_method("caa", fn)
    gate    = fn(ctx) -> Gates                           register_gate("dsas", fn, configs={"dsas": DSASConfig})
    joint   = a gate that trains its method's maps with it (LinEAS + E2E-DSAS): fn(ctx) -> Gates with maps.

Each component names its config dataclasses with the keys under which they are saved and passed to `fit`
(`dsas=DSASConfig(...)`). A keyword option goes to the one config that has that field; a field two configs share
must be given through its config (`dsas=DSASConfig(C=2)`) or dotted (`**{"dsas.C": 2}`, the CLI's `--option
dsas.C=2`); `seed` is FitConfig's and reaches every component.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from dsas.condition import Condition, ThresholdConfig, fit_condition
from dsas.data import PromptSets
from dsas.gates import (
    POOLED_SCOPES,
    RUNNING_MEAN_SCOPES,
    DSASConfig,
    SiteGate,
    fit_regulator,
    opening_logit,
    per_prompt_tokens,
    resolve_scope,
    upper_quantile,
)
from dsas.maps import ITIConfig, LinearActConfig, SiteMap, fit_caa, fit_iti, fit_linear_act
from dsas.options import check_fields
from dsas.record import record
from dsas.sites import Site, fingerprint, resolve_sites
from dsas.steer import steering
from dsas.steerer import Steerer
from dsas.train import E2E_KINDS, E2EConfig, LinEASConfig, train_maps


@dataclass
class FitConfig:
    """Options shared by every method and gate."""

    batch_size: int = 16
    """Prompts per forward pass while recording activations."""
    max_length: int = 128
    """Prompts are truncated to this many tokens."""
    seed: int = 0
    """Seeds everything random in fitting (CV folds, probe splits, initialisations, resampling)."""
    skip_tokens: int | Literal["auto"] = "auto"
    """Leave the first k real tokens of every prompt out of what maps and gates are fitted on (token-means,
    token distributions, LinEAS's source means), and out of the running mean a latched gate (scope "prefix" /
    "below+prefix") and the threshold gate read at run time. A prompt of k tokens or fewer keeps them all.
    "auto" (default): the attention sink, the first token of every text prompt: the special tokens the
    tokenizer puts before every prompt (a BOS token: k = 1 on Gemma and Llama), or, where it puts none, the
    first real token (k = 1 on SmolLM2, GPT-2 and Qwen2). Images: k = 0. The sink's activations are the largest
    in the prompt and nearly the same in every prompt (a BOS token's exactly so), so in a token-mean it only adds
    a vector weighted by 1 / prompt length: a length signal to the regulators, noise to a mean difference, and a
    point mass that a `control_fpr` counted on tokens calibrates onto; left in, SmolLM2's concept gates stay shut
    on the concept's own prompts (docs/concepts.md, "The BOS token" and "The attention sink"). k = 0 is the
    paper's token-mean bit for bit. The steerer saves the k it resolved to."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.batch_size < 1 or self.max_length < 1:
            raise ValueError(
                f"FitConfig.batch_size and max_length must be >= 1, got {self.batch_size} and {self.max_length}."
            )
        if self.skip_tokens != "auto" and self.skip_tokens < 0:
            raise ValueError(f"FitConfig.skip_tokens must be >= 0 or 'auto', got {self.skip_tokens}.")

    @property
    def skip(self) -> int:
        """`skip_tokens` once `resolve_fit_config` has made it concrete (fit does so first thing)."""
        if self.skip_tokens == "auto":
            raise RuntimeError(
                "FitConfig.skip_tokens='auto' is unresolved: call resolve_fit_config(cfg, tokenizer)."
            )
        return self.skip_tokens


ADDED_FIT_FIELDS = {"skip_tokens": 0}
"""FitConfig fields added after steerers were first saved, with the default that reproduces the earlier fit bit
for bit: a config records them only when they differ from it, so a steerer fitted without them keeps the same
saved config and content hash (and every cached result keyed by it stays valid)."""


def fit_config_dict(cfg: FitConfig) -> dict[str, Any]:
    """`cfg` as saved in a steerer's config (`ADDED_FIT_FIELDS` only when set); resolve "auto" fields first
    (`resolve_fit_config`)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if ADDED_FIT_FIELDS.get(k, object()) != v}


def prepended_specials(tokenizer: Any) -> int:
    """How many special tokens `tokenizer` puts before every text (its BOS token: 1 on Gemma and Llama, 0 on
    SmolLM2, GPT-2 and Qwen2), counted on a one-word text as the recorder tokenizes it."""
    ids = list(tokenizer("a")["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    n = 0
    while n < len(ids) - 1 and ids[n] in special:
        n += 1
    return n


def resolve_fit_config(cfg: FitConfig, tokenizer: Any | None) -> FitConfig:
    """`cfg` with `skip_tokens="auto"` made concrete for this tokenizer (None: images, 0; text: the prepended
    special tokens, at least one: the attention sink), as `fit` saves it: key caches of fits by the resolved
    config, so a default that resolves to the old value keeps their keys."""
    if cfg.skip_tokens != "auto":
        return cfg
    return replace(cfg, skip_tokens=0 if tokenizer is None else max(1, prepended_specials(tokenizer)))


# ---- data: what fit records from ------------------------------------------------------------------------


@runtime_checkable
class FitData(Protocol):
    """Source / target / control examples that can record their activations at a list of sites."""

    @property
    def kind(self) -> str:
        """ "text" or "images": what the model consumes (some components need a text model)."""
        ...

    @property
    def name(self) -> str: ...

    def validate(self, need_control: bool) -> None: ...

    def sizes(self) -> dict[str, int]: ...

    def resolve_sites(
        self, model: nn.Module, sites: str | Sequence[str], layers: Sequence[int] | None
    ) -> list[Site]: ...

    def record(
        self, model: nn.Module, split: str, sites: list[Site], pool: str, cfg: FitConfig, progress: bool
    ) -> dict[str, Any]:
        """{site: Tensor[n, d]} for pool="mean"; {site: list of Tensor[K_i, d]} for pool="all" (the tokens of
        each example: a prompt's tokens, an image's timesteps). Steering active on `model` is seen."""
        ...


@dataclass
class TextData:
    """Prompt sets and the tokenizer that feeds them to a language model."""

    sets: PromptSets
    tokenizer: Any
    kind: str = "text"

    @property
    def name(self) -> str:
        return self.sets.name

    def validate(self, need_control: bool) -> None:
        self.sets.validate(need_control=need_control)

    def sizes(self) -> dict[str, int]:
        return {k: len(getattr(self.sets, k)) for k in ("source", "target", "control")}

    def resolve_sites(
        self, model: nn.Module, sites: str | Sequence[str], layers: Sequence[int] | None
    ) -> list[Site]:
        return resolve_sites(model, sites, layers)

    def record(
        self, model: nn.Module, split: str, sites: list[Site], pool: str, cfg: FitConfig, progress: bool
    ) -> dict[str, Any]:
        return record(
            model,
            self.tokenizer,
            getattr(self.sets, split),
            sites,
            pool=pool,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            progress=progress,
            desc=f"recording {split}",
            skip=cfg.skip,
        )


# ---- the context a component sees -----------------------------------------------------------------------


@dataclass
class FitContext:
    """What a method or gate sees: the model, the data, the sites, options, and cached recordings."""

    model: nn.Module
    data: FitData
    sites: list[Site]
    fit: FitConfig
    options: dict[str, Any]
    """Config objects by key ("dsas", "iti", ...)."""
    progress: bool = True
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-site diagnostics a component reports; merged into `Steerer.stats`."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Fit-wide diagnostics (e.g. the training curve's ends); saved as `config["training"]`."""
    _cache: dict[tuple[str, str], Any] = field(default_factory=dict)

    def acts(self, split: str, pool: str = "mean") -> dict[str, Any]:
        """Unsteered activations of one split at every site, cached."""
        key = (split, pool)
        if key not in self._cache:
            self._cache[key] = self.record(split, self.sites, pool, self.progress)
        return self._cache[key]

    def record(
        self, split: str, sites: list[Site], pool: str = "mean", progress: bool = False
    ) -> dict[str, Any]:
        """Activations of one split at `sites` now (steering active on the model is seen); not cached."""
        return self.data.record(self.model, split, sites, pool, self.fit, progress)

    @property
    def tokenizer(self) -> Any:
        return self.text.tokenizer

    @property
    def prompts(self) -> PromptSets:
        """The prompt sets (components that run prompts through a text model)."""
        return self.text.sets

    @property
    def text(self) -> TextData:
        if not isinstance(self.data, TextData):
            raise TypeError("this component needs a text model, its tokenizer and prompt sets")
        return self.data


@dataclass
class Gates:
    """What a gate fitter returns: a gate per site, the sites steered at run time, and per-site stats."""

    gates: dict[str, SiteGate]
    steered: list[str]
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    maps: dict[str, SiteMap] | None = None
    """Set by joint fitters (LinEAS + E2E-DSAS), which train the maps with their gates."""
    condition: Condition | None = None
    """Set by the CAST-style threshold baseline: a prompt-level decision instead of a per-token gate."""


MethodFn = Callable[[FitContext], dict[str, SiteMap]]
GateFn = Callable[[FitContext], Gates]


@dataclass(frozen=True)
class Component:
    """A registered method or gate."""

    fn: Callable[[FitContext], Any]
    configs: dict[str, type] = field(default_factory=dict)
    """Config classes by option key."""
    needs_control: bool = False
    text_only: bool = False
    """Needs a text model (it re-runs prompts through it, or reads token sequences)."""
    joint: str | None = None
    """For a gate that trains its maps jointly: the only method it works with (that method's fn is skipped)."""


METHODS: dict[str, Component] = {}
GATES: dict[str, Component] = {}


def register_method(
    name: str, fn: MethodFn, configs: dict[str, type] | None = None, *, text_only: bool = False
) -> None:
    METHODS[name] = Component(fn, dict(configs or {}), text_only=text_only)


def register_gate(
    name: str,
    fn: GateFn,
    configs: dict[str, type] | None = None,
    *,
    needs_control: bool = True,
    text_only: bool = False,
    joint: str | None = None,
) -> None:
    GATES[name] = Component(fn, dict(configs or {}), needs_control, text_only, joint)


# ---- built-in methods ------------------------------------------------------------------------------------


@dataclass
class CAAConfig:
    """Options of CAA (mean difference of token-mean activations)."""

    incremental: bool = False
    """Fit site by site, recording each site's source activations with the sites below it already steered
    (strength 1, no gate), so that strength 1 moves what actually arrives at every site onto the target and the
    shifts of all sites do not add up along the residual stream."""

    def __post_init__(self) -> None:
        check_fields(self)


def _site_by_site(
    ctx: FitContext, incremental: bool, fit_one: Callable[[Site, torch.Tensor, torch.Tensor], SiteMap]
) -> dict[str, SiteMap]:
    """Fit every site's map from its (source, target) activations; with `incremental`, site l's source
    activations are recorded with sites < l steered by the maps fitted so far (strength 1, no gate). Targets
    are always the unsteered target activations."""
    src, tgt = ctx.acts("source"), ctx.acts("target")
    maps: dict[str, SiteMap] = {}
    for i, s in enumerate(ctx.sites):
        x = src[s.name]
        if incremental and i > 0:
            up = ctx.sites[:i]
            with steering(ctx.model, up, maps, {u.name: SiteGate() for u in up}, 1.0):
                x = ctx.record("source", [s])[s.name]
        maps[s.name] = fit_one(s, x, tgt[s.name])
    return maps


def _caa(ctx: FitContext) -> dict[str, SiteMap]:
    cfg: CAAConfig = ctx.options["caa"]
    return _site_by_site(ctx, cfg.incremental, lambda _s, x, t: fit_caa(x, t))


def _iti(ctx: FitContext) -> dict[str, SiteMap]:
    cfg: ITIConfig = ctx.options["iti"]
    heads = cfg.heads
    if cfg.unit == "head" and heads is None:
        heads = getattr(getattr(ctx.model, "config", None), "num_attention_heads", None)

    def one(s: Site, x: torch.Tensor, t: torch.Tensor) -> SiteMap:
        m, ctx.stats[s.name] = fit_iti(x, t, cfg, heads, ctx.fit.seed)
        return m

    return _site_by_site(ctx, cfg.incremental, one)


def _linear_act(ctx: FitContext) -> dict[str, SiteMap]:
    cfg: LinearActConfig = ctx.options["linear_act"]
    return _site_by_site(ctx, cfg.incremental, lambda _s, x, t: fit_linear_act(x, t, cfg.quantiles))


def _lineas(ctx: FitContext) -> dict[str, SiteMap]:
    res = train_maps(
        ctx.model,
        ctx.tokenizer,
        ctx.sites,
        ctx.prompts.source,
        ctx.acts("target"),
        ctx.options["lineas"],
        max_length=ctx.fit.max_length,
        chunk=ctx.fit.batch_size,
        progress=ctx.progress,
        skip=ctx.fit.skip,
    )
    ctx.summary = res.summary()
    return res.maps


# ---- built-in gates --------------------------------------------------------------------------------------


def _gate_none(ctx: FitContext) -> Gates:
    return Gates({s.name: SiteGate() for s in ctx.sites}, [s.name for s in ctx.sites])


def _joined(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Per site, the activations of several splits as one: rows concatenated, or lists of prompts chained."""
    if len(parts) == 1:
        return parts[0]
    return {
        k: [t for p in parts for t in p[k]] if isinstance(v, list) else torch.cat([p[k] for p in parts])
        for k, v in parts[0].items()
    }


def _running_mean(t: torch.Tensor) -> torch.Tensor:
    """Row k of the result is the mean of rows 0..k of `t` [K, d] (in float64: a sum over a long prompt)."""
    n = torch.arange(1, len(t) + 1, dtype=torch.float64).unsqueeze(1)
    return t.double().cumsum(0) / n


def _gate_dsas(ctx: FitContext) -> Gates:
    cfg = ctx.options["dsas"] = resolve_scope(ctx.options["dsas"], ctx.data.kind == "text")
    if cfg.scope != "token" and ctx.data.kind != "text":
        raise ValueError(f"scope={cfg.scope!r} follows a token sequence; for images use scope='token'.")
    if cfg.split is not None and cfg.scope not in POOLED_SCOPES:
        raise ValueError(
            f"DSASConfig.split needs pooled gates (scope {POOLED_SCOPES}: token sequences, inactive='off'); this "
            f"fit resolved to scope={cfg.scope!r}. Drop split or fit a language model with inactive='off'."
        )
    pool = "all" if cfg.features == "tokens" else "mean"
    negatives = ["control", "target"] if cfg.negatives == "control+target" else ["control"]
    src, ctl = ctx.acts("source", pool), _joined([ctx.acts(k, pool) for k in negatives])
    tok = None
    if cfg.control_fpr is not None and cfg.calibrate_on == "tokens" and pool == "mean":
        tok = _read_tokens(ctx, cfg, negatives)
    gates, steered, stats = {}, [], {}
    for s in ctx.sites:
        r = fit_regulator(src[s.name], ctl[s.name], cfg, ctx.fit.seed, None if tok is None else tok[s.name])
        gates[s.name] = r.gate
        stats[s.name] = {"active": r.active, **r.stats}
        if r.steered:
            steered.append(s.name)
    if cfg.scope in POOLED_SCOPES:
        # From the first accurate regulator up, every site is steered: accurate ones add their logit to the
        # pool, the others read it (model order is forward order).
        first = next((i for i, s in enumerate(ctx.sites) if stats[s.name]["active"]), len(ctx.sites))
        steered = [s.name for s in ctx.sites[first:]]
        for s in ctx.sites:
            if not stats[s.name]["active"]:
                gates[s.name] = SiteGate("pooled", None, 0.0, 1.0, cfg.scope, cfg.floor)
        if cfg.split is not None:
            gates, steered = _split(ctx, cfg, gates, stats, pool)
    return Gates(gates, steered, stats)


def _read_tokens(ctx: FitContext, cfg: DSASConfig, splits: list[str]) -> dict[str, Any]:
    """Per site, the splits' prompts as lists of token rows, each as the gate reads it at run time: alone, or
    the running mean of the prompt so far for a latched (running-mean) scope."""
    tok = _joined([ctx.acts(k, "all") for k in splits])
    if cfg.scope in RUNNING_MEAN_SCOPES:
        tok = {k: [_running_mean(t) for t in v] for k, v in tok.items()}
    return tok


def _control_examples(ctx: FitContext, cfg: DSASConfig, pool: str) -> dict[str, Any]:
    """Per site, the control prompts as `control_fpr` counts them for a split's pool: token-means, or (with
    calibrate_on="tokens") every token, read as the gate reads it. The control set alone: it stands for the
    text to leave alone, where the target prompts of a removal fit are rewrites of the source (polite insults)
    that the pool need not be shut on."""
    if cfg.calibrate_on == "tokens" and pool == "mean":
        return _read_tokens(ctx, cfg, ["control"])
    return ctx.acts("control", pool)


def _split(
    ctx: FitContext,
    cfg: DSASConfig,
    gates: dict[str, SiteGate],
    stats: dict[str, Any],
    pool: str,
) -> tuple[dict[str, SiteGate], list[str]]:
    """DSASConfig.split: the accurate regulators under the split only add their logit to the pool (mult 0:
    their site is left as it is); every site above reads the pool and is steered. With `control_fpr`, the pool
    is calibrated as a whole on the control examples (`_control_examples`, read as `pool` features)."""
    split = cfg.split
    assert split is not None
    k = round(split * len(ctx.sites))
    readers = [s.name for s in ctx.sites[:k] if stats[s.name]["active"]]
    if not readers or k >= len(ctx.sites):
        raise ValueError(
            f"DSASConfig.split={split} leaves {len(readers)} accurate regulators under the split and "
            f"{len(ctx.sites) - k} sites above it, of {len(ctx.sites)}: both must be at least one. Raise or "
            "lower split, or fit on more prompts (the per-site accuracies are in the steerer's stats)."
        )
    out = {n: dataclasses.replace(gates[n], mult=0.0) for n in readers}
    if cfg.control_fpr is not None:
        out = _calibrate_pool(out, _control_examples(ctx, cfg, pool), cfg)
    out |= {s.name: SiteGate("pooled", None, 0.0, 1.0, cfg.scope, cfg.floor) for s in ctx.sites[k:]}
    steered = [s.name for s in ctx.sites if s.name in out]
    return {**gates, **out}, steered


def _calibrate_pool(
    readers: dict[str, SiteGate], negatives: dict[str, Any], cfg: DSASConfig
) -> dict[str, SiteGate]:
    """Shift every reader's bias by one amount so that the pool they make -- the one decision every steered
    site reads under `split` -- opens on `control_fpr` of the control examples, read as the gate reads them.

    Each regulator was calibrated alone; the mean of several logits spreads less than any one of them, so
    without this the pool opens on far fewer examples than `control_fpr` says (and on far fewer of the inputs
    to steer). Examples are the negatives' token-means, or their tokens (running means for a latched gate)
    weighted 1/K per prompt, as `fit_regulator` counts them."""
    assert cfg.control_fpr is not None
    logits: list[np.ndarray] = []
    weights: np.ndarray | None = None
    for name, g in readers.items():
        assert g.w is not None
        x = negatives[name]
        if isinstance(x, list):  # per-prompt token rows, each prompt counted once
            X, weights = per_prompt_tokens(x)
        else:
            X = x.double().numpy()
        logits.append(X @ g.w.double().numpy() + float(g.b))
    pool = np.mean(logits, axis=0)
    # Where each regulator's own calibration put the quantile: the opening point, then offset and temperature.
    target = (opening_logit(cfg) - cfg.offset) / cfg.temperature
    delta = upper_quantile(pool, weights, cfg.control_fpr) - target
    return {n: dataclasses.replace(g, b=float(g.b) - delta) for n, g in readers.items()}


def _e2e_init(ctx: FitContext, kind: str) -> dict[str, tuple[torch.Tensor, float]]:
    """Warm start of every site's gate from the DSAS regulator (u = folded w, c = b). A ReLU gate is rescaled
    so that its mean on the source prompts is 1; one that is zero on every source prompt would start dead and
    starts at u = 0, c = 1 instead."""
    # Every site is trained, so the regulator's accuracy is not needed: "train" skips the k-fold refits.
    dcfg = dataclasses.replace(ctx.options["dsas"], acc_mode="train")
    src, ctl = ctx.acts("source"), ctx.acts("control")
    init = {}
    for s in ctx.sites:
        g = fit_regulator(src[s.name], ctl[s.name], dcfg, ctx.fit.seed).gate
        assert g.w is not None
        u, c = g.w.float(), float(g.b)
        if kind == "relu":
            on_src = torch.relu(src[s.name].float() @ u + c).mean()
            if float(on_src) > 1e-6:
                u, c = u / on_src, c / float(on_src)
            else:
                u, c = torch.zeros_like(u), 1.0
        init[s.name] = (u, c)
    return init


def _gate_e2e(kind: str) -> GateFn:
    def fn(ctx: FitContext) -> Gates:
        ecfg: E2EConfig = ctx.options["e2e"]
        sets = ctx.prompts
        res = train_maps(
            ctx.model,
            ctx.tokenizer,
            ctx.sites,
            sets.source,
            ctx.acts("target"),
            ctx.options["lineas"],
            control=sets.control,
            gate_kind=kind,
            gate_init=_e2e_init(ctx, kind) if ecfg.warm_start else None,
            e2e=ecfg,
            max_length=ctx.fit.max_length,
            chunk=ctx.fit.batch_size,
            progress=ctx.progress,
            desc=f"e2e-{kind}",
            skip=ctx.fit.skip,
        )
        assert res.gates is not None
        ctx.summary = res.summary()
        return Gates(res.gates, [s.name for s in ctx.sites], res.stats, maps=res.maps)

    return fn


def _gate_threshold(ctx: FitContext) -> Gates:
    cfg: ThresholdConfig = ctx.options["threshold"]
    cond, stats = fit_condition(ctx.model, lambda split, sites: ctx.record(split, sites), cfg, ctx.fit.seed)
    cfg.site = cond.site  # saved resolved, so the artifact names the site it reads
    names = [s.name for s in ctx.sites]
    return Gates({n: SiteGate() for n in names}, names, {n: dict(stats) for n in names}, condition=cond)


register_method("caa", _caa, {"caa": CAAConfig})
register_method("iti", _iti, {"iti": ITIConfig})
register_method("lineas", _lineas, {"lineas": LinEASConfig}, text_only=True)
register_method("linear_act", _linear_act, {"linear_act": LinearActConfig})
register_gate("none", _gate_none, needs_control=False)
register_gate("dsas", _gate_dsas, {"dsas": DSASConfig})
for _kind in E2E_KINDS:
    register_gate(
        f"e2e-{_kind}",
        _gate_e2e(_kind),
        {"e2e": E2EConfig, "dsas": DSASConfig},
        text_only=True,
        joint="lineas",
    )
register_gate("threshold", _gate_threshold, {"threshold": ThresholdConfig}, text_only=True)


# ---- options ---------------------------------------------------------------------------------------------


def route_options(method: str, gate: str, options: dict[str, Any]) -> tuple[FitConfig, dict[str, Any]]:
    """Build FitConfig and every component's config from keyword options (see the module docstring).

    Unknown names and names two configs share are errors that say what to pass instead."""
    classes: dict[str, type] = {"fit": FitConfig, **METHODS[method].configs, **GATES[gate].configs}
    fields = {key: {f.name for f in dataclasses.fields(cls)} for key, cls in classes.items()}
    given: dict[str, Any] = {}
    kw: dict[str, dict[str, Any]] = {key: {} for key in classes}
    unknown = []
    for name, value in options.items():
        if name in classes:
            if not isinstance(value, classes[name]):
                raise TypeError(f"{name}= must be a {classes[name].__name__}, got {type(value).__name__}.")
            given[name] = value
            continue
        key, _, field_name = name.rpartition(".")
        if key:
            if key not in classes or field_name not in fields[key]:
                unknown.append(name)
                continue
            kw[key][field_name] = value
            continue
        owners = [k for k in classes if name in fields[k]]
        if not owners:
            unknown.append(name)
        elif len(owners) > 1:
            alts = " or ".join(f"{k}={classes[k].__name__}({name}=...)" for k in owners)
            raise TypeError(
                f"Option {name!r} belongs to several configs ({', '.join(owners)}) of method={method!r}, "
                f"gate={gate!r}: pass {alts}, or a dotted name such as {owners[-1]}.{name}=... "
                f"(CLI: --option {owners[-1]}.{name}=...)."
            )
        else:
            kw[owners[0]][name] = value
    if unknown:
        valid = sorted({f for fs in fields.values() for f in fs} | set(classes))
        raise TypeError(
            f"Unknown option(s) {sorted(unknown)} for method={method!r}, gate={gate!r}. Valid: {valid}."
        )
    built = {
        key: cls(**{**(vars(given[key]) if key in given else {}), **kw[key]}) for key, cls in classes.items()
    }
    return built.pop("fit"), built


# ---- fit -------------------------------------------------------------------------------------------------


def _as_data(tokenizer: Any, sets: Any) -> FitData:
    if sets is None and isinstance(tokenizer, FitData):
        return tokenizer
    if isinstance(sets, FitData):
        return sets
    if isinstance(sets, PromptSets):
        if tokenizer is None:
            raise TypeError("Prompt sets need the model's tokenizer: dsas.fit(model, tokenizer, sets, ...).")
        return TextData(sets, tokenizer)
    raise TypeError(
        "sets must be dsas.PromptSets(source=[...], target=[...], control=[...]) for a language model, or "
        "dsas.ImageSets(source=..., target=..., control=...) for a diffusion denoiser."
    )


def fit(
    model: nn.Module,
    tokenizer: Any = None,
    sets: PromptSets | FitData | None = None,
    method: str = "caa",
    gate: str = "dsas",
    sites: str | Sequence[str] = "auto",
    *,
    layers: Sequence[int] | None = None,
    progress: bool = True,
    **options: Any,
) -> Steerer:
    """Fit a steerer: `method` says how to steer, `gate` says when.

    tokenizer, sets: a tokenizer and `PromptSets` for a language model; for a diffusion denoiser pass
             `ImageSets` (denoiser calls of each image set) as `sets` (or in the tokenizer's place).
    method:  "caa" (mean difference), "iti" (ITIConfig), "lineas" (end-to-end affine maps, LinEASConfig;
             text), "linear_act" (per-unit 1-D OT, LinearActConfig).
    gate:    "none" (constant 1), "dsas" (DSASConfig), "e2e-sigmoid" / "e2e-relu" (trained jointly with the
             LinEAS maps: method="lineas", E2EConfig; text), "threshold" (CAST-style prompt-level baseline,
             ThresholdConfig; text).
    sites:   text: "auto" (attention + MLP outputs of every block), "blocks", "attn", "mlp", a regex over
             module names, or a list of module names; layers: keep only these block indices. Images: "auto"
             (every ResNet / transformer block), "blocks", "resnets", a regex or a list.
    options: fields of FitConfig and of the method's and gate's configs (pca_dim=5, acc_threshold=0.75, ...),
             whole configs by key (dsas=DSASConfig(...)), or dotted names (**{"dsas.C": 2}).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {sorted(METHODS)}.")
    if gate not in GATES:
        raise ValueError(f"Unknown gate {gate!r}; choose one of {sorted(GATES)}.")
    m, g = METHODS[method], GATES[gate]
    if g.joint is not None and method != g.joint:
        raise ValueError(
            f"gate={gate!r} is trained jointly with its maps and works only with method in {[g.joint]}; got "
            f"method={method!r}. Use method={g.joint!r}, or gate='dsas' to put a DSAS regulator on top of any "
            "method."
        )
    fcfg, opts = route_options(method, gate, options)  # bad options fail before anything is loaded or run
    data = _as_data(tokenizer, sets)
    fcfg = resolve_fit_config(fcfg, getattr(data, "tokenizer", None) if data.kind == "text" else None)
    for what, name, comp in (("method", method, m), ("gate", gate, g)):
        if comp.text_only and data.kind != "text":
            raise ValueError(
                f"{what}={name!r} needs a text model (it runs prompts through the model or reads token "
                f"sequences); it cannot be fitted on {data.kind}. For {data.kind} use method in "
                f"{sorted(k for k, c in METHODS.items() if not c.text_only)} and gate in "
                f"{sorted(k for k, c in GATES.items() if not c.text_only)}."
            )
    if fcfg.skip_tokens and data.kind != "text":
        raise ValueError(
            f"skip_tokens={fcfg.skip_tokens} leaves the first tokens of each prompt out; {data.kind} have no "
            "token sequence to skip into. Leave skip_tokens=0 for a diffusion denoiser."
        )
    data.validate(need_control=g.needs_control)
    site_list = data.resolve_sites(model, sites, layers)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    ctx = FitContext(model, data, site_list, fcfg, opts, progress)
    try:
        torch.manual_seed(fcfg.seed)
        maps = m.fn(ctx) if g.joint is None else None
        res: Gates = g.fn(ctx)
    finally:
        model.train(was_training)
    if res.maps is not None:
        maps = res.maps
    assert maps is not None
    if fcfg.skip:  # what the latched gates and the threshold gate read at run time
        res.gates = {k: replace(v, skip=fcfg.skip) if v.kind != "const" else v for k, v in res.gates.items()}
        if res.condition is not None:
            res.condition = replace(res.condition, skip=fcfg.skip)
    config: dict[str, Any] = {
        "method": method,
        "gate": gate,
        "domain": data.kind,
        "sites_spec": sites if isinstance(sites, str) else list(sites),
        "layers": None if layers is None else list(layers),
        "fit": fit_config_dict(fcfg),
        "options": {k: dataclasses.asdict(v) for k, v in opts.items()},
        "n_prompts": data.sizes(),
        "prompt_sets": data.name,
        "fit_seconds": round(time.perf_counter() - t0, 3),
    }
    if ctx.summary:
        config["training"] = ctx.summary
    _warn_if_inert(maps, res)
    stats = {s.name: {**ctx.stats.get(s.name, {}), **res.stats.get(s.name, {})} for s in site_list}
    fp = fingerprint(model, site_list)
    if data.kind != "text":
        fp["site_dims"] = {s.name: maps[s.name].dim for s in site_list}
    return Steerer(site_list, maps, res.gates, res.steered, config, fp, stats, res.condition)


def _warn_if_inert(maps: dict[str, SiteMap], res: Gates) -> None:
    if not res.steered:
        warnings.warn(
            "No site passed the regulator's accuracy threshold: this steerer changes nothing. Lower "
            "acc_threshold, add prompts, or check that source and control differ.",
            stacklevel=3,
        )
    elif all(maps[n].is_zero() for n in res.steered):
        warnings.warn(
            "Every steered site's map is zero (source and target give the same activations): this steerer "
            "changes nothing. Check that the target set differs from the source set.",
            stacklevel=3,
        )
