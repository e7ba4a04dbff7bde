#!/usr/bin/env bash
# Local job launcher with the interface of Kaldi's run.pl, so a recipe can switch to a
# cluster launcher (slurm.pl-style) by editing conf/cmd.sh only:
#   steps/launch_local.sh [options] JOB=1:4 exp/x/log/name.JOB.log program args...
#   steps/launch_local.sh [options] exp/x/log/name.log program args...
# Each job runs `program args` with every JOB in the arguments and the log path replaced
# by the job index; all jobs run in parallel (at most --max-jobs-run at a time). A job's
# stdout and stderr go to its own log, which starts with the command line and ends with
# its exit code and time, as in Kaldi, so a failed job is found in seconds.
# Options: --max-jobs-run N (default: no limit). --mem, --gpu, --num-threads, --time
# take a value and are accepted but ignored here: they are for cluster launchers.
# An argument that is exactly a shell operator (| || && ; > >> < 2>&1) stays an
# operator, so `\|` pipes as in Kaldi; every other argument is passed quoted.
set -euo pipefail

prog=$(basename "$0")
usage="usage: $prog [--max-jobs-run N] [JOB=a:b] <log-file> <program> [args...]"

max_jobs_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --max-jobs-run) max_jobs_run=${2:?$usage}; shift 2 ;;
    --mem|--gpu|--num-threads|--time) shift; [ $# -gt 0 ] && shift ;;  # cluster-only
    --*=*) shift ;;   # --mem=4G and friends: cluster-only, ignored
    *) break ;;
  esac
done

jobvar=""; first=1; last=1
if [[ ${1:-} =~ ^([A-Za-z_][A-Za-z0-9_]*)=([0-9]+)(:([0-9]+))?$ ]]; then
  jobvar=${BASH_REMATCH[1]}; first=${BASH_REMATCH[2]}; last=${BASH_REMATCH[4]:-$first}
  shift
  if [ "$first" -gt "$last" ]; then
    echo "$prog: ERROR: empty job range $jobvar=$first:$last" >&2; exit 1
  fi
fi
if [ $# -lt 2 ]; then
  echo "$usage" >&2; exit 1
fi
logspec=$1; shift
if [ -n "$jobvar" ] && [ "$first" -ne "$last" ] && [[ $logspec != *"$jobvar"* ]]; then
  echo "$prog: ERROR: log name $logspec must contain $jobvar (one log per job)" >&2; exit 1
fi

# substitute the job index into one string (nothing to do in the non-array form)
subst() {
  if [ -n "$jobvar" ]; then printf '%s' "${1//$jobvar/$2}"; else printf '%s' "$1"; fi
}

# Run one job: header, the command through bash (for \| pipes), footer with the exit code.
run_one() {
  local id=$1 log cmd="" a start rc child
  log=$(subst "$logspec" "$id")
  for a in "${args[@]}"; do
    a=$(subst "$a" "$id")
    case "$a" in
      '|'|'||'|'&&'|';'|'>'|'>>'|'<'|'2>&1'|'2>') cmd+="$a " ;;
      *) cmd+="$(printf '%q' "$a") " ;;
    esac
  done
  mkdir -p "$(dirname "$log")"
  start=$(date +%s)
  {
    echo "# ${cmd% }"
    echo "# Started at $(date)"
    echo "#"
  } > "$log"
  rc=0
  bash -o pipefail -c "$cmd" >> "$log" 2>&1 < /dev/null &
  child=$!
  trap 'kill "$child" 2>/dev/null || true' TERM   # pass a stop on to the program
  wait "$child" || rc=$?
  [ "$rc" -gt 128 ] && wait "$child" 2>/dev/null || true   # if interrupted, let it end first
  {
    echo "# Accounting: time=$(( $(date +%s) - start )) threads=1"
    echo "# Ended (code $rc) at $(date), elapsed time $(( $(date +%s) - start )) seconds"
  } >> "$log"
  return "$rc"
}

args=("$@")
pids=()
# If we are interrupted, stop the jobs we started rather than leaving them running.
trap 'for p in ${pids[@]+"${pids[@]}"}; do kill "$p" 2>/dev/null || true; done; exit 130' INT TERM

for ((id = first; id <= last; id++)); do
  if [ "$max_jobs_run" -gt 0 ] && [ "$(jobs -pr | wc -l)" -ge "$max_jobs_run" ]; then
    wait -n || true   # a slot frees; each job's status is read from its log below
  fi
  run_one "$id" &
  pids+=($!)
done
wait || true

# The log's last line carries the job's exit code; a job killed before writing it failed.
failed=0
for ((id = first; id <= last; id++)); do
  log=$(subst "$logspec" "$id")
  if ! tail -n 1 "$log" 2>/dev/null | grep -q '^# Ended (code 0) '; then
    failed=$((failed + 1))
    if [ -n "$jobvar" ]; then
      echo "$prog: job $id failed, see $log" >&2
    else
      echo "$prog: command failed, see $log" >&2
    fi
    # the job's own last words, without our 3 header lines and the footer
    { sed '1,3d' "$log" 2>/dev/null || true; } | { grep -Ev '^# (Accounting|Ended)' || true; } |
      tail -n 5 | sed 's/^/    /' >&2
  fi
done
if [ "$failed" -gt 0 ]; then
  [ -n "$jobvar" ] && echo "$prog: $failed of $((last - first + 1)) jobs failed" >&2
  exit 1
fi
exit 0
