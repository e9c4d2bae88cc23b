#!/usr/bin/env bash
# The GPU benchmark, end to end, in one command (what was run on the lent H200/H100; see benchmarks/README.md).
# About 8-9 minutes: give the device call a 600 s limit (DEADLINE, default 570 s, bounds the last step).
#   OUT=/some/dir bash benchmarks/gpu_check.sh            # results land in $OUT (default benchmarks/results)
# Uses the machine's python3 (with torch + transformers) and this checkout's src/ on PYTHONPATH; no install.
set -u
OUT=${OUT:-benchmarks/results}
BUDGET=${BUDGET:-340}
DEADLINE=${DEADLINE:-570}
PLAN=${PLAN:-compiled:1,compiled:32,eager:1,eager:32}
CONFIGS=${CONFIGS:-unsteered,vanilla,dsas,e2e-dsas}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  2>&1 | tee -a "$OUT/gpu.txt"
# Per-site cost of the hook (seconds; HOOKS=0 skips it).
[ "${HOOKS:-1}" = 1 ] && $PY benchmarks/bench_hooks.py --device cuda --dims 1536 --batches 1,32 --tokens 1 --dtypes bfloat16 \
  --inner 500 --rounds 5 --out "$OUT/hooks_cuda.json" 2>&1 | tail -n 8
# Tokens/s: compiled phases first (the 0.98x target), then eager; phases that would start after BUDGET s are skipped.
$PY benchmarks/bench_generate.py --shape qwen2.5-1.5b --plan "$PLAN" --configs "$CONFIGS" \
  --compiled-configs unsteered,dsas --e2e-steps 10 --budget-s "$BUDGET" --phase-reserve-s 60 \
  --out "$OUT/generate_qwen2.5-1.5b_cuda.json" 2>&1 | grep -v "^Loading" | tee "$OUT/generate.log" | tail -n 60
# Where the compiled step's time goes: kernels, graph inputs, guard checks, step time without and with CUDA graphs
# (8 of the 28 layers: the per-layer structure is what counts; ~1-2 min), cut off at DEADLINE s of the script.
LEFT=$((DEADLINE - SECONDS)); [ "$LEFT" -gt 240 ] && LEFT=240
[ "$LEFT" -ge "${GRAPH_MIN_S:-60}" ] && timeout "$LEFT" $PY benchmarks/bench_graph.py --shape qwen2.5-1.5b --layers 8 --configs unsteered,dsas --cudagraphs ${GRAPH_ARGS:-} \
  --rounds 7 --out "$OUT/graph_qwen2.5-1.5b-8l_cuda.json" 2>&1 | grep -v "Warning" | tail -n 12
# Optional (PROFILE=1): host-side profile of the compiled decode loop, steered vs unsteered (3 files; ~2-3 min).
# With PROFILE=1 set HOOKS=0 (or skip the graph step) to stay within the 8 files a device call brings back.
if [ "${PROFILE:-0}" = 1 ]; then
  LEFT=$((DEADLINE - SECONDS))
  [ "$LEFT" -ge 90 ] && timeout "$LEFT" $PY benchmarks/profile_decode.py --shape qwen2.5-1.5b --new-tokens 64 \
    --out-dir "$OUT" 2>&1 | grep -v "Warning\|USDT" | tail -n 40
fi
# Optional (LIBS=1): dsas against steering-vectors / repeng / pyvene. The GPU machine has no network: copy their
# wheels into benchmarks/wheels/ first (pip download --no-deps -d benchmarks/wheels -r benchmarks/requirements-libraries.txt)
# and carry that folder.
if [ "${LIBS:-0}" = 1 ] && [ -d benchmarks/wheels ]; then
  $PY -m pip install -q --no-deps --no-index --find-links benchmarks/wheels -r benchmarks/requirements-libraries.txt
  timeout 300 $PY benchmarks/bench_libraries.py --shape qwen2.5-1.5b --batches 1,32 --rounds 3 --compile-check \
    --out "$OUT/libraries_qwen2.5-1.5b_cuda.json" 2>&1 | grep -v "Warning" | tail -n 24
fi
