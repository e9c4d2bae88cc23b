"""The steering rule inside real forward passes and `generate`, on five architectures."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dsas
from dsas.gates import SiteGate
from dsas.sites import get_module
from dsas.torchutil import output_tensor, replace_output

PROMPTS = ["you stupid idiot and", "the city river history is", "a nice kind friend"]


def _logits(model, tok, texts=PROMPTS):
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


@pytest.fixture(scope="module")
def steerer(arch_model, tiny_tok, engine_sets):
    return dsas.fit(
        arch_model, tiny_tok, engine_sets, method="caa", gate="dsas", progress=False, acc_threshold=0.5
    )


def test_strength_zero_is_bit_identical(arch_model, tiny_tok, steerer):
    ref = _logits(arch_model, tiny_tok)
    assert steerer.steered, "the fixture must steer at least one site"
    with steerer.apply(arch_model, strength=0.0):
        out = _logits(arch_model, tiny_tok)
    assert torch.equal(ref, out)


def test_zero_gate_is_bit_identical(arch_model, tiny_tok, steerer):
    ref = _logits(arch_model, tiny_tok)
    zero = dataclasses.replace(steerer, gates={k: SiteGate("const", None, 0.0, 0.0) for k in steerer.gates})
    with zero.apply(arch_model, strength=8.0):
        out = _logits(arch_model, tiny_tok)
    assert torch.equal(ref, out)


def test_steering_changes_outputs_and_hooks_are_removed(arch_model, tiny_tok, steerer):
    ref = _logits(arch_model, tiny_tok)
    with steerer.apply(arch_model, strength=50.0):
        out = _logits(arch_model, tiny_tok)
    assert not torch.allclose(ref, out)
    assert torch.equal(ref, _logits(arch_model, tiny_tok))


def test_gate_none_equals_hand_written_addition(arch_model, tiny_tok, engine_sets):
    st = dsas.fit(arch_model, tiny_tok, engine_sets, method="caa", gate="none", progress=False)
    assert st.steered == st.site_names
    lam = 3.0
    handles = []

    def make(site):
        v = st.maps[site.name].shift

        def hook(_m, _i, out):
            h = output_tensor(out, site.index)
            return replace_output(out, h + lam * v.to(h.dtype), site.index)

        return hook

    for s in st.sites:
        handles.append(get_module(arch_model, s).register_forward_hook(make(s)))
    try:
        ref = _logits(arch_model, tiny_tok)
    finally:
        for h in handles:
            h.remove()
    with st.apply(arch_model, strength=lam):
        out = _logits(arch_model, tiny_tok)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_constant_gate_equals_plain_steering(arch_model, tiny_tok, engine_sets):
    """A DSAS steerer whose gates are forced to 1 is exactly vanilla CAA at the same strength."""
    vanilla = dsas.fit(arch_model, tiny_tok, engine_sets, gate="none", progress=False)
    gated = dsas.fit(
        arch_model, tiny_tok, engine_sets, gate="dsas", progress=False, acc_threshold=0.5, inactive="vanilla"
    )
    gated.gates = {k: SiteGate("const") for k in gated.gates}
    with vanilla.apply(arch_model, strength=2.0):
        a = _logits(arch_model, tiny_tok)
    with gated.apply(arch_model, strength=2.0):
        b = _logits(arch_model, tiny_tok)
    assert torch.equal(a, b)


def test_cached_and_uncached_generation_agree(arch_model, left_tok, steerer):
    enc = left_tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with steerer.apply(arch_model, strength=6.0, trace=True) as t1:
        a = arch_model.generate(**enc, use_cache=True, **kw)
    with steerer.apply(arch_model, strength=6.0, trace=True) as t2:
        b = arch_model.generate(**enc, use_cache=False, **kw)
    assert torch.equal(a, b)
    s1, s2 = t1.scales, t2.scales
    real = t1.mask.bool()  # padding positions attend to nothing: their activations are meaningless
    assert s1.keys() == s2.keys() and torch.equal(t1.mask, t2.mask)
    for k in s1:
        assert s1[k].shape == (len(PROMPTS), a.shape[1] - 1)
        # Same tokens; scales differ only by fp32 round-off between 1-token and full-sequence kernels.
        torch.testing.assert_close(s1[k][real], s2[k][real], rtol=1e-4, atol=1e-5)


def test_left_padded_batch_equals_rows_alone(arch_model, left_tok, steerer):
    enc = left_tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with steerer.apply(arch_model, strength=6.0, trace=True) as tb:
        batch = arch_model.generate(**enc, **kw)
    scales_b, mask = tb.scales, tb.mask
    assert mask is not None and mask.shape[1] == batch.shape[1] - 1
    for i, p in enumerate(PROMPTS):
        one = left_tok([p], return_tensors="pt")
        with steerer.apply(arch_model, strength=6.0, trace=True) as t1:
            alone = arch_model.generate(**one, **kw)
        n = alone.shape[1]
        assert torch.equal(batch[i, -n:], alone[0])
        for k, v in t1.scales.items():
            real = scales_b[k][i][mask[i].bool()]
            torch.testing.assert_close(real, v[0], rtol=1e-4, atol=1e-5)


def test_per_row_strength(arch_model, tiny_tok, steerer):
    ref = _logits(arch_model, tiny_tok)
    with steerer.apply(arch_model, strength=[0.0, 30.0, 0.0]):
        out = _logits(arch_model, tiny_tok)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[2], ref[2])
    assert not torch.allclose(out[1], ref[1])
    with (
        pytest.raises(ValueError, match="one strength per prompt"),
        steerer.apply(arch_model, strength=[1.0, 2.0]),
    ):
        _logits(arch_model, tiny_tok)


def test_strength_list_that_only_divides_the_batch_is_refused(arch_model, tiny_tok, steerer):
    """[a, b] for four rows is neither one value nor one per row: an error, never a silent [a, a, b, b]."""
    texts = [*PROMPTS, "the king"]
    with pytest.raises(ValueError, match="2 values"), steerer.apply(arch_model, strength=[1.0, 2.0]):
        _logits(arch_model, tiny_tok, texts)
    enc = tiny_tok(texts, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="2 values"), steerer.apply(arch_model, strength=[1.0, 2.0]):
        arch_model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=0)


def test_per_row_strength_with_num_return_sequences(arch_model, left_tok, steerer):
    enc = left_tok(PROMPTS[:2], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0)
    plain = arch_model.generate(**enc, **kw)
    with steerer.apply(arch_model, strength=[0.0, 40.0]):
        mixed = arch_model.generate(**enc, **kw)
    assert torch.equal(mixed[:2], plain[:2])  # prompt 0's sequences are unsteered


def test_copies_made_inside_apply_are_not_steered(arch_model, tiny_tok, steerer):
    import copy
    import pickle

    ref = _logits(arch_model, tiny_tok)
    with steerer.apply(arch_model, strength=8.0):
        steered = _logits(arch_model, tiny_tok)
        clone = copy.deepcopy(arch_model)
        pickled = pickle.loads(pickle.dumps(arch_model))
    assert not torch.equal(ref, steered)
    for m in (clone, pickled):
        assert torch.equal(_logits(m, tiny_tok), ref)
        assert not any("forward" in x.__dict__ or "__deepcopy__" in x.__dict__ for x in m.modules())
        assert not getattr(m, "_dsas_steering", False)
        with steerer.apply(m, strength=8.0):  # and a copy can be steered on its own
            assert torch.equal(_logits(m, tiny_tok), steered)
    assert not any("forward" in x.__dict__ for x in arch_model.modules())


def test_apply_without_with_warns(arch_model, steerer):
    import gc

    with pytest.warns(RuntimeWarning, match="without `with`"):
        steerer.apply(arch_model, 8.0)
        gc.collect()


def test_gradient_checkpointing_with_grad_warns(tiny_tok, engine_sets):
    from conftest import make_tiny_model

    model = make_tiny_model("llama", len(tiny_tok))
    st = dsas.fit(model, tiny_tok, engine_sets, gate="none", progress=False)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    with pytest.warns(UserWarning, match="inside the `apply` block"), st.apply(model, 1.0):
        pass
    model.eval()


def test_streaming_generation_outliving_the_block_warns(arch_model, left_tok, steerer):
    import threading

    from transformers import TextIteratorStreamer

    enc = left_tok(PROMPTS[:1], return_tensors="pt")
    started, release = threading.Event(), threading.Event()

    class Slow(TextIteratorStreamer):
        def put(self, value):
            started.set()
            release.wait(10)
            super().put(value)

    streamer = Slow(left_tok)
    kw = dict(max_new_tokens=2, do_sample=False, pad_token_id=0, streamer=streamer)
    with pytest.warns(UserWarning, match="still running"), steerer.apply(arch_model, 4.0):
        t = threading.Thread(target=arch_model.generate, kwargs={**enc, **kw})
        t.start()
        started.wait(10)
    release.set()
    t.join(20)
    list(streamer)


def test_per_row_strength_with_beams(arch_model, left_tok, steerer):
    enc = left_tok(PROMPTS[:2], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
    plain = arch_model.generate(**enc, **kw)
    with steerer.apply(arch_model, strength=[0.0, 40.0]):
        mixed = arch_model.generate(**enc, **kw)
    assert torch.equal(mixed[0], plain[0])


def test_hooks_removed_when_generate_raises(arch_model, tiny_tok, steerer):
    ref = _logits(arch_model, tiny_tok)
    with pytest.raises(RuntimeError, match="boom"), steerer.apply(arch_model, strength=5.0):
        raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in arch_model.modules())
    assert torch.equal(ref, _logits(arch_model, tiny_tok))


def test_nesting_is_refused(arch_model, steerer):
    with (
        steerer.apply(arch_model, strength=1.0),
        pytest.raises(RuntimeError, match="already applied"),
        steerer.apply(arch_model, strength=1.0),
    ):
        pass
    with steerer.apply(arch_model, strength=1.0):  # usable again after exit
        pass


def test_bf16_model_keeps_dtype(tiny_tok, engine_sets):
    from conftest import make_tiny_model

    model = make_tiny_model("llama", len(tiny_tok)).to(torch.bfloat16)
    st = dsas.fit(model, tiny_tok, engine_sets, progress=False, acc_threshold=0.5)
    enc = tiny_tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**enc).logits
        with st.apply(model, strength=0.0):
            same = model(**enc).logits
        with st.apply(model, strength=4.0):
            out = model(**enc).logits
    assert out.dtype == torch.bfloat16 and torch.equal(ref, same) and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def prefix_steerer(arch_model, tiny_tok, engine_sets):
    return dsas.fit(
        arch_model, tiny_tok, engine_sets, progress=False, acc_threshold=0.5, scope="prefix", inactive="keep"
    )


def test_prefix_gate_reads_the_running_mean_of_the_logit(arch_model, left_tok, prefix_steerer):
    """scope="prefix": every token's gate is phi(mean of w . z over the real tokens so far + b), computed here from
    the unsteered activations of the first steered site (nothing upstream of it is steered)."""
    st = prefix_steerer
    assert all(g.scope == "prefix" for g in st.gates.values())
    enc = left_tok(PROMPTS, return_tensors="pt", padding=True)
    real = enc["attention_mask"].float()
    first = st.steered[0]  # nothing upstream is steered: its activations are the model's own
    g = st.gates[first]
    acts = {}

    def grab(_m, _a, out):
        acts["z"] = output_tensor(out).float()
        return out

    with torch.no_grad():
        h = get_module(arch_model, first).register_forward_hook(grab)
        try:
            arch_model(**enc)
        finally:
            h.remove()
        with st.apply(arch_model, 2.0, trace=True) as tr:
            arch_model(**enc)
    assert g.skip == 1  # the tiny tokenizer prepends a BOS token: skip_tokens="auto" leaves it out
    s = acts["z"] @ g.w
    seen = torch.cumsum(real, 1)
    kept = real * (seen > g.skip)
    mean = torch.cumsum(s * kept, 1) / (seen - g.skip).clamp_min(1)
    expect = 2.0 * g.mult * torch.sigmoid((mean + g.b).masked_fill(seen <= g.skip, float("-inf")))
    torch.testing.assert_close(tr.scales[first][real.bool()], expect[real.bool()], rtol=1e-5, atol=1e-6)


def test_prefix_gate_cached_uncached_and_rows_alone_agree(arch_model, left_tok, prefix_steerer):
    enc = left_tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with prefix_steerer.apply(arch_model, strength=6.0, trace=True) as t1:
        cached = arch_model.generate(**enc, use_cache=True, **kw)
    with prefix_steerer.apply(arch_model, strength=6.0, trace=True) as t2:
        uncached = arch_model.generate(**enc, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    real = t1.mask.bool()
    for k in t1.scales:
        torch.testing.assert_close(t1.scales[k][real], t2.scales[k][real], rtol=1e-4, atol=1e-5)
    for i, p in enumerate(PROMPTS):
        with prefix_steerer.apply(arch_model, strength=6.0):
            alone = arch_model.generate(**left_tok([p], return_tensors="pt"), **kw)
        assert torch.equal(cached[i, -alone.shape[1] :], alone[0])
    with prefix_steerer.apply(arch_model, strength=0.0):
        assert torch.equal(arch_model.generate(**enc, **kw), arch_model.generate(**enc, **kw))


def test_prefix_gate_follows_beam_search_and_survives_save(arch_model, left_tok, prefix_steerer, tmp_path):
    _beam_scores_match_a_full_pass(arch_model, left_tok, prefix_steerer, 6.0)
    prefix_steerer.save(tmp_path / "p")
    back = dsas.Steerer.load(tmp_path / "p", model=arch_model)
    assert all(g.scope == "prefix" for g in back.gates.values())


@pytest.fixture(scope="module")
def llama(tiny_tok):
    from conftest import make_tiny_model

    return make_tiny_model("llama", len(tiny_tok))


def _generation_invariants(model, tok, st, enc, strength=6.0):
    """Cached == uncached generation, each row of the left-padded batch == the prompt alone, strength 0 == the
    unsteered model bit for bit."""
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with st.apply(model, strength=strength):
        cached = model.generate(**enc, use_cache=True, **kw)
        uncached = model.generate(**enc, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    for i, p in enumerate(PROMPTS):
        with st.apply(model, strength=strength):
            alone = model.generate(**tok([p], return_tensors="pt"), **kw)
        assert torch.equal(cached[i, -alone.shape[1] :], alone[0])
    with torch.no_grad():
        plain = model(**enc).logits
        with st.apply(model, strength=0.0):
            assert torch.equal(model(**enc).logits, plain)


@pytest.fixture(scope="module")
def pooled_steerer(arch_model, tiny_tok, engine_sets):
    """scope="below" with a mix of regulators and borrowers: every second steered site gives up its own
    regulator (what a site under the accuracy threshold gets from `fit`)."""
    st = dsas.fit(arch_model, tiny_tok, engine_sets, progress=False, acc_threshold=0.5, scope="below")
    gates = dict(st.gates)
    for name in st.steered[1::2]:
        gates[name] = SiteGate("pooled", None, 0.0, 1.0, "below")
    return dataclasses.replace(st, gates=gates)


def _pooled_reference(model, steerer, enc, lam, latched=False, skip=0, floor=0.0):
    """The definition, written out with plain forward hooks: at each steered site in forward order, add its
    regulator's logit (read on its own output) to the pool, then h + lam * mult * sigmoid(pool mean) * Δ(h);
    `latched` (scope "below+prefix"): the pool mean's running mean over the real tokens so far, leaving out the
    first `skip` of them (shut until one is kept); `floor`: the sigmoid floored, max(0, (g - f) / (1 - f))."""
    real = enc["attention_mask"].double()
    seen = torch.cumsum(real, 1)
    kept = real * (seen > skip)
    pool: list[torch.Tensor] = []
    hooks = []

    def make(name):
        m, g = steerer.maps[name], steerer.gates[name]

        def hook(_mod, _args, out):
            h = output_tensor(out).double()
            if g.w is not None:
                pool.append(h @ g.w.double() + g.b)
            s = torch.stack(pool).mean(0)
            if latched:
                s = torch.cumsum(s * kept, 1) / (seen - skip).clamp_min(1)
                if skip:  # nothing kept yet: the gate is shut
                    s = s.masked_fill(seen <= skip, float("-inf"))
            gate = ((torch.sigmoid(s) - floor) / (1 - floor)).clamp_min(0)
            delta = m.shift.double() + (0 if m.scale is None else m.scale.double() * h)
            y = h + lam * g.mult * gate[..., None] * delta
            return replace_output(out, y.to(output_tensor(out).dtype))

        return hook

    def reset(_mod, _args, _kwargs):
        pool.clear()

    hooks.append(model.register_forward_pre_hook(reset, with_kwargs=True))
    try:
        for name in steerer.steered:
            hooks.append(get_module(model, name).register_forward_hook(make(name)))
        with torch.no_grad():
            return model(**enc).logits
    finally:
        for h in hooks:
            h.remove()


def test_pooled_gate_reads_the_mean_logit_of_the_regulators_below(arch_model, left_tok, pooled_steerer):
    st = pooled_steerer
    assert st.gates[st.steered[0]].w is not None and st.gates[st.steered[1]].kind == "pooled"
    enc = left_tok(PROMPTS, return_tensors="pt", padding=True)
    ref = _pooled_reference(arch_model, st, enc, 3.0)
    with torch.no_grad(), st.apply(arch_model, 3.0):
        out = arch_model(**enc).logits
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(out[real], arch_model(**enc).logits[real], atol=1e-3)


def test_pooled_gate_cached_uncached_rows_alone_zero_strength_and_save(
    arch_model, left_tok, pooled_steerer, tmp_path
):
    _keeps_invariants_and_survives_save(arch_model, left_tok, pooled_steerer, tmp_path)


def _keeps_invariants_and_survives_save(model, tok, st, tmp_path):
    """Cached = uncached, rows alone = batch, strength 0 exact; save -> load keeps every gate and the logits."""
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    _generation_invariants(model, tok, st, enc)
    with torch.no_grad(), st.apply(model, strength=6.0):
        steered = model(**enc).logits
    st.save(tmp_path / "st")
    back = dsas.Steerer.load(tmp_path / "st", model=model)
    assert [(back.gates[s].kind, back.gates[s].scope) for s in back.steered] == [
        (st.gates[s].kind, st.gates[s].scope) for s in st.steered
    ]
    with torch.no_grad(), back.apply(model, strength=6.0):
        assert torch.equal(model(**enc).logits, steered)


def test_pooled_fit_steers_every_site_from_the_first_regulator_up(llama, tiny_tok, engine_sets):
    st = dsas.fit(llama, tiny_tok, engine_sets, progress=False, acc_threshold=0.75, scope="below")
    active = [s for s in st.site_names if st.stats[s]["active"]]
    assert active, "the tiny sets should give at least one accurate regulator"
    first = st.site_names.index(active[0])
    assert st.steered == st.site_names[first:]
    for s in st.site_names:
        g = st.gates[s]
        assert (g.kind == "sigmoid" and g.scope == "below") if s in active else g.kind == "pooled"
    with pytest.raises(ValueError, match="inactive='off'"):
        dsas.DSASConfig(scope="below", inactive="vanilla")


@pytest.mark.parametrize("split", [None, 0.5])
def test_pooled_gate_under_torch_compile_equals_eager(llama, tiny_tok, engine_sets, split):
    """The pool lives within one forward pass, which torch.compile traces whole: one graph, no break
    (fullgraph=True raises on any), the same logits as eager; with a split too (readers of mult 0)."""
    st = dsas.fit(llama, tiny_tok, engine_sets, progress=False, acc_threshold=0.5, scope="below", split=split)
    enc = tiny_tok(PROMPTS[:1], return_tensors="pt")
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(llama, backend=counter, fullgraph=True)
    with torch.no_grad(), st.apply(llama, 2.0):
        eager = llama(**enc).logits
        out = compiled(**enc).logits
        again = compiled(**enc).logits  # the pool of the last pass does not leak into the next
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, eager, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1  # no recompile for the second pass
    with torch.no_grad():
        assert not torch.allclose(llama(**enc).logits, eager, atol=1e-3)


@pytest.fixture(scope="module")
def latched_steerer(arch_model, tiny_tok, engine_sets):
    """scope="below+prefix", with every second steered site a borrower (as for `pooled_steerer`)."""
    st = dsas.fit(arch_model, tiny_tok, engine_sets, progress=False, acc_threshold=0.5, scope="below+prefix")
    gates = dict(st.gates)
    for name in st.steered[1::2]:
        gates[name] = SiteGate("pooled", None, 0.0, 1.0, "below+prefix", skip=gates[name].skip)
    return dataclasses.replace(st, gates=gates)


def test_latched_pooled_gate_reads_the_running_mean_of_the_pool(arch_model, left_tok, latched_steerer):
    st = latched_steerer
    assert {st.gates[s].scope for s in st.steered} == {"below+prefix"}
    enc = left_tok(PROMPTS, return_tensors="pt", padding=True)
    real = enc["attention_mask"].bool()
    skip = st.gates[st.steered[0]].skip
    assert skip == 1  # the BOS token (skip_tokens="auto")
    ref = _pooled_reference(arch_model, st, enc, 3.0, latched=True, skip=skip)
    with torch.no_grad(), st.apply(arch_model, 3.0):
        out = arch_model(**enc).logits
    torch.testing.assert_close(out[real], ref[real], rtol=1e-4, atol=1e-4)
    per_token = _pooled_reference(arch_model, st, enc, 3.0)
    assert not torch.allclose(
        out[real], per_token[real], atol=1e-3
    )  # the running mean is not the token's own


def _beam_scores_match_a_full_pass(model, tok, st, strength):
    """Beam search under a running-mean gate: every returned hypothesis's score is the sum of its tokens'
    log-probabilities in one uncached steered pass over the whole sequence. The running means must follow the
    beams that generate() reorders after each step: with them left in place, the scores drift."""
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    kw = dict(
        max_new_tokens=5,
        do_sample=False,
        num_beams=3,
        num_return_sequences=3,
        length_penalty=0.0,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        eos_token_id=None,
    )
    with torch.no_grad(), st.apply(model, strength):
        out = model.generate(**enc, **kw)
        seqs = out.sequences
        p = enc["input_ids"].shape[1]
        mask = torch.cat([enc["attention_mask"].repeat_interleave(3, 0), torch.ones_like(seqs[:, p:])], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() gives left-padded rows (GPT-2 needs it)
        logits = model(input_ids=seqs, attention_mask=mask, position_ids=pos).logits
    lp = torch.log_softmax(logits[:, p - 1 : -1].float(), -1).gather(-1, seqs[:, p:, None])[..., 0]
    torch.testing.assert_close(lp.sum(-1), out.sequences_scores, rtol=1e-4, atol=1e-4)


def test_latched_pooled_gate_keeps_every_invariant_and_follows_beams(
    arch_model, left_tok, latched_steerer, tmp_path
):
    _keeps_invariants_and_survives_save(arch_model, left_tok, latched_steerer, tmp_path)
    _beam_scores_match_a_full_pass(arch_model, left_tok, latched_steerer, 6.0)


@pytest.fixture(scope="module")
def split_steerer(arch_model, tiny_tok, engine_sets):
    """DSASConfig.split: the regulators of the lower half decide one pooled gate for the upper half."""
    return dsas.fit(
        arch_model, tiny_tok, engine_sets, progress=False, acc_threshold=0.5, scope="below", split=0.5
    )


def test_split_gate_reads_only_unsteered_sites_and_keeps_every_invariant(
    arch_model, left_tok, split_steerer, tmp_path
):
    """Under the split nothing is steered (readers have mult 0), above it every site is, all with the sigmoid of
    the mean logit of the readers as they are in the *unsteered* model -- steering cannot move its own gate."""
    st = split_steerer
    names = st.site_names
    k = round(0.5 * len(names))
    readers = [s for s in st.steered if names.index(s) < k]
    assert readers and st.steered[len(readers) :] == names[k:]
    assert all(st.gates[s].mult == 0.0 and st.gates[s].w is not None for s in readers)
    assert all(st.gates[s].kind == "pooled" for s in names[k:])
    enc = left_tok(PROMPTS, return_tensors="pt", padding=True)
    real = enc["attention_mask"].bool()
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        get_module(arch_model, s).register_forward_hook(
            lambda _m, _a, out, s=s: seen.__setitem__(s, output_tensor(out).detach().double())
        )
        for s in readers
    ]
    try:
        with torch.no_grad():
            arch_model(**enc)
    finally:
        for h in hooks:
            h.remove()
    logit = torch.stack([seen[s] @ st.gates[s].w.double() + st.gates[s].b for s in readers]).mean(0)
    expected = torch.sigmoid(logit)[real]
    for lam in (2.0, 8.0):  # the same gate at any strength: what it reads is never steered
        with torch.no_grad(), st.apply(arch_model, lam, trace=True) as tr:
            out = arch_model(**enc).logits
        for s in names[k:]:
            torch.testing.assert_close(tr.scales[s][real].double() / lam, expected, rtol=1e-4, atol=1e-5)
        for s in readers:
            assert not tr.scales[s].any()
    ref = _pooled_reference(arch_model, st, enc, 8.0)
    torch.testing.assert_close(out[real], ref[real], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(out[real], arch_model(**enc).logits[real], atol=1e-3)
    _generation_invariants(arch_model, left_tok, st, enc)
    st.save(tmp_path / "s")
    back = dsas.Steerer.load(tmp_path / "s", model=arch_model)
    assert [back.gates[s].mult for s in back.steered] == [st.gates[s].mult for s in st.steered]
    with torch.no_grad(), back.apply(arch_model, strength=8.0):
        assert torch.equal(arch_model(**enc).logits, out)


def test_removal_preset_is_a_latched_hard_split_gate_that_keeps_every_invariant(
    arch_model, left_tok, tiny_tok, engine_sets, tmp_path
):
    """DSASConfig.removal(): the lower half's regulators, read on their unsteered sites' running means, decide
    one floored gate for every site of the upper half. The output is that definition written out, and the
    invariants (cached = uncached, rows = batch, strength 0 exact, save -> load) hold."""
    cfg = dsas.DSASConfig.removal(acc_threshold=0.5, control_fpr=0.3)
    st = dsas.fit(arch_model, tiny_tok, engine_sets, progress=False, dsas=cfg)
    names = st.site_names
    k = round(0.5 * len(names))
    readers = [s for s in st.steered if names.index(s) < k]
    assert readers and st.steered[len(readers) :] == names[k:]
    assert all(st.gates[s].mult == 0.0 and st.gates[s].scope == "below+prefix" for s in readers)
    assert all(st.gates[s].kind == "pooled" and st.gates[s].floor == 0.5 for s in names[k:])
    # On control prompts, where the pool was calibrated to open on only 30% of the running means, the floor
    # shuts the gate exactly on most tokens.
    for texts in (PROMPTS, engine_sets.control[:8]):
        enc = left_tok(texts, return_tensors="pt", padding=True)
        real = enc["attention_mask"].bool()
        ref = _pooled_reference(
            arch_model, st, enc, 6.0, latched=True, floor=0.5, skip=st.gates[names[-1]].skip
        )
        with torch.no_grad(), st.apply(arch_model, 6.0, trace=True) as tr:
            out = arch_model(**enc).logits
        torch.testing.assert_close(out[real], ref[real], rtol=1e-4, atol=1e-4)
    assert (tr.scales[names[-1]][real] == 0).float().mean() > 0.5
    _keeps_invariants_and_survives_save(arch_model, left_tok, st, tmp_path)


def test_split_refuses_what_it_cannot_do(llama, tiny_tok, engine_sets):
    with pytest.raises(ValueError, match="split"):
        dsas.DSASConfig(scope="token", split=0.5)
    with pytest.raises(ValueError, match="split"):
        dsas.DSASConfig(split=1.0)
    with pytest.raises(ValueError, match="accurate regulators under the split"):
        dsas.fit(llama, tiny_tok, engine_sets, progress=False, acc_threshold=1.0, scope="below", split=0.5)


@pytest.fixture(scope="module", params=["token", "below"])
def floored_steerer(request, arch_model, tiny_tok, engine_sets):
    """Hard gates: exactly 0 on all but 30% of the control prompts' tokens."""
    from conftest import HARD_GATES

    return dsas.fit(
        arch_model,
        tiny_tok,
        engine_sets,
        progress=False,
        acc_threshold=0.5,
        scope=request.param,
        **HARD_GATES,
    )


