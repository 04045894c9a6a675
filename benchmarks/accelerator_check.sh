#!/usr/bin/env bash
# The checks to run first on a new accelerator host (GPU or TPU), from the repository root, in
# one command of at most 10 minutes (installs included):
#
#   benchmarks/accelerator_check.sh OUTDIR [PYTHON] [--cpu-smoke]
#
# Stages and outputs: benchmarks/accelerator_kit.py (its docstring). The host needs no network:
# wheels the image lacks travel in wheels/ (benchmarks/kit_wheels.sh fills it) and are installed
# first. --cpu-smoke runs every stage at toy size on CPU (the tests do, so the kit cannot rot).
# STAGES="sweep profile" runs a subset; KIT_BUDGET_S (default 540) is the whole run's time.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${1:?usage: benchmarks/accelerator_check.sh OUTDIR [PYTHON] [--cpu-smoke]}
shift
py=python3
if [[ $# -gt 0 && $1 != --* ]]; then
  py=$1
  shift
fi
if [[ -d wheels ]] && compgen -G "wheels/*.whl" > /dev/null; then
  "$py" -m pip install --quiet --no-index --no-deps wheels/*.whl || echo "wheels: install failed"
fi
exec "$py" benchmarks/accelerator_kit.py "$out" "$@"
