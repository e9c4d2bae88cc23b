"""Installing the rule (`dsas.rule`) on a model for the span of a `with` block: state, per-row strength, `Trace`.

Everything dsas changes inside `apply` is done by wrapping a module's `forward` on the instance
(`wrap_forward`), never by module hooks: dynamo always guards on a module's instance `forward`, so a model
compiled before, inside or after `apply` runs the graph that matches (steered inside, unsteered outside) with
dynamo's default settings, and no compiled model pays for dynamo's process-wide guards on module hooks. Every
wrapper is removed in `finally`; a copy of the model made inside the block (`copy.deepcopy`, pickling) carries
none of them. Module hooks are only used to observe (recording activations, `dsas.record`).

Every term of the rule depends only on the current token, so prefill and each cached decode step scale their own
tokens: cached and uncached generation agree, and padding does not leak across rows.
"""

from __future__ import annotations

import copy
import copyreg
import inspect
import threading
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from dsas.compiled import ACTIVE, pack_sites, unpack
from dsas.rule import Folded, SiteParams, fold, logit, prefix_logit, rule, rule_folded
from dsas.sites import Site, get_module
from dsas.torchutil import module_device, output_tensor, replace_output

EXPANDS = ("interleave", "tile")

FAST_EAGER = True
"""Eager token activations take the folded fast path (`dsas.rule.rule_folded`); False sends every site call
through the reference `dsas.rule.rule` (benchmarks/bench_generate.py --reference measures both)."""


@dataclass
class Trace:
    """Per-token scales lam * g seen at each site while steering.

    scales: {site: Tensor[batch, tokens]} aligned with token positions across prefill and every cached decode
            step (an uncached pass that restarts at position 0 overwrites). With beam search, rows are beam
            slots, not final hypotheses. For 4-D (image) sites the last call's [batch, H, W] map is kept.
    mask:   the attention mask of the last forward pass ([batch, tokens]) when the model received one.
    calls:  every site call in order as (site, offset, scale), for per-step analyses (e.g. diffusion steps).
    """

    calls: list[tuple[str, int, torch.Tensor]] = field(default_factory=list)
    mask: torch.Tensor | None = None
    offset: int = 0
    """Position of the current forward pass's first token."""

    def begin_pass(self, offset: int, mask: torch.Tensor | None) -> None:
        """Called before every top-level forward: where its tokens start, and its mask."""
        self.offset = offset
        if mask is not None:
            self.mask = mask.cpu()

    def add(self, site: str, a: torch.Tensor) -> None:
        self.calls.append((site, self.offset, a.detach()))

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


