#!/usr/bin/env bash
# Slurm job launcher with the interface of steps/launch_local.sh (Kaldi's slurm.pl shape), so
# the recipe moves to a cluster by pointing conf/cmd.sh's variables here (conf/cmd_slurm.sh):
#   steps/launch_slurm.sh [options] JOB=1:4 exp/x/log/name.JOB.log program args...
#   steps/launch_slurm.sh [options] exp/x/log/name.log program args...
# One sbatch call per launch: an array job (--array=1-4) in the JOB= form, a plain job
# otherwise. Each job writes its own log on the compute node in launch_local.sh's format (the
# command, start time, the program's stdout+stderr, accounting and `# Ended (code N)` lines),
# so a failed job is found the same way whichever launcher ran it. Slurm's own output file goes
# to <logdir>/slurm/<name>.<jobid>_<task>.out, where a job killed by Slurm (time limit,
# memory, node failure) before writing its footer still leaves Slurm's reason.
# The launcher waits for every job, scancels them if it is interrupted, and exits 1 naming
# each failed job's log. Jobs run in the submitting directory with the caller's environment
# (--chdir, --export=ALL), so what `. ./path.sh` set up (venv, PYTHONPATH, LC_ALL) carries over.
# Options (mapped to sbatch):
#   --mem 4G -> --mem=4G      --time T -> --time=T        --num-threads N -> --cpus-per-task=N
#   --gpu N -> --gres=gpu:N (0: none)    --max-jobs-run N -> array throttle %N
#   --partition P   --account A   --sbatch-opt WORD (repeatable, passed to sbatch verbatim)
# An argument that is exactly a shell operator (| || && ; > >> < 2>&1) stays an operator, so
# `\|` pipes as in Kaldi; every other argument is passed quoted. As in Kaldi, JOB is replaced
# wherever it appears, $SLURM_JOB_ID included: use such variables in a script, not inline.
set -euo pipefail

prog=$(basename "$0")
usage="usage: $prog [--mem M] [--time T] [--gpu N] [--num-threads N] [--max-jobs-run N] [--partition P] [--account A] [--sbatch-opt WORD]... [JOB=a:b] <log-file> <program> [args...]"
die() { echo "$prog: ERROR: $*" >&2; exit 1; }

mem=""; time_limit=""; gpu=0; num_threads=""; max_jobs_run=0; partition=""; account=""
sbatch_opts=()
while [ $# -gt 0 ]; do
  case "$1" in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;   # --mem=4G is --mem 4G
    --mem|--time|--gpu|--num-threads|--max-jobs-run|--partition|--account|--sbatch-opt)
      [ $# -ge 2 ] || die "option $1 needs a value"
      case "$1" in
        --mem) mem=$2 ;;
        --time) time_limit=$2 ;;
        --gpu) gpu=$2 ;;
        --num-threads) num_threads=$2 ;;
        --max-jobs-run) max_jobs_run=$2 ;;
        --partition) partition=$2 ;;
        --account) account=$2 ;;
        --sbatch-opt) sbatch_opts+=("$2") ;;
      esac
      shift 2 ;;
    --*) die "unknown option $1 (a typo would silently lose a resource request); $usage" ;;
    *) break ;;
  esac
done
for v in gpu max_jobs_run; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "--${v//_/-} ${!v} is not a non-negative integer"
done
[ -z "$num_threads" ] || [[ $num_threads =~ ^[1-9][0-9]*$ ]] || die "--num-threads $num_threads is not a positive integer"

jobvar=""; first=1; last=1
if [[ ${1:-} =~ ^([A-Za-z_][A-Za-z0-9_]*)=([0-9]+)(:([0-9]+))?$ ]]; then
  jobvar=${BASH_REMATCH[1]}; first=${BASH_REMATCH[2]}; last=${BASH_REMATCH[4]:-$first}
  shift
  [ "$first" -le "$last" ] || die "empty job range $jobvar=$first:$last"
