"""Where does a removal gate stand when generation starts? The share of held-out toxic and neutral prompts whose
gate is open at their last prompt token, for `DSASConfig.removal()` fitted with a given `skip_tokens`.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/prompt_end_gates.py --model gemma3-270m --seed 0 --skip-tokens 0
    OMP_NUM_THREADS=1 .venv/bin/python scripts/prompt_end_gates.py --model gemma3-270m --seed 0 --skip-tokens auto

Fits CAA + DSAS with the removal preset on the study's toxicity draw (32 prompts per split, `--seed`), reads the
pooled gate logit of the top steered site at every token of each held-out prompt with the floor taken off (so
the logit is visible where the floored gate is 0; the floored gate opens where it is > 0), and prints: the
share of the first 210 toxic and 213 neutral held-out prompts open at their last token, the AUC of that logit,
its quantiles, and the calibrated logit at the first token of a few control prompts. On a model whose tokenizer
prepends a BOS token, with `skip_tokens=0` that last number is exactly 0 for every prompt: the BOS token, the
same in every prompt, is where the calibration put the gate's midpoint (docs/concepts.md, "The BOS token").
~3 min for Gemma-3-270M on one CPU core.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
from prompt_gate import top_gate  # scripts/ is on the path when a script runs
from sklearn.metrics import roc_auc_score

import dsas
from dsas.gates import DSASConfig, changed_fields


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-tokens", default="auto", help="an int or 'auto' (FitConfig.skip_tokens)")
    args = ap.parse_args()
    skip = args.skip_tokens if args.skip_tokens == "auto" else int(args.skip_tokens)
    model, tok = dsas.load_model(args.model)
    sets = dsas.load_prompt_sets("toxicity", n=32, seed=args.seed)
    opts = changed_fields(DSASConfig.removal())
    st = dsas.fit(model, tok, sets, method="caa", gate="dsas", progress=False, skip_tokens=skip, **opts)
    resolved = st.config["fit"].get("skip_tokens", 0)
    st.gates = {
        k: replace(g, floor=0.0) for k, g in st.gates.items()
    }  # read the logit where the gate is shut

    def logits(prompt: str) -> np.ndarray:
        g = top_gate(model, tok, st, prompt).clamp(1e-12, 1 - 1e-12)
        return torch.log(g / (1 - g)).numpy()

    full = dsas.load_prompt_sets("toxicity")
    lt = np.array([logits(p)[-1] for p in full.eval["toxic"][:210]])
    ln = np.array([logits(p)[-1] for p in full.eval["neutral"][:213]])
    auc = roc_auc_score([1] * len(lt) + [0] * len(ln), np.r_[lt, ln])
    print(
        f"{args.model} seed {args.seed}, skip_tokens={args.skip_tokens} (resolved: {resolved}), removal preset:"
    )
    print(
        f"  open at the last prompt token: toxic {(lt > 0).mean():.3f}, neutral {(ln > 0).mean():.3f}; AUC {auc:.3f}"
    )
    print(f"  logit quantiles: toxic 10% / 50% {np.quantile(lt, [0.1, 0.5]).round(2).tolist()}, neutral 50% / 95% "
          f"/ 99% {np.quantile(ln, [0.5, 0.95, 0.99]).round(2).tolist()}")  # fmt: skip
    if not resolved:  # with a skip the first tokens are outside the running mean (0 until one is in)
        first = [round(float(logits(p)[0]), 3) for p in sets.control[:5]]
        print(f"  calibrated logit at the first token of 5 control prompts: {first}")


if __name__ == "__main__":
    main()
