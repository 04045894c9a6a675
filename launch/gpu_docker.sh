#!/usr/bin/env bash
# Run the mwmae image on a GPU host with docker (NVIDIA Container Toolkit).
#
#   launch/gpu_docker.sh train  --image IMAGE --config FILE --workdir DIR [--data MANIFEST]
#                               [--gpus all|N|device=0,1] [multi-host flags] [--skip-preflight]
#                               [-- TRAINER_FLAGS]
#   launch/gpu_docker.sh export --image IMAGE --workdir DIR --out DIR [--step N]
#   launch/gpu_docker.sh eval   --image IMAGE --artifact DIR --tasks-dir DIR --out DIR
#                               [--seeds N] [--grid default|fast|faster]
#
# train: one container per host sees all of the host's GPUs (one JAX process). For several
#   hosts run it on every host with the same --coordinator HOST:PORT (host 0's address and a
#   free port) and --num-processes N, and --process-id 0..N-1; the workdir must then be gs://
#   (or, with --shared-workdir, a path every host mounts at the same place). The trainer
#   resumes from the latest checkpoint in the workdir: rerun the same command after a failure,
#   or pass --restart N to let docker restart it (detached; follow with docker logs -f NAME).
#   The preflight (the image's preflight command: devices, attention kernels, the train step,
#   input pipeline and storage) runs first, in the foreground, with the same mounts and flags; it
#   writes WORKDIR/preflight.json, and when it fails the script exits with its status and the
#   trainer does not start. It runs once per command (docker's --restart applies to the trainer
#   only); --skip-preflight starts the trainer without it.
# export: the export CLI turns a checkpoint of the workdir into an artifact under --out.
# eval: the HEAR evaluation of an exported artifact on the task folders, results under --out.
#
# Local paths are mounted into the container (data and tasks read-only): the workdir at
# /mnt/workdir, the manifest's folder at /mnt/data (shard paths inside the manifest must be
# relative to it), exports at /mnt/exports, the artifact at /mnt/artifact, tasks at /mnt/tasks,
# results at /mnt/out. gs:// paths are passed as they are; --credentials FILE mounts a service
# account key for them (GOOGLE_APPLICATION_CREDENTIALS).
#
# Config paths are inside the image (its configs/ folder, e.g. configs/tiny.py).
# Common flags: --image IMAGE (required: REGION-docker.pkg.dev/PROJECT/REPO/mwmae:cuda-TAG),
#   --name NAME (container name), --user UID:GID (default: yours, so outputs belong to you),
#   --gpus SPEC (default: all), --credentials FILE, --dry-run (print the docker command).
set -euo pipefail

PROG=gpu_docker.sh
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

(($# >= 1)) || usage 2
verb=$1
shift
case $verb in
  train | export | eval) ;;
  -h | --help | help) usage 0 ;;
  *) die "unknown verb '$verb' (train, export, eval)" ;;
esac

image="" config="" workdir="" data="" gpus=all coordinator="" num_processes="" process_id=""
shared_workdir=0 preflight=1 restart="" cname="" user="" credentials="" out="" step="" artifact=""
tasks_dir="" seeds="" grid=""
extra=()
while (($#)); do
  case $1 in
    --image) need_value "$1" $#; image=$2; shift 2 ;;
    --config) need_value "$1" $#; config=$2; shift 2 ;;
    --workdir) need_value "$1" $#; workdir=$2; shift 2 ;;
    --data) need_value "$1" $#; data=$2; shift 2 ;;
    --gpus) need_value "$1" $#; gpus=$2; shift 2 ;;
    --coordinator) need_value "$1" $#; coordinator=$2; shift 2 ;;
    --num-processes) need_value "$1" $#; num_processes=$2; shift 2 ;;
    --process-id) need_value "$1" $#; process_id=$2; shift 2 ;;
    --shared-workdir) shared_workdir=1; shift ;;
    --skip-preflight) preflight=0; shift ;;
    --restart) need_value "$1" $#; restart=$2; shift 2 ;;
    --name) need_value "$1" $#; cname=$2; shift 2 ;;
    --user) need_value "$1" $#; user=$2; shift 2 ;;
    --credentials) need_value "$1" $#; credentials=$2; shift 2 ;;
    --out) need_value "$1" $#; out=$2; shift 2 ;;
    --step) need_value "$1" $#; step=$2; shift 2 ;;
    --artifact) need_value "$1" $#; artifact=$2; shift 2 ;;
    --tasks-dir) need_value "$1" $#; tasks_dir=$2; shift 2 ;;
    --seeds) need_value "$1" $#; seeds=$2; shift 2 ;;
    --grid) need_value "$1" $#; grid=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown flag '$1' (see $PROG --help)" ;;
  esac
