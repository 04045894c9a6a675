#!/usr/bin/env bash
# The checks to run first on a new accelerator host (GPU or TPU), from the repository root:
#
#   benchmarks/accelerator_check.sh OUTDIR [PYTHON]
#
# 1. the compiled Pallas kernel of this backend against the XLA reference (the same property
#    tests that run interpreted in CI), 2. the attention benchmark (kernel vs XLA on the paper's
#    decoder and encoder shapes), 3. the base train step in bfloat16 with the XLA reference and
#    with the kernel, 4. HEAR embedding throughput. Each stage has its own time limit and log, and
#    a failing stage does not stop the next one. Figures land in OUTDIR/*.json, logs in *.log.
#    STAGES="kernel_tests train_step" runs a subset; TRAIN_BATCH sets the train-step batch.
set -uo pipefail

out=${1:?usage: benchmarks/accelerator_check.sh OUTDIR [PYTHON]}
py=${2:-python3}
batch=${TRAIN_BATCH:-128}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

stages=${STAGES:-environment kernel_tests attention train_step hear_embed}

stage() {  # stage NAME SECONDS COMMAND...: run one stage, log it, keep going on failure
  local name=$1 limit=$2
  shift 2
  [[ " $stages " == *" ${name%%:*} "* ]] || return 0
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >>"$out/${name%%:*}.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s"
  tail -n 25 "$out/$name.log"
}

stage environment 30 "$py" -c "import jax; print(jax.__version__, jax.default_backend(), jax.devices())"
stage kernel_tests 150 "$py" -m pytest -q -p no:cacheprovider tests/test_kernels_pallas.py \
  -k "not interpret and not benchmark"
stage attention 100 bash -c "'$py' benchmarks/attention.py > '$out/attention.json'"
for impl in xla pallas; do
  stage "train_step:$impl" 100 bash -c "'$py' benchmarks/train_step.py --configs base \
    --batch $batch --dtype bfloat16 --steps 10 --scan_unroll 1 --attention $impl \
    >> '$out/train_step.json'"
done
stage hear_embed 90 bash -c "'$py' benchmarks/hear_embed.py --size base --clips 10 \
  --batches 1,32 --dtypes float32,bfloat16 > '$out/hear_embed.json'"
