#!/usr/bin/env bash
# Install mwmae into a virtual environment. The Dockerfile and CI call this same script, so the
# image and the tests cannot drift apart.
#   scripts/install.sh [VENV_DIR] [EXTRAS]     (defaults: .venv test; e.g. test,hear)
# The training stack (extra `train`: JAX, Orbax, TensorFlow's event writer...) comes with any
# EXTRAS except those naming `hear-torch` without `train`: that is the JAX-free HEAR install
# (PyTorch, safetensors, numpy and the HEAR tools), e.g. `scripts/install.sh .venv-hear hear-torch`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
extras=${2:-test}
case ",$extras," in
  *,train,*) ;;
  *,hear-torch,*) ;;
  *) extras="train,$extras" ;;
esac
python=${PYTHON:-python3.11}
if ! command -v "$python" >/dev/null 2>&1; then
  python=python3
fi
version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$version" != "3.11" ]; then
  echo "mwmae needs Python 3.11 (found $version at $(command -v "$python")); set PYTHON=..." >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
# An editable install needs redoing only when what pip reads changes: skip it when the stamp of
# the last successful install matches (CI's test command then does not rebuild the package
# while another environment installs beside it).
stamp="$venv/.mwmae-installed"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)" $extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import mwmae" 2>/dev/null; then
  echo "mwmae[${extras}] is installed in $venv (pyproject.toml and constraints.txt unchanged)"
  exit 0
fi
rm -f "$stamp"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# pyproject.toml gives ranges; constraints.txt the exact versions CI and the images test.
"$venv/bin/python" -m pip install --quiet -c constraints.txt -e ".[${extras}]"
case ",$extras," in
  *,hear,* | *,hear-torch,*)
    # They pin numpy 1.19 (impossible on Python 3.11); their runtime deps are the hear extra.
    "$venv/bin/python" -m pip install --quiet --no-deps heareval==2021.1.3 hearvalidator==2021.0.2
    ;;
esac
echo "$want" >"$stamp"
echo "installed mwmae[${extras}] into $venv"
