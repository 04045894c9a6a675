#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM (one host or a pod slice) with gcloud.
#
#   launch/tpu_vm.sh VERB --project P --zone Z --accelerator-type v4-32 [flags] [-- TRAINER_FLAGS]
#
# Verbs:
#   create    create the TPU VM (or, with --queued, a queued resource and wait for it)
#   setup     install on every worker: --mode pip (default) copies the committed source
#             (git archive HEAD) and runs scripts/install.sh with jax[tpu]; --mode docker pulls
#             --image
#   train     start training on every worker in the background (multi-host: --worker=all and
#             --multihost); the trainer resumes from the latest checkpoint in --workdir. The
#             preflight (python -m mwmae.preflight, same flags) runs first on all workers at once
#             and writes WORKDIR/preflight.json; the trainer starts only when it exits 0
#   up        create + setup + train
#   logs      follow a worker's training log (--worker, default 0)
#   status    print each worker's state (preflight / preflight failed RC / running / done RC /
#             absent)
#   stop      stop training on every worker
#   fetch     copy the workdir (gs:// through gcloud storage) and worker 0's log to --dest
#   delete    delete the TPU VM (or the queued resource)
#   babysit   keep training going until it finishes: recreate the TPU after a preemption,
#             set it up again and restart training (which resumes); restart a crashed run; stop
#             (exit status: the preflight's) when the preflight fails, which a restart would repeat
#
# Flags:
#   --project P            Google Cloud project (required)
#   --zone Z               zone of the TPU (required)
#   --name N               TPU VM / queued resource name (default: mwmae)
#   --accelerator-type T   v2-N, v3-N, v4-N, v5p-N (N TensorCores) or v5litepod-N, v6e-N (N chips)
#   --runtime-version V    TPU software version (default: the one for the accelerator's family)
#   --spot | --preemptible spot (or legacy preemptible) capacity
#   --queued               go through a queued resource (waits for capacity)
#   --mode pip|docker      how workers get the code (default: pip)
#   --image IMAGE          the tpu image for --mode docker (REGION-docker.pkg.dev/PROJECT/REPO/mwmae:tpu-TAG)
#   --config FILE          trainer config (default: configs/mwmae_base_200_4x16.py)
#   --workdir DIR          checkpoints and logs; gs:// for a pod slice, docker mode and babysit
#   --data MANIFEST        shard manifest (gs://.../manifest.csv); default: the config's data
#   --dest DIR             where fetch copies to (default: runs/NAME)
#   --worker N|all         worker for logs (default: 0)
#   --poll SECONDS         babysit / queued-resource poll interval (default: 300)
#   --max-restarts N       babysit gives up after N restarts (default: 50)
#   --skip-preflight       start the trainer without running the preflight first
#   --dry-run              print every command instead of running it
# Everything after -- goes to the trainer (and its preflight), e.g. -- --config.mesh.preset=fsdp
set -euo pipefail

PROG=tpu_vm.sh
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

(($# >= 1)) || usage 2
verb=$1
shift
case $verb in
  create | setup | train | up | logs | status | stop | fetch | delete | babysit) ;;
  -h | --help | help) usage 0 ;;
  *) die "unknown verb '$verb' (create, setup, train, up, logs, status, stop, fetch, delete, babysit)" ;;
esac

