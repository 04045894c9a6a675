#!/usr/bin/env bash
# Evaluate an exported MW-MAE artifact on HEAR tasks with hear-eval-kit (embeddings once, the
# downstream predictor over several seeds), on this host (CPU, or a GPU when JAX/torch see one).
#   launch/hear_eval.sh ARTIFACT_DIR TASKS_DIR OUT_DIR [--seeds N] [--grid faster] [...]
# Extra arguments go to `python -m mwmae.hear.evaluate` (see its --help). PYTHON selects the
# interpreter (default: python3 on PATH). Results: OUT_DIR/results.md and results.json.
set -euo pipefail

if (($# < 3)); then
  echo "usage: $0 ARTIFACT_DIR TASKS_DIR OUT_DIR [evaluate options...]" >&2
  exit 2
fi
artifact=$1
tasks_dir=$2
out=$3
shift 3
for dir in "$artifact" "$tasks_dir"; do
  if [[ ! -d $dir ]]; then
    echo "$0: $dir: no such directory" >&2
    exit 2
  fi
done
python=${PYTHON:-python3}
exec "$python" -m mwmae.hear.evaluate --artifact "$artifact" --tasks-dir "$tasks_dir" \
  --out "$out" "$@"
