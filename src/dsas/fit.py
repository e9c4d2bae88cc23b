"""`dsas.fit`: record activations once, fit the map ("how") and the gate ("when") per site, return a Steerer.

Methods and gates are looked up in two registries, so a new one is a function plus a config dataclass:

    register_method("caa", (), fit_fn)              fit_fn(ctx) -> {site: SiteMap}
    register_gate("dsas", (DSASConfig,), gate_fn)   gate_fn(ctx, maps) -> GateResult

A config class `FooConfig` is reachable as `ctx.options["foo"]`, and its fields as keyword options of `fit`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dsas.data import PromptSets
from dsas.gates import DSASConfig, SiteGate, fit_regulator
from dsas.maps import SiteMap, fit_caa
from dsas.record import record
from dsas.sites import Site, fingerprint, resolve_sites
from dsas.steerer import Steerer


@dataclass
class FitConfig:
    """Options shared by every method and gate."""

    batch_size: int = 16
    """Prompts per forward pass while recording activations."""
    max_length: int = 128
    """Prompts are truncated to this many tokens."""
    seed: int = 0
    """Seeds everything random in fitting (CV folds, initialisations, resampling)."""


@dataclass
class FitContext:
    """What a method or gate sees: the model, the sets, the sites, options, and cached recordings."""

    model: nn.Module
    tokenizer: Any
    sets: PromptSets
    sites: list[Site]
    fit: FitConfig
    options: dict[str, Any]
    progress: bool = True
    _cache: dict[tuple[str, str], Any] = field(default_factory=dict)

    def acts(self, split: str, pool: str = "mean") -> dict[str, Any]:
        """Unsteered activations of one split ("source", "target", "control") at every site, cached."""
        key = (split, pool)
        if key not in self._cache:
            texts = getattr(self.sets, split)
            self._cache[key] = record(
                self.model,
                self.tokenizer,
                texts,
                self.sites,
                pool=pool,
                batch_size=self.fit.batch_size,
                max_length=self.fit.max_length,
                progress=self.progress,
                desc=f"recording {split}",
            )
        return self._cache[key]


@dataclass
class GateResult:
    gates: dict[str, SiteGate]
    steered: list[str]
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    maps: dict[str, SiteMap] | None = None
    """Set by gates trained jointly with their maps (E2E-DSAS); replaces the method's maps."""


MethodFn = Callable[[FitContext], dict[str, SiteMap]]
GateFn = Callable[[FitContext, dict[str, SiteMap]], GateResult]
METHODS: dict[str, tuple[tuple[type, ...], MethodFn]] = {}
GATES: dict[str, tuple[tuple[type, ...], GateFn, bool]] = {}


def register_method(name: str, configs: tuple[type, ...], fn: MethodFn) -> None:
    METHODS[name] = (configs, fn)


def register_gate(name: str, configs: tuple[type, ...], fn: GateFn, needs_control: bool = True) -> None:
    GATES[name] = (configs, fn, needs_control)


def config_key(cls: type) -> str:
    """DSASConfig -> "dsas": the name under which a config lives in ctx.options and in `fit(**options)`."""
    return cls.__name__.removesuffix("Config").lower()


def _caa(ctx: FitContext) -> dict[str, SiteMap]:
    src, tgt = ctx.acts("source"), ctx.acts("target")
    return {s.name: fit_caa(src[s.name], tgt[s.name]) for s in ctx.sites}


def _gate_none(ctx: FitContext, maps: dict[str, SiteMap]) -> GateResult:
    return GateResult({s.name: SiteGate() for s in ctx.sites}, [s.name for s in ctx.sites])


def _gate_dsas(ctx: FitContext, maps: dict[str, SiteMap]) -> GateResult:
    cfg: DSASConfig = ctx.options["dsas"]
    pool = "all" if cfg.features == "tokens" else "mean"
    src, ctl = ctx.acts("source", pool), ctx.acts("control", pool)
    gates, steered, stats = {}, [], {}
    for s in ctx.sites:
        r = fit_regulator(src[s.name], ctl[s.name], cfg)
        gates[s.name] = r.gate
        stats[s.name] = {"active": r.active, **r.stats}
        if r.steered:
            steered.append(s.name)
    return GateResult(gates, steered, stats)


