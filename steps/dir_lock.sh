#!/usr/bin/env bash
# Sourced by steps that write into (or read from) a directory that another run may be using.
#
#   take_dir_lock <dir> <lock-name> [<pattern> ...]
#     holds an exclusive flock on <dir>/<lock-name> until this shell and every job it started have ended
#     (they inherit the descriptor), however they end. A run holding it stops this one with one line naming
#     it. A lock that is free means no run is writing in <dir>, so the files there matching the patterns
#     (what a killed run leaves: temporaries of atomic writes, scratch files) are a dead run's: they are
#     removed, with one line saying so. A live run's files are never touched.
#   share_dir_lock <dir> <lock-name>
#     holds a shared flock on it (readers; any number at once), so no writer starts while they read.
#
# A clean end empties the lock files this shell wrote its name into.
dir_locks=()
take_dir_lock() {
  local dir=$1 name=$2 fd holder p f left=() names=()
  shift 2
  mkdir -p "$dir"
  exec {fd}<>"$dir/$name"
  holder=$(cat "$dir/$name")
  flock -n "$fd" ||
    { echo "$0: ERROR: $dir is in use by ${holder:-another run}; wait for it to end or stop it (lock: $dir/$name)" >&2
      exit 1; }
  for p in "$@"; do names+=(${names[@]+-o} -name "$p"); done
  if [ ${#names[@]} -gt 0 ]; then
    while IFS= read -r -d '' f; do left+=("$f"); done < <(find "$dir" -maxdepth 1 -type f \( "${names[@]}" \) -print0)
  fi
  if [ ${#left[@]} -gt 0 ]; then
    echo "$0: removing ${#left[@]} file(s) left in $dir by a run that did not finish${holder:+ ($holder)}:" \
      "$(printf '%s\n' "${left[@]##*/}" | sort | head -n 4 | paste -sd' ')$([ ${#left[@]} -gt 4 ] && echo ' ...')"
    rm -f "${left[@]}"
  fi
  echo "$0 pid $$ on host $(hostname) since $(date '+%F %T')" > "$dir/$name"
  dir_locks+=("$dir/$name")
  trap 'for f in ${dir_locks[@]+"${dir_locks[@]}"}; do : > "$f"; done' EXIT
}
share_dir_lock() {
  local dir=$1 name=$2 fd
  mkdir -p "$dir"
  exec {fd}<>"$dir/$name"
  flock -s -n "$fd" ||
    { echo "$0: ERROR: $dir is being written by $(cat "$dir/$name"); wait for it to end (lock: $dir/$name)" >&2
      exit 1; }
}
