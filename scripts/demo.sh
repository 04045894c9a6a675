#!/usr/bin/env bash
# The README's main command: the whole system on this machine's CPU, audio to HEAR score.
#
#   scripts/demo.sh [WORKDIR]        (default runs/demo; a rerun continues from what is there)
#
# Every stage below is one documented command; read them in order to learn the system.
# Environment: PYTHON=path/to/python skips the install and uses that interpreter;
# DEMO_CLIPS (corpus size, default 1200), DEMO_STEPS (pretraining steps, default 2000),
# DEMO_TASK_CLIPS (downstream clips per class, default 60), DEMO_DEVICES (CPU devices, default 2),
# DEMO_TAG_STEPS (fine-tuning steps, default 150), DEMO_TAG_SEEDS (seeds per mode, default 3),
# DEMO_EVAL_SEEDS (hear-eval-kit probe seeds per model, default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-runs/demo}
clips=${DEMO_CLIPS:-1200}
steps=${DEMO_STEPS:-2000}
task_clips=${DEMO_TASK_CLIPS:-60}
devices=${DEMO_DEVICES:-2}
tag_steps=${DEMO_TAG_STEPS:-150}
tag_seeds=${DEMO_TAG_SEEDS:-3}
eval_seeds=${DEMO_EVAL_SEEDS:-10}

if [[ -z "${PYTHON:-}" ]]; then
  scripts/install.sh .venv hear,demo
  PYTHON=.venv/bin/python
fi
bin=$(dirname "$PYTHON")
mkdir -p "$work"
# JAX sees the CPU cores as devices (a real data-parallel mesh); no GPU memory grab, no TF logs.
export XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}"
export TF_CPP_MIN_LOG_LEVEL=3 TF_ENABLE_ONEDNN_OPTS=0 EPATH_USE_TF=false PYTHONWARNINGS=ignore

# (Functions run by stage() chain with `|| return`: set -e does not apply under `||`.)
stage() {  # stage NAME COMMAND...: run it, time it, record it in WORKDIR/timings.tsv
  local name=$1 start=$SECONDS rc=0
  shift
  printf '\n\033[1m== %s\033[0m  %s\n' "$name" "$*"
  "$@" || rc=$?
  local status=ok
  [[ $rc -eq 0 ]] || status="failed (exit $rc)"
  grep -v "^$name	" "$work/timings.tsv" 2>/dev/null >"$work/timings.tmp" || true
  printf '%s\t%s\t%s\n' "$name" "$((SECONDS - start))" "$status" >>"$work/timings.tmp"
  mv "$work/timings.tmp" "$work/timings.tsv"
  if [[ $rc -ne 0 ]]; then
    echo "demo: stage '$name' failed (exit $rc); fix it and rerun: finished stages are kept" >&2
    exit "$rc"
  fi
}

# The files of a shard set (FOLDER PREFIX -> FOLDER/PREFIX-manifest.csv): named by mwmae.data.
manifest() { "$PYTHON" -m mwmae.data.shard_set manifest "$1" "$2"; }

# 1. An unlabelled audio corpus: spoken words (eSpeak NG), melodies, glides, chords, noise.
stage corpus "$PYTHON" -m mwmae.demo.corpus "$work/corpus" --clips "$clips"

# 2. Log-mel TFRecord shards (the original record schema); finished shards are skipped. Then
#    every record is parsed back (exit status 1 on any problem; the report is JSON).
build_shards() {
  "$PYTHON" -m tfrecord_tools.build folder "$work/corpus" --out "$work/shards" \
    --shard-size 100 --workers 2 --labels-from-subfolder || return
  "$PYTHON" -m tfrecord_tools.inspect "$(manifest "$work/shards" data)" \
    >"$work/shards/inspect.json" || return
  echo "inspect: every record parses ($work/shards/inspect.json)"
}
stage shards build_shards

# 3. Pretrain with the real trainer: mesh over the CPU devices, Orbax checkpoints, TensorBoard
#    (tensorboard --logdir $work/train/tensorboard). Resumes from the newest checkpoint.
stage train "$PYTHON" -m mwmae.train --config configs/demo.py --workdir "$work/train" \
  --config.data.train_shards="$(manifest "$work/shards" data)" \
  --config.num_train_steps="$steps"

