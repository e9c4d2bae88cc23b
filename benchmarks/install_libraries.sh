#!/usr/bin/env bash
# Install the libraries that benchmarks/bench_libraries.py compares with, into .venv, without their dependencies
# (see requirements-libraries.txt). Benchmarks only: the package and its tests never import them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m pip install --no-deps -r benchmarks/requirements-libraries.txt
"$PY" - <<'PY'
import numpy as np

if not hasattr(np, "float_"):
    np.float_ = np.float64  # repeng 0.4.0 names it in an annotation (see bench_libraries._numpy_compat)
import pyvene  # noqa: F401
import repeng  # noqa: F401
import steering_vectors  # noqa: F401

print("steering-vectors, repeng, pyvene import")
PY
