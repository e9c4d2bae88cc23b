"""`Steerer`: fitted maps + gates for a list of sites, applied with a context manager, saved as JSON+safetensors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsas.artifact import check_fingerprint, read_artifact, write_artifact
from dsas.gates import SiteGate
from dsas.maps import SiteMap
from dsas.sites import Site, fingerprint
from dsas.steer import Trace, steering


@dataclass
class Steerer:
    """A fitted steerer.

    sites:       every fitted site, in model order.
    maps/gates:  per-site displacement and gate (the gate of an "off" site is kept for analysis).
    steered:     names of the sites hooked at run time (others failed the regulator's accuracy gate).
    stats:       per-site fit diagnostics (regulator accuracy, norms, ...).
    config:      method, gate and every option used to fit, saved with the artifact.
    fingerprint: the model it was fitted on; `apply` refuses another.
    """

    sites: list[Site]
    maps: dict[str, SiteMap]
    gates: dict[str, SiteGate]
    steered: list[str]
    config: dict[str, Any]
    fingerprint: dict[str, Any]
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    @property
    def method(self) -> str:
        return str(self.config.get("method"))

    @property
    def gate(self) -> str:
        return str(self.config.get("gate"))

    def check_model(self, model: nn.Module) -> None:
        actual = fingerprint(model, self.sites)
        actual["module_names"] = {n for n, _ in model.named_modules()}
        check_fingerprint(self.fingerprint, actual)

    @contextmanager
    def apply(
        self,
        model: nn.Module,
        strength: float | Sequence[float] | torch.Tensor = 1.0,
        *,
        trace: bool = False,
        expand: str = "interleave",
    ) -> Iterator[Trace]:
        """Steer `model` inside the block: z' = z + strength * g(z) * Δ(z) at every steered site.

        strength: one float, or one value per batch row (expanded for beams / num_return_sequences).
        trace:    record strength * g for every token at every steered site (yielded Trace.scales).
        expand:   how per-row strengths follow a batch that generate() enlarged: "interleave" (beams) or
                  "tile" (classifier-free guidance batches [uncond; cond]).
        """
        self.check_model(model)
        on = set(self.steered)
        sites = [s for s in self.sites if s.name in on]
        if self.gate == "threshold":  # prompt-level binary decision: see dsas.condition
            from dsas.condition import conditional_steering

            cond = Site(self.config["options"]["threshold"]["site"])
            g = self.gates[sites[0].name] if sites else None
            if g is None or g.w is None:
                raise ValueError("This threshold steerer holds no condition direction; refit it.")
            with conditional_steering(
                model, sites, self.maps, self.gates, cond, g.w, g.b, strength, trace=trace, expand=expand
            ) as tr:
                yield tr
            return
        with steering(model, sites, self.maps, self.gates, strength, trace=trace, expand=expand) as tr:
            yield tr

    def report(self) -> list[dict[str, Any]]:
        """One row per site: kind, layer, regulator accuracy, active/steered flags, norms of map and gate."""
        rows = []
        on = set(self.steered)
        for s in self.sites:
            m, g = self.maps[s.name], self.gates[s.name]
            row: dict[str, Any] = {"site": s.name, "kind": s.kind, "layer": s.layer, "steered": s.name in on}
            row.update(self.stats.get(s.name, {}))
            row["shift_norm"] = float(m.shift.norm())
            if m.scale is not None:
                row["scale_norm"] = float(m.scale.norm())
            row["gate"] = g.kind
            if g.w is not None:
                row["gate_w_norm"] = float(g.w.norm())
            rows.append(row)
        return rows

    # -- artifacts ---------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write `dsas_config.json` + `dsas_steerer.safetensors` into directory `path`."""
        tensors: dict[str, torch.Tensor] = {}
        per_site = []
        for s in self.sites:
            for k, v in self.maps[s.name].tensors().items():
                tensors[f"{s.name}/map.{k}"] = v
            g = self.gates[s.name]
            if g.w is not None:
                tensors[f"{s.name}/gate.w"] = g.w
            per_site.append(
                {
                    "name": s.name,
                    "kind": s.kind,
                    "layer": s.layer,
                    "steered": s.name in self.steered,
                    "gate": {"kind": g.kind, "b": g.b, "mult": g.mult},
                    "stats": self.stats.get(s.name, {}),
                }
            )
        cfg = {"config": self.config, "fingerprint": self.fingerprint, "sites": per_site}
        return write_artifact(path, cfg, tensors)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> Steerer:
        """Read a saved steerer; with `model`, check at once that it is the model it was fitted on."""
        cfg, tensors = read_artifact(path)
        sites, maps, gates, steered, stats = [], {}, {}, [], {}
        for row in cfg["sites"]:
            name = row["name"]
            sites.append(Site(name, row["kind"], row["layer"]))
            prefix = f"{name}/map."
            maps[name] = SiteMap.from_tensors(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
            gk = row["gate"]
            gates[name] = SiteGate(
                gk["kind"], tensors.get(f"{name}/gate.w"), float(gk["b"]), float(gk["mult"])
            )
            if row["steered"]:
                steered.append(name)
            stats[name] = row.get("stats", {})
        st = cls(sites, maps, gates, steered, cfg["config"], cfg["fingerprint"], stats)
        if model is not None:
            st.check_model(model)
        return st
