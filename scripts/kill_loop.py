"""kill -9 a process in the middle of saving a steerer, and in the middle of a sweep, again and again; count
what a load or a resumed sweep sees afterwards.

    .venv/bin/python scripts/kill_loop.py                  # 30 kills mid-save, 10 mid-sweep (~1 min)
    .venv/bin/python scripts/kill_loop.py --saves 100 --sweeps 30 --artifact-module /tmp/old_artifact.py

Save loop: a forked child saves steerer A and steerer B alternately into one folder, without pause; the parent
SIGKILLs it after a random delay and loads the folder. The load must give A or B exactly: a "hybrid" loads but
matches neither, an "error" refuses to load (a save must never leave a folder that cannot load either). After
each kill the next save must leave exactly the two artifact files ("stray" counts leftovers).

Sweep loop: a forked child sweeps 2 steerers x 6 strengths + the baseline into a fresh run folder with a stand-in
evaluation (a few ms per point; the store, keys and lock are the real ones) and is SIGKILLed at a random time;
a second child resumes to completion. "lost" counts points the first child reported stored that the store does
not hold; "recomputed" counts points computed again although stored; "incomplete" counts runs whose final
`load_points` is not the full grid, in order.

`--artifact-module` runs the save loop against another implementation of `dsas.artifact` (e.g. an earlier
version, to see the hybrids it made). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

WIDTH, SITES = 576, 30  # SmolLM2-135M's width; half its sites, so a save is a few ms as in real use


def _artifact(seed: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A steerer in `Steerer.save`'s layout: per-site rows in the JSON, a shift and a gate vector per site."""
    g = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i // 2}.{'self_attn' if i % 2 == 0 else 'mlp'}" for i in range(SITES)]
    rows = [
        {
            "name": n,
            "kind": "attn" if n.endswith("attn") else "mlp",
            "layer": int(n.split(".")[2]),
            "steered": True,
            "gate": {"kind": "sigmoid", "b": float(torch.randn(1, generator=g)), "mult": 1.0},
            "stats": {"accuracy": 0.9},
        }
        for n in names
    ]
    config = {
        "config": {"method": "caa", "gate": "dsas", "options": {}, "seed": seed},
        "fingerprint": {"architecture": "LlamaForCausalLM", "hidden_size": WIDTH, "num_layers": SITES // 2},
        "sites": rows,
    }
    tensors = {}
    for n in names:
        tensors[f"{n}/map.shift"] = torch.randn(WIDTH, generator=g)
        tensors[f"{n}/gate.w"] = torch.randn(WIDTH, generator=g)
    return config, tensors


def _load_module(path: str | None) -> ModuleType:
    if path is None:
        import dsas.artifact

        return dsas.artifact
    spec = importlib.util.spec_from_file_location("artifact_under_test", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def save_loop(n: int, seed: int = 0, artifact_module: str | None = None) -> dict[str, Any]:
    """Kill a saving child `n` times; classify every load that follows."""
    from dsas.artifact import content_hash

    art = _load_module(artifact_module)
    rng = random.Random(seed)
    pair = [_artifact(1), _artifact(2)]
    counts = {"kills": 0, "loaded_A": 0, "loaded_B": 0, "hybrids": 0, "errors": 0, "stray_after_next_save": 0}
    counts["stray_at_kill"] = 0
    with tempfile.TemporaryDirectory(prefix="dsas-kill-save-") as d:
        want = []
        for k, p in enumerate(pair):  # the reference: each steerer saved once and read back, undisturbed
            art.write_artifact(Path(d) / f"ref{k}", *p)
            want.append(content_hash(*art.read_artifact(Path(d) / f"ref{k}")))
        folder = Path(d) / "steerer"
        art.write_artifact(folder, *pair[0])
        t = time.perf_counter()
        for i in range(6):
            art.write_artifact(folder, *pair[i % 2])
        save_s = (time.perf_counter() - t) / 6
        for _ in range(n):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: save A, B, A, ... until killed
                os.close(r)
                os.write(w, b"go")
                k = 1
                while True:
                    art.write_artifact(folder, *pair[k % 2])
                    k += 1
            os.close(w)
            os.read(r, 2)
            os.close(r)
            time.sleep(rng.uniform(0.0, 3 * save_s))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            counts["kills"] += 1
            names = {p.name for p in folder.iterdir()}
            counts["stray_at_kill"] += bool(names - {art.CONFIG_NAME, art.TENSORS_NAME})
            try:
                h = content_hash(*art.read_artifact(folder))
            except Exception:
                counts["errors"] += 1
            else:
                if h == want[0]:
                    counts["loaded_A"] += 1
                elif h == want[1]:
                    counts["loaded_B"] += 1
                else:
                    counts["hybrids"] += 1
            art.write_artifact(folder, *pair[rng.randrange(2)])
            names = {p.name for p in folder.iterdir()}
            counts["stray_after_next_save"] += bool(names - {art.CONFIG_NAME, art.TENSORS_NAME})
    counts["save_ms"] = round(save_s * 1e3, 2)
    return counts


class _Tok:
    """The tokenizer surface a sweep's evaluation hash reads; the stand-in evaluation needs no more."""

    def get_vocab(self) -> dict[str, int]:
        return {"a": 0, "b": 1}


def _sweep_child(
    folder: Path, steerers: dict[str, Any], grid: dict[str, list[float]], w: int, rng_seed: int
) -> None:
    import dsas.sweep as sw

    rng = random.Random(rng_seed)

    def fake_eval(model: Any, tok: Any, st: Any, strength: float, data: Any, cfg: Any) -> dict[str, Any]:
        os.write(w, f"C {None if st is None else st.config['seed']} {strength:g}\n".encode())
        time.sleep(rng.uniform(0.002, 0.02))
        return {"toxicity": 1 / (1 + strength), "ppl": 10 + strength, "mc_acc": None}

    def done(row: dict[str, Any]) -> None:
        os.write(w, f"D {row['steerer_hash'][:12]} {row['strength']:g} {row['toxicity']!r}\n".encode())

    sw.evaluate_point = fake_eval  # type: ignore[assignment]
    cfg = sw.EvalConfig(n_mc=0)
    data = sw.EvalData(["you a"], ["the b"], ["wiki text"])
    torch.manual_seed(0)
    sw.run_sweep(nn.Linear(4, 4), _Tok(), steerers, grid, data, cfg, folder, progress=False, on_point=done)


def _run_child(args: tuple[Any, ...], kill_after: float | None) -> list[str]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            _sweep_child(*args[:3], w, args[3])
        except BaseException as err:  # report, never fall back into the parent's loop
            os.write(w, f"X {type(err).__name__}: {err}\n".encode())
            code = 1
        os._exit(code)
    os.close(w)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    return out.decode().splitlines()


def sweep_loop(n: int, seed: int = 0) -> dict[str, Any]:
    """Kill a sweeping child `n` times at random moments; resume each run and check every stored point."""
    import dsas
    from dsas.artifact import write_artifact
    from dsas.sweep import load_points

    rng = random.Random(seed)
    counts = {"kills": 0, "points_stored_before_kill": 0, "lost": 0, "recomputed": 0, "incomplete": 0}
    counts["child_errors"] = 0
    grid_s = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    with tempfile.TemporaryDirectory(prefix="dsas-kill-sweep-") as d:
        steerers = {}
        for k, name in enumerate(("a", "b")):
            write_artifact(Path(d) / name, *_artifact(10 + k))
            steerers[name] = dsas.Steerer.load(Path(d) / name)
        grid = {name: grid_s for name in steerers}
        want_keys = ["unsteered@0"] + [f"{name}@{s:g}" for name in steerers for s in grid_s]
        for i in range(n):
            folder = Path(d) / f"run{i}"
            first = _run_child((folder, steerers, grid, rng.random()), kill_after=rng.uniform(0.0, 0.6))
            counts["kills"] += 1
            stored = {tuple(x.split()[1:]) for x in first if x.startswith("D ")}
            counts["points_stored_before_kill"] += len(stored)
            have = {
                (p["steerer_hash"][:12], f"{p['strength']:g}", repr(p["toxicity"]))
                for p in load_points(folder)
            }
            counts["lost"] += len(stored - have)
            second = _run_child((folder, steerers, grid, rng.random()), kill_after=None)
            counts["child_errors"] += sum(x.startswith("X ") for x in first + second)
            again = {tuple(x.split()[1:]) for x in second if x.startswith("D ")}
            counts["recomputed"] += len({(h, s) for h, s, _ in again} & {(h, s) for h, s, _ in stored})
            counts["incomplete"] += [p["key"] for p in load_points(folder)] != want_keys
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--saves", type=int, default=30)
    p.add_argument("--sweeps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--artifact-module", help="path of another dsas/artifact.py to run the save loop against")
    a = p.parse_args()
    if sys.platform == "win32":
        raise SystemExit("kill_loop.py needs os.fork (Linux, macOS).")
    torch.set_num_threads(1)
    t = time.perf_counter()
    report = {
        "save": save_loop(a.saves, a.seed, a.artifact_module),
        "sweep": sweep_loop(a.sweeps, a.seed) if a.sweeps else None,
    }
    report["seconds"] = round(time.perf_counter() - t, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
