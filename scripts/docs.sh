#!/usr/bin/env bash
# Build the manual as a site, strictly: a broken link or anchor, a page left out of the nav or
# any other warning fails the build. The tests that the docs' flags, config keys and modules
# exist are in the default suite (tests/test_docs.py).
#   scripts/docs.sh [SITE_DIR]        (default: a temporary folder, removed afterwards)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/mkdocs ]]; then
  .venv/bin/python -m pip install --quiet -c constraints.txt "mkdocs>=1.6,<2"
fi
site=${1:-}
if [[ -z $site ]]; then
  site=$(mktemp -d)
  trap 'rm -rf "$site"' EXIT
fi
.venv/bin/mkdocs build --strict --site-dir "$site"
echo "docs: built into $site"
