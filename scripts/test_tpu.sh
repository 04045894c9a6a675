#!/usr/bin/env bash
# The TPU compile checks, on any host (no TPU needed): install the `tpu` extra into .venv-tpu
# (libtpu lets XLA and Mosaic compile for TPU topologies here) and run tests_tpu/.
#   scripts/test_tpu.sh [extra pytest args]      e.g. -m "not slow", -k v5e
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh .venv-tpu test,tpu
# One process: each compile already uses every core, and libtpu's host memory adds up.
exec .venv-tpu/bin/python -m pytest tests_tpu --durations=10 "$@"
