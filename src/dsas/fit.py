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
from dsas.gates import DSASConfig, SiteGate, ThresholdConfig, fit_regulator, fit_threshold
from dsas.maps import ITIConfig, LinearActConfig, SiteMap, fit_caa, fit_iti, fit_linear_act
from dsas.record import record
from dsas.sites import Site, find_blocks, fingerprint, resolve_sites
from dsas.steer import steering
from dsas.steerer import Steerer
from dsas.train import E2EConfig, LinEASConfig, train_maps


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
    method: str = ""
    """Name of the method being fitted (a gate trained jointly with its maps checks it)."""
    gate: str = ""
    """Name of the gate being fitted (a method whose maps a gate trains jointly skips its own training)."""
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-site diagnostics a method reports (e.g. ITI probe accuracies); merged into `Steerer.stats`."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Fit-wide diagnostics (e.g. the training curve's ends); saved as `config["training"]`."""

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


def register_gate(
    name: str,
    configs: tuple[type, ...],
    fn: GateFn,
    needs_control: bool = True,
    methods: tuple[str, ...] | None = None,
) -> None:
    """`methods`: the only methods this gate works with (checked before anything is fitted); None: any."""
    GATES[name] = (configs, fn, needs_control)
    if methods is not None:
        GATE_METHODS[name] = methods
    else:
        GATE_METHODS.pop(name, None)


GATE_METHODS: dict[str, tuple[str, ...]] = {}


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


def _iti(ctx: FitContext) -> dict[str, SiteMap]:
    cfg: ITIConfig = ctx.options["iti"]
    heads = cfg.heads
    if cfg.unit == "head" and heads is None:
        heads = getattr(getattr(ctx.model, "config", None), "num_attention_heads", None)
    src, tgt = ctx.acts("source"), ctx.acts("target")
    maps = {}
    for s in ctx.sites:
        maps[s.name], ctx.stats[s.name] = fit_iti(src[s.name], tgt[s.name], cfg, heads, ctx.fit.seed)
    return maps


def _linear_act(ctx: FitContext) -> dict[str, SiteMap]:
    """Linear-AcT, incrementally: site l is fitted on source activations recorded with sites < l steered
    (strength 1, no gate); targets are the unsteered target activations."""
    cfg: LinearActConfig = ctx.options["linearact"]
    src, tgt = ctx.acts("source"), ctx.acts("target")
    maps: dict[str, SiteMap] = {}
    for i, s in enumerate(ctx.sites):
        x = src[s.name]
        if cfg.incremental and i > 0:
            up = ctx.sites[:i]
            with steering(ctx.model, up, maps, {u.name: SiteGate() for u in up}, 1.0):
                x = record(
                    ctx.model,
                    ctx.tokenizer,
                    ctx.sets.source,
                    [s],
                    batch_size=ctx.fit.batch_size,
                    max_length=ctx.fit.max_length,
                    progress=False,
                )[s.name]
        maps[s.name] = fit_linear_act(x, tgt[s.name], cfg.quantiles)
    return maps


E2E_GATES = {"e2e-sigmoid": "sigmoid", "e2e-relu": "relu"}


def _lineas(ctx: FitContext) -> dict[str, SiteMap]:
    tgt = ctx.acts("target")
    if ctx.gate in E2E_GATES:
        # The E2E gate trains these maps jointly with itself, from the identity (paper Alg. 3).
        return {
            s.name: SiteMap(torch.zeros(tgt[s.name].shape[1]), torch.zeros(tgt[s.name].shape[1]))
            for s in ctx.sites
        }
    res = train_maps(
        ctx.model,
        ctx.tokenizer,
        ctx.sites,
        ctx.sets.source,
        tgt,
        ctx.options["lineas"],
        max_length=ctx.fit.max_length,
        chunk=ctx.fit.batch_size,
        progress=ctx.progress,
    )
    ctx.summary = res.summary()
    return res.maps


def _e2e_init(ctx: FitContext, kind: str) -> dict[str, tuple[torch.Tensor, float]]:
    """Warm start of every site's gate from the DSAS regulator (u = folded w, c = b). A ReLU gate is rescaled
    so that its mean on the source prompts is 1; one that is zero on every source prompt would start dead and
    starts at u = 0, c = 1 instead."""
    # Every site is trained, so the regulator's accuracy is not needed: "train" skips the k-fold refits.
    dcfg = dataclasses.replace(ctx.options["dsas"], acc_mode="train")
    src, ctl = ctx.acts("source"), ctx.acts("control")
    init = {}
    for s in ctx.sites:
        g = fit_regulator(src[s.name], ctl[s.name], dcfg).gate  # one BLAS thread inside
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
    def fn(ctx: FitContext, maps: dict[str, SiteMap]) -> GateResult:
        ecfg: E2EConfig = ctx.options["e2e"]
        init = _e2e_init(ctx, kind) if ecfg.warm_start else None
        res = train_maps(
            ctx.model,
            ctx.tokenizer,
            ctx.sites,
            ctx.sets.source,
            ctx.acts("target"),
            ctx.options["lineas"],
            control=ctx.sets.control,
            gate_kind=kind,
            gate_init=init,
            e2e=ecfg,
            max_length=ctx.fit.max_length,
            chunk=ctx.fit.batch_size,
            progress=ctx.progress,
            desc=f"e2e-{kind}",
        )
        assert res.gates is not None
        ctx.summary = res.summary()
        return GateResult(res.gates, [s.name for s in ctx.sites], res.stats, maps=res.maps)

    return fn


