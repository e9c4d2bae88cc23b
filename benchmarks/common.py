"""Shared helpers of the benchmark scripts: models by name or shape, tokenizers, steerers, timing, reporting.

The scripts run unchanged on CPU and on a CUDA GPU (`--device auto` picks CUDA when there is one). Every ratio is
measured in one process with the configurations interleaved (round r runs them in an order rotated by r), so
that the load of a shared machine falls on all of them alike; tables report medians over rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SRC = os.environ.get("DSAS_SRC") or str(ROOT / "src")
"""The dsas tree the scripts import: this checkout's, or another one's `src` (DSAS_SRC=/tmp/before/src) to run
the same benchmark on an earlier version."""
sys.path.insert(0, SRC)
sys.path.insert(0, str(ROOT / "tests"))  # conftest: the tiny random-init models the tests use

import dsas  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

QWEN25_15B: dict[str, Any] = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def _dsas_modules() -> dict[str, ModuleType]:
    return {k: m for k, m in list(sys.modules.items()) if k == "dsas" or k.startswith("dsas.")}


def import_tree(src: str) -> dict[str, ModuleType]:
    """Import a second dsas tree (another checkout's `src`) into this process, for before/after timings in one
    interleaved loop: its modules are returned and the first tree's are put back. Run code of the second tree
    inside `use_tree(modules)`, so that imports made at call time resolve to that tree too."""
    import importlib

    first = _dsas_modules()
    for k in first:
        del sys.modules[k]
    sys.path.insert(0, src)
    try:
        importlib.import_module("dsas")
        for sub in ("fit", "steer", "steerer", "sites", "maps", "gates"):
            importlib.import_module(f"dsas.{sub}")
        second = _dsas_modules()
    finally:
        sys.path.remove(src)
        for k in _dsas_modules():
            del sys.modules[k]
        sys.modules.update(first)
    return second


@contextmanager
def use_tree(modules: dict[str, ModuleType] | None) -> Iterator[ModuleType]:
    """sys.modules holds `modules` (a tree from `import_tree`; None: the one imported first) inside the block;
    yields its `dsas` package."""
    if modules is None:
        yield sys.modules["dsas"]
        return
    saved = _dsas_modules()
    for k in saved:
        del sys.modules[k]
    sys.modules.update(modules)
    try:
        yield modules["dsas"]
    finally:
        modules.update(_dsas_modules())  # submodules imported inside the block stay with their tree
        for k in _dsas_modules():
            del sys.modules[k]
        sys.modules.update(saved)


def add_common_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", default=None, help="a dsas.load_model name or path (default: smollm2-135m)")
    g.add_argument("--shape", choices=["qwen2.5-1.5b", "tiny"], help="random-init model of this shape")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, fp32 on cpu), float32, bfloat16")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a loaded machine)")
    p.add_argument(
        "--out", default=None, help="JSON path (default: benchmarks/results/<script>_<model>_<dev>.json)"
    )


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return dev, dtype


def compile_config(dev: torch.device) -> Any:
    """The compiled-generate setting of every benchmark: one static graph per decode step (`fullgraph=True`,
    `dynamic=False`), CUDA graphs on CUDA, and compiled on CPU too (transformers compiles on accelerators only
    unless told)."""
    from transformers import CompileConfig

    cuda = dev.type == "cuda"
    cc = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda else "default")
    if not cuda:
        cc._compile_all_devices = True  # type: ignore[assignment]
    return cc


def model_tag(args: argparse.Namespace) -> str:
    return args.shape or args.model or "smollm2-135m"


def bpe_tokenizer(texts: list[str], vocab: int = 4096) -> Any:
    """A byte-level BPE tokenizer trained on `texts` in a second (random-init shapes have no tokenizer offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    out.padding_side = "left"
    return out


def load(args: argparse.Namespace, dev: torch.device, dtype: torch.dtype) -> tuple[Any, Any, dsas.PromptSets]:
    """(model, tokenizer, prompt sets) for --model / --shape, in eval mode on `dev`."""
    if args.shape == "tiny":
        from conftest import make_engine_sets, make_tiny_model, make_tiny_tokenizer

        tok = make_tiny_tokenizer()
        tok.padding_side = "left"
        model = make_tiny_model("llama", len(tok), layers=4, hidden=64)
        return model.to(dev, dtype).eval(), tok, make_engine_sets(32)
    sets = dsas.load_prompt_sets("toxicity", n=32)
    if args.shape == "qwen2.5-1.5b":
        import transformers as tf

        full = dsas.load_prompt_sets("toxicity")
        tok = bpe_tokenizer(
            [*full.source, *full.target, *full.control, *(t for v in full.eval.values() for t in v)]
        )
        cfg = tf.Qwen2Config(**QWEN25_15B, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(0)
        with dev:
            qwen: Any = tf.Qwen2ForCausalLM(cfg)
        return qwen.to(dtype).eval(), tok, sets
    model, tok = dsas.load_model(args.model or "smollm2-135m")
    return model.to(dev, dtype).eval(), tok, sets


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def rss_mb() -> float:
    """Resident set size of this process (Linux), MiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def environment(dev: torch.device) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(dev),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_average(),
    }
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def interleave(
    fns: dict[str, Callable[[], float | tuple[float, float]]], rounds: int, base: str | None = None
) -> dict[str, dict[str, Any]]:
    """Run every fn once per round, the order rotated each round. A fn returns its seconds, or (seconds, decode
    seconds). Per config: median time and, with `base`, the median of the per-round ratios base_time / time
    (paired, so drifting load cancels); the same for the decode seconds when the fns return them."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    decode: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            t = fns[k]()
            if isinstance(t, tuple):
                t, d = t
                decode[k].append(d)
            times[k].append(t)
    out: dict[str, dict[str, Any]] = {}
    for k in names:
        row: dict[str, Any] = {}
        for key, series in (("", times), ("decode_", decode)):
            t = series[k]
            if not t:
                continue
            row[f"{key}seconds"], row[f"{key}median_s"] = t, _median(t)
            if base is not None and len(series[base]) == len(t):
                ratios = [b / x for b, x in zip(series[base], t, strict=True)]
                row[f"{key}ratio"] = _median(ratios)
                row[f"{key}ratio_min"], row[f"{key}ratio_max"] = min(ratios), max(ratios)
        out[k] = row
    return out


def throughput(r: dict[str, Any], tokens: int) -> dict[str, Any]:
    """tokens/s and the ratios of one `interleave` row, rounded for a table (`tokens` per timed call)."""
    return {
        "tok_s": round(tokens / r["median_s"], 2),
        "ratio": round(r.get("ratio", 1.0), 4),
        "ratio_min": round(r.get("ratio_min", 1.0), 4),
        "ratio_max": round(r.get("ratio_max", 1.0), 4),
    }


def _median(x: list[float]) -> float:
    s = sorted(x)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def steerer_bytes(st: dsas.Steerer) -> int:
    """Bytes of the tensors a steerer hooks in (maps + gates of the steered sites)."""
    n = 0
    for s in st.steered:
        n += sum(t.numel() * t.element_size() for t in st.maps[s].tensors().values())
        w = st.gates[s].w
        n += 0 if w is None else w.numel() * w.element_size()
    return n


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


def result_path(args: argparse.Namespace, script: str, dev: torch.device) -> Path:
    if args.out:
        return Path(args.out)
    return RESULTS / f"{script}_{model_tag(args)}_{dev.type}.json"


class Clock:
    """Elapsed time against an optional budget, so a run on a lent machine ends in time."""

    def __init__(self, budget_s: float | None):
        self.t0 = time.perf_counter()
        self.budget = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return float("inf") if self.budget is None else self.budget - self.elapsed()