def as_strength(strength: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Strengths as a flat fp32 CPU tensor; empty or non-finite values are refused."""
    try:
        lam = torch.as_tensor(strength, dtype=torch.float32).reshape(-1).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"strength must be a number or a list of numbers, got {strength!r}.") from e
    if lam.numel() == 0:
        raise ValueError("strength is empty: pass a float or one value per batch row.")
    if not torch.isfinite(lam).all():
        raise ValueError(f"strength must be finite, got {lam.tolist()}.")
    return lam


class SteerState:
    """Run-time state of one steering block: strengths (per row), generate's input rows, the trace."""

    def __init__(self, lam: torch.Tensor, expand: str, trace: Trace | None):
        self.lam = lam
        self.expand = expand
        self.trace = trace
        self.prefix = False
        """Some site's gate reads the running mean over the sequence (`DSASConfig.scope="prefix"`)."""
        self.rows_in: int | None = None
        """Rows of the batch given to `generate` (set while it runs): per-row strengths follow its expansion."""
        self.generating = 0
        self.offset = 0
        """Position of the current top-level pass's first token (0: a new sequence)."""
        self.mask: torch.Tensor | None = None
        """Attention mask of the current pass (past + current tokens), when the model got one."""
        self.carries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        """Per prefix-gated site: the running sums and counts of its gate logit per row."""
        self.pool: tuple[torch.Tensor, int] | None = None
        """Scope "below": the sum and count of the pooled regulators' logits [B, T] so far in this pass (the
        lowest pooled regulator starts it afresh in every pass)."""
        self.packs: list[Any] = []
        self._lam: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._lam_dev: dict[torch.device, torch.Tensor] = {}

    def begin_pass(self, offset: int, mask: torch.Tensor | None) -> None:
        self.offset, self.mask = offset, mask
        if offset == 0:
            self.carries.clear()
        if self.trace is not None:
            self.trace.begin_pass(offset, mask)

    def real_tokens(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """[batch, length] 1. for the real tokens of the current pass, 0. for padding."""
        if self.mask is None or self.mask.shape[0] != batch:
            return torch.ones(batch, length, device=device)
        return self.mask[:, -length:].to(device, torch.float32)

    @property
    def shared(self) -> bool:
        """One strength for every row."""
        return self.lam.numel() == 1

    def prepare(self, device: torch.device) -> None:
        """Move the strengths to `device` before any forward pass, so a compiled graph finds them there."""
        if device not in self._lam_dev:
            self._lam_dev[device] = self.lam.to(device=device, dtype=torch.float32).contiguous()

    def lam_for(self, batch: int, device: torch.device) -> torch.Tensor:
        """[batch] fp32 strengths on `device` (cached eagerly; recomputed inside a compiled graph, where the
        cache's mutation would cost a recompile)."""
        if torch.compiler.is_compiling():
            return self.rows(self._lam_dev.get(device, self.lam).to(device), batch)
        key = (batch, device)
        lam = self._lam.get(key)
        if lam is None:
            lam = self._lam[key] = (
                self.rows(self.lam, batch).to(device=device, dtype=torch.float32).contiguous()
            )
        return lam

    def rows(self, lam: torch.Tensor, batch: int) -> torch.Tensor:
        """One strength per batch row: one value for all, one per row, or one per prompt given to `generate`
        (repeated for its beams / num_return_sequences) or to a classifier-free-guidance batch (expand="tile")."""
        n = lam.numel()
        if n == 1:
            return lam.expand(batch)
        if n == batch:
            return lam
        if batch % n == 0:
            if self.expand == "tile":
                return lam.repeat(batch // n)
            if self.rows_in == n:
                return lam.repeat_interleave(batch // n)
        given = f"generate() was given {self.rows_in} prompts" if self.rows_in else "this forward pass has"
        raise ValueError(
            f"strength has {n} values but {given} {batch} rows: pass one float, or exactly one strength per "
            "prompt (they follow generate's beams and num_return_sequences; use expand='tile' for a "
            "classifier-free-guidance batch [uncond; cond])."
        )


class Wrapped:
    """Handle of a method (`forward`, `generate`) that `wrap_method` replaced on a module instance; `remove` puts
    the previous one back."""

    def __init__(self, mod: nn.Module, name: str, installed: Any, prev: Any):
        self.mod, self.name, self.installed, self.prev = mod, name, installed, prev

    def remove(self) -> None:
        d = self.mod.__dict__
        stack = d.get("_dsas_prev", {}).get(self.name, [])
        if d.get(self.name) is not self.installed:
            warnings.warn(
                f"{type(self.mod).__name__}.{self.name} was replaced again while dsas steered it (by another "
                "library or by user code): dsas leaves that replacement in place, and if it calls dsas' steered "
                f"{self.name} the module keeps steering until it is undone. Undo such patches before leaving "
                "`apply`.",
                stacklevel=3,
            )
        elif self.prev is None:
            del d[self.name]
        else:
            d[self.name] = self.prev
        if stack and stack[-1] is self.prev:
            stack.pop()
        if not stack:
            d.get("_dsas_prev", {}).pop(self.name, None)
        if not d.get("_dsas_prev"):
            for k in ("_dsas_prev", "__deepcopy__", "__reduce_ex__"):
                d.pop(k, None)


def _unsteered_state(mod: nn.Module) -> dict[str, Any]:
    """The module's `__dict__` as it was before dsas wrapped it: what copies and pickles get."""
    d = dict(mod.__dict__)
    for name, stack in d.pop("_dsas_prev", {}).items():
        if stack[0] is None:
            d.pop(name, None)
        else:
            d[name] = stack[0]
    for k in ("__deepcopy__", "__reduce_ex__", "_dsas_steering"):
        d.pop(k, None)
    return d


def _protect(mod: nn.Module) -> None:
    """Make `copy.deepcopy` and pickling of a wrapped module give the unwrapped module (a copy made inside
    `apply` would otherwise stay steered forever, by the original's closures)."""
    d = mod.__dict__
    if "__deepcopy__" in d:
        return

    def deepcopy_unsteered(memo: dict[int, Any]) -> nn.Module:
        new = type(mod).__new__(type(mod))
        memo[id(mod)] = new
        new.__setstate__(copy.deepcopy(_unsteered_state(mod), memo))
        return new

    def reduce_unsteered(_protocol: Any) -> Any:
        return (copyreg.__newobj__, (type(mod),), _unsteered_state(mod))  # type: ignore[attr-defined]

    d["__deepcopy__"], d["__reduce_ex__"] = deepcopy_unsteered, reduce_unsteered


def _install(mod: nn.Module, name: str, method: Callable[..., Any], prev: Any) -> Wrapped:
    """Put `method(self, *args, **kwargs)` on the instance as `mod.<name>`, with the original's signature
    (callers such as generate() read forward's signature to decide which inputs to pass)."""
    d = mod.__dict__
    try:
        sig = inspect.signature(getattr(type(mod), name) if prev is None else prev)
        if prev is not None:  # a bound callable: give it the `self` that the bound method drops again
            first = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
            sig = sig.replace(parameters=[first, *sig.parameters.values()])
        method.__signature__ = sig  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        pass
    installed = types.MethodType(method, mod)
    d.setdefault("_dsas_prev", {}).setdefault(name, []).append(prev)
    _protect(mod)
    d[name] = installed
    return Wrapped(mod, name, installed, prev)


def wrap_method(
    mod: nn.Module, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Wrapped:
    """Replace `mod.<name>` on the instance by `make(current)` (a function of the call's arguments). An existing
    instance-level method is the one wrapped, and restored by `remove`."""
    prev = mod.__dict__.get(name)
    fn = make(prev if prev is not None else types.MethodType(getattr(type(mod), name), mod))

    def method(_self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return _install(mod, name, method, prev)


def wrap_forward(
    mod: nn.Module,
    after: Callable[[nn.Module, Any, Any], Any] | None = None,
    before: Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None] | None = None,
) -> Wrapped:
    """Run `before(mod, args, kwargs)` ahead of `mod`'s forward and let `after(mod, args, out)` replace its
    output. Unlike a module hook this needs no extra dynamo guard: the instance's `forward` is already guarded,
    so compiled graphs see the wrapper come and go. The steering case (`after` only, the class's forward) is one
    flat function: every extra level of calls costs a compiled graph guards on each site."""
    prev = mod.__dict__.get("forward")
    if prev is None and before is None and after is not None:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return after(self, args, type(self).forward(self, *args, **kwargs))

    elif prev is None:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before(self, args, kwargs)
            out = type(self).forward(self, *args, **kwargs)
            return out if after is None else after(self, args, out)

    else:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before(self, args, kwargs)
            out = prev(*args, **kwargs)
            return out if after is None else after(self, args, out)

    return _install(mod, "forward", forward, prev)


class _Flag:
    """The model's "being steered" mark: true here, false in a deep copy or a pickle of the model."""

    def __bool__(self) -> bool:
        return True

    def __deepcopy__(self, memo: dict[int, Any]) -> bool:
        return False

    def __reduce__(self) -> Any:
        return (bool, ())


def pass_position(args: Any, kwargs: dict[str, Any]) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """(position of the first token, 2-D attention mask or None, input ids or embeddings or None) of a top-level
    forward pass, read from its arguments."""
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


def _beams(model: nn.Module, kwargs: dict[str, Any]) -> int:
    if "num_beams" in kwargs:
        return int(kwargs["num_beams"] or 1)
    cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return int(getattr(cfg, "num_beams", 1) or 1)


def _generate_rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    for x in (
        kwargs.get("input_ids"),
        kwargs.get("inputs"),
        args[0] if args else None,
        kwargs.get("inputs_embeds"),
    ):
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            return int(x.shape[0])
    return None


@contextmanager
def steering_frame(
    model: nn.Module,
    strength: float | Sequence[float] | torch.Tensor = 1.0,
    expand: str = "interleave",
    trace: bool = False,
) -> Iterator[tuple[SteerState, list[Wrapped]]]:
    """The frame every steering block shares: refuses nesting and bad options, marks the model, follows
    `generate` (its prompt rows, and whether it still runs at exit), and removes every wrapper the block appends
    to the list, even on error."""
    if getattr(model, "_dsas_steering", False):
        raise RuntimeError(
            "A steerer is already applied to this model: exit its `with` block first. Nested steering is "
            "refused so that every token's scale is well defined."
        )
    if expand not in EXPANDS:
        raise ValueError(
            "expand must be 'interleave' (beams, generate) or 'tile' (classifier-free guidance)."
        )
    state = SteerState(as_strength(strength), expand, Trace() if trace else None)
    _warn_checkpointing(model)
    wrappers: list[Wrapped] = []
    lock = threading.Lock()
    try:
        model.__dict__["_dsas_steering"] = _Flag()
        if callable(getattr(model, "generate", None)):

            def make(call: Callable[..., Any]) -> Callable[..., Any]:
                def generate(*args: Any, **kwargs: Any) -> Any:
                    if state.prefix and _beams(model, kwargs) > 1 and hasattr(model, "_reorder_cache"):
                        raise ValueError(
                            "This steerer's gates read a running mean per sequence (scope 'prefix' or "
                            "'below+prefix'), and this model reorders beams with its own _reorder_cache, which "
                            "the running means cannot follow: use greedy or sampling, or refit with "
                            "scope='below' (or 'token')."
                        )
                    with lock:
                        state.generating += 1
                        state.rows_in = _generate_rows(args, kwargs)
                    try:
                        return call(*args, **kwargs)
                    finally:
                        with lock:
                            state.generating -= 1

                return generate

            wrappers.append(wrap_method(model, "generate", make))
        yield state, wrappers
    finally:
        if state.generating:
            warnings.warn(
                "generate() started inside `apply` is still running (e.g. in a streaming thread) while the block "
                "exits: the tokens it produces from now on are unsteered. Join the thread inside the block.",
                stacklevel=3,
            )
        for w in reversed(wrappers):
            w.remove()
        ACTIVE.pop(id(model), None)
        model.__dict__.pop("_dsas_steering", None)


def _warn_checkpointing(model: nn.Module) -> None:
    if not (model.training and torch.is_grad_enabled()):
        return
    with warnings.catch_warnings():  # transformers 5 renamed the flag and warns on the old name
        warnings.simplefilter("ignore", FutureWarning)
        on = getattr(model, "is_activation_checkpointing", None)
        if on is None:
            on = getattr(model, "is_gradient_checkpointing", False)
    if on:
        warnings.warn(
            "Gradient checkpointing is on: the backward pass re-runs the forward, and run after the `with` block "
            "it re-runs it unsteered (wrong gradients). Call loss.backward() inside the `apply` block.",
            stacklevel=4,
        )


def check_width(site: Site, h: torch.Tensor, dim: int) -> None:
    d = h.shape[1] if h.dim() == 4 else h.shape[-1]
    if d != dim:
        raise ValueError(
            f"Site {site.name} outputs {d} features but the steerer was fitted with {dim}: "
            "this steerer belongs to another model."
        )


def _site_hook(
    site: Site, params: SiteParams, state: SteerState, key: int, code: int, first_pool: bool = False
) -> Any:
    """What runs after a steered site's forward: the rule on its output.

    Eager token activations take `rule_folded` (lam * mult folded in at entry, or once per batch size with
    per-row strengths); under torch.compile the site reads its row of the packed parameters (`dsas.compiled`);
    traced, 4-D or float64 activations take the reference `rule`, which also returns lam * g."""
    dim, index, name = int(params.shift.shape[-1]), site.index, site.name
    per_device = {params.shift.device: params}
    folds: dict[tuple[int, int, torch.device], Folded] = {}
    if state.shared and state.trace is None:
        folds[(0, 2, params.shift.device)] = folds[(0, 3, params.shift.device)] = fold(
            params, state.lam.to(params.shift.device), 3
        )

    def on(dev: torch.device) -> SiteParams:
        p = per_device.get(dev)
        if p is None:
            p = per_device[dev] = params.on(dev)
        return p

    # Prefix and pooled sites get their own hook: the common one stays free of the check (a guard per site when
    # compiled). A pooled site reads the pool's mean as its logit, which already holds every regulator's bias:
    # it applies the rule with b = 0 (made once per device).
    if params.prefix or params.pool:
        reads: dict[torch.device, SiteParams] = {}

        def sequence_hook(_mod: nn.Module, _args: Any, out: Any) -> Any:
            h = output_tensor(out, index)
            check_width(site, h, dim)
            p = on(h.device)
            if params.prefix and not params.pool:
                return replace_output(out, _prefix_site(name, h, p, state), index)
            read = reads.get(h.device)
            if read is None:
                read = reads[h.device] = replace(p, b=0.0)
            return replace_output(out, _pool_site(name, h, p, read, state, first_pool), index)

        return sequence_hook

    def hook(_mod: nn.Module, _args: Any, out: Any) -> Any:
        h = output_tensor(out, index)
        check_width(site, h, dim)
        if torch.compiler.is_compiling():
            st = ACTIVE[key] if code >= 0 else state
            assert isinstance(st, SteerState)
            p = unpack(st.packs, code) if code >= 0 else on(h.device)
            if p.shift.device != h.device:
                p = on(h.device)
            y, a = rule(h, p, st.lam_for(h.shape[0], h.device))
            if st.trace is not None:
                st.trace.add(name, a)
            return replace_output(out, y, index)
        if FAST_EAGER and state.trace is None and h.dim() < 4 and h.dtype != torch.float64:
            k = (0 if state.shared else h.shape[0], h.dim(), h.device)
            f = folds.get(k)
            if f is None:
                lam = state.lam_for(h.shape[0], h.device)
                f = folds[k] = fold(on(h.device), lam[:1] if state.shared else lam, h.dim())
            return replace_output(out, rule_folded(h, f), index)
        y, a = rule(h, on(h.device), state.lam_for(h.shape[0], h.device))
        if state.trace is not None:
            state.trace.add(name, a)
        return replace_output(out, y, index)

    return hook


def _token_sequence(name: str, h: torch.Tensor, what: str, compiled: bool = False) -> torch.Tensor:
    """h as [B, T, d] for a gate that keeps state along the sequence or across sites: token activations only,
    and eager only unless `compiled` (a pooled gate's state lives within one forward pass, which torch.compile
    traces as one graph)."""
    if (torch.compiler.is_compiling() and not compiled) or h.dim() not in (2, 3):
        raise ValueError(
            f"Site {name} has {what}, which runs on token sequences only"
            + ("" if compiled else " and eagerly")
            + (
                ": refit with scope='token' for image sites."
                if compiled
                else ": for torch.compile use steerer.with_scope('below') (pooled gates) or with_scope('token') "
                "(per-site gates), the same regulators read per token; refit with scope='token' for image sites."
            )
        )
    return h if h.dim() == 3 else h[:, None]


def _rule_with_logits(
    name: str, h: torch.Tensor, x: torch.Tensor, p: SiteParams, state: SteerState, s: torch.Tensor
) -> torch.Tensor:
    """The rule on x = `_token_sequence(h)` with each token's gate logit replaced by s [B, T], in h's shape."""
    y, a = rule(x, p, state.lam_for(x.shape[0], h.device), s)
    if state.trace is not None:
        state.trace.add(name, a)
    return y if h.dim() == 3 else y[:, 0]


def _running_mean(name: str, s: torch.Tensor, state: SteerState, skip: int = 0) -> torch.Tensor:
    """Each token's logit s [B, T] replaced by its running mean over the sequence, carried across the passes of
    one sequence (prefill, then every cached decode step)."""
    b, t = s.shape
    carry = state.carries.get(name)
    if carry is None or carry[0].shape[0] != b:
        if state.offset > 0 and carry is not None:
            raise ValueError(
                f"Site {name}: the batch changed from {carry[0].shape[0]} to {b} rows mid-sequence."
            )
        zero = torch.zeros(b, device=s.device)
        carry = (zero, zero)
    out, state.carries[name] = prefix_logit(s, state.real_tokens(b, t, s.device), carry, skip)
    return out


def _prefix_site(name: str, h: torch.Tensor, p: SiteParams, state: SteerState) -> torch.Tensor:
    """A prefix-scope gate: the rule with each token's logit replaced by its running mean over the sequence."""
    x = _token_sequence(name, h, "a prefix-scope gate")
    assert p.w is not None
    return _rule_with_logits(name, h, x, p, state, _running_mean(name, logit(x.float(), p.w), state, p.skip))


def _pool_site(
    name: str, h: torch.Tensor, p: SiteParams, read: SiteParams, state: SteerState, first: bool
) -> torch.Tensor:
    """Scope "below": add this site's regulator logit w . z + b (if it has one) to the pass's pool, then the rule
    (`read`: p with b = 0) with each token's logit replaced by the pool's mean; "below+prefix" (`p.prefix`): by
    that mean's running mean over the sequence."""
    if p.prefix:
        x = _token_sequence(name, h, "a pooled running-mean gate (scope='below+prefix')")
    else:
        x = _token_sequence(name, h, "a pooled gate (scope='below')", compiled=True)
    if p.w is not None:
        s = logit(x.float(), p.w) + float(p.b)
        if first or state.pool is None or state.pool[0].shape != s.shape:
            state.pool = (s, 1)
        else:
            state.pool = (state.pool[0] + s, state.pool[1] + 1)
    elif state.pool is None or state.pool[0].shape != x.shape[:2]:
        raise RuntimeError(
            f"Site {name} reads the pooled gate of the regulators below it, but none ran before it in this "
            "forward pass: the sites must run in model order."
        )
    s = state.pool[0] / state.pool[1]
    return _rule_with_logits(
        name, h, x, read, state, _running_mean(name, s, state, p.skip) if p.prefix else s
    )


def follow_beams(cache: Any, state: SteerState) -> None:
    """Make the running means follow beam search: generate() reorders the cache rows after every step
    (`cache.reorder_cache(beam_idx)`), and the per-row running sums must move with them. The cache lives for
    one generate() call, so its method is wrapped on the instance, once."""
    reorder = getattr(cache, "reorder_cache", None)
    if reorder is None or getattr(reorder, "_dsas_follows", False):
        return

    def follow(beam_idx: torch.Tensor) -> Any:
        out = reorder(beam_idx)
        for name, (s, n) in state.carries.items():
            i = beam_idx.to(s.device)
            state.carries[name] = (s[i], n[i])
        return out

    follow._dsas_follows = True  # type: ignore[attr-defined]
    cache.reorder_cache = follow


def track_positions(model: nn.Module, state: SteerState) -> Wrapped:
    """Wrap the model's forward so the block knows where each pass's tokens start (cache length) and its mask:
    the trace aligns scales with positions, prefix gates carry their running state across decode steps."""

    def before(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        off, mask, _ = pass_position(args, kwargs)
        state.begin_pass(off, mask)
        if state.prefix:
            follow_beams(kwargs.get("past_key_values", kwargs.get("cache")), state)

    return wrap_forward(model, before=before)


@contextmanager
def steering(
    model: nn.Module,
    sites: Sequence[Site],
    maps: dict[str, Any],
    gates: dict[str, Any],
    strength: float | Sequence[float] | torch.Tensor = 1.0,
    *,
    trace: bool = False,
    expand: str = "interleave",
) -> Iterator[Trace]:
    """Steer `model`'s sites (maps: {site: SiteMap}, gates: {site: SiteGate}) for the span of the block."""
    with steering_frame(model, strength, expand, trace) as (state, wrappers):
        mods = [get_module(model, s) for s in sites]
        devs = [module_device(m) or torch.device("cpu") for m in mods]
        params = [
            SiteParams.build(maps[s.name], gates[s.name], dv) for s, dv in zip(sites, devs, strict=True)
        ]
        state.prefix = any(p.prefix for p in params)
        if state.trace is not None or state.prefix:
            wrappers.append(track_positions(model, state))
        for dv in set(devs):
            state.prepare(dv)
        state.packs, codes = pack_sites(list(params))
        key = id(model)
        ACTIVE[key] = state
        first = next((i for i, p in enumerate(params) if p.pool and p.w is not None), -1)
        for i, (s, mod, p, code) in enumerate(zip(sites, mods, params, codes, strict=True)):
            wrappers.append(wrap_forward(mod, _site_hook(s, p, state, key, code, i == first)))
        yield state.trace if state.trace is not None else Trace()
