#!/usr/bin/env bash
# Build the images from the Dockerfile without a Docker daemon (buildah), then prove the cpu
# image works: its entry point's help, an exported artifact through hear-validator, and a
# 20-step training that leaves checkpoint 20. Needs root (debootstrap, buildah's chroot
# isolation), buildah and, for the local base, debootstrap:
#   apt-get install -y buildah debootstrap
#
#   scripts/build_images.sh [--dry-run] [cpu|tpu|cuda ...]     (default: cpu)
#
# --dry-run prints the commands instead of running them. Exit status: 0 when every image was
# built and every check passed; 1 otherwise (the failing step's last lines are printed); 2 for
# bad arguments.
#
# Environment (defaults in brackets):
#   MWMAE_STORAGE_DRIVER  containers storage driver [vfs: needs no overlay support, so it works
#                         inside a container too]
#   MWMAE_STORAGE_ROOT    containers storage directory [buildah's own]
#   MWMAE_BASE_IMAGE      the Python 3.11 bookworm base [localhost/bookworm-python:base]. A
#                         localhost/ name that is missing is made with debootstrap; any other
#                         name is pulled by the build (e.g. python:3.11.11-slim-bookworm).
#   MWMAE_DEBIAN_MIRROR   where debootstrap fetches from [http://deb.debian.org/debian]
#   MWMAE_IMAGE           name of the built images, tagged with the target [localhost/mwmae]
#   MWMAE_PIP_CONF        pip.conf mounted read-only at /etc/pip.conf during the build [one
#                         merged from this host's pip configuration: its files and PIP_*
#                         variables, so a build behind a proxy or a local mirror reaches the
#                         same indexes as pip here]; "none" mounts none
#   MWMAE_CA_DIR          CA certificates mounted read-only at /etc/ssl/certs during the build
#                         [/etc/ssl/certs: a proxy's CA lives there]; "none" mounts none
#   MWMAE_TORCH_INDEX     the Dockerfile's TORCH_INDEX build argument [left to the Dockerfile,
#                         or "none" when download.pytorch.org cannot be reached from here]
# Every local path the pip configuration names (find-links, file:// indexes, constraint files)
# is mounted read-only at the same place, since pip in the build reads them there.
# The step functions run through step() and the cleanup through trap, which shellcheck misses.
# shellcheck disable=SC2329
set -euo pipefail
cd "$(dirname "$0")/.."

driver=${MWMAE_STORAGE_DRIVER:-vfs}
storage_root=${MWMAE_STORAGE_ROOT:-}
base=${MWMAE_BASE_IMAGE:-localhost/bookworm-python:base}
mirror=${MWMAE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
image=${MWMAE_IMAGE:-localhost/mwmae}
pip_conf=${MWMAE_PIP_CONF:-}
ca_dir=${MWMAE_CA_DIR:-/etc/ssl/certs}
torch_index=${MWMAE_TORCH_INDEX-auto}

usage() {
  sed -n '2,/^# is mounted read-only/p' "$0" | sed 's/^# \{0,1\}//'
}

dry_run=0
targets=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    cpu|tpu|cuda) targets+=("$arg") ;;
    *) echo "build_images.sh: unknown argument '$arg' (targets: cpu tpu cuda; --dry-run)" >&2
       exit 2 ;;
  esac
