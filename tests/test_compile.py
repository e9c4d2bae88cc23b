"""Steering under torch.compile: no graph breaks, the same logits as eager, and hooks that compiled graphs notice.

One tiny Llama, compiled twice (the steered and the unsteered graph): ~20-40 s on a loaded 2-core CPU.
"""

from __future__ import annotations

import pytest
import torch
from graph_code import inductor_code, kernel_launches

import dsas
from dsas.steer import guard_hooks_under_compile

PROMPTS = ["you stupid idiot and", "the city river history is"]


@pytest.fixture(scope="module")
def compiled_setup(tiny_tok, engine_sets):
    from conftest import make_tiny_model

    model = make_tiny_model("llama", len(tiny_tok), layers=2)
    st = dsas.fit(model, tiny_tok, engine_sets, method="caa", gate="dsas", progress=False, acc_threshold=0.5)
    assert st.steered and all(st.gates[s].kind == "sigmoid" for s in st.steered)
    return model, st, tiny_tok(PROMPTS, return_tensors="pt", padding=True)


@pytest.mark.usefixtures("single_thread")
def test_compiled_steering_matches_eager_without_graph_breaks(compiled_setup):
    from torch._dynamo.testing import CompileCounterWithBackend

    model, st, enc = compiled_setup
    torch._dynamo.reset()
    guard_hooks_under_compile()  # as `apply` does; here before the first compile, so no graph lacks guards
    counter = CompileCounterWithBackend("inductor")
    # fullgraph=True raises on any graph break; dynamic=False keeps one static graph per hook set.
    fwd = torch.compile(model.forward, backend=counter, fullgraph=True, dynamic=False)

    def logits(f, strength=None):
        with torch.no_grad():
            if strength is None:
                return f(**enc).logits
            with st.apply(model, strength=strength):
                return f(**enc).logits

    eager_ref, eager_steered = logits(model), logits(model, 6.0)
    assert not torch.allclose(eager_ref, eager_steered, atol=1e-3)

    with inductor_code() as steered_code:
        steered = logits(fwd, 6.0)
    assert counter.frame_count == 1
    torch.testing.assert_close(steered, eager_steered, rtol=1e-5, atol=1e-5)
    # Another strength reuses the graph (the strength is a graph input, not a constant).
    torch.testing.assert_close(logits(fwd, 2.0), logits(model, 2.0), rtol=1e-5, atol=1e-5)
    zero = logits(fwd, 0.0)
    assert counter.frame_count == 1

    # Outside `apply` the hooks are gone and the guards send the call to a second, unsteered graph ...
    with inductor_code() as plain_code:
        plain = logits(fwd)
    assert counter.frame_count == 2
    # Inductor fuses each site's gate (a dot product), sigmoid and update into the kernel that already adds the
    # residual and normalizes: the steered graph launches exactly the kernels of the unsteered one.
    launches = kernel_launches(plain_code)
    assert launches[0] > 0 and kernel_launches(steered_code) == launches
    torch.testing.assert_close(plain, eager_ref, rtol=1e-5, atol=1e-5)
    # ... and strength 0 under compile is the unsteered compiled model, bit for bit.
    assert torch.equal(zero, plain)
    # Back inside `apply`, the steered graph is picked again (without the guards, the unsteered graph would be).
    torch.testing.assert_close(logits(fwd, 6.0), steered, rtol=0, atol=0)
    assert counter.frame_count == 2
    assert not any(m._forward_hooks for m in model.modules())  # zero cost outside `apply`
    # Per-row strengths ([B] instead of one value) are a third graph, exact as well.
    torch.testing.assert_close(logits(fwd, [0.0, 6.0]), logits(model, [0.0, 6.0]), rtol=1e-5, atol=1e-5)


def test_steering_turns_on_hook_guards(compiled_setup):
    model, st, _ = compiled_setup
    import torch._dynamo

    with st.apply(model, strength=1.0):
        pass
    assert torch._dynamo.config.skip_nnmodule_hook_guards is False
