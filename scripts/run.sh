#!/usr/bin/env bash
# The main job on the embedded default data, from a fresh machine, with no network use
# beyond set-up and no file outside the repository:
#   1. write scikit-learn's digits as WebDataset shards (70% train / 30% held out),
#   2. pretrain the DIM paper's small encoder (dim_conv32, a timm model) with two views for a few minutes on CPU (configs/digits.yaml),
#   3. evaluate the frozen encoder: linear probe and k-NN on conv / fc / y, against the
#      same architecture at random init and against raw pixels; print the table and draw
#      held-out digits beside their nearest training digits (export/neighbours.png).
# Extra arguments are config overrides for pretraining, e.g. ./scripts/run.sh train.max_steps=100
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"   # cd's to the repository root
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export WANDB_SILENT=${WANDB_SILENT:-true}
start=$(date +%s)
data=${DIM_MAIN_DATA:-data/digits-main}
out=${DIM_MAIN_OUT:-runs/digits}

echo "[run] 1/3 shards: $data"
.venv/bin/python -m pipeline.prepare digits "$data" --val-fraction 0.3 --seed 0

echo "[run] 2/3 pretraining (configs/digits.yaml) -> $out"
.venv/bin/python pretrain.py --config configs/digits.yaml \
    data.train_shards="$data/train.json" data.val_shards="$data/val.json" \
    train.output_dir="$out" "$@"

echo "[run] 3/3 evaluation: probes fit on $data/train.json, scored on $data/val.json"
.venv/bin/python -m pipeline.evaluate --checkpoint "$out" \
    --train-shards "$data/train.json" --test-shards "$data/val.json" --json "$out/eval.json"

.venv/bin/python - "$out/eval.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
for probe in ("linear", "knn"):
    d, b = r["dim"]["conv"][probe], r["random_init"]["conv"][probe]
    verdict = "beats" if d > b else "does NOT beat"
    print(f"[run] conv/{probe}: DIM {100 * d:.1f}% {verdict} random init {100 * b:.1f}% "
          f"(pixels {100 * r['pixels']['pixels'][probe]:.1f}%)")
EOF
echo "[run] results: $out/eval.json, curves: $out/metrics.png, nearest neighbours: $out/export/neighbours.png, model folder + card: $out/export; total $(( $(date +%s) - start ))s"
