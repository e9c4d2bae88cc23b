"""The steering rule at every site:  z' = z + lam * g(z) * Δ(z),  per token.

`steer_tensor` is the whole rule (one screen) and the reference. `steering` installs it on a model for the span of
a `with` block and removes it in `finally` (no cost outside). Every term depends only on the current
token, so prefill and each cached decode step scale their own tokens: cached and uncached generation agree, and
padding does not leak across rows.

Run-time paths (benchmarks/README.md has the measurements): eagerly, `steer_folded` (the strength folded into the
displacement: three kernels per DSAS site, one add for vanilla steering); under torch.compile, `steer_tensor` on
the site's row of one packed parameter tensor per device (no per-site graph inputs, no graph breaks under
`fullgraph=True`, the gate written as `(z * w).sum(-1)` so inductor fuses it with the update); with `trace=True`
or on 4-D feature maps, `steer_tensor`.

A site is steered by wrapping its module's `forward` on the instance (`wrap_forward`), not by a forward hook:
dynamo always guards on a module's instance `forward`, so a model compiled before, inside or after `apply` runs
the graph that matches (steered inside, unsteered outside) with dynamo's default settings, and no compiled model,
steered or not, pays for dynamo's process-wide guards on module hooks. Module hooks are used only where dsas
needs a pre-hook (`trace=True`, conditional steering); those turn on dynamo's hook guards
(`guard_hooks_under_compile`).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from dsas.gates import SiteGate
from dsas.maps import SiteMap
from dsas.sites import Site, get_module, output_tensor, replace_output


@dataclass
class SiteParams:
    """Everything the hook of one site needs, already on the activation's device, fp32. `b` and `mult` are 0-d
    tensors when they come from a `_Pack` (compiled path), floats otherwise."""

    shift: torch.Tensor
    scale: torch.Tensor | None
    lo: torch.Tensor | None
    hi: torch.Tensor | None
    w: torch.Tensor | None
    b: float | torch.Tensor
    mult: float | torch.Tensor
    relu: bool

    @classmethod
    def build(cls, m: SiteMap, g: SiteGate, device: torch.device) -> SiteParams:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=torch.float32).contiguous()

        shift = mv(m.shift)
        assert shift is not None
        w = mv(g.w) if g.kind != "const" else None
        return cls(shift, mv(m.scale), mv(m.lo), mv(m.hi), w, float(g.b), float(g.mult), g.kind == "relu")

    def fold(self, lam: torch.Tensor, ndim: int) -> Folded:
        """These parameters with lam * mult folded into Δ, for token activations of `ndim` dims ([B, d] or
        [B, T, d]). lam: [B] fp32 on the device, or [1] when every row shares one strength."""
        k = lam * self.mult
        k = k.view(-1, *([1] * (ndim - 1))) if k.numel() > 1 else k.reshape(())
        shift = (k * self.shift).contiguous()
        scale = None if self.scale is None else (k * self.scale).contiguous()
        w = None if self.w is None else self.w.view(1, -1)
        b = torch.full((1,), float(self.b), dtype=torch.float32, device=self.shift.device)
        return Folded(shift, scale, self.lo, self.hi, w, b, self.relu)


@dataclass
class Folded:
    """One site's parameters for one batch shape, with the strength folded into the displacement."""

    shift: torch.Tensor
    """lam * mult * shift: [d], or [B, 1.., d] with one strength per row."""
    scale: torch.Tensor | None
    lo: torch.Tensor | None
    hi: torch.Tensor | None
    w: torch.Tensor | None
    """The gate vector as a [1, d] `linear` weight."""
    b: torch.Tensor
    """The gate bias as a [1] `linear` bias."""
    relu: bool


_TENSORS = ("shift", "scale", "lo", "hi", "w")