register_method("caa", (), _caa)
register_gate("none", (), _gate_none, needs_control=False)
register_gate("dsas", (DSASConfig,), _gate_dsas)


def _configs(method: str, gate: str, options: dict[str, Any]) -> tuple[FitConfig, dict[str, Any]]:
    """Route keyword options to the config dataclasses by field name; unknown names are an error."""
    classes: dict[str, type] = {"fit": FitConfig}
    for cls in METHODS[method][0] + GATES[gate][0]:
        classes[config_key(cls)] = cls
    built: dict[str, Any] = {}
    rest = dict(options)
    for name, cls in classes.items():
        given: Any = rest.pop(name, None)
        if given is not None and not isinstance(given, cls):
            raise TypeError(f"{name}= must be a {cls.__name__}, got {type(given).__name__}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: rest.pop(k) for k in list(rest) if k in fields}
        built[name] = cls(**{**vars(given), **kw}) if given is not None else cls(**kw)
    if rest:
        valid = sorted({f.name for c in classes.values() for f in dataclasses.fields(c)} | set(classes))
        raise TypeError(
            f"Unknown option(s) {sorted(rest)} for method={method!r}, gate={gate!r}. Valid: {valid}."
        )
    return built.pop("fit"), built


def fit(
    model: nn.Module,
    tokenizer: Any,
    sets: PromptSets,
    method: str = "caa",
    gate: str = "dsas",
    sites: str | Sequence[str] = "auto",
    *,
    layers: Sequence[int] | None = None,
    progress: bool = True,
    **options: Any,
) -> Steerer:
    """Fit a steerer: `method` says how to steer (caa, ...), `gate` says when (none, dsas, ...).

    sites:   "auto" (attention + MLP outputs of every block), "blocks", "attn", "mlp", a regex over module
             names, or a list of module names. layers: keep only these block indices.
    options: fields of FitConfig, of the method's and of the gate's config dataclasses (e.g. pca_dim=5,
             acc_threshold=0.75 for gate="dsas"), or whole config objects by name (dsas=DSASConfig(...)).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {sorted(METHODS)}.")
    if gate not in GATES:
        raise ValueError(f"Unknown gate {gate!r}; choose one of {sorted(GATES)}.")
    if not isinstance(sets, PromptSets):
        raise TypeError("sets must be a dsas.PromptSets(source=[...], target=[...], control=[...]).")
    sets.validate(need_control=GATES[gate][2])
    fcfg, opts = _configs(method, gate, options)
    site_list = resolve_sites(model, sites, layers)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        ctx = FitContext(model, tokenizer, sets, site_list, fcfg, opts, progress)
        torch.manual_seed(fcfg.seed)
        maps = METHODS[method][1](ctx)
        res = GATES[gate][1](ctx, maps)
    finally:
        model.train(was_training)
    if res.maps is not None:
        maps = res.maps
    config = {
        "method": method,
        "gate": gate,
        "sites_spec": sites if isinstance(sites, str) else list(sites),
        "layers": None if layers is None else list(layers),
        "fit": dataclasses.asdict(fcfg),
        "options": {k: dataclasses.asdict(v) for k, v in opts.items()},
        "n_prompts": {"source": len(sets.source), "target": len(sets.target), "control": len(sets.control)},
        "prompt_sets": sets.name,
        "fit_seconds": round(time.perf_counter() - t0, 3),
    }
    if not res.steered:
        import warnings

        warnings.warn(
            "No site passed the regulator's accuracy threshold: this steerer changes nothing. Lower "
            "acc_threshold, add prompts, or check that source and control differ.",
            stacklevel=2,
        )
    return Steerer(site_list, maps, res.gates, res.steered, config, fingerprint(model, site_list), res.stats)
