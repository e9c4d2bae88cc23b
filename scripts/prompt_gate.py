"""Does a gate decided once, by the unsteered prompt, beat the latched gate on concept induction?

The default latched gate (`scope="below+prefix"`) reads the running mean of activations that the sites below have
already steered, over the prompt and every generated token. This probe takes the other extreme: each held-out
prompt's gate is read once, on the unsteered stream, at its last token (the top steered site's pooled gate, which
is exactly the regulators' training feature: the prompt's token-mean), and ungated CAA then steers every token of
that row at strength * g. "soft": g as read; "hardNN": g = 1 where the pooled logit exceeds the control prompts'
(100 - NN)th percentile, else 0.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/prompt_gate.py concept 0 1,1.5,2 soft,hard05

Arguments: prompt set, seeds (comma-separated; 56 fit prompts per split drawn with each, as the study does),
strengths, modes. Prints the in- and out-of-category concept rates over every held-out prompt (32 greedy tokens,
as the study) and the held-out AUC of the prompt-level logit. ~70 s per strength and mode on 2 CPU cores.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import dsas
from dsas.eval import generate_continuations
from dsas.eval.concept import concept_rate, concept_words
from dsas.torchutil import model_device

EPS = 1e-6  # a strength this small leaves the stream unsteered to float precision; the trace gives g = scale / EPS


def top_gate(model: torch.nn.Module, tok: object, st: dsas.Steerer, text: str) -> torch.Tensor:
    """g [T] (float64) of the top steered site at every token of `text`, read on the unsteered stream (the other
    probe scripts, `prompt_end_gates.py` and `removal_recall.py`, read the gate through this too)."""
    enc = tok(text, return_tensors="pt").to(model_device(model))  # type: ignore[operator]
    with torch.no_grad(), st.apply(model, EPS, trace=True) as tr:
        model(**enc)
    return tr.scales[st.steered[-1]][0].double() / EPS


def prompt_logits(model: torch.nn.Module, tok: object, st: dsas.Steerer, prompts: list[str]) -> np.ndarray:
    """The pooled gate logit of the top steered site at each prompt's last token, on the unsteered stream."""
    out = []
    for p in prompts:
        g = min(max(float(top_gate(model, tok, st, p)[-1]), 1e-7), 1 - 1e-7)
        out.append(np.log(g / (1 - g)))
    return np.array(out)


def main() -> None:
    name, seeds = sys.argv[1], [int(x) for x in sys.argv[2].split(",")]
    grid = [float(x) for x in sys.argv[3].split(",")]
    modes = sys.argv[4].split(",") if len(sys.argv) > 4 else ["soft", "hard05"]
    model, tok = dsas.load_model("smollm2-135m")
    for seed in seeds:
        sets = dsas.load_prompt_sets(name, n=56, seed=seed)
        word, keys = concept_words(sets.meta) or "", list(sets.eval)
        ins = sets.eval[sets.meta.get("eval_in") or keys[0]]
        outs = sets.eval[sets.meta.get("eval_out") or keys[1]]
        gated = dsas.fit(model, tok, sets, gate="dsas", progress=False)
        caa = dsas.fit(model, tok, sets, gate="none", progress=False)
        li, lo = prompt_logits(model, tok, gated, ins), prompt_logits(model, tok, gated, outs)
        lc = prompt_logits(model, tok, gated, sets.control)
        auc = roc_auc_score([1] * len(li) + [0] * len(lo), np.r_[li, lo])
        print(f"seed {seed}: held-out AUC {auc:.3f}", flush=True)
        for mode in modes:
            if mode == "soft":
                gi, go = 1 / (1 + np.exp(-li)), 1 / (1 + np.exp(-lo))
            else:
                t = np.quantile(lc, 1 - float(mode[4:]) / 100)
                gi, go = (li > t).astype(float), (lo > t).astype(float)
                print(f"  {mode}: open on {gi.mean():.3f} in / {go.mean():.3f} out", flush=True)
            for lam in grid:
                t0, rates = time.time(), []
                for prompts, g in ((ins, gi), (outs, go)):
                    conts: list[str] = []
                    for i in range(0, len(prompts), 16):
                        with caa.apply(model, [lam * float(x) for x in g[i : i + 16]]):
                            conts += generate_continuations(
                                model,
                                tok,
                                prompts[i : i + 16],
                                max_new_tokens=32,
                                do_sample=False,
                                batch_size=16,
                                progress=False,
                            )
                    rates.append(concept_rate(conts, word))
                row = {
                    "set": name,
                    "seed": seed,
                    "mode": mode,
                    "strength": lam,
                    "in": rates[0],
                    "out": rates[1],
                }
                print(json.dumps(row), f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