project="" zone="" name=mwmae accel="" runtime="" capacity="" queued=0 mode=pip image=""
config=configs/mwmae_base_200_4x16.py workdir="" data="" dest="" worker=0 poll=300
max_restarts=50 preflight=1
trainer_extra=()
while (($#)); do
  case $1 in
    --project) need_value "$1" $#; project=$2; shift 2 ;;
    --zone) need_value "$1" $#; zone=$2; shift 2 ;;
    --name) need_value "$1" $#; name=$2; shift 2 ;;
    --accelerator-type) need_value "$1" $#; accel=$2; shift 2 ;;
    --runtime-version) need_value "$1" $#; runtime=$2; shift 2 ;;
    --spot) capacity=spot; shift ;;
    --preemptible) capacity=preemptible; shift ;;
    --queued) queued=1; shift ;;
    --mode) need_value "$1" $#; mode=$2; shift 2 ;;
    --image) need_value "$1" $#; image=$2; shift 2 ;;
    --config) need_value "$1" $#; config=$2; shift 2 ;;
    --workdir) need_value "$1" $#; workdir=$2; shift 2 ;;
    --data) need_value "$1" $#; data=$2; shift 2 ;;
    --dest) need_value "$1" $#; dest=$2; shift 2 ;;
    --worker) need_value "$1" $#; worker=$2; shift 2 ;;
    --poll) need_value "$1" $#; poll=$2; shift 2 ;;
    --max-restarts) need_value "$1" $#; max_restarts=$2; shift 2 ;;
    --skip-preflight) preflight=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; trainer_extra=("$@"); break ;;
    *) die "unknown flag '$1' (see $PROG --help)" ;;
  esac
done

# ---- validation: everything is checked before the first command runs ----
[[ -n $project ]] || die "missing --project (the Google Cloud project that owns the TPU)"
[[ -n $zone ]] || die "missing --zone (e.g. us-central2-b for v4)"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name '$name' is not a valid TPU name (lower-case letters, digits and dashes)"
[[ $mode == pip || $mode == docker ]] || die "--mode must be pip or docker, not '$mode'"
[[ $poll =~ ^[0-9]+$ ]] || die "--poll must be a number of seconds, not '$poll'"
[[ $max_restarts =~ ^[0-9]+$ ]] || die "--max-restarts must be a number, not '$max_restarts'"
[[ $worker =~ ^([0-9]+|all)$ ]] || die "--worker must be a worker index or 'all', not '$worker'"

needs_accel=0 needs_workdir=0
case $verb in
  create | setup | train | up | babysit | status | stop) needs_accel=1 ;;
esac
case $verb in
  train | up | babysit | fetch) needs_workdir=1 ;;
esac

hosts=1
if ((needs_accel)) || [[ -n $accel ]]; then
  [[ -n $accel ]] || die "missing --accelerator-type (e.g. v4-8, v4-32, v5litepod-16, v6e-8)"
  if [[ ! $accel =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-([0-9]+)$ ]]; then
    die "unknown accelerator type '$accel': expected v2-N, v3-N, v4-N, v5p-N (N TensorCores, a" \
      "multiple of 8) or v5litepod-N, v6e-N (N chips: 1, 4, 8, 16, ... 256)"
  fi
  family=${BASH_REMATCH[1]}
  size=$((10#${BASH_REMATCH[2]}))
  case $family in
    v2 | v3 | v4 | v5p)
      ((size >= 8 && size % 8 == 0)) ||
        die "unknown accelerator type '$accel': $family sizes are multiples of 8 (${family}-8, ${family}-16, ...)"
      hosts=$((size / 8))
      default_runtime=tpu-ubuntu2204-base
      [[ $family == v5p ]] && default_runtime=v2-alpha-tpuv5
      ;;
    v5litepod | v6e)
      ((size >= 1 && size <= 256 && (size & (size - 1)) == 0 && size != 2)) ||
        die "unknown accelerator type '$accel': $family sizes are 1, 4, 8, 16, 32, 64, 128, 256"
      hosts=1
      ((size > 8)) && hosts=$((size / 4))
      default_runtime=v2-alpha-tpuv5-lite
      [[ $family == v6e ]] && default_runtime=v2-alpha-tpuv6e
      ;;
  esac
  runtime=${runtime:-$default_runtime}
fi

