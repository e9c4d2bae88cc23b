"""Inductor's generated code, read back: shared by tests/test_compile.py and benchmarks/bench_graph.py (which runs on
machines without pytest, so this lives outside conftest)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock


@contextmanager
def inductor_code() -> Iterator[list[str]]:
    """The modules inductor generates inside the block. Unlike `torch._inductor.utils.run_and_get_code` this
    keeps dynamo's caches (graphs compiled before stay); the FX graph cache is off so a cached graph is
    generated again."""
    import torch._inductor.config
    from torch._inductor.graph import GraphLowering

    codes: list[str] = []
    patch_save = mock.patch.object(GraphLowering, "save_output_code", codes.append)
    with patch_save, torch._inductor.config.patch(fx_graph_cache=False):
        yield codes


def kernel_launches(codes: list[str]) -> list[int]:
    """Per generated module: fused-kernel launches (C++ `cpp_fused_*` on CPU, Triton `.run(` on CUDA) and extern
    launches (matmuls, attention) in its `call`."""
    out = []
    for code in codes:
        call = code[code.find("def call(") :]
        fused = len(re.findall(r"^\s+cpp_fused_\w+\(", call, re.M)) + len(re.findall(r"\.run\(", call))
        out += [fused, len(re.findall(r"extern_kernels\.\w+\(|torch\.ops\.aten\.\w+\.default\(", call))]
    return out
