"""Steering under torch.compile: no graph breaks, the same logits as eager, and steering that compiled graphs notice
(with dynamo's default settings, whether the model was compiled before, inside or after `apply`).

One tiny Llama, compiled twice (the steered and the unsteered graph): ~20-40 s on a loaded 2-core CPU.
"""

from __future__ import annotations

import pytest
import torch
from graph_code import inductor_code, kernel_launches

import dsas
from dsas.steer import wrap_forward

PROMPTS = ["you stupid idiot and", "the city river history is"]


@pytest.fixture(scope="module")
def compiled_setup(tiny_tok, engine_sets):
    from conftest import make_tiny_model

    model = make_tiny_model("llama", len(tiny_tok), layers=2)
    # scope "below": the default "below+prefix" keeps a running mean across passes, which compiling leaves out.
    st = dsas.fit(
        model,
        tiny_tok,
        engine_sets,
        method="caa",
        gate="dsas",
        progress=False,
        acc_threshold=0.5,
        scope="below",
    )
    assert st.steered and all(st.gates[s].kind == "sigmoid" for s in st.steered)
    return model, st, tiny_tok(PROMPTS, return_tensors="pt", padding=True)


@pytest.fixture
def dynamo_defaults():
    """Dynamo as a user has it: no guards on module hooks (what hook-based steering silently fails on)."""
    import torch._dynamo

    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
        yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("single_thread", "dynamo_defaults")
def test_compiled_steering_matches_eager_without_graph_breaks(compiled_setup):
    from torch._dynamo.testing import CompileCounterWithBackend

    model, st, enc = compiled_setup
    counter = CompileCounterWithBackend("inductor")
    # fullgraph=True raises on any graph break; dynamic=False keeps one static graph per steering state.
    fwd = torch.compile(model.forward, backend=counter, fullgraph=True, dynamic=False)

    def logits(f, strength=None):
        with torch.no_grad():
            if strength is None:
                return f(**enc).logits
            with st.apply(model, strength=strength):
                return f(**enc).logits

    eager_ref, eager_steered = logits(model), logits(model, 6.0)
    assert not torch.allclose(eager_ref, eager_steered, atol=1e-3)

    # Compiled before the first `apply` (the case where hook-based steering keeps running the unsteered graph).
    with inductor_code() as plain_code:
        plain = logits(fwd)
    assert counter.frame_count == 1
    torch.testing.assert_close(plain, eager_ref, rtol=1e-5, atol=1e-5)
    # Inside `apply` the wrapped forwards fail the unsteered graph's guards: a second, steered graph.
    with inductor_code() as steered_code:
        steered = logits(fwd, 6.0)
    assert counter.frame_count == 2
    torch.testing.assert_close(steered, eager_steered, rtol=1e-5, atol=1e-5)
    # Another strength reuses the graph (the strength is a graph input, not a constant).
    torch.testing.assert_close(logits(fwd, 2.0), logits(model, 2.0), rtol=1e-5, atol=1e-5)
    zero = logits(fwd, 0.0)
    assert counter.frame_count == 2
    # Inductor fuses each site's gate (a dot product), sigmoid and update into the kernel that already adds the
    # residual and normalizes: the steered graph launches exactly the kernels of the unsteered one.
    launches = kernel_launches(plain_code)
    assert launches[0] > 0 and kernel_launches(steered_code) == launches
    # Strength 0 under compile is the unsteered compiled model, bit for bit.
    assert torch.equal(zero, plain)
    # Outside `apply` the unsteered graph runs again, inside the steered one: no recompile, no stale graph.
    assert torch.equal(logits(fwd), plain)
    torch.testing.assert_close(logits(fwd, 6.0), steered, rtol=0, atol=0)
    assert counter.frame_count == 2
    # Zero cost outside `apply`: no hook, no instance-level forward left on any module.
    assert not any(m._forward_hooks or "forward" in m.__dict__ for m in model.modules())
    # Per-row strengths ([B] instead of one value) are a third graph, exact as well.
    torch.testing.assert_close(logits(fwd, [0.0, 6.0]), logits(model, [0.0, 6.0]), rtol=1e-5, atol=1e-5)
    # Site steering leaves dynamo's settings alone (hook guards cost every compiled model in the process).
    assert torch._dynamo.config.skip_nnmodule_hook_guards is True


def test_wrap_forward_restores_an_instance_forward():
    """A forward already replaced on the instance (accelerate's offloading hooks do this) is wrapped, not lost."""
    lin = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    base = lin(x)
    lin.forward = lambda t: type(lin).forward(lin, t) * 2  # type: ignore[method-assign]
    prev = lin.__dict__["forward"]
    h = wrap_forward(lin, lambda _m, _a, out: out + 1)
    torch.testing.assert_close(lin(x), base * 2 + 1)
    h.remove()
    assert lin.__dict__["forward"] is prev
    torch.testing.assert_close(lin(x), base * 2)
    del lin.forward
    h = wrap_forward(lin, lambda _m, _a, out: out + 1)
    torch.testing.assert_close(lin(x), base + 1)
    h.remove()
    assert "forward" not in lin.__dict__
    torch.testing.assert_close(lin(x), base)


def test_wrap_forward_warns_when_patched_over():
    lin = torch.nn.Linear(3, 3)
    h = wrap_forward(lin, lambda _m, _a, out: out)
    lin.forward = lambda t: t  # type: ignore[method-assign]
    with pytest.warns(UserWarning, match="replaced again"):
        h.remove()


@pytest.mark.usefixtures("single_thread", "dynamo_defaults")
def test_floored_gates_compile_without_graph_breaks(compiled_setup, engine_sets, tiny_tok):
    """A gate floor (`DSASConfig.floor`) is one more value of the site's packed row, read inside the graph."""
    model, _, enc = compiled_setup
    from conftest import HARD_GATES

    # Per-site gates: the packed-row path (a pooled site reads its parameters as constants of the graph).
    st = dsas.fit(
        model, tiny_tok, engine_sets, progress=False, acc_threshold=0.5, scope="token", **HARD_GATES
    )
    fwd = torch.compile(model.forward, backend="inductor", fullgraph=True, dynamic=False)
    with torch.no_grad(), st.apply(model, strength=6.0, trace=True) as tr:
        eager = model(**enc).logits
    assert any(bool((a == 0).any()) for a in tr.scales.values())  # the floor closes some gates exactly
    with torch.no_grad(), st.apply(model, strength=6.0):
        torch.testing.assert_close(fwd(**enc).logits, eager, rtol=1e-4, atol=1e-4)
