#!/usr/bin/env bash
# The GPU compile checks, on any host (no GPU or driver needed): install the `cuda` extra into
# .venv-gpu (the CUDA wheels let XLA, Triton and ptxas compile for an H100 here) and run
# tests_gpu/. With no arguments the slow test (the base config, minutes) is left out.
#   scripts/test_gpu.sh [extra pytest args]      e.g. -m slow, -k embed
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh .venv-gpu test,cuda
if [ "$#" -eq 0 ]; then
  set -- -m "not slow"
fi
# One process: each compile already uses every core.
exec .venv-gpu/bin/python -m pytest tests_gpu --durations=10 "$@"
