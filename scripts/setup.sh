#!/usr/bin/env bash
# Create .venv/ (when absent) and install the project into it. Sourced by run.sh / test.sh.
# TORCH_SPEC picks the torch build: the default pair is a CUDA build that also runs on
# CPU; on a cluster with another CUDA, set e.g. TORCH_SPEC="torch torchvision --index-url ...".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "[setup] installing $TORCH_SPEC"
    .venv/bin/pip install --disable-pip-version-check -q $TORCH_SPEC
fi
echo "[setup] installing the project (pip install -e '.[dev]')"
.venv/bin/pip install --disable-pip-version-check -q -e ".[dev]"
export PATH="$PWD/.venv/bin:$PATH"