# 4. Export the encoder as an artifact, and the same network's untrained initial weights as
#    the baseline that shows what pretraining bought.
export_both() {
  # A rerun after more training replaces the previous export (identical weights are left as
  # they are); the initial weights never change, so that export needs no --overwrite.
  "$PYTHON" -m mwmae.export --workdir "$work/train" --out "$work/export" --overwrite || return
  "$PYTHON" -m mwmae.export --workdir "$work/train" --initial --out "$work/initial"
}
stage export export_both

# 5. The HEAR 2021 API check of the module that serves the artifact.
stage validate "$bin/hear-validator" hear_mwmae -m "$work/export"

# 6. A downstream task in HEAR format: spoken digits, with speakers in test unseen in train.
stage tasks "$PYTHON" -m mwmae.hear.tasks "$work/tasks" --kind digits \
  --per-class "$task_clips" --seed 1

# 7. hear-eval-kit: embeddings once, then its MLP probe over DEMO_EVAL_SEEDS seeds (mean and 95%
#    interval), for both models; the pretrained one beside the initial weights, with the overall
#    score.
evaluate_both() {
  local common=(--tasks-dir "$work/tasks" --preset demo --seeds "$eval_seeds" --grid faster
                --grid-points 1)
  "$PYTHON" -m mwmae.hear.evaluate --artifact "$work/initial" --name initial \
    --out "$work/hear/initial" "${common[@]}" || return
  "$PYTHON" -m mwmae.hear.evaluate --artifact "$work/export" --name pretrained \
    --out "$work/hear/pretrained" "${common[@]}" --compare "$work/hear/initial/results.json" \
    --overwrite
}
stage evaluate evaluate_both

# 8. Fine-tune the pretrained encoder on the digits task (its train split as labelled shards),
#    against the same network from its initial weights and a frozen-encoder linear probe (at 5x
#    the learning rate: only the head learns), each with DEMO_TAG_SEEDS seeds; every clip of the
#    test split is scored at the end. Finished runs are
#    kept and an interrupted one resumes, unless the weights or the step count changed.
finetune_all() {
  local task=$work/tasks/mwmae_digits split seed mode wd
  for split in train test; do
    "$PYTHON" -m tfrecord_tools.build hear "$task" --split "$split" --out "$work/digits" \
      --prefix "$split" --shard-size 100 --workers 1 --no-progress >/dev/null || return
  done
  # What the runs start from: the two exports' checksums and the step count.
  local key
  key="$(grep -ho '"params_sha256": "[0-9a-f]*"' "$work/export/config.json" \
         "$work/initial/config.json" | tr -d '\n') steps=$tag_steps"
  for wd in "$work"/finetune/*/; do
    if [[ -d $wd && "$(cat "$wd/demo-key" 2>/dev/null)" != "$key" ]]; then
      echo "fine-tuning afresh: $wd was made from other weights or steps"
      rm -rf "$wd"
    fi
  done
  for seed in $(seq 1 "$tag_seeds"); do
    for mode in finetuned initial probe; do
      wd=$work/finetune/$mode-$seed
      if grep -qs "\"step\": $tag_steps," "$wd/evaluations.jsonl"; then
        echo "$mode seed $seed: done ($wd)"
        continue
      fi
      mkdir -p "$wd" && echo "$key" >"$wd/demo-key"
      "$PYTHON" -m mwmae.finetune --config configs/tag.py:demo --workdir "$wd" \
        --config.init_from="$work/$([[ $mode == initial ]] && echo initial || echo export)" \
        --config.tagger.freeze_encoder="$([[ $mode == probe ]] && echo True || echo False)" \
        --config.optimizer.base_learning_rate="$([[ $mode == probe ]] && echo 0.04 || echo 0.008)" \
        --config.seed="$seed" --config.num_train_steps="$tag_steps" \
        --config.data.train_shards="$(manifest "$work/digits" train)" \
        --config.tagger.eval_shards="$(manifest "$work/digits" test)" || return
    done
  done
}
stage finetune finetune_all

# 9. Summary table + WORKDIR/demo.png (spectrograms, masks, reconstructions, loss curve, and
#    the downstream scores).
stage report "$PYTHON" -m mwmae.demo.report "$work"
echo "total $(awk -F'\t' '{s += $2} END {print s}' "$work/timings.tsv") s; picture: $work/demo.png"
