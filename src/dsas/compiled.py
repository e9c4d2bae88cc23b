"""What steering needs under torch.compile: every site's parameters packed in one tensor per (device, width).

A compiled graph guards on what the hook reads. Per-site parameter tensors were 2 graph inputs per site, each
copied into the CUDA graph's static buffers on every replay by a Python loop; a dataclass slot cost ~15 guards
per site (benchmarks/README.md has the measurements). So under compile a site reads its row of one packed
tensor, finds the `steering` block through the module-level `ACTIVE` registry (guarded once per graph, not once
per site), and its row and flags are one int constant (`code`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsas.rule import SiteParams


@dataclass
class Pack:
    """The parameters of every site of one (device, width) in one fp32 tensor [sites, 5 d + 3]: per row shift, w,
    scale, lo, hi, then b, mult and floor. The hooks slice their row inside the graph; nothing is copied eagerly."""

    t: torch.Tensor
    d: int


SCALE, SUPPORT, GATE, RELU, FLOOR = 1, 2, 4, 8, 16
ROW = 5
"""Bits of flags under the row index in a site's code."""


def unpack(packs: list[Pack], code: int) -> SiteParams:
    """The parameters of one site as views of its pack row; `code` = pack << 32 | row << ROW | flags."""
    pk = packs[code >> 32]
    r, d = pk.t[(code >> ROW) & 0x7FFFFFF], pk.d
    return SiteParams(
        shift=r[:d],
        scale=r[2 * d : 3 * d] if code & SCALE else None,
        lo=r[3 * d : 4 * d] if code & SUPPORT else None,
        hi=r[4 * d : 5 * d] if code & SUPPORT else None,
        w=r[d : 2 * d] if code & GATE else None,
        b=r[5 * d],
        mult=r[5 * d + 1],
        relu=bool(code & RELU),
        floor=r[5 * d + 2] if code & FLOOR else 0.0,
    )


def pack_sites(params: list[SiteParams | None]) -> tuple[list[Pack], list[int]]:
    """One `Pack` per (device, width) for the sites whose parameters are known at entry, and each site's code
    for `unpack` (-1: not packed)."""
    groups: dict[tuple[torch.device, int], list[int]] = {}
    for i, p in enumerate(params):
        if p is not None:
            groups.setdefault((p.shift.device, int(p.shift.shape[-1])), []).append(i)
    packs: list[Pack] = []
    codes = [-1] * len(params)
    for (dev, d), idx in groups.items():
        t = torch.zeros(len(idx), 5 * d + 3, device=dev)
        for row, i in enumerate(idx):
            p = params[i]
            assert p is not None
            for k, v in enumerate((p.shift, p.w, p.scale, p.lo, p.hi)):
                if v is not None:
                    t[row, k * d : (k + 1) * d] = v
            t[row, 5 * d], t[row, 5 * d + 1], t[row, 5 * d + 2] = float(p.b), float(p.mult), float(p.floor)
            flags = (
                (SCALE if p.scale is not None else 0)
                | (SUPPORT if p.lo is not None else 0)
                | (GATE if p.w is not None else 0)
                | (RELU if p.relu else 0)
                | (FLOOR if float(p.floor) else 0)
            )
            codes[i] = len(packs) << 32 | row << ROW | flags
        packs.append(Pack(t, d))
    return packs, codes


ACTIVE: dict[int, object] = {}
"""id(model) -> the run-time state of the `steering` block in progress on it (`dsas.steer.SteerState`)."""
