#!/usr/bin/env bash
# One-time setup of a local virtual environment in .venv (idempotent; ~2-4 minutes on a fresh machine).
# Order matters: the CPU torch wheel first, so no dependency can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $PIP install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
fi
$PIP install -q -e ".[toxicity,diffusion,dev]" 2>&1 | grep -v "is ignored" || true
$PIP install -q --no-deps -r requirements-assets.txt 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, transformers, dsas; print(f'dsas ready: torch {torch.__version__}, transformers {transformers.__version__}')"
