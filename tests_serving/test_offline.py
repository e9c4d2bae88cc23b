"""dsas inside vLLM, offline (`LLM`), on the embedded SmolLM2 in fp32: one engine with two steerers for the
module, plus one engine without dsas steering in a fresh process for the comparisons that need it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# Skipped where vLLM is not installed (the main .venv): these tests run in .venv-vllm.
pytest.importorskip("vllm.entrypoints.llm")
import vllm

MAX_TOKENS = 16
HF_STRENGTH = 4.0
ENGINE: dict[str, Any] = {"dtype": "float32", "max_model_len": 256, "max_num_seqs": 16, "seed": 0}
MIXED = [
    None,
    ("tox", 1.0),
    ("tox", 4.0),
    ("van", 1.0),
    ("van", 4.0),
    ("pool", 4.0),
    ("tox", 4.0),
    ("van", 1.0),
]
"""Steering of each row of the mixed batch (row i uses prompt i % 5: rows 0 / 6 and 2 / 7 share a prompt,
unsteered vs steered, so the prefix cache would mix them up if steering were not part of its key; row 5's pooled
gates share the step with the per-site gates of the others)."""


def _trim(tokens: list[int], eos: int) -> list[int]:
    """Up to and including the first EOS (HF stops there; vLLM does too unless told otherwise)."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.fixture(scope="module")
def hf(steerer_dirs: dict[str, Path], prompts: list[str]) -> dict[str, Any]:
    """The HF path (`Steerer.apply` + `generate`): greedy continuations, unsteered and steered, one prompt at a
    time (no padding). Runs before the engine, which rebinds the process's threads."""
    import torch

    import dsas

    model, tok = dsas.load_model("smollm2-135m")
    steerers = {k: dsas.Steerer.load(steerer_dirs[k], model=model) for k in ("tox", "pool")}
    ids = [tok(p)["input_ids"] for p in prompts]
    out: dict[str, Any] = {"ids": ids, "eos": tok.eos_token_id, "plain": [], "steered": [], "pooled": []}
    with torch.no_grad():
        for key, name in (("plain", None), ("steered", "tox"), ("pooled", "pool")):
            for p in ids:
                x = torch.tensor([p])
                kw = dict(max_new_tokens=MAX_TOKENS, do_sample=False, attention_mask=torch.ones_like(x))
                if name is None:
                    y = model.generate(x, **kw)
                else:
                    with steerers[name].apply(model, strength=HF_STRENGTH):
                        y = model.generate(x, **kw)
                out[key].append(_trim(y[0, len(p) :].tolist(), tok.eos_token_id))
    return out


@pytest.fixture(scope="module")
def llm(hf: dict[str, Any], steerer_dirs: dict[str, Path], checkpoint: str, engine_env: Any) -> Any:
    os.environ.update(engine_env(steerer_dirs))
    engine = vllm.LLM(model=checkpoint, **ENGINE)
    yield engine
    del engine


def _runner(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


def _params(steering: tuple[str, float] | None, **kw: Any) -> Any:
    extra = None if steering is None else {"dsas_steerer": steering[0], "dsas_strength": steering[1]}
    return vllm.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args=extra, **kw)


def _generate(llm: Any, ids: list[list[int]], params: list[Any]) -> list[Any]:
    from vllm.inputs import TokensPrompt

    return [
        o.outputs[0]
        for o in llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
    ]


def test_steered_continuations_agree_with_the_hf_path_as_well_as_unsteered_ones(llm: Any, hf: dict[str, Any]):
    ids, eos = hf["ids"], hf["eos"]
    plain = _generate(llm, ids, [_params(None)] * len(ids))
    steered = _generate(llm, ids, [_params(("tox", HF_STRENGTH))] * len(ids))
    agree_plain = sum(_trim(list(o.token_ids), eos) == h for o, h in zip(plain, hf["plain"], strict=True))
    agree_steered = sum(
        _trim(list(o.token_ids), eos) == h for o, h in zip(steered, hf["steered"], strict=True)
    )
    print(
        f"vLLM vs HF, {len(ids)} prompts x {MAX_TOKENS} tokens: unsteered {agree_plain}, steered {agree_steered}"
    )
    changed = sum(a != b for a, b in zip(hf["plain"], hf["steered"], strict=True))
    assert changed >= 4, "the steerer must change some continuations for the comparison to mean anything"
    assert agree_steered >= agree_plain


def test_pooled_gates_are_served_and_agree_with_the_hf_path(llm: Any, hf: dict[str, Any]):
    """scope="below": each site's gate reads the mean logit of the steerer's regulators below it in the same pass
    (a pool buffer the sites' ops update in place), floored so neutral prompts stay untouched."""
    ids, eos = hf["ids"], hf["eos"]
    plain = _generate(llm, ids, [_params(None)] * len(ids))
    pooled = _generate(llm, ids, [_params(("pool", HF_STRENGTH))] * len(ids))
    agree_plain = sum(_trim(list(o.token_ids), eos) == h for o, h in zip(plain, hf["plain"], strict=True))
    agree = sum(_trim(list(o.token_ids), eos) == h for o, h in zip(pooled, hf["pooled"], strict=True))
    print(f"vLLM vs HF, pooled gates: unsteered {agree_plain}, steered {agree} of {len(ids)}")
    changed = sum(a != b for a, b in zip(hf["plain"], hf["pooled"], strict=True))
    assert changed >= 4, "the steerer must change some continuations for the comparison to mean anything"
    assert agree >= agree_plain


