#!/usr/bin/env bash
# The README's main command: install into .venv and pretrain a tiny MW-MAE on synthetic
# audio-like log-mel on this machine's CPU, printing the loss per step and the checkpoint path.
#   scripts/demo.sh [WORKDIR]      (default: runs/tiny; a rerun resumes from its checkpoint)
set -euo pipefail
cd "$(dirname "$0")/.."
workdir=${1:-runs/tiny}
scripts/install.sh .venv test
exec .venv/bin/python -m mwmae.train --config configs/tiny.py --workdir "$workdir"