fi
if [ $# -lt 2 ]; then
  echo "$usage" >&2; exit 1
fi
logspec=$1; shift
if [ -n "$jobvar" ] && [ "$first" -ne "$last" ] && [[ $logspec != *"$jobvar"* ]]; then
  die "log name $logspec must contain $jobvar (one log per job)"
fi
command -v sbatch > /dev/null || die "sbatch not found: Slurm's client commands are not installed or not on PATH (use steps/launch_local.sh to run locally)"

# The command as one string, quoted as launch_local.sh does; JOB is substituted in the job itself.
cmd=""
for a in "$@"; do
  case "$a" in
    '|'|'||'|'&&'|';'|'>'|'>>'|'<'|'2>&1'|'2>') cmd+="$a " ;;
    *) cmd+="$(printf '%q' "$a") " ;;
  esac
done
cmd=${cmd% }

subst() {
  if [ -n "$jobvar" ]; then printf '%s' "${1//$jobvar/$2}"; else printf '%s' "$1"; fi
}
# Slurm's files go to <logdir>/slurm: the first directory of the log path without JOB in it.
logdir=$(dirname "$logspec")
while [ -n "$jobvar" ] && [[ $logdir == *"$jobvar"* ]]; do logdir=$(dirname "$logdir"); done
name=$(basename "$logspec"); name=${name%.log}
if [ -n "$jobvar" ]; then name=${name//.$jobvar/}; name=${name//$jobvar/}; fi
[ -n "$name" ] || name=job
qdir=$logdir/slurm
mkdir -p "$qdir"
# A log left by an earlier run must not pass for this run's result.
for ((id = first; id <= last; id++)); do
  log=$(subst "$logspec" "$id"); mkdir -p "$(dirname "$log")"; rm -f "$log"
done

# The job script: the same header/footer as launch_local.sh's run_one, run on the compute node.
script=$qdir/$name.sh
{
  echo '#!/usr/bin/env bash'
  echo "# Written by $prog for: $logspec (each array task runs it with its own $jobvar)"
  printf 'cmd=%q\nlog=%q\njobvar=%q\n' "$cmd" "$logspec" "$jobvar"
  cat <<'JOB'
if [ -n "$jobvar" ]; then
  id=${SLURM_ARRAY_TASK_ID:?not an array task}
  cmd=${cmd//$jobvar/$id}; log=${log//$jobvar/$id}
fi
mkdir -p "$(dirname "$log")"
start=$(date +%s)
{
  echo "# $cmd"
  echo "# Started at $(date)"
  echo "#"
} > "$log"
rc=0
bash -o pipefail -c "$cmd" >> "$log" 2>&1 < /dev/null &
child=$!
trap 'kill "$child" 2>/dev/null || true' TERM   # Slurm's stop (scancel, time limit) reaches the program
wait "$child" || rc=$?
[ "$rc" -gt 128 ] && wait "$child" 2>/dev/null || true   # if stopped, let it end first
{
  echo "# Accounting: time=$(( $(date +%s) - start )) threads=${SLURM_CPUS_PER_TASK:-1}"
  echo "# Ended (code $rc) at $(date), elapsed time $(( $(date +%s) - start )) seconds"
} >> "$log"
exit "$rc"
JOB
} > "$script"

opts=(--parsable --chdir="$PWD" --export=ALL --job-name="$name")
if [ -n "$jobvar" ]; then
  array=$first-$last
  [ "$max_jobs_run" -gt 0 ] && array+="%$max_jobs_run"
  opts+=(--array="$array" --output="$qdir/$name.%A_%a.out")
else
  opts+=(--output="$qdir/$name.%j.out")
fi
[ -n "$mem" ] && opts+=(--mem="$mem")
[ -n "$time_limit" ] && opts+=(--time="$time_limit")
[ -n "$num_threads" ] && opts+=(--cpus-per-task="$num_threads")
[ "$gpu" -gt 0 ] && opts+=(--gres="gpu:$gpu")
[ -n "$partition" ] && opts+=(--partition="$partition")
[ -n "$account" ] && opts+=(--account="$account")
opts+=(${sbatch_opts[@]+"${sbatch_opts[@]}"})

if ! out=$(sbatch "${opts[@]}" "$script" 2>&1 < /dev/null); then
  die "sbatch refused the submission: $(tr '\n' ' ' <<< "$out" | sed 's/ *$//')"
fi
jobid=$(tail -n 1 <<< "$out"); jobid=${jobid%%;*}   # --parsable: <id>[;cluster]
[[ $jobid =~ ^[0-9]+$ ]] || die "sbatch printed no job id: $(tr '\n' ' ' <<< "$out")"

# If we are stopped, stop the jobs too rather than leaving them queued or running.
trap 'scancel "$jobid" 2>/dev/null || true; echo "$prog: interrupted; cancelled Slurm job $jobid" >&2; exit 130' INT TERM

# Wait until every task is in a final state (or gone from the controller's memory).
# States of finished tasks are kept for the failure report: "<task> <state>" lines.
final='^(COMPLETED|CANCELLED|FAILED|TIMEOUT|NODE_FAIL|PREEMPTED|BOOT_FAIL|DEADLINE|OUT_OF_MEMORY|SPECIAL_EXIT|REVOKED)$'
states=""; polls=0; errors=0
errf=$(mktemp); trap 'rm -f "$errf"' EXIT   # squeue's complaints, apart from its list
while :; do
  if q=$(squeue -h -t all -j "$jobid" -o '%K %T' 2> "$errf"); then
    errors=0
    # done when no task is pending or running (an empty list: all purged already)
    if awk -v re="$final" 'NF == 0 { next } NF != 2 || $2 !~ re { bad = 1 } END { exit bad }' <<< "$q"; then
      states=$q; break
    fi
  elif q=$(cat "$errf"); grep -q 'Invalid job id' <<< "$q"; then
    break   # already purged by the controller (MinJobAge): the logs tell the rest
  else
    errors=$((errors + 1))   # the controller may be restarting: keep waiting, a while
    [ "$errors" -lt 60 ] || die "squeue keeps failing while waiting for job $jobid: $q"
  fi
  polls=$((polls + 1))
  sleep $(( polls < 10 ? 1 : (polls < 40 ? 3 : 10) )) & wait $! || true   # wait: traps fire at once
done
trap - INT TERM

task_state() {   # the Slurm state of one task, or "" when unknown
  local key=$1
  [ -n "$jobvar" ] || key=N/A
  awk -v k="$key" '$1 == k { print $2 }' <<< "$states"
}
ended_ok() { tail -n 1 "$1" 2>/dev/null | grep -q '^# Ended (code 0) '; }
has_footer() { grep -q '^# Ended (code' "$1" 2>/dev/null; }

# The log's last line carries the job's exit code; a job killed before writing it failed.
failed=0
for ((id = first; id <= last; id++)); do
  log=$(subst "$logspec" "$id")
  state=$(task_state "$id")
  # No footer yet although Slurm says the job succeeded (or no longer knows): a shared
  # filesystem may take a few seconds to show the log here.
  if [ "$state" = COMPLETED ] || [ -z "$state" ]; then
    for _ in 1 2 3 4 5 6 7 8 9 10; do has_footer "$log" && break; sleep 1; done
  fi
  ended_ok "$log" && continue
  failed=$((failed + 1))
  what="command"; [ -n "$jobvar" ] && what="job $id"
  echo "$prog: $what failed${state:+ (Slurm: $state)}, see $log" >&2
  # the job's own last words, without the 3 header lines and the footer
  { sed '1,3d' "$log" 2>/dev/null || true; } | { grep -Ev '^# (Accounting|Ended)' || true; } |
    tail -n 5 | sed 's/^/    /' >&2
  if ! has_footer "$log"; then
    if [ -n "$jobvar" ]; then out=$qdir/$name.${jobid}_$id.out; else out=$qdir/$name.$jobid.out; fi
    echo "$prog: it ended without a footer (killed or never started); Slurm's output: $out" >&2
    { tail -n 5 "$out" 2>/dev/null || true; } | sed 's/^/    /' >&2
  fi
done
if [ "$failed" -gt 0 ]; then
  [ -n "$jobvar" ] && echo "$prog: $failed of $((last - first + 1)) jobs of Slurm job $jobid failed" >&2
  exit 1
fi
exit 0