def test_floored_gate_is_exactly_shut_on_some_tokens_and_keeps_every_invariant(
    arch_model, left_tok, floored_steerer, tmp_path
):
    st = floored_steerer
    assert st.steered and all(st.gates[s].floor == 0.5 for s in st.steered)
    enc = left_tok(PROMPTS, return_tensors="pt", padding=True)
    real = enc["attention_mask"].bool()
    with torch.no_grad(), st.apply(arch_model, 3.0, trace=True) as tr:
        traced = arch_model(**enc).logits
    scales = torch.stack([tr.scales[s] for s in st.steered])[:, real]
    assert (
        0 < int((scales == 0).sum()) < scales.numel()
    )  # some (site, token) pairs exactly untouched, some not
    with torch.no_grad(), st.apply(arch_model, 3.0):
        steered = arch_model(**enc).logits  # the folded eager path equals the traced reference
    torch.testing.assert_close(steered[real], traced[real], rtol=1e-5, atol=1e-5)
    _generation_invariants(arch_model, left_tok, st, enc)
    st.save(tmp_path / "f")
    back = dsas.Steerer.load(tmp_path / "f", model=arch_model)
    assert all(back.gates[s].floor == 0.5 for s in back.steered)
    with torch.no_grad(), back.apply(arch_model, strength=3.0):
        assert torch.equal(arch_model(**enc).logits, steered)


