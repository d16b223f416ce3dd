#!/usr/bin/env bash
# Set up .venv/ if needed, lint (ruff check + format check), then run the test suite.
# Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export WANDB_MODE=offline WANDB_SILENT=true OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q "$@"
