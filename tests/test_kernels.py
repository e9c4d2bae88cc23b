"""Eager steering at the kernel floor: what each steered site dispatches in a steady-state forward pass, counted with a
`TorchDispatchMode` (dispatch_count.py; benchmarks/bench_kernels.py reports the same for every method x gate)."""

from __future__ import annotations

import pytest
from conftest import make_engine_sets, make_tiny_model
from dispatch_count import per_site, steering_ops

import dsas


@pytest.fixture(scope="module")
def llama(tiny_tok):
    return make_tiny_model("llama", len(tiny_tok), layers=2, hidden=32)


def site_ops(model, tok, st, strength, prompts):
    """{site: ops steering added} for the second forward inside `apply` (the first may prepare per-batch-size
    parameters) and for the first one."""
    enc = tok(prompts, padding=True, return_tensors="pt")
    steady, first, plain = steering_ops(model, enc, st, strength)
    return per_site(steady, plain, st.steered), per_site(first, plain, st.steered)


@pytest.mark.parametrize(
    ("gate", "launch_ops"),
    [("none", {"add": 1}), ("dsas", {"addmm": 1, "sigmoid_": 1, "addcmul": 1})],
)
def test_site_launches_at_the_floor(llama, tiny_tok, single_thread, gate, launch_ops):
    extra = {"inactive": "keep"} if gate == "dsas" else {}
    st = dsas.fit(llama, tiny_tok, make_engine_sets(8), method="caa", gate=gate, progress=False, **extra)
    assert len(st.steered) == 4
    prompts = ["the cat is stupid", "a nice dog is a good friend"]
    # one global strength: nothing is created per call, not even on the first forward (folded at entry)
    steady, first = site_ops(llama, tiny_tok, st, 4.0, prompts[:1])
    for s in st.steered:
        assert dict(steady[s].launch) == launch_ops, s
        assert sum(steady[s].launch.values()) <= (1 if gate == "none" else 3)
        assert not steady[s].factory and not first[s].factory, (s, first[s].factory)
        assert dict(first[s].launch) == launch_ops, s
    assert not steady[""].all and not first[""].all  # nothing outside the sites
    # one strength per row: the same steady state (folded once per batch size)
    steady, _ = site_ops(llama, tiny_tok, st, [2.0, 4.0], prompts)
    for s in st.steered:
        assert dict(steady[s].launch) == launch_ops and not steady[s].factory, s
