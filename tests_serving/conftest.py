"""Shared set-up of the vLLM serving tests (run in .venv-vllm by scripts/test_vllm.sh; the main suite skips them).

Three steerers fitted on the embedded SmolLM2 by `dsas fit`, once per session: CAA + DSAS with the paper's
per-site gates ("tox": scope="token"), vanilla CAA ("van", a constant gate) and CAA + DSAS with pooled gates
("pool": scope "below", a state across the sites of a pass, here with the floored, calibrated gates
of docs/concepts.md). Set DSAS_VLLM_TEST_STEERERS to a folder holding `tox/`, `van/` and `pool/` from earlier runs to skip
the fits while iterating."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PROMPTS_PER_KIND = 8


POOLED = ["scope=below", "floor=0.5", "control_fpr=0.05", "calibrate_on=tokens", "negatives=control+target"]


def _fit(out: Path, gate: str, options: list[str] | None = None) -> None:
    if (out / "dsas_config.json").is_file():
        return
    dsas_cmd = str(Path(sys.executable).parent / "dsas")
    cmd = [dsas_cmd, "fit", "--out", str(out), "--method", "caa", "--gate", gate]
    for o in options or []:
        cmd += ["--option", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=900)


@pytest.fixture(scope="session")
def steerer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = Path(os.environ.get("DSAS_VLLM_TEST_STEERERS") or tmp_path_factory.mktemp("steerers"))
    dirs = {"tox": root / "tox", "van": root / "van", "pool": root / "pool"}
    _fit(dirs["tox"], "dsas", ["scope=token"])
    _fit(dirs["van"], "none")
    _fit(dirs["pool"], "dsas", POOLED)
    return dirs


@pytest.fixture(scope="session")
def checkpoint() -> str:
    """The embedded SmolLM2's cached safetensors folder, which vLLM serves."""
    from dsas.serving.launch import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    """Toxic prompts (the DSAS gate opens) and neutral ones (it mostly stays shut)."""
    import dsas

    sets = dsas.load_prompt_sets("toxicity", n=PROMPTS_PER_KIND, seed=1)
    return [*sets.source[:PROMPTS_PER_KIND], *sets.control[:PROMPTS_PER_KIND]]


def _engine_env(steerers: dict[str, Path] | None) -> dict[str, str]:
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    if steerers is not None:
        env["DSAS_STEERERS"] = ",".join(f"{k}={v}" for k, v in steerers.items())
    return env


@pytest.fixture(scope="session")
def engine_env() -> Any:
    """Environment of a test engine (in-process engine core, one thread, small KV cache), given its steerers."""
    return _engine_env