def _gate_threshold(ctx: FitContext, maps: dict[str, SiteMap]) -> GateResult:
    cfg: ThresholdConfig = ctx.options["threshold"]
    if cfg.site is None:
        block_name, blocks = find_blocks(ctx.model)
        cond = resolve_sites(ctx.model, [f"{block_name}.{len(blocks) // 2}"])[0]
    else:
        cond = resolve_sites(ctx.model, [cfg.site])[0]
    cfg.site = cond.name  # saved resolved, so the artifact names the site it reads
    kw: dict[str, Any] = {
        "batch_size": ctx.fit.batch_size,
        "max_length": ctx.fit.max_length,
        "progress": False,
    }
    src = record(ctx.model, ctx.tokenizer, ctx.sets.source, [cond], **kw)[cond.name]
    ctl = record(ctx.model, ctx.tokenizer, ctx.sets.control, [cond], **kw)[cond.name]
    direction, threshold, stats = fit_threshold(src, ctl, cfg, ctx.fit.seed)
    stats = {"condition_site": cond.name, **stats}
    # One copy per site: safetensors refuses tensors that share memory.
    gates = {s.name: SiteGate("const", direction.clone(), threshold) for s in ctx.sites}
    return GateResult(gates, [s.name for s in ctx.sites], {s.name: dict(stats) for s in ctx.sites})


register_method("caa", (), _caa)
register_method("iti", (ITIConfig,), _iti)
register_method("lineas", (LinEASConfig,), _lineas)
register_method("linear_act", (LinearActConfig,), _linear_act)
register_gate("none", (), _gate_none, needs_control=False)
register_gate("dsas", (DSASConfig,), _gate_dsas)
for _name, _kind in E2E_GATES.items():
    register_gate(_name, (E2EConfig, DSASConfig), _gate_e2e(_kind), methods=("lineas",))
register_gate("threshold", (ThresholdConfig,), _gate_threshold)


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
    """Fit a steerer: `method` says how to steer, `gate` says when.

    method:  "caa" (mean difference), "iti" (ITIConfig), "lineas" (end-to-end affine maps, LinEASConfig),
             "linear_act" (per-unit 1-D OT, LinearActConfig).
    gate:    "none" (constant 1), "dsas" (DSASConfig), "e2e-sigmoid" / "e2e-relu" (trained jointly with the
             LinEAS maps: method="lineas", E2EConfig), "threshold" (CAST-style prompt-level baseline,
             ThresholdConfig).

    sites:   "auto" (attention + MLP outputs of every block), "blocks", "attn", "mlp", a regex over module
             names, or a list of module names. layers: keep only these block indices.
    options: fields of FitConfig, of the method's and of the gate's config dataclasses (e.g. pca_dim=5,
             acc_threshold=0.75 for gate="dsas"), or whole config objects by name (dsas=DSASConfig(...)).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {sorted(METHODS)}.")
    if gate not in GATES:
        raise ValueError(f"Unknown gate {gate!r}; choose one of {sorted(GATES)}.")
    if gate in GATE_METHODS and method not in GATE_METHODS[gate]:
        raise ValueError(
            f"gate={gate!r} is trained jointly with its maps and works only with method in "
            f"{list(GATE_METHODS[gate])}; got method={method!r}. Use method={GATE_METHODS[gate][0]!r}, or "
            "gate='dsas' to put a DSAS regulator on top of any method."
        )
    if not isinstance(sets, PromptSets):
        raise TypeError("sets must be a dsas.PromptSets(source=[...], target=[...], control=[...]).")
    sets.validate(need_control=GATES[gate][2])
    fcfg, opts = _configs(method, gate, options)
    site_list = resolve_sites(model, sites, layers)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        ctx = FitContext(model, tokenizer, sets, site_list, fcfg, opts, progress, method=method, gate=gate)
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
    if ctx.summary:
        config["training"] = ctx.summary
    if not res.steered:
        import warnings

        warnings.warn(
            "No site passed the regulator's accuracy threshold: this steerer changes nothing. Lower "
            "acc_threshold, add prompts, or check that source and control differ.",
            stacklevel=2,
        )
    stats = {s.name: {**ctx.stats.get(s.name, {}), **res.stats.get(s.name, {})} for s in site_list}
    return Steerer(site_list, maps, res.gates, res.steered, config, fingerprint(model, site_list), stats)