if ((needs_workdir)); then
  [[ -n $workdir ]] || die "missing --workdir (gs://BUCKET/PATH: checkpoints and logs)"
  if [[ $workdir != gs://* ]]; then
    ((hosts == 1)) || die "--workdir must be on gs:// for a multi-host slice ($accel has $hosts" \
      "hosts, which must all read and write the same checkpoints); got '$workdir'"
    [[ $verb != babysit ]] || die "--workdir must be on gs:// for babysit (a recreated TPU VM" \
      "starts with an empty disk, so checkpoints must outlive it); got '$workdir'"
    [[ $mode == pip ]] || die "--workdir must be on gs:// with --mode docker (the container's" \
      "disk is not kept); got '$workdir'"
  fi
fi
if [[ $mode == docker ]] && [[ $verb == setup || $verb == train || $verb == up || $verb == babysit ]]; then
  [[ -n $image ]] || die "--mode docker needs --image (e.g. us-docker.pkg.dev/$project/mwmae/mwmae:tpu-latest)"
fi
if ((queued)) && [[ $capacity == preemptible ]]; then
  die "--preemptible does not apply to queued resources; use --spot"
fi
[[ $verb != train && $verb != up && $verb != babysit ]] || [[ -f $config ]] ||
  die "config '$config' not found (paths are relative to the repository root)"

# ---- gcloud command lines ----
zp=(--zone="$zone" --project="$project")
REMOTE_DIR=mwmae            # pip mode: the source and its .venv, under the worker's home
CONTAINER=mwmae-train       # docker mode: the training container's name
PREFLIGHT_CONTAINER=mwmae-preflight
# docker mode: a preflight job still waiting to start a trainer would start it after a stop.
STOP_DOCKER="if [ -f preflight.pid ]; then kill -- -\"\$(cat preflight.pid)\" 2> /dev/null; rm -f preflight.pid; fi; sudo docker rm -f $CONTAINER $PREFLIGHT_CONTAINER > /dev/null 2>&1"
BUNDLE=dist/mwmae-src.tar.gz

tpu_ssh() {
  # tpu_ssh WORKER REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "$name" --worker="$1" "${zp[@]}" --command="$2"
}

trainer_args() {
  local args=(--config "$config" --workdir "$workdir")
  ((hosts > 1)) && args+=(--multihost)
  [[ -z $data ]] || args+=(--config.data.source=shards --config.data.train_shards="$data")
  args+=("${trainer_extra[@]}")
  join_quoted "${args[@]}"
}

create_tpu() {
  local cap=()
  [[ -z $capacity ]] || cap=(--"$capacity")
  if ((queued)); then
    run gcloud compute tpus queued-resources create "$name" --node-id="$name" "${zp[@]}" \
      --accelerator-type="$accel" --runtime-version="$runtime" "${cap[@]}"
    wait_active
  else
    run gcloud compute tpus tpu-vm create "$name" "${zp[@]}" --accelerator-type="$accel" \
      --version="$runtime" "${cap[@]}"
  fi
}

# READY (a usable TPU VM), a transitional state, or "" when it does not exist.
tpu_state() {
  local state
  if ((queued)); then
    state=$(capture gcloud compute tpus queued-resources describe "$name" "${zp[@]}" \
      --format='value(state.state)' 2>/dev/null) || state=""
    [[ $state != ACTIVE ]] || state=READY
  else
    state=$(capture gcloud compute tpus tpu-vm describe "$name" "${zp[@]}" \
      --format='value(state)' 2>/dev/null) || state=""
  fi
  printf '%s' "$state"
}

wait_active() {
  local state
  while true; do
    state=$(tpu_state)
    ((DRY_RUN)) && return 0
    case $state in
      READY) return 0 ;;
      FAILED | SUSPENDED | "") die "queued resource $name is ${state:-gone}; see gcloud compute tpus queued-resources describe $name" ;;
    esac
    echo "$PROG: queued resource $name is $state; waiting ${poll}s" >&2
    sleep "$poll"
  done
}

