# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run): errors, quoting, dry-run.

PROG=${PROG:-$(basename "$0")}
DRY_RUN=0
# fd 3: the script's stdout, where dry-run commands go even from inside $(...).
exec 3>&1

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

# One word quoted so that a POSIX shell reads it back unchanged (the rules of Python's
# shlex.quote: safe words stay bare, anything else goes in single quotes).
shquote() {
  local s=$1
  if [[ -z $s ]]; then
    printf "''"
  elif [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\"\'\"\'}"
  fi
}

# All arguments quoted and joined by spaces: a command line to print or to send to a remote shell.
join_quoted() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(shquote "$word")"
  done
  printf '%s' "$out"
}

# Run a command, or with --dry-run only print it (one command per line on stdout).
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(join_quoted "$@")" >&3
    return 0
  fi
  printf '+ %s\n' "$(join_quoted "$@")" >&2
  "$@"
}

# Like run, for commands whose output the script reads: a dry run prints the command (on fd 3)
# and outputs nothing.
capture() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(join_quoted "$@")" >&3
    return 0
  fi
  "$@"
}

# An absolute form of a local path (it need not exist yet); gs:// paths pass unchanged.
abspath() {
  case $1 in
    gs://* | /*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "${1#./}" ;;
  esac
}

need_value() {
  # $1: the flag, $2: how many arguments are left (including the flag itself)
  (($2 >= 2)) || die "$1 needs a value"
}

# Print the calling script's header comment (line 2 up to `set -euo`) and exit with $1.
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}
