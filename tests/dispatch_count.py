"""The aten ops a forward pass dispatches, attributed to steering sites: shared by tests/test_kernels.py and
benchmarks/bench_kernels.py (which runs on machines without pytest, so this lives outside conftest).

A `TorchDispatchMode` sees every op below autograd. An op "launches" when it would start a device kernel (or a
copy) on a GPU; views and metadata ops (`view`, `t`, `expand`, `detach`, `alias`, `_unsafe_view`, ...) and bare
allocations (`empty*`: the caching allocator, no kernel) do not. A "factory" op creates a tensor that no input
holds the data of (`empty`, `full`, `zeros`, `scalar_tensor`, `lift_fresh`, `*_like`, `new_*`, any op without a
tensor argument): what a steering site must not do on every call when its parameters can be prepared once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

NO_LAUNCH = {
    # metadata / aliasing ops that are not marked as views in their schema
    "_unsafe_view",
    "detach",
    "alias",
    "lift_fresh",
    "set_",
    "resize_",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "is_same_size",
    "_reshape_alias",
    # bare allocations: no kernel
    "empty",
    "empty_strided",
    "empty_like",
    "new_empty",
    "new_empty_strided",
}
FACTORY_NAMES = {"lift_fresh", "lift_fresh_copy", "scalar_tensor"}


def op_name(func: Any) -> str:
    """`aten.addmm.default` -> "addmm"."""
    return str(func.overloadpacket.__name__)


def launches(func: Any) -> bool:
    """Whether dispatching `func` starts a kernel (or copy) on a GPU."""
    return not (getattr(func, "is_view", False) or op_name(func) in NO_LAUNCH)


def is_factory(func: Any, args: Any, kwargs: Any) -> bool:
    n = op_name(func)
    if n in FACTORY_NAMES or n.endswith("_like") or n.startswith("new_"):
        return True
    return not any(isinstance(x, torch.Tensor) for x in tree_leaves((args, kwargs)))


@dataclass
class Ops:
    """What one window (a site's forward, or all of a forward pass outside sites) dispatched."""

    all: Counter[str] = field(default_factory=Counter)
    launch: Counter[str] = field(default_factory=Counter)
    factory: Counter[str] = field(default_factory=Counter)

    def __sub__(self, other: Ops) -> Ops:
        """The ops this window dispatched beyond `other` (multiset difference; what steering adds)."""
        return Ops(self.all - other.all, self.launch - other.launch, self.factory - other.factory)

    def n(self) -> tuple[int, int, int]:
        """(dispatched, launching, factory) counts."""
        return sum(self.all.values()), sum(self.launch.values()), sum(self.factory.values())


class _Counter(TorchDispatchMode):
    def __init__(self, windows: dict[str, Ops], stack: list[str]):
        super().__init__()
        self.windows, self.stack = windows, stack

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        w = self.windows.setdefault(self.stack[-1], Ops())
        n = op_name(func)
        w.all[n] += 1
        if launches(func):
            w.launch[n] += 1
        if is_factory(func, args, kwargs):
            w.factory[n] += 1
        return func(*args, **kwargs)


@contextmanager
def count_ops(model: torch.nn.Module, sites: list[str]) -> Iterator[dict[str, Ops]]:
    """{site name: Ops} for the ops dispatched inside each named module's call (its forward and whatever wraps
    it: dsas' steering), and under "" everything else, for the forward passes run inside the block. Module hooks
    mark the windows, so install them outside any steering block and compare with an unsteered pass."""
    windows: dict[str, Ops] = {}
    stack = [""]
    handles = []

    def leave(_m: Any, _a: Any, _o: Any) -> None:
        stack.pop()

    for name in sites:
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_pre_hook(lambda _m, _a, n=name: stack.append(n) and None))
        handles.append(mod.register_forward_hook(leave))
    try:
        with _Counter(windows, stack):
            yield windows
    finally:
        for h in handles:
            h.remove()


def per_site(steered: dict[str, Ops], plain: dict[str, Ops], sites: list[str]) -> dict[str, Ops]:
    """What steering added at each site (and under "" outside every site), steered minus unsteered windows."""
    return {s: steered.get(s, Ops()) - plain.get(s, Ops()) for s in ["", *sites]}


def steering_ops(
    model: torch.nn.Module, enc: dict[str, torch.Tensor], st: Any, strength: Any
) -> tuple[dict[str, Ops], dict[str, Ops], dict[str, Ops]]:
    """(steady, first, plain): the ops of each steered site in the second forward inside `apply` (the first may
    prepare per-batch-size parameters), in the first, and in an unsteered forward (after a warm-up one)."""
    with torch.no_grad():
        model(**enc)
        with count_ops(model, st.steered) as plain:
            model(**enc)
        with st.apply(model, strength=strength):
            with count_ops(model, st.steered) as first:
                model(**enc)
            with count_ops(model, st.steered) as steady:
                model(**enc)
    return steady, first, plain