delete_tpu() {
  if ((queued)); then
    run gcloud compute tpus queued-resources delete "$name" "${zp[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${zp[@]}" --quiet
  fi
}

registry_of() {
  # the registry host of an image name, when it has one (REGION-docker.pkg.dev, gcr.io, ...)
  local host=${1%%/*}
  [[ $host == *.* && $1 == */* ]] && printf '%s' "$host"
  return 0
}

setup_workers() {
  if [[ $mode == pip ]]; then
    run mkdir -p "$(dirname "$BUNDLE")"
    run git archive --format=tar.gz --prefix="$REMOTE_DIR/" -o "$BUNDLE" HEAD
    run gcloud compute tpus tpu-vm scp "$BUNDLE" "$name:mwmae-src.tar.gz" --worker=all "${zp[@]}"
    tpu_ssh all "set -e; sudo apt-get -qq update && sudo apt-get -qq install -y python3.11 python3.11-venv; rm -rf $REMOTE_DIR && tar -xzf mwmae-src.tar.gz && cd $REMOTE_DIR && PYTHON=python3.11 scripts/install.sh .venv tpu"
  else
    local registry pull
    pull="sudo docker pull $(shquote "$image")"
    registry=$(registry_of "$image")
    [[ -z $registry ]] || pull="sudo gcloud auth configure-docker $registry --quiet && $pull"
    tpu_ssh all "set -e; $pull"
  fi
}

start_training() {
  # Every worker starts its job in one --worker=all ssh that returns at once, so the preflight,
  # a multi-host program like the trainer, starts on all workers together. Its exit status goes
  # to preflight.rc (which status reads); the trainer starts only after a 0.
  local failed
  failed="echo \"mwmae: preflight exited \$rc, so the trainer was not started; its verdict is in\" $(shquote "$workdir/preflight.json")"
  if [[ $mode == pip ]]; then
    # Relative config and workdir paths mean what they mean in the repository (cwd: its copy).
    # setsid makes the job a process group of its own, which stop kills as a whole.
    local job="" train clear="rm -f train.rc preflight.rc preflight.log"
    train=".venv/bin/python -m mwmae.train $(trainer_args); echo \$? > train.rc"
    if ((preflight)); then
      # made before the job starts: status reads "preflight" from it (and no preflight.rc yet)
      clear="rm -f train.rc preflight.rc; : > preflight.log"
      # tee: the preflight's lines also open train.log, which logs follows
      job="set -o pipefail; PYTHONUNBUFFERED=1 .venv/bin/python -m mwmae.preflight $(trainer_args) 2>&1 | tee preflight.log; rc=\$?; echo \$rc > preflight.rc; if [ \$rc -ne 0 ]; then $failed; exit \$rc; fi; "
    fi
    job+=$train
    tpu_ssh all "cd $REMOTE_DIR || exit 1; $clear; setsid nohup bash -c $(shquote "$job") > train.log 2>&1 < /dev/null & echo \$! > train.pid"
  else
    local train job
    train="sudo docker run -d --name $CONTAINER --privileged --net=host $(shquote "$image") $(trainer_args)"
    if ((preflight)); then
      # The trainer container appears only once the preflight container exited 0; until then
      # status sees the job (preflight.pid) alive.
      job="sudo docker run --rm --name $PREFLIGHT_CONTAINER --privileged --net=host $(shquote "$image") preflight $(trainer_args); rc=\$?; echo \$rc > preflight.rc; if [ \$rc -ne 0 ]; then $failed; exit \$rc; fi; $train > /dev/null"
      tpu_ssh all "$STOP_DOCKER; rm -f preflight.rc preflight.log; setsid nohup bash -c $(shquote "$job") > preflight.log 2>&1 < /dev/null & echo \$! > preflight.pid"
    else
      tpu_ssh all "$STOP_DOCKER; rm -f preflight.rc preflight.log; $train"
    fi
  fi
  if ((preflight && !DRY_RUN)); then
    say "the preflight runs first on every worker ($workdir/preflight.json); the trainer starts if it passes (see: $PROG status)"
  fi
}