def test_with_scope_reads_the_same_regulators_another_way(
    arch_model, left_tok, latched_steerer, pooled_steerer, prefix_steerer
):
    """A running-mean fit turned into a per-token one is exactly the per-token fit (fitting does not depend on
    the running mean), and back; the original is untouched; crossing pooled and per-site gates is refused."""
    enc = left_tok(PROMPTS, return_tensors="pt", padding=True)

    def logits(st):
        with torch.no_grad(), st.apply(arch_model, 6.0):
            return arch_model(**enc).logits

    below = latched_steerer.with_scope("below")
    assert {below.gates[s].scope for s in below.steered} == {"below"}
    assert below.config["options"]["dsas"]["scope"] == "below"
    assert latched_steerer.config["options"]["dsas"]["scope"] == "below+prefix"
    assert torch.equal(logits(below), logits(pooled_steerer))
    assert torch.equal(logits(below.with_scope("below+prefix")), logits(latched_steerer))
    assert not torch.equal(logits(below), logits(latched_steerer))
    token = prefix_steerer.with_scope("token")
    assert {token.gates[s].scope for s in token.steered} == {"token"}
    with pytest.raises(ValueError, match="refit with scope='token'"):
        latched_steerer.with_scope("token")
    with pytest.raises(ValueError, match="not one of"):
        latched_steerer.with_scope("auto")


