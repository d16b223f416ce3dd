#!/usr/bin/env bash
# Set up .venv/ if needed, then run the main job on the embedded default data.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pipeline.demo "$@"
