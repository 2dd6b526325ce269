#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package with every extra; safe to re-run.
# On a machine without an NVIDIA GPU it installs the CPU build of torch 2.13.0; override with
# TORCH_SPEC (e.g. TORCH_SPEC="torch" for the default CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if [ -z "${TORCH_SPEC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then TORCH_SPEC="torch"; else TORCH_SPEC="torch==2.13.0"; fi
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC" -e ".[dev,hf,bench]" >.venv/pip.log 2>&1 \
  || { cat .venv/pip.log; echo "setup_env.sh: pip install failed (log above)" >&2; exit 1; }
.venv/bin/python -c "import torch, fused_objectives; print('environment ready: torch', torch.__version__)"