stop_training() {
  if [[ $mode == pip ]]; then
    tpu_ssh all "if [ -f $REMOTE_DIR/train.pid ]; then kill -- -\"\$(cat $REMOTE_DIR/train.pid)\" 2> /dev/null; rm -f $REMOTE_DIR/train.pid; fi; true"
  else
    tpu_ssh all "$STOP_DOCKER; true"
  fi
}

# Prints one line "mwmae-status: preflight | preflight failed RC | running | done RC | absent" per
# worker.
PROBE_PIP="cd $REMOTE_DIR 2> /dev/null || { echo 'mwmae-status: absent'; exit 0; }; if [ -f train.rc ]; then echo \"mwmae-status: done \$(cat train.rc)\"; elif [ -f preflight.rc ] && [ \"\$(cat preflight.rc)\" != 0 ]; then echo \"mwmae-status: preflight failed \$(cat preflight.rc)\"; elif [ -f train.pid ] && kill -0 -- -\"\$(cat train.pid)\" 2> /dev/null; then if [ -f preflight.log ] && [ ! -f preflight.rc ]; then echo 'mwmae-status: preflight'; else echo 'mwmae-status: running'; fi; else echo 'mwmae-status: absent'; fi"
PROBE_DOCKER="if [ -f preflight.rc ] && [ \"\$(cat preflight.rc)\" != 0 ]; then echo \"mwmae-status: preflight failed \$(cat preflight.rc)\"; exit 0; fi; s=\$(sudo docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' $CONTAINER 2> /dev/null) || { if [ -f preflight.pid ] && kill -0 \"\$(cat preflight.pid)\" 2> /dev/null; then echo 'mwmae-status: preflight'; else echo 'mwmae-status: absent'; fi; exit 0; }; case \$s in running*) echo 'mwmae-status: running' ;; exited*) echo \"mwmae-status: done \${s#* }\" ;; *) echo 'mwmae-status: absent' ;; esac"

probe() {
  local cmd=$PROBE_PIP
  [[ $mode == pip ]] || cmd=$PROBE_DOCKER
  if ((DRY_RUN)); then
    tpu_ssh all "$cmd"
  else
    gcloud compute tpus tpu-vm ssh "$name" --worker=all "${zp[@]}" --command="$cmd" 2>/dev/null |
      grep '^mwmae-status: ' | sed 's/^mwmae-status: //' || true
  fi
}

follow_logs() {
  if [[ $mode == pip ]]; then
    tpu_ssh "$worker" "tail -n +1 -F $REMOTE_DIR/train.log"
  else
    # the preflight's output until its job ends, then the trainer's
    tpu_ssh "$worker" "if [ -f preflight.pid ]; then tail -n +1 -F --pid=\"\$(cat preflight.pid)\" preflight.log 2> /dev/null; fi; sudo docker logs -f $CONTAINER"
  fi
}

