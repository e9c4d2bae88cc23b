#!/usr/bin/env bash
# Set up .venv-vllm (if needed) and run the vLLM serving tests (tests_serving). Extra args go to pytest.
# Separate from scripts/test.sh: vLLM pins many versions and stays out of .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_vllm.sh
# One engine thread per process: the tests start engines one after another and share the machine.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests_serving "$@"
