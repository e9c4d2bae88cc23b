"""One call of the vLLM serving op on the CPU: `torch.ops.dsas.steer` against the function it dispatches to.

    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/bench_serving_op.py [--tokens 16] [--d 576]

Times (median of 7 repeats of 3000 calls, microseconds per call) an idle call (no token steered this step: a
copy), a steered call on the one-steerer path (a CAA + DSAS row), the same through the op, and a plain `clone`
(the floor of an idle call). The dispatch cost is the difference between the op and the direct call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from dsas.rule import SiteParams
from dsas.serving import op


def per_call_us(f: Callable[[], object], calls: int = 3000, repeats: int = 7) -> float:
    for _ in range(200):
        f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            f()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--d", type=int, default=576)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n, d = args.tokens, args.d
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g)
    p = SiteParams(torch.randn(d, generator=g), w=0.01 * torch.randn(d, generator=g), b=0.1)
    rows0, sca0 = op.unsteered_row(d)
    rows1, sca1 = op.pack_site(p, d)
    vec, sca = torch.stack([rows0, rows1]), torch.stack([sca0, sca1])
    rows = torch.ones(4 * n, dtype=torch.int64)
    lam = torch.full((4 * n,), 2.0)
    res = {}
    with torch.inference_mode():  # as vLLM runs the model
        res["clone"] = per_call_us(lambda: h.clone())
        op.Activity.steered = False
        res["idle op"] = per_call_us(lambda: torch.ops.dsas.steer(h, rows, lam, vec, sca))
        op.Activity.steered, op.Activity.row = True, 1
        res["steered op"] = per_call_us(lambda: torch.ops.dsas.steer(h, rows, lam, vec, sca))
        res["steered direct"] = per_call_us(lambda: op.steer(h, rows, lam, vec, sca))
        op.Activity.row = -1
    for k, v in res.items():
        print(f"{k:>16}: {v:6.1f} us")
    print(json.dumps({"tokens": n, "d": d, "us_per_call": res}))


if __name__ == "__main__":
    main()
