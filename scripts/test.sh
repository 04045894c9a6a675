#!/usr/bin/env bash
# The README's test command: install into .venv, lint, run the default (not slow) test suite.
#   scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh .venv test,hear,demo,docs
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -m "not slow" -n 2 --durations=15 "$@"
