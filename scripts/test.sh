#!/usr/bin/env bash
# The README's test command: install into .venv, lint, run the default (not slow) test suite.
#   scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh .venv test,hear,demo,docs
.venv/bin/ruff check .
# --dist loadscope: a module's tests go to one worker, so its module-scoped fixtures (trained
# runs, artifacts) are built once, not once per worker. Integration runs over 30 s are marked
# slow: CI runs them after this suite (.ci/run).
exec .venv/bin/python -m pytest -m "not slow" -n 2 --dist loadscope --durations=15 "$@"
