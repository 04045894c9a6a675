#!/usr/bin/env bash
# Wheels the lent GPU host's image lacks, for its Python 3.12, into wheels/ (git-ignored; carry
# it to the host with the working tree): what `import mwmae.train` needs beyond the image's JAX,
# flax, optax, orbax, torch and friends. About 6 MB.
#   benchmarks/kit_wheels.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
rm -rf wheels && mkdir wheels
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any -d wheels \
  "ml-collections>=1.1,<2" "clu>=0.0.12,<0.1" "grain>=0.2.18,<0.3" "array-record>=0.8.6,<0.9" \
  "google-crc32c>=1.9" "portpicker>=1.6" "soundfile>=0.14"
du -sh wheels