done
if [ ${#targets[@]} -eq 0 ]; then
  targets=(cpu)
fi

buildah=(buildah --storage-driver "$driver")
if [ -n "$storage_root" ]; then
  buildah+=(--root "$storage_root")
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/mwmae-images.XXXXXX")
containers=()
cleanup() {
  local c
  if [ "$dry_run" -eq 0 ]; then
    for c in ${containers[@]+"${containers[@]}"}; do
      "${buildah[@]}" rm "$c" >/dev/null 2>&1 || true
    done
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# Prints a command as a shell would read it back, then runs it unless this is a dry run.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [ "$dry_run" -eq 0 ]; then
    "$@"
  fi
}

summary=()
failed=0
now() { date +%s; }

# step NAME LOG CMD...: runs CMD (errexit on) with its output in LOG and sets step_status; on
# failure prints LOG's tail. Never call it as a condition: bash would then ignore errexit in CMD.
step_status=0
step() {
  local name=$1 log=$2 start took
  shift 2
  start=$(now)
  echo "==> $name"
  set +e
  if [ "$dry_run" -eq 1 ]; then
    (set -e; "$@")
  else
    (set -e; "$@") >"$log" 2>&1
  fi
  step_status=$?
  set -e
  took=$(($(now) - start))
  if [ "$dry_run" -eq 1 ]; then
    echo "<== $name: (dry run)"
  elif [ "$step_status" -eq 0 ]; then
    echo "<== $name: ok (${took} s)"
    summary+=("$(printf '%-40s ok      %5d s' "$name" "$took")")
  else
    echo "<== $name: FAILED (exit $step_status, ${took} s); its last lines:"
    tail -n 40 "$log" | sed 's/^/    /'
    summary+=("$(printf '%-40s FAILED  %5d s' "$name" "$took")")
    failed=1
  fi
}

# ---- the base: Debian bookworm's Python 3.11, made here when it is a local name ----

base_ctr="mwmae-base-$$"
make_base() {
  local rootfs=$work/rootfs ctr=$base_ctr
  run debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$mirror"
  # Package caches only make every layer above bigger.
  run find "$rootfs/var/cache/apt" "$rootfs/var/lib/apt/lists" -type f -delete
  run tar -C "$rootfs" -cf "$work/rootfs.tar" .
  run rm -rf "$rootfs"
  run "${buildah[@]}" from --name "$ctr" scratch
  run "${buildah[@]}" add "$ctr" "$work/rootfs.tar" /
  run "${buildah[@]}" config --cmd /bin/bash --env LANG=C.UTF-8 "$ctr"
  run "${buildah[@]}" commit --rm "$ctr" "$base"
  run rm -f "$work/rootfs.tar"
}

base_present() {
  [ "$dry_run" -eq 0 ] && "${buildah[@]}" inspect --type image "$base" >/dev/null 2>&1
}

if [[ "$base" != localhost/* ]]; then
  echo "base $base: pulled by the build"
elif base_present; then
  echo "base $base: present, reused"
  summary+=("$(printf '%-40s reused  %5d s' "base $base" 0)")
elif [ "$dry_run" -eq 1 ]; then
  echo "base $base: made when missing with"
  make_base
else
  containers+=("$base_ctr")
  step "base $base" "$work/base.log" make_base
  if [ "$step_status" -ne 0 ]; then
    exit 1
  fi
fi

# ---- what pip in the build needs from this host ----

# The host's pip configuration, files and PIP_* variables merged as pip itself sees them.
host_pip_conf() {
  python3 - "$1" <<'EOF'
import ast, subprocess, sys
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                        text=True).stdout
sections: dict[str, dict[str, str]] = {}
env: dict[str, str] = {}
for line in listed.splitlines():
    key, _, value = line.partition("=")
    section, _, option = key.rpartition(".")
    if not option or not value:
        continue
    value = ast.literal_eval(value)
    if section == ":env:":  # variables beat files: applied last
        env[option] = value
    else:
        sections.setdefault(section, {})[option] = value
sections.setdefault("global", {}).update(env)
with open(sys.argv[1], "w") as f:
    for section, options in sections.items():
        if options:
            f.write(f"[{section}]\n")
            for option, value in options.items():
                f.write(f"{option} = {value.replace(chr(10), chr(10) + '    ')}\n")
EOF
}

mounts=()
mounted=()
mount_ro() {  # SOURCE [TARGET]
  local target=${2:-$1} m
  for m in ${mounted[@]+"${mounted[@]}"}; do
    if [ "$target" = "$m" ] || [[ "$target" == "$m"/* ]]; then
      return 0
    fi
  done
  mounted+=("$target")
  mounts+=(-v "$1:$target:ro")
}

if [ "$ca_dir" != none ] && [ -d "$ca_dir" ]; then
  mount_ro "$ca_dir" /etc/ssl/certs
fi
if [ -z "$pip_conf" ]; then
  pip_conf=$work/pip.conf
  if command -v python3 >/dev/null 2>&1; then
    host_pip_conf "$pip_conf"
  fi
  if [ ! -s "$pip_conf" ]; then
    pip_conf=none
  fi
fi
if [ "$pip_conf" != none ]; then
  mount_ro "$pip_conf" /etc/pip.conf
  # Local paths it names: find-links, file:// indexes, constraint files. An index's pages link
  # to files beside its simple/ folder (../../files/...), so its parent goes in whole.
  while read -r path; do
    path=${path%/}
    if [[ "$path" == */simple ]]; then
      path=${path%/simple}
    fi
    if [ -e "$path" ]; then
      mount_ro "$path"
    fi
  done < <(grep -oE '(file://)?/[^[:space:]"'"'"']+' "$pip_conf" | sed 's#^file://##' | sort -u)
fi

if [ "$torch_index" = auto ]; then
  torch_index=""
  if [ "$dry_run" -eq 0 ] && [[ " ${targets[*]} " == *" cpu "* ]] &&
     ! python3 -c 'import urllib.request as u; u.urlopen("https://download.pytorch.org/whl/cpu/", timeout=10)' \
       >/dev/null 2>&1; then
    echo "download.pytorch.org cannot be reached from here: the build takes torch from the" \
         "configured indexes (TORCH_INDEX=none)"
    torch_index=none
  fi
fi

# ---- the images ----

build() {
  local target=$1
  local args=(--build-arg "TARGET=$target" --build-arg "PYTHON_IMAGE=$base")
  if [ -n "$torch_index" ]; then
    args+=(--build-arg "TORCH_INDEX=$torch_index")
  fi
  # Docker's image format: OCI, buildah's default, has no SHELL, so buildah would drop the
  # Dockerfile's (bash, pipefail) and run every RUN with /bin/sh.
  run "${buildah[@]}" bud --isolation chroot --format docker ${mounts[@]+"${mounts[@]}"} \
    "${args[@]}" -f Dockerfile -t "$image:$target" .
}

# ---- the cpu image's checks, in one working container ----

# What each check's output must show besides its exit status 0.
declare -A proof=(
  [help]="python -m mwmae.train --config"  # the trainer's usage line
  [hear-validator]="Looks good!"
  [train-20]="^20 +complete"  # python -m mwmae.checkpoint inspect's line for step 20
)

check_help() {
  local cmd
  if [ "$dry_run" -eq 1 ]; then
    cmd=(python -m mwmae.job --helpshort)
    echo "# the image's ENTRYPOINT and CMD, as docker run IMAGE runs them:"
  else
    mapfile -t cmd < <("${buildah[@]}" inspect --type image --format \
      '{{range .OCIv1.Config.Entrypoint}}{{println .}}{{end}}{{range .OCIv1.Config.Cmd}}{{println .}}{{end}}' \
      "$image:cpu")
  fi
  run "${buildah[@]}" run --isolation chroot "$1" -- "${cmd[@]}"
}

# One line each, so that --dry-run prints them in plain shell quoting.
check_hear_validator() {
  local script="python -m mwmae.train --config configs/tiny.py --workdir /tmp/mwmae-hear"
  script+=" --config.num_train_steps=5 --config.data.num_workers=0"
  script+=" && python -m mwmae.export --workdir /tmp/mwmae-hear --out /tmp/mwmae-artifact"
  script+=" && hear-validator hear_mwmae --model /tmp/mwmae-artifact --device cpu"
  run "${buildah[@]}" run --isolation chroot "$1" -- bash -c "$script"
}

check_train_20() {
  local script="python -m mwmae.train --config configs/tiny.py --workdir /tmp/w"
  script+=" --config.num_train_steps=20 --config.data.num_workers=0"
  script+=" && python -m mwmae.checkpoint inspect /tmp/w"
  run "${buildah[@]}" run --isolation chroot "$1" -- bash -c "$script"
}

run_check() {  # CHECK CONTAINER
  local out=$work/$1.out
  "check_${1//-/_}" "$2" 2>&1 | tee "$out"
  if [ "$dry_run" -eq 0 ] && ! grep -qE "${proof[$1]}" "$out"; then
    echo "exit status 0, but the output lacks: ${proof[$1]}"
    return 1
  fi
}

image_id() {
  "${buildah[@]}" images --noheading --format '{{.ID}}' "$1" 2>/dev/null | head -n 1 || true
}

ctr="mwmae-check-$$"
for target in "${targets[@]}"; do
  replaced=""
  if [ "$dry_run" -eq 0 ]; then
    replaced=$(image_id "$image:$target")
  fi
  step "build $image:$target" "$work/build-$target.log" build "$target"
  if [ "$step_status" -ne 0 ]; then
    continue
  fi
  if [ "$dry_run" -eq 0 ]; then
    # The image this build replaced, now nameless: vfs keeps every image whole (gigabytes).
    # rmi refuses while a container or another name still uses it.
    if [ -n "$replaced" ] && [ "$replaced" != "$(image_id "$image:$target")" ]; then
      "${buildah[@]}" rmi "$replaced" >/dev/null 2>&1 || true
    fi
    size=$("${buildah[@]}" images --format '{{.Size}}' "$image:$target" | head -n 1)
    echo "image $image:$target: $size"
    summary+=("$(printf '%-40s %s' "size $image:$target" "$size")")
  fi
  if [ "$target" != cpu ]; then
    continue
  fi
  containers+=("$ctr")
  step "container $ctr" "$work/from.log" run "${buildah[@]}" from --name "$ctr" "$image:cpu"
  if [ "$step_status" -ne 0 ]; then
    continue
  fi
  for check in help hear-validator train-20; do
    step "check $check" "$work/check-$check.log" run_check "$check" "$ctr"
    if [ "$dry_run" -eq 1 ]; then
      continue
    elif [ "$step_status" -eq 0 ]; then
      # What proved it, so that a reader of this output need not open the log.
      echo "check $check: passed ($(grep -m 1 -E "${proof[$check]}" "$work/$check.out"))"
    else
      echo "check $check: FAILED"
    fi
  done
done

if [ ${#summary[@]} -gt 0 ]; then
  echo "summary:"
  printf '  %s\n' "${summary[@]}"
fi
exit "$failed"