def test_latched_gate_with_skip_tokens_leaves_the_sink_out_of_its_running_mean(
    arch_model, left_tok, tiny_tok, engine_sets, tmp_path
):
    """`skip_tokens=1`: the latched pooled gate's running mean starts at the second real token (the tiny
    tokenizer's first is BOS), on left-padded rows; every generation invariant and beam search still hold, and
    the artifact keeps the skip."""
    st = dsas.fit(
        arch_model,
        tiny_tok,
        engine_sets,
        progress=False,
        acc_threshold=0.5,
        scope="below+prefix",
        skip_tokens=1,
    )
    assert {st.gates[n].skip for n in st.steered} == {1}
    enc = left_tok(PROMPTS, return_tensors="pt", padding=True)
    real = enc["attention_mask"].bool()
    with torch.no_grad(), st.apply(arch_model, 3.0):
        out = arch_model(**enc).logits
    torch.testing.assert_close(
        out[real],
        _pooled_reference(arch_model, st, enc, 3.0, latched=True, skip=1)[real],
        rtol=1e-4,
        atol=1e-4,
    )
    assert not torch.allclose(
        out[real], _pooled_reference(arch_model, st, enc, 3.0, latched=True)[real], atol=1e-3
    )  # the sink is not averaged in
    _generation_invariants(arch_model, left_tok, st, enc)
    _beam_scores_match_a_full_pass(arch_model, left_tok, st, 3.0)
    st.save(tmp_path / "s")
    back = dsas.Steerer.load(tmp_path / "s", model=arch_model)
    with torch.no_grad(), back.apply(arch_model, 3.0):
        assert torch.equal(arch_model(**enc).logits, out)