fetch_results() {
  local to=${dest:-runs/$name}
  run mkdir -p "$to"
  if [[ $workdir == gs://* ]]; then
    run gcloud storage rsync --recursive "$workdir" "$to/workdir"
  else
    local remote=$workdir
    [[ $remote == /* ]] || remote=$REMOTE_DIR/$remote
    run gcloud compute tpus tpu-vm scp --recurse "$name:$remote" "$to/workdir" --worker=0 "${zp[@]}"
  fi
  if [[ $mode == docker ]]; then
    tpu_ssh 0 "sudo docker logs $CONTAINER > train.log 2>&1"
    run gcloud compute tpus tpu-vm scp "$name:train.log" "$to/train.log" --worker=0 "${zp[@]}"
  else
    run gcloud compute tpus tpu-vm scp "$name:$REMOTE_DIR/train.log" "$to/train.log" --worker=0 "${zp[@]}"
  fi
  # absent after --skip-preflight
  run gcloud compute tpus tpu-vm scp "$name:$(preflight_log)" "$to/preflight.log" --worker=0 "${zp[@]}" ||
    say "no preflight.log on worker 0"
}

preflight_log() {
  if [[ $mode == pip ]]; then printf '%s' "$REMOTE_DIR/preflight.log"; else printf preflight.log; fi
}

# Stop everything and exit with the preflight's status: on a healthy TPU a restart would only
# run the same failing checks again.
preflight_failed() {
  local count=$1 rc=$2
  [[ $rc =~ ^[1-9][0-9]*$ ]] && ((rc < 256)) || rc=1
  say "the end of worker 0's preflight.log:"
  tpu_ssh 0 "tail -n 25 $(preflight_log)" >&2 || true
  stop_training
  say "preflight failed on $count worker(s) (exit $rc); training was not started and babysit" \
    "does not retry it: the verdict is in $workdir/preflight.json (fix the cause, or rerun" \
    "with --skip-preflight)"
  exit "$rc"
}

say() { echo "$PROG: $*" >&2; }

babysit() {
  local restarts=0 state statuses total done_ok failed pre_failed pre_running
  while true; do
    state=$(tpu_state)
    if ((DRY_RUN)); then
      # One recovery round, as after a preemption: every command babysit may run.
      delete_tpu
      create_tpu
      setup_workers
      start_training
      probe
      tpu_ssh 0 "tail -n 25 $(preflight_log)"
      stop_training
      return 0
    fi
    case $state in
      READY)
        statuses=$(probe)
        total=$(grep -c . <<<"$statuses" || true)
        done_ok=$(grep -c '^done 0$' <<<"$statuses" || true)
        failed=$(grep -cE '^(done [1-9][0-9]*|absent)$' <<<"$statuses" || true)
        pre_failed=$(grep -c '^preflight failed ' <<<"$statuses" || true)
        pre_running=$(grep -c '^preflight$' <<<"$statuses" || true)
        if ((pre_failed > 0)); then
          preflight_failed "$pre_failed" "$(grep -m1 '^preflight failed ' <<<"$statuses" | cut -d' ' -f3)"
        elif ((total >= hosts && done_ok == total)); then
          say "training finished on all $total workers"
          return 0
        elif ((failed > 0)); then
          ((restarts < max_restarts)) || die "training stopped $restarts times; giving up (see: $PROG logs)"
          restarts=$((restarts + 1))
          say "training is not running on $failed worker(s); restart $restarts (resumes from the last checkpoint)"
          stop_training
          start_training
        elif ((pre_running > 0)); then
          say "preflight running on $pre_running worker(s)"
        else
          say "training running on $total worker(s)"
        fi
        ;;
      CREATING | STARTING | RESTARTING | REPAIRING | PROVISIONING | WAITING_FOR_RESOURCES | ACCEPTED | CREATING_NODE)
        say "TPU $name is $state; waiting"
        ;;
      *)
        ((restarts < max_restarts)) || die "TPU recreated $restarts times; giving up"
        restarts=$((restarts + 1))
        say "TPU $name is ${state:-gone} (preempted?); recreating it, restart $restarts"
        [[ -z $state ]] || delete_tpu
        create_tpu
        setup_workers
        start_training
        ;;
    esac
    sleep "$poll"
  done
}

case $verb in
  create) create_tpu ;;
  setup) setup_workers ;;
  train) start_training ;;
  up) create_tpu; setup_workers; start_training ;;
  logs) follow_logs ;;
  status) if ((DRY_RUN)); then probe; else probe | nl -v0 -w1 -s': worker '; fi ;;
  stop) stop_training ;;
  fetch) fetch_results ;;
  delete) delete_tpu ;;
  babysit) babysit ;;
esac