def test_mixed_batch_rows_equal_each_request_alone(llm: Any, hf: dict[str, Any]):
    ids = [hf["ids"][i % 5] for i in range(len(MIXED))]
    batch = _generate(llm, ids, [_params(s, ignore_eos=True) for s in MIXED])
    alone = [_generate(llm, [p], [_params(s, ignore_eos=True)])[0] for p, s in zip(ids, MIXED, strict=True)]
    assert [list(o.token_ids) for o in batch] == [list(o.token_ids) for o in alone]
    # Same prompt, other steering: the rows differ, so each row really got its own steering.
    assert batch[6].token_ids != batch[0].token_ids and batch[7].token_ids != batch[2].token_ids


def test_bad_requests_are_refused_with_the_fix_and_the_engine_keeps_serving(llm: Any, hf: dict[str, Any]):
    from vllm.exceptions import VLLMValidationError

    cases = {
        "nope": ("Unknown steerer 'nope'", {"dsas_steerer": "nope"}),
        "nan": ("finite number", {"dsas_steerer": "tox", "dsas_strength": math.nan}),
        "text": ("finite number", {"dsas_steerer": "tox", "dsas_strength": "2"}),
        "orphan": ("without 'dsas_steerer'", {"dsas_strength": 2.0}),
        "typo": ("Unknown steering argument", {"dsas_steerer": "tox", "dsas_strenght": 2.0}),
    }
    for message, extra in cases.values():
        sp = vllm.SamplingParams(max_tokens=2, temperature=0.0, extra_args=extra)
        with pytest.raises(VLLMValidationError, match=message):
            _generate(llm, hf["ids"][:1], [sp])
    again = _generate(llm, hf["ids"][:1], [_params(("tox", 4.0))])
    assert len(again[0].token_ids) > 0


def test_buffers_stay_put_and_finished_requests_are_forgotten(llm: Any, hf: dict[str, Any]):
    state = _runner(llm).dsas_state
    ptrs = (state.rows.data_ptr(), state.lam.data_ptr(), *(t.vec.data_ptr() for t in state.tables.values()))
    _generate(
        llm, hf["ids"][:4], [_params(("tox", 2.0)), _params(None), _params(("van", 1.0)), _params(None)]
    )
    _generate(llm, hf["ids"][:2], [_params(None), _params(None)])
    _generate(llm, hf["ids"][:1], [_params(None)])
    assert (
        state.rows.data_ptr(),
        state.lam.data_ptr(),
        *(t.vec.data_ptr() for t in state.tables.values()),
    ) == ptrs
    assert not state.active and len(state.requests) <= 1  # only the last, not yet reported finished
    assert (
        state.names == ("tox", "van", "pool") and len(state.tables) == 60
    )  # tox steers 58 sites, van all 60
    assert state.pool is not None and sum(t.pooled for t in state.tables.values()) == 59  # pool: 59 sites


@pytest.fixture(scope="module")
def plain(
    llm: Any, hf: dict[str, Any], checkpoint: str, engine_env: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """The mixed batch's prompts on an engine in a fresh process with DSAS_STEERERS unset."""
    job = tmp_path_factory.mktemp("plain") / "job.json"
    ids = [hf["ids"][i % 5] for i in range(len(MIXED))]
    job.write_text(
        json.dumps({"checkpoint": checkpoint, "engine": ENGINE, "prompts": ids, "max_tokens": MAX_TOKENS})
    )
    env = {k: v for k, v in os.environ.items() if k != "DSAS_STEERERS"} | engine_env(None)
    script = Path(__file__).with_name("plain_engine.py")
    res = subprocess.run(
        [sys.executable, str(script), str(job)], env=env, capture_output=True, text=True, timeout=600
    )
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    assert res.returncode == 0 and line, res.stderr[-3000:]
    return json.loads(line[0].removeprefix("RESULT "))


def test_plugin_is_inert_without_dsas_steerers(plain: dict):
    assert plain["entry_point_ran"]
    assert plain["dsas_modules"] == []
    assert all(m.startswith("vllm.") for m in plain["method_modules"].values()), plain["method_modules"]


def test_unsteered_rows_are_bit_identical_to_an_engine_without_dsas(
    llm: Any, hf: dict[str, Any], plain: dict
):
    ids = [hf["ids"][i % 5] for i in range(len(MIXED))]
    outs = _generate(llm, ids, [_params(s, ignore_eos=True, logprobs=1) for s in MIXED])
    for i, (o, s) in enumerate(zip(outs, MIXED, strict=True)):
        if s is None:
            logprobs = [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs, strict=True)]
            assert list(o.token_ids) == plain["tokens"][i]
            assert logprobs == plain["logprobs"][i]  # exact floats
        else:
            assert list(o.token_ids) != plain["tokens"][i] or s[1] == 1.0
