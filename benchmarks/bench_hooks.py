"""Cost of one steering site per call: the reference rule `dsas.rule.rule` vs the eager fast path
`dsas.rule.rule_folded` (parameters folded once by `dsas.rule.fold`), and the whole site as `dsas.steer.steering`
installs it (a one-module model whose module is the site: wrapped forward + rule, minus the unsteered call), on
decode-step (T=1) and prefill (T=32) shapes. Everything is interleaved (the order rotated every round); medians.
`--before PATH` times the whole site of another dsas tree too (e.g. a worktree of the previous commit), in the same
loop: `steering` has kept its signature.

    .venv/bin/python benchmarks/bench_hooks.py                 # CPU, fp32 and bf16
    python3 benchmarks/bench_hooks.py --device cuda            # GPU (times include a sync every `--inner` calls)

`rule` is the form traced, 4-D, float64 and compiled site calls take (and every eager call with
`dsas.steer.FAST_EAGER = False`); `rule_folded` is what an eager token activation takes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, environment, import_tree, load_average, sync, use_tree, write_json
from torch import nn

from dsas.gates import SiteGate
from dsas.maps import SiteMap
from dsas.rule import SiteParams, fold, rule, rule_folded
from dsas.sites import Site
from dsas.steer import steering


class Passthrough(nn.Module):
    """A module that returns its input; its buffer puts it on a device (where `steering` builds the parameters)."""

    def __init__(self, dev: torch.device):
        super().__init__()
        self.register_buffer("anchor", torch.zeros(1, device=dev))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h


def timed(fn: Any, dev: torch.device, inner: int) -> float:
    """us per call of `fn` over `inner` calls (one device sync at the end)."""
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(dev)
    return (time.perf_counter() - t0) / inner * 1e6


def site_us(tree: Any, gate: str, g_w: torch.Tensor, shift: torch.Tensor, dev: torch.device) -> Any:
    """A function that times one call of a one-module model whose module is a steered site (`steering` of `tree`,
    None: this checkout), per call over `inner` calls."""

    def run(h: torch.Tensor, inner: int) -> float:
        with use_tree(tree):
            from dsas.gates import SiteGate as G
            from dsas.maps import SiteMap as M
            from dsas.sites import Site as S
            from dsas.steer import steering as steer

            one = nn.Sequential(Passthrough(dev))  # a one-module model: its module "0" is the site
            g = G("sigmoid", g_w, 0.1) if gate == "dsas" else G()
            with steer(one, [S("0")], {"0": M(shift)}, {"0": g}, 4.0):
                one(h)
                return timed(lambda: one(h), dev, inner)

    return run


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
    p.add_argument("--before", default=None, help="src folder of another dsas tree: its whole site too")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    before = import_tree(args.before) if args.before else None
    env = environment(dev)
    torch.manual_seed(0)
    rows = []
    plain = nn.Sequential(Passthrough(dev))
    for d in map(int, args.dims.split(",")):
        shift, g_w = torch.randn(d), torch.randn(d) / d**0.5
        m = SiteMap(shift)
        for gname, g in (("vanilla", SiteGate()), ("dsas", SiteGate("sigmoid", g_w, 0.1))):
            p_ = SiteParams.build(m, g, dev)
            site = {"after": site_us(None, gname, g_w, shift, dev)}
            if before is not None:
                site["before"] = site_us(before, gname, g_w, shift, dev)
            for b in map(int, args.batches.split(",")):
                for t in map(int, args.tokens.split(",")):
                    for dt in args.dtypes.split(","):
                        h = torch.randn(b, t, d, device=dev).to(getattr(torch, dt))
                        lam = torch.full((b,), 4.0, device=dev)
                        f = fold(p_, lam[:1], 3)
                        ref = rule(h, p_, lam)[0]
                        err = (rule_folded(h, f).float() - ref.float()).abs().max().item()
                        with steering(plain, [Site("0")], {"0": m}, {"0": g}, 4.0):
                            err = max(err, (plain(h).float() - ref.float()).abs().max().item())
                        fns: dict[str, Any] = {
                            "rule": lambda h=h, lam=lam, q=p_: timed(
                                lambda: rule(h, q, lam), dev, args.inner
                            ),
                            "rule_folded": lambda h=h, f=f: timed(lambda: rule_folded(h, f), dev, args.inner),
                            "unsteered": lambda h=h: timed(lambda: plain(h), dev, args.inner),
                            **{f"site_{k}": (lambda h=h, fn=fn: fn(h, args.inner)) for k, fn in site.items()},
                        }
                        times: dict[str, list[float]] = {k: [] for k in fns}
                        names = list(fns)
                        for r in range(args.rounds):  # interleaved, the order rotated every round
                            for k in names[r % len(names) :] + names[: r % len(names)]:
                                times[k].append(fns[k]())
                        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
                        row = {
                            "d": d,
                            "gate": gname,
                            "batch": b,
                            "tokens": t,
                            "dtype": dt,
                            "reference_us": med["rule"],
                            "folded_us": med["rule_folded"],
                            "unsteered_call_us": med["unsteered"],
                            **{
                                f"site_us_{k}": sorted(
                                    x - u for x, u in zip(times[f"site_{k}"], times["unsteered"], strict=True)
                                )[args.rounds // 2]
                                for k in site
                            },
                            **(
                                {
                                    "site_us_after_minus_before": sorted(
                                        a - b_
                                        for a, b_ in zip(
                                            times["site_after"], times["site_before"], strict=True
                                        )
                                    )[args.rounds // 2]
                                }
                                if "before" in site
                                else {}
                            ),
                            "max_abs_diff": err,
                            "raw_us": times,
                        }
                        rows.append(row)
                        sites = "  ".join(f"whole site ({k}) {row[f'site_us_{k}']:6.2f} us" for k in site)
                        if "before" in site:
                            sites += f"  after - before {row['site_us_after_minus_before']:+.2f} us (paired)"
                        print(
                            f"d={d} {gname:7s} B={b} T={t} {dt:8s} rule {row['reference_us']:7.2f} us  "
                            f"rule_folded {row['folded_us']:6.2f} us  {sites}  diff {err:.1e}"
                        )
    env["load_average_end"] = load_average()
    out = Path(args.out) if args.out else RESULTS / f"hooks_{dev.type}.json"
    write_json(out, {"env": env, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
