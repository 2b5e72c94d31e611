#!/usr/bin/env bash
# Train the GPU recipe (configs/gpu.toml) on packed sets and leave the checkpoint in parts of at
# most 15 MiB, as a GPU machine can return them. On the GPU machine, from the repo root:
#   bash scripts/train-gpu.sh [DATA_DIR=.data] [OUT_DIR=${OUT:-runs/gpu-out}] [--set section.key=value ...]
# DATA_DIR holds one folder per set with its manifest.csv; scripts/pack_sets.py writes it, and the
# one wheel the GPU image lacks (pytorch-metric-learning) to .whl/. Nothing is downloaded there.
# Back on this machine: cxr-reid checkpoint join OUT_DIR/model.pt.parts.json --out runs/gpu/model.pt
# PYTHON (default python3, the GPU image's) and RUN_DIR (default runs/gpu) may be set.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-.data}
OUT_DIR=${2:-${OUT:-runs/gpu-out}}
shift $(( $# > 2 ? 2 : $# ))
PYTHON=${PYTHON:-python3}
RUN_DIR=${RUN_DIR:-runs/gpu}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! "$PYTHON" -c "import pytorch_metric_learning" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps .whl/pytorch_metric_learning-*.whl
fi
manifests=$("$PYTHON" - "$DATA_DIR" <<'PY'
import json, pathlib, sys
print(json.dumps(sorted(str(p) for p in pathlib.Path(sys.argv[1]).glob("*/manifest.csv"))))
PY
)
[ "$manifests" != "[]" ] || { echo "no <set>/manifest.csv under $DATA_DIR" >&2; exit 2; }
mkdir -p "$OUT_DIR"
"$PYTHON" -m app.cli train --config configs/gpu.toml --output "$RUN_DIR" --no-progress \
    --set "data.manifests=$manifests" "$@" 2>&1 | tee "$OUT_DIR/train.log"
cp "$RUN_DIR/metrics.jsonl" "$OUT_DIR/"
"$PYTHON" -m app.cli checkpoint split "$RUN_DIR/model.pt" --out "$OUT_DIR"