done

# ---- validation: everything is checked before the command runs ----
[[ -n $image ]] || die "missing --image (the cuda image, e.g. us-docker.pkg.dev/PROJECT/mwmae/mwmae:cuda-latest)"
[[ $gpus =~ ^(all|[1-9][0-9]*|device=[0-9]+(,[0-9]+)*)$ ]] ||
  die "--gpus must be all, a count or device=I,J (got '$gpus')"
[[ -z $user || $user =~ ^[0-9]+(:[0-9]+)?$ ]] || die "--user must be UID or UID:GID (got '$user')"
[[ -z $restart || $restart =~ ^[0-9]+$ ]] || die "--restart must be a number of retries (got '$restart')"
[[ -z $step || $step =~ ^[0-9]+$ ]] || die "--step must be a checkpoint step number (got '$step')"
[[ -z $seeds || $seeds =~ ^[1-9][0-9]*$ ]] || die "--seeds must be a positive number (got '$seeds')"
[[ -z $grid || $grid == faster || $grid == fast || $grid == default ]] || die "--grid must be default, fast or faster (got '$grid')"
user=${user:-$(id -u):$(id -g)}

case $verb in
  train)
    [[ -n $config ]] || die "missing --config (e.g. configs/mwmae_base_200_4x16.py)"
    [[ -n $workdir ]] || die "missing --workdir (a local folder or gs://BUCKET/PATH)"
    multi=0
    if [[ -n $coordinator || -n $num_processes || -n $process_id ]]; then
      [[ $coordinator =~ ^[^:[:space:]]+:[0-9]+$ ]] ||
        die "--coordinator must be HOST:PORT of process 0 (got '${coordinator}')"
      [[ $num_processes =~ ^[1-9][0-9]*$ ]] ||
        die "--num-processes must be a positive number with --coordinator (got '${num_processes}')"
      if [[ ! $process_id =~ ^(0|[1-9][0-9]*)$ ]] || ((process_id >= num_processes)); then
        die "--process-id must be 0..$((num_processes - 1)) (got '${process_id}')"
      fi
      ((num_processes > 1)) && multi=1
    fi
    if ((multi)) && [[ $workdir != gs://* ]] && ((!shared_workdir)); then
      die "--workdir must be on gs:// for a multi-host run (all $num_processes processes read and" \
        "write the same checkpoints); got '$workdir' (a filesystem every host mounts at the same" \
        "path: add --shared-workdir)"
    fi
    ;;
  export)
    [[ -n $workdir ]] || die "missing --workdir (the training workdir with checkpoints)"
    [[ -n $out ]] || die "missing --out (the folder for the exported artifact)"
    ;;
  eval)
    [[ -n $artifact ]] || die "missing --artifact (an exported artifact folder)"
    [[ -n $tasks_dir ]] || die "missing --tasks-dir (the HEAR task folders)"
    [[ -n $out ]] || die "missing --out (the folder for the results)"
    for path in "$artifact" "$tasks_dir"; do
      [[ $path != gs://* ]] || die "eval reads local folders; copy '$path' to this host first"
      ((DRY_RUN)) || [[ -d $path ]] || die "'$path' is not a folder"
    done
    ;;
esac

# ---- the docker command ----
# head policy named opts program (IMAGE ARGS): the preflight shares head and opts (mounts, network)
head=(docker run --gpus "$gpus" --user "$user" -e HOME=/tmp)
if [[ -n $restart ]]; then
  policy=(--detach --restart "on-failure:$restart")
else
  policy=(--rm)
fi
named=()
[[ -z $cname ]] || named=(--name "$cname")
opts=()
if [[ -n $credentials ]]; then
  opts+=(-v "$(abspath "$credentials"):/mnt/credentials.json:ro"
    -e GOOGLE_APPLICATION_CREDENTIALS=/mnt/credentials.json)
fi

# bind HOSTPATH CONTAINERPATH [ro]: mounts a local path; BOUND is the path the container sees
BOUND=""
bind() {
  if [[ $1 == gs://* ]]; then
    BOUND=$1
  else
    opts+=(-v "$(abspath "$1"):$2${3:+:$3}")
    BOUND=$2
  fi
}

args=()
case $verb in
  train)
    # host networking for the coordinator and NCCL; host IPC and unlimited locked memory for
    # NCCL's shared buffers
    opts+=(--net=host --ipc=host --ulimit memlock=-1 --ulimit stack=67108864)
    bind "$workdir" /mnt/workdir
    wd=$BOUND
    args=(--config "$config" --workdir "$wd")
    if [[ -n $data ]]; then
      if [[ $data == gs://* ]]; then
        manifest=$data
      else
        bind "$(dirname "$data")" /mnt/data ro
        datadir=$BOUND
        manifest=$datadir/$(basename "$data")
      fi
      args+=(--config.data.source=shards --config.data.train_shards="$manifest")
    fi
    if ((multi)); then
      args+=(--coordinator_address="$coordinator" --num_processes="$num_processes"
        --process_id="$process_id")
    fi
    program=("$image" "${args[@]}" "${extra[@]}")
    ;;
  export)
    bind "$workdir" /mnt/workdir ro
    wd=$BOUND
    bind "$out" /mnt/exports
    od=$BOUND
    args=(--workdir "$wd" --out "$od")
    [[ -z $step ]] || args+=(--step "$step")
    program=(--entrypoint python "$image" -m mwmae.export "${args[@]}" "${extra[@]}")
    ;;
  eval)
    bind "$artifact" /mnt/artifact ro
    ad=$BOUND
    bind "$tasks_dir" /mnt/tasks ro
    td=$BOUND
    bind "$out" /mnt/out
    od=$BOUND
    args=(--artifact "$ad" --tasks-dir "$td" --out "$od")
    [[ -z $seeds ]] || args+=(--seeds "$seeds")
    [[ -z $grid ]] || args+=(--grid "$grid")
    program=(--entrypoint python "$image" -m mwmae.hear.evaluate "${args[@]}" "${extra[@]}")
    ;;
esac

if ((!DRY_RUN)); then
  # docker creates a missing bind-mount source as root: make the output folder as the caller
  made=$out
  [[ $verb != train ]] || made=$workdir
  [[ $made == gs://* ]] || mkdir -p "$made"
fi
if [[ $verb == train ]] && ((preflight)); then
  # always --rm and in the foreground: its exit status decides whether the trainer starts
  pre=("${head[@]}" --rm)
  [[ -z $cname ]] || pre+=(--name "$cname-preflight")
  rc=0
  run "${pre[@]}" "${opts[@]}" "$image" preflight "${args[@]}" "${extra[@]}" || rc=$?
  if ((rc != 0)); then
    echo "$PROG: preflight failed (exit $rc), so the trainer was not started; its verdict is in" \
      "$workdir/preflight.json (--skip-preflight bypasses it)" >&2
    exit "$rc"
  fi
fi
run "${head[@]}" "${policy[@]}" "${named[@]}" "${opts[@]}" "${program[@]}"