def steer_tensor(h: torch.Tensor, p: SiteParams, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the rule to one site output. h: [B, T, d], [B, d] or [B, C, H, W] (channels = d).

    lam: [B] fp32 strengths. Returns (h', a) with a = lam * g of shape h'.shape minus the feature dim.
    Math in fp32, cast back to h's dtype. This is the reference; `steer_folded` is the eager fast path.
    """
    chan_first = h.dim() == 4
    # fp32 at least; float64 activations stay float64 so that strength 0 is still the identity.
    ct = torch.promote_types(h.dtype, torch.float32)
    z = (h.movedim(1, -1) if chan_first else h).to(ct)
    if ct != torch.float32:
        p = dataclasses.replace(p, **{k: getattr(p, k).to(ct) for k in _TENSORS if getattr(p, k) is not None})
    lam = lam.view(-1, *([1] * (z.dim() - 2))).to(ct)
    if p.w is None:
        a = (lam * p.mult).expand(z.shape[:-1])
    else:
        # Under torch.compile an elementwise product + sum fuses with the add below; eagerly a matvec is faster.
        s = (z * p.w).sum(-1) if torch.compiler.is_compiling() else z @ p.w
        s = s + p.b
        a = lam * (p.mult * (torch.relu(s) if p.relu else torch.sigmoid(s)))
    delta = p.shift if p.scale is None else torch.addcmul(p.shift, z, p.scale)
    if p.lo is not None and p.hi is not None:
        delta = torch.where((z >= p.lo) & (z <= p.hi), delta, 0.0)
    y = torch.addcmul(z, a.unsqueeze(-1), delta).to(h.dtype)
    return (y.movedim(-1, 1) if chan_first else y), a


def steer_folded(h: torch.Tensor, f: Folded) -> torch.Tensor:
    """The rule for token activations h [B, T, d] / [B, d], eager and untraced, with lam * mult folded into `f`:
    y = z + phi(w . z + b) * (lam mult Δ(z)). A CAA + DSAS site is three kernels (gate as a [d -> 1] linear
    layer, in-place sigmoid, addcmul), vanilla CAA one add; no fp32 round trip for fp32 activations (bf16 ones
    add an upcast and a cast back, except vanilla CAA, whose add upcasts in-kernel)."""
    if f.w is None and f.scale is None and f.lo is None:
        y = h + f.shift  # a bf16 / fp16 h is promoted to fp32 inside the add: no separate upcast kernel
        return y if y.dtype == h.dtype else y.to(h.dtype)
    z = h.float()  # h itself when h is fp32
    delta = f.shift if f.scale is None else torch.addcmul(f.shift, z, f.scale)
    if f.lo is not None and f.hi is not None:
        delta = torch.where((z >= f.lo) & (z <= f.hi), delta, 0.0)
    if f.w is None:
        y = z + delta
    else:
        g = F.linear(z, f.w, f.b)  # [..., 1]: w . z + b
        y = torch.addcmul(z, g.relu_() if f.relu else g.sigmoid_(), delta)
    return y if y.dtype == h.dtype else y.to(h.dtype)


@dataclass
class Trace:
    """Per-token scales lam * g seen at each site while steering.

    scales: {site: Tensor[batch, tokens]} aligned with token positions across prefill and every cached decode
            step (an uncached pass that restarts at position 0 overwrites). With beam search, rows are beam
            slots, not final hypotheses. For 4-D (image) sites the last call's [batch, H, W] map is kept.
    mask:   the attention mask of the last forward pass ([batch, tokens]) when the model received one.
    calls:  every hook call in order as (site, offset, scale), for per-step analyses (e.g. diffusion steps).
    """

    calls: list[tuple[str, int, torch.Tensor]] = field(default_factory=list)
    mask: torch.Tensor | None = None
    _offset: int = 0

    def begin_pass(self, offset: int, mask: torch.Tensor | None) -> None:
        """Called by a model pre-hook before every top-level forward: where its tokens start, and its mask."""
        self._offset = offset
        if mask is not None:
            self.mask = mask.cpu()

    @property
    def scales(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for site, off, a in self.calls:
            a = a.float().cpu()
            prev = out.get(site)
            if a.dim() != 2 or prev is None or off == 0:
                out[site] = a
            else:
                out[site] = torch.cat([prev[:, :off], a], dim=1)
        return out

    def site_mean(self) -> torch.Tensor:
        """Mean scale over sites, [batch, tokens]: the paper's Figure-1 per-token view."""
        s = [v for v in self.scales.values() if v.dim() == 2]
        if not s:
            raise ValueError("No token-level scales were traced.")
        return torch.stack(s).mean(0)


class _State:
    """Run-time state shared by the hooks of one `steering` block."""

    def __init__(self, lam: torch.Tensor, expand: str, trace: Trace | None):
        self.lam = lam
        self.expand = expand
        self.trace = trace
        self._lam_cache: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._lam_dev: dict[torch.device, torch.Tensor] = {}
        self.packs: list[_Pack] = []

    def prepare(self, device: torch.device) -> None:
        """Move the strengths to `device` before any forward pass, so a compiled graph finds them there."""
        if device not in self._lam_dev:
            self._lam_dev[device] = self.lam.to(device=device, dtype=torch.float32).contiguous()

    def lam_for(self, batch: int, device: torch.device) -> torch.Tensor:
        """[batch] fp32 strengths on `device` (cached eagerly; recomputed inside a compiled graph, where the
        cache's mutation would cost a recompile)."""
        if torch.compiler.is_compiling():
            return self._rows(self._lam_dev.get(device, self.lam).to(device), batch)
        key = (batch, device)
        lam = self._lam_cache.get(key)
        if lam is None:
            lam = self._rows(self.lam, batch).to(device=device, dtype=torch.float32).contiguous()
            self._lam_cache[key] = lam
        return lam

    def _rows(self, lam: torch.Tensor, batch: int) -> torch.Tensor:
        n = lam.numel()
        if n == 1:
            return lam.expand(batch)
        if n == batch:
            return lam
        if batch % n == 0:
            # generate() repeats rows for beams / num_return_sequences (interleave); CFG concatenates (tile).
            k = batch // n
            return lam.repeat_interleave(k) if self.expand == "interleave" else lam.repeat(k)
        raise ValueError(
            f"strength has {n} values but the batch has {batch} rows: pass one float, or one strength "
            "per prompt (per batch row)."
        )


def _module_device(module: nn.Module) -> torch.device | None:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return None


FAST_EAGER = True
"""Eager hooks take the folded fast path (`steer_folded`); False runs the reference `steer_tensor` everywhere
(what every hook ran before the fast path existed: benchmarks/bench_generate.py --reference measures both)."""


@dataclass
class _Pack:
    """The parameters of every site of one (device, width) in one fp32 tensor [sites, 5 d + 2]: per row shift, w,
    scale, lo, hi, then b and mult. Under torch.compile the hooks slice their row inside the graph, so all sites
    together are one graph input (per-site tensors were 2 inputs per site, each copied into the CUDA graph's
    static buffers on every replay by a Python loop: ~0.45 ms per decode step for 56 sites, measured on an
    H200). The slices are views: nothing is copied eagerly."""

    t: torch.Tensor
    d: int


_SCALE, _SUPPORT, _GATE, _RELU = 1, 2, 4, 8


def _unpack(packs: list[_Pack], code: int) -> SiteParams:
    """The parameters of one site as views of its pack row. `code` = pack << 32 | row << 4 | flags: one int, so a
    compiled graph guards one constant per site (a dataclass slot cost ~15 guards per site)."""
    pk = packs[code >> 32]
    r, d = pk.t[(code >> 4) & 0xFFFFFFF], pk.d
    return SiteParams(
        shift=r[:d],
        scale=r[2 * d : 3 * d] if code & _SCALE else None,
        lo=r[3 * d : 4 * d] if code & _SUPPORT else None,
        hi=r[4 * d : 5 * d] if code & _SUPPORT else None,
        w=r[d : 2 * d] if code & _GATE else None,
        b=r[5 * d],
        mult=r[5 * d + 1],
        relu=bool(code & _RELU),
    )


def _pack(params: list[SiteParams | None]) -> tuple[list[_Pack], list[int]]:
    """One `_Pack` per (device, width) for the sites whose parameters were built at entry, and each site's code
    for `_unpack` (-1: not packed)."""
    groups: dict[tuple[torch.device, int], list[int]] = {}
    for i, p in enumerate(params):
        if p is not None:
            groups.setdefault((p.shift.device, int(p.shift.shape[-1])), []).append(i)
    packs: list[_Pack] = []
    codes = [-1] * len(params)
    for (dev, d), idx in groups.items():
        t = torch.zeros(len(idx), 5 * d + 2, device=dev)
        for row, i in enumerate(idx):
            p = params[i]
            assert p is not None
            for k, v in enumerate((p.shift, p.w, p.scale, p.lo, p.hi)):
                if v is not None:
                    t[row, k * d : (k + 1) * d] = v
            t[row, 5 * d], t[row, 5 * d + 1] = float(p.b), float(p.mult)
            flags = (
                (_SCALE if p.scale is not None else 0)
                | (_SUPPORT if p.lo is not None else 0)
                | (_GATE if p.w is not None else 0)
                | (_RELU if p.relu else 0)
            )
            codes[i] = len(packs) << 32 | row << 4 | flags
        packs.append(_Pack(t, d))
    return packs, codes


_ACTIVE: dict[int, _State] = {}
"""id(model) -> the state of the `steering` block in progress on it. Compiled hooks reach their state through this
global rather than their closures, so dynamo guards it once per graph instead of once per site."""


def _make_hook(
    site: Site,
    m: SiteMap,
    g: SiteGate,
    state: _State,
    device: torch.device | None,
    code: int = -1,
    built: SiteParams | None = None,
    key: int | None = None,
) -> Any:
    """The forward hook of one site. Three paths, one rule:

    * eager, untraced, token activations: `steer_folded`, the strength folded in once per batch size;
    * under torch.compile: `steer_tensor` on the site's row of the packed parameters (`code`, see `_unpack`),
      state reached through `_ACTIVE[key]`: the graph holds no per-site inputs, guards four constants per
      site, and no Python state is created or mutated while tracing;
    * traced (`trace=True`) or 4-D feature maps: `steer_tensor`, which also returns lam * g.

    Per-device parameters are built when the hook is made, on the module's device (or passed in `built`)."""
    dim = m.dim
    params: dict[torch.device, SiteParams] = {}
    if device is not None:
        params[device] = built if built is not None else SiteParams.build(m, g, device)
        state.prepare(device)
    folds: dict[tuple[int, int, torch.device], Folded] = {}

    def site_params(dev: torch.device) -> SiteParams:
        p = params.get(dev)
        if p is None:
            p = params[dev] = SiteParams.build(m, g, dev)
        return p

    index, name = site.index, site.name
    if key is None or code < 0:
        key, code = -1, -1

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> Any:
        h = output_tensor(out, index)
        d = h.shape[1] if h.dim() == 4 else h.shape[-1]
        if d != dim:
            raise ValueError(
                f"Site {name} outputs {d} features but the steerer was fitted with {dim}: "
                "this steerer belongs to another model."
            )
        if torch.compiler.is_compiling() and code >= 0:
            st = _ACTIVE[key]
            p = _unpack(st.packs, code)
            if p.shift.device == h.device:
                y, a = steer_tensor(h, p, st.lam_for(h.shape[0], h.device))
                if st.trace is not None:
                    st.trace.calls.append((name, st.trace._offset, a.detach()))
                return replace_output(out, y, index)
        if torch.compiler.is_compiling():
            p = site_params(h.device)
        elif FAST_EAGER and state.trace is None and h.dim() < 4 and h.dtype != torch.float64:
            fk = (h.shape[0], h.dim(), h.device)
            f = folds.get(fk)
            if f is None:
                lam = state.lam_for(h.shape[0], h.device)
                if state.lam.numel() == 1:
                    lam = lam[:1]
                f = folds[fk] = site_params(h.device).fold(lam, h.dim())
            return replace_output(out, steer_folded(h, f), index)
        else:
            p = site_params(h.device)
        y, a = steer_tensor(h, p, state.lam_for(h.shape[0], h.device))
        if state.trace is not None:
            state.trace.calls.append((name, state.trace._offset, a.detach()))
        return replace_output(out, y, index)

    return hook


def pass_position(args: Any, kwargs: dict[str, Any]) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """(position of the first token, 2-D attention mask or None, input ids or embeddings or None) of a top-level
    forward pass, read by a `with_kwargs` forward pre-hook on the model."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    ref = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
    mask = kwargs.get("attention_mask")
    mask = mask.detach() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    off = 0
    if mask is not None and isinstance(ref, torch.Tensor):
        # generate() passes the mask of past + current tokens: the current chunk starts where it ends.
        off = mask.shape[1] - ref.shape[1]
    else:
        # transformers 4 calls the cache `past_key_values`, transformers 5 `cache`.
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is not None and hasattr(cache, "get_seq_length"):
            off = int(cache.get_seq_length())
    return max(off, 0), mask, ref if isinstance(ref, torch.Tensor) else None


def _trace_pre_hook(trace: Trace) -> Any:
    """Reads the cache length and mask of each top-level forward, so scales land at the right positions."""

    def pre(_mod: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        off, mask, _ = pass_position(args, kwargs)
        trace.begin_pass(off, mask)

    return pre


GUARD_COMPILED_HOOKS = True
"""Let dsas turn on torch.compile's guards on module hooks where it registers one (see
`guard_hooks_under_compile`)."""


def guard_hooks_under_compile(model: nn.Module | None = None) -> None:
    """Make torch.compile notice module hooks being added and removed.

    By default dynamo does not guard on module hooks (`torch._dynamo.config.skip_nnmodule_hook_guards`): a
    graph compiled without a hook keeps running without it, and one compiled with it keeps running it after the
    hook is removed (measured: silently wrong logits; this is how hook-based steering libraries fail under
    compile). Site steering needs no hook (`wrap_forward`); `trace=True` and conditional steering register
    module hooks and call this first: with the guards on, a compiled model keeps one graph per hook set and
    picks the right one on every call, at the price of a few guard checks per call on every compiled model.
    Graphs compiled before the guards were turned on carry none, so a model compiled before such a block gets a
    warning: call `torch._dynamo.reset()` (or compile after the first such block).
    Set `dsas.steer.GUARD_COMPILED_HOOKS = False` to leave dynamo's setting alone.
    """
    if not GUARD_COMPILED_HOOKS:
        return
    import torch._dynamo

    cfg = torch._dynamo.config
    if not cfg.skip_nnmodule_hook_guards:
        return
    cfg.skip_nnmodule_hook_guards = False
    if model is not None and _compiled_before(model):
        import warnings

        warnings.warn(
            "This model was compiled with torch.compile before dsas turned on dynamo's guards on module hooks: "
            "those graphs do not see steering hooks and keep running unsteered inside `apply`. Call "
            "torch._dynamo.reset() once now (graphs compiled from here on are guarded).",
            stacklevel=2,
        )


def _compiled_before(model: nn.Module) -> bool:
    """Whether dynamo holds graphs for this model's forward (torch.compile(model.forward), or the compiled
    __call__ that transformers' generate makes for a static cache)."""
    if getattr(model, "_compiled_call", None) is not None:
        return True
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

        return bool(_debug_get_cache_entry_list(type(model).forward.__code__))
    except (ImportError, AttributeError, TypeError):
        return False


def as_strength(strength: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    lam = torch.as_tensor(strength, dtype=torch.float32).reshape(-1).detach().cpu()
    if lam.numel() == 0:
        raise ValueError("strength is empty: pass a float or one value per batch row.")
    if not torch.isfinite(lam).all():
        raise ValueError(f"strength must be finite, got {lam.tolist()}.")
    return lam


@contextmanager
def steering(
    model: nn.Module,
    sites: Sequence[Site],
    maps: dict[str, SiteMap],
    gates: dict[str, SiteGate],
    strength: float | Sequence[float] | torch.Tensor = 1.0,
    *,
    trace: bool = False,
    expand: str = "interleave",
) -> Iterator[Trace]:
    """Steer `model`'s sites for the span of the block (wrapped forwards, see `wrap_forward`); undone even on
    error."""
    with hooked(model, strength, expand, trace) as (state, handles):
        if state.trace is not None:
            guard_hooks_under_compile(model)
            handles.append(model.register_forward_pre_hook(_trace_pre_hook(state.trace), with_kwargs=True))
        mods = [get_module(model, s) for s in sites]
        devs = [_module_device(mod) for mod in mods]
        built = [
            None if dv is None else SiteParams.build(maps[s.name], gates[s.name], dv)
            for s, dv in zip(sites, devs, strict=True)
        ]
        state.packs, codes = _pack(built)
        key = id(model)
        _ACTIVE[key] = state
        for s, mod, dv, code, p in zip(sites, mods, devs, codes, built, strict=True):
            hook = _make_hook(s, maps[s.name], gates[s.name], state, dv, code, p, key)
            handles.append(wrap_forward(mod, hook))
        yield state.trace if state.trace is not None else Trace()


class _Wrapped:
    """Handle of a module whose `forward` `wrap_forward` replaced on the instance; `remove` puts it back."""

    def __init__(self, mod: nn.Module, fn: Callable[..., Any], prev: Any):
        self.mod, self.fn, self.prev = mod, fn, prev

    def remove(self) -> None:
        d = self.mod.__dict__
        if d.get("forward") is not self.fn:
            import warnings

            warnings.warn(
                f"{type(self.mod).__name__}.forward was replaced again while dsas steered it (by another library "
                "or by user code): dsas leaves that replacement in place, and if it calls dsas' steered forward the "
                "module keeps steering until it is undone. Undo such patches before leaving `apply`.",
                stacklevel=3,
            )
            return
        if self.prev is None:
            del d["forward"]
        else:
            d["forward"] = self.prev


def wrap_forward(mod: nn.Module, hook: Callable[[nn.Module, Any, Any], Any]) -> _Wrapped:
    """Run `hook(mod, args, out)` on the output of `mod` by replacing `forward` on the instance (an existing
    instance-level forward, e.g. accelerate's, is wrapped and restored). Unlike a forward hook this needs no
    extra dynamo guards: the instance's `forward` is already guarded, so compiled graphs see it come and go."""
    prev = mod.__dict__.get("forward")
    if prev is None:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return hook(self, args, type(self).forward(self, *args, **kwargs))

    else:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return hook(self, args, prev(*args, **kwargs))

    bound = types.MethodType(forward, mod)
    mod.forward = bound
    return _Wrapped(mod, bound, prev)


@contextmanager
def hooked(
    model: nn.Module, strength: float | Sequence[float] | torch.Tensor, expand: str, trace: bool
) -> Iterator[tuple[_State, list[RemovableHandle | _Wrapped]]]:
    """The frame every steering block shares: refuses nesting and bad options, marks the model, and removes every
    handle (hook or wrapped forward) the block appends to the list, even on error."""
    if getattr(model, "_dsas_steering", False):
        raise RuntimeError(
            "A steerer is already applied to this model: exit its `with` block first. Nested steering is "
            "refused so that every token's scale is well defined."
        )
    if expand not in ("interleave", "tile"):
        raise ValueError(
            "expand must be 'interleave' (beams, generate) or 'tile' (classifier-free guidance)."
        )
    state = _State(as_strength(strength), expand, Trace() if trace else None)
    handles: list[RemovableHandle | _Wrapped] = []
    try:
        model._dsas_steering = True  # type: ignore[assignment]
        yield state, handles
    finally:
        for h in handles:
            h.remove()
        _ACTIVE.pop(id(model), None)
        model._dsas_steering = False  # type: ignore[assignment]
