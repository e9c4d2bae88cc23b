"""`Steerer`: fitted maps + gates for a list of sites, applied with a context manager, saved as JSON+safetensors."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from dsas.artifact import check_fingerprint, read_artifact, write_artifact
from dsas.condition import Condition, conditional_steering
from dsas.gates import POOLED_SCOPES, RUNNING_MEAN_SCOPES, SiteGate
from dsas.maps import SiteMap
from dsas.sites import Site, fingerprint
from dsas.steer import Trace, steering


class Applied(AbstractContextManager[Trace]):
    """What `Steerer.apply` returns: steering starts at `with` and stops at its end. Created and never entered,
    it steers nothing, and says so when it is dropped."""

    def __init__(self, cm: AbstractContextManager[Trace]):
        self._cm = cm
        self._entered = False

    def __enter__(self) -> Trace:
        self._entered = True
        return self._cm.__enter__()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return self._cm.__exit__(et, ev, tb)

    def __del__(self) -> None:
        if not self._entered:
            warnings.warn(
                "Steerer.apply(...) was called without `with`: nothing was steered. Write "
                "`with steerer.apply(model, strength):` around the forward or generate calls.",
                RuntimeWarning,
                stacklevel=2,
            )


@dataclass
class Steerer:
    """A fitted steerer.

    sites:       every fitted site, in model order.
    maps/gates:  per-site displacement and gate (the gate of an "off" site is kept for analysis).
    steered:     names of the sites hooked at run time (others failed the regulator's accuracy gate).
    stats:       per-site fit diagnostics (regulator accuracy, norms, ...).
    config:      method, gate and every option used to fit, saved with the artifact.
    fingerprint: the model it was fitted on; `apply` refuses another.
    condition:   the CAST-style threshold baseline's prompt-level decision (gate="threshold"), else None.
    """

    sites: list[Site]
    maps: dict[str, SiteMap]
    gates: dict[str, SiteGate]
    steered: list[str]
    config: dict[str, Any]
    fingerprint: dict[str, Any]
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    condition: Condition | None = None

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    @property
    def method(self) -> str:
        return str(self.config.get("method"))

    @property
    def gate(self) -> str:
        return str(self.config.get("gate"))

    def check_model(self, model: nn.Module, *, check_weights: bool = True) -> None:
        """Refuse a model other than the one this steerer was fitted on (architecture, sizes, sites and, with
        `check_weights`, a signature of a few weights: pass False for a fine-tuned variant of that model)."""
        actual = fingerprint(model, self.sites)
        actual["module_names"] = {n for n, _ in model.named_modules()}
        check_fingerprint(self.fingerprint, actual, check_weights=check_weights)

    def apply(
        self,
        model: nn.Module,
        strength: float | Sequence[float] | torch.Tensor = 1.0,
        *,
        trace: bool = False,
        expand: str = "interleave",
        check_weights: bool = True,
    ) -> Applied:
        """Steer `model` inside the `with` block: z' = z + strength * g(z) * Δ(z) at every steered site.

        strength: one float, or one value per prompt (expanded for generate's beams / num_return_sequences).
        trace:    record strength * g for every token at every steered site (yielded Trace.scales).
        expand:   how per-prompt strengths follow a batch that generate() enlarged: "interleave" (beams) or
                  "tile" (classifier-free guidance batches [uncond; cond]).
        check_weights: compare the model's weight signature with the fitted model's (False: a fine-tuned
                  variant of it).
        Training through a steered model: call backward inside the block (gradient checkpointing re-runs the
        forward during backward, which outside the block is unsteered).
        """
        return Applied(self._apply(model, strength, trace, expand, check_weights))

    @contextmanager
    def _apply(
        self,
        model: nn.Module,
        strength: float | Sequence[float] | torch.Tensor,
        trace: bool,
        expand: str,
        check_weights: bool,
    ) -> Iterator[Trace]:
        self.check_model(model, check_weights=check_weights)
        on = set(self.steered)
        sites = [s for s in self.sites if s.name in on]
        if self.condition is not None:
            with conditional_steering(
                model,
                self.condition,
                sites,
                self.maps,
                self.gates,
                strength=strength,
                trace=trace,
                expand=expand,
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

    def with_scope(self, scope: str) -> Steerer:
        """The same steerer with its gates read another way: "below" <-> "below+prefix" (pooled gates) or
        "token" <-> "prefix" (per-site gates). The fit does not depend on the running mean, so this is exact,
        not a refit: e.g. a default fit (running-mean pooled gates, eager only) becomes servable by vLLM and
        traceable by torch.compile as scope="below". One thing does depend on the reading: a `control_fpr`
        counted on tokens (`calibrate_on="tokens"`, e.g. `DSASConfig.removal()`) was placed on what the fitted
        scope reads (running means or single tokens); read the other way, the gates open on a different share of
        control tokens than asked, so this warns and names the refit that keeps the calibration (the config keeps the
        fitted scope as `fitted_scope`, so reading the gates back the fitted way is silent)."""
        family = {"below": POOLED_SCOPES, "below+prefix": POOLED_SCOPES, "token": ("token", "prefix")}
        family["prefix"] = family["token"]
        if scope not in family:
            raise ValueError(f"scope={scope!r} is not one of {tuple(family)}.")
        gates = dict(self.gates)
        for n in self.steered:
            g = gates[n]
            if g.kind in ("sigmoid", "relu", "pooled"):
                if g.scope not in family[scope]:
                    raise ValueError(
                        f"Site {n} has scope={g.scope!r}, which reads another set of regulators than "
                        f"scope={scope!r} (pooled: {POOLED_SCOPES}; per site: token, prefix): refit with "
                        f"scope={scope!r}."
                    )
                gates[n] = replace(g, scope=scope)
        opts = self.config.get("options", {}).get("dsas")
        # The scope the fit counted control_fpr on; `scope` itself follows the current reading (a round trip
        # back to the fitted reading must not warn).
        fitted = opts.get("fitted_scope", opts.get("scope")) if isinstance(opts, dict) else None
        if (
            isinstance(opts, dict)
            and opts.get("control_fpr") is not None
            and opts.get("calibrate_on") == "tokens"
            and (fitted in RUNNING_MEAN_SCOPES) != (scope in RUNNING_MEAN_SCOPES)
        ):
            read = "running means" if fitted in RUNNING_MEAN_SCOPES else "one token at a time"
            warnings.warn(
                f"This steerer's control_fpr={opts['control_fpr']} was calibrated on control tokens read as "
                f"scope={fitted!r} reads them ({read}); read as scope={scope!r}, its gates open on a "
                f"different share of them. To keep the calibration, refit with scope={scope!r} (`dsas fit "
                f"--option scope={scope}`).",
                UserWarning,
                stacklevel=2,
            )
        config = dict(self.config)
        options = {k: dict(v) if isinstance(v, dict) else v for k, v in config.get("options", {}).items()}
        if isinstance(options.get("dsas"), dict):
            options["dsas"].setdefault("fitted_scope", options["dsas"].get("scope"))
            options["dsas"]["scope"] = scope
            config["options"] = options
        return replace(self, gates=gates, config=config)

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
                    "gate": {"kind": g.kind, "b": g.b, "mult": g.mult}
                    | ({"scope": g.scope} if g.scope != "token" else {})
                    | ({"floor": g.floor} if g.floor else {})
                    | ({"skip": g.skip} if g.skip else {}),
                    "stats": self.stats.get(s.name, {}),
                }
            )
        cfg: dict[str, Any] = {"config": self.config, "fingerprint": self.fingerprint, "sites": per_site}
        if self.condition is not None:
            tensors["condition/direction"] = self.condition.direction
            cfg["condition"] = {"site": self.condition.site, "threshold": self.condition.threshold} | (
                {"skip": self.condition.skip} if self.condition.skip else {}
            )
        return write_artifact(path, cfg, tensors)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None, *, check_weights: bool = True) -> Steerer:
        """Read a saved steerer; with `model`, check at once that it is the model it was fitted on
        (`check_weights=False` accepts a fine-tuned variant: same architecture and sizes, other weights)."""
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
                gk["kind"],
                tensors.get(f"{name}/gate.w"),
                float(gk["b"]),
                float(gk["mult"]),
                gk.get("scope", "token"),
                float(gk.get("floor", 0.0)),
                int(gk.get("skip", 0)),
            )
            if row["steered"]:
                steered.append(name)
            stats[name] = row.get("stats", {})
        condition = None
        if "condition" in cfg:
            c = cfg["condition"]
            condition = Condition(
                c["site"], tensors["condition/direction"], float(c["threshold"]), int(c.get("skip", 0))
            )
        elif cfg["config"].get("gate") == "threshold":
            # Saved before the condition had its own tensor: every site's constant gate held the direction
            # (w) and the threshold (b), and the condition site was in the options.
            g = gates[steered[0] if steered else sites[0].name]
            if g.w is None:
                raise ValueError(f"{path} is a threshold steerer without a condition direction; refit it.")
            site = cfg["config"]["options"]["threshold"]["site"]
            condition = Condition(site, g.w, float(g.b))
            gates = {n: SiteGate("const", None, 0.0, gk.mult) for n, gk in gates.items()}
        st = cls(sites, maps, gates, steered, cfg["config"], cfg["fingerprint"], stats, condition)
        if model is not None:
            st.check_model(model, check_weights=check_weights)
        return st
