#!/usr/bin/env bash
# Local job launcher with the interface of Kaldi's run.pl, so a recipe can switch to a
# cluster launcher (slurm.pl-style) by editing conf/cmd.sh only:
#   steps/launch_local.sh [options] JOB=1:4 exp/x/log/name.JOB.log program args...
#   steps/launch_local.sh [options] exp/x/log/name.log program args...
# Each job runs `program args` with every JOB in the arguments and the log path replaced
# by the job index; all jobs run in parallel (at most --max-jobs-run at a time). A job's
# stdout and stderr go to its own log, which starts with the command line and ends with
# its exit code and time, as in Kaldi, so a failed job is found in seconds (steps/job_wrapper.sh
# writes the log, as it does for steps/launch_slurm.sh).
# Options: --max-jobs-run N (default: no limit). --mem, --gpu, --num-threads, --time, --cpus-per-gpu,
# --mem-per-gpu, --partition, --account, --sbatch-opt take a value and are accepted but ignored here:
# they are for cluster launchers. --nodes takes 1 only (several nodes need a cluster launcher).
# The jobs see CAPSV_CONCURRENT_JOBS, how many of them run at once on this machine, and so share
# its memory and GPU (capsv.resources divides the scoring cache's budget by it).
# INT, TERM or HUP stop every job (TERM to each program and what it started), wait until their logs
# are closed, and end this launcher with the same signal (exit status 128 + its number).
# An argument that is exactly a shell operator (| || && ; > >> < 2>&1) stays an
# operator, so `\|` pipes as in Kaldi; every other argument is passed quoted.
set -euo pipefail

prog=$(basename "$0")
. "$(dirname "$0")/job_wrapper.sh"
usage="usage: $prog [--max-jobs-run N] [JOB=a:b] <log-file> <program> [args...]"

max_jobs_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;   # --mem=4G is --mem 4G
    --max-jobs-run) max_jobs_run=${2:?$usage}; shift 2 ;;
    --nodes)
      [ "${2:-}" = 1 ] || { echo "$prog: ERROR: --nodes ${2:-} : jobs of several nodes need a cluster launcher (conf/cmd_slurm.sh)" >&2; exit 1; }
      shift 2 ;;
    --mem|--gpu|--num-threads|--time|--cpus-per-gpu|--mem-per-gpu|--partition|--account|--sbatch-opt)
      shift; [ $# -gt 0 ] && shift ;;   # cluster-only
    *) break ;;
  esac
done
[[ $max_jobs_run =~ ^[0-9]+$ ]] || { echo "$prog: ERROR: --max-jobs-run $max_jobs_run is not a non-negative integer" >&2; exit 1; }

if job_range "${1:-}"; then
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
cmd=$(job_command "$@")
njobs=$((last - first + 1))
concurrent=$(( max_jobs_run > 0 && max_jobs_run < njobs ? max_jobs_run : njobs ))
export CAPSV_CONCURRENT_JOBS=$concurrent

# A signal is noted here and acted on in the main flow: stop the jobs, then end with that signal.
sig=""
for s in INT TERM HUP; do trap "sig=$s" "$s"; done
pids=()
for ((id = first; id <= last; id++)); do
  while [ -z "$sig" ] && [ "$max_jobs_run" -gt 0 ] && [ "$(jobs -pr | wc -l)" -ge "$max_jobs_run" ]; do
    wait -n || true   # a slot frees (or a signal came); each job's status is read from its log below
  done
  [ -z "$sig" ] || break
  run_job "$(job_subst "$logspec" "$id")" "$(job_subst "$cmd" "$id")" &
  pids+=($!)
done
while [ -z "$sig" ] && [ -n "$(jobs -pr)" ]; do wait -n || true; done

if [ -n "$sig" ]; then
  trap '' INT TERM HUP   # a second Ctrl-C must not cut the stopping short
  for p in ${pids[@]+"${pids[@]}"}; do kill -TERM "$p" 2>/dev/null || true; done
  for p in ${pids[@]+"${pids[@]}"}; do wait "$p" 2>/dev/null || true; done
  echo "$prog: interrupted (SIG$sig); stopped the jobs it had started" >&2
  trap - "$sig"; kill -s "$sig" $$
  exit $((128 + $(kill -l "$sig")))   # not reached: the signal ends the launcher
fi
wait || true

# The log's last line carries the job's exit code; a job killed before writing it failed.
failed=0
for ((id = first; id <= last; id++)); do
  log=$(job_subst "$logspec" "$id")
  job_ended_ok "$log" && continue
  failed=$((failed + 1))
  job_report_failed "$prog" "$log" "$([ -n "$jobvar" ] && echo "$id")"
done
if [ "$failed" -gt 0 ]; then
  [ -n "$jobvar" ] && echo "$prog: $failed of $njobs jobs failed" >&2
  exit 1
fi
exit 0
