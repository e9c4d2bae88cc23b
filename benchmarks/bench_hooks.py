"""Cost of one steering site: the reference rule `steer_tensor` vs the eager fast path `steer_folded`, and the whole
forward hook (what a site adds to every forward pass), per call, on decode-step (T=1) and prefill (T=32) shapes.

    .venv/bin/python benchmarks/bench_hooks.py                 # CPU, fp32 and bf16
    python3 benchmarks/bench_hooks.py --device cuda            # GPU (times include a sync every `--inner` calls)

`steer_tensor` is the rule as it ran in every hook before the fast path existed (it still runs when tracing and
under torch.compile), so its row is the "before" of this change.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, environment, load_average, sync, write_json

from dsas.gates import SiteGate
from dsas.maps import SiteMap
from dsas.sites import Site
from dsas.steer import SiteParams, _make_hook, _State, as_strength, steer_folded, steer_tensor


def per_call_us(fn: Any, dev: torch.device, inner: int, rounds: int) -> float:
    fn()
    sync(dev)
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(dev)
        ts.append((time.perf_counter() - t0) / inner * 1e6)
    return sorted(ts)[len(ts) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dims", default="576,1536")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--tokens", default="1,32")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--inner", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    site = Site("model.layers.0.mlp")
    for d in map(int, args.dims.split(",")):
        m = SiteMap(torch.randn(d))
        for gname, g in (
            ("vanilla", SiteGate()),
            ("dsas", SiteGate("sigmoid", torch.randn(d) / d**0.5, 0.1)),
        ):
            p_ = SiteParams.build(m, g, dev)
            for b in map(int, args.batches.split(",")):
                for t in map(int, args.tokens.split(",")):
                    for dt in args.dtypes.split(","):
                        h = torch.randn(b, t, d, device=dev).to(getattr(torch, dt))
                        lam = torch.full((b,), 4.0, device=dev)
                        f = p_.fold(lam[:1], 3)
                        hook = _make_hook(site, m, g, _State(as_strength(4.0), "interleave", None), dev)
                        ref = steer_tensor(h, p_, lam)[0]
                        err = (steer_folded(h, f).float() - ref.float()).abs().max().item()
                        ref_fn = lambda h=h, p_=p_, lam=lam: steer_tensor(h, p_, lam)  # noqa: E731
                        fold_fn = lambda h=h, f=f: steer_folded(h, f)  # noqa: E731
                        hook_fn = lambda h=h, hook=hook: hook(None, None, h)  # noqa: E731
                        row = {
                            "d": d,
                            "gate": gname,
                            "batch": b,
                            "tokens": t,
                            "dtype": dt,
                            "reference_us": per_call_us(ref_fn, dev, args.inner, args.rounds),
                            "folded_us": per_call_us(fold_fn, dev, args.inner, args.rounds),
                            "hook_us": per_call_us(hook_fn, dev, args.inner, args.rounds),
                            "max_abs_diff": err,
                        }
                        rows.append(row)
                        print(
                            f"d={d} {gname:7s} B={b} T={t} {dt:8s} reference {row['reference_us']:7.1f} us  "
                            f"folded {row['folded_us']:7.1f} us  hook {row['hook_us']:7.1f} us  diff {err:.1e}"
                        )
    env = environment(dev)
    env["load_average_end"] = load_average()
    out = Path(args.out) if args.out else RESULTS / f"hooks_{dev.type}.json"
    write_json(out, {"env": env, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
