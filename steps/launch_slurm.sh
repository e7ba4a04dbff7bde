#!/usr/bin/env bash
# Slurm job launcher with the interface of steps/launch_local.sh (Kaldi's slurm.pl shape), so
# the recipe moves to a cluster by pointing conf/cmd.sh's variables here (conf/cmd_slurm.sh):
#   steps/launch_slurm.sh [options] JOB=1:4 exp/x/log/name.JOB.log program args...
#   steps/launch_slurm.sh [options] exp/x/log/name.log program args...
# One sbatch call per launch: an array job (--array=1-4) in the JOB= form, a plain job
# otherwise. Each job writes its own log on the compute node with steps/job_wrapper.sh, the code
# launch_local.sh runs its jobs with (the command, start time, the program's stdout+stderr,
# accounting and `# Ended (code N)` lines), so a failed job is found the same way whichever
# launcher ran it. Slurm's own output file, <logdir>/slurm/<name>.<jobid>[_<task>].out, starts with
# the job as Slurm sees it (scontrol show job: the CPUs, memory and GPUs it got) and keeps Slurm's
# reason when a job is killed (time limit, memory, node failure) before it writes its footer.
#
# The launcher waits for every job and exits 1 naming each failed job's log. On the way:
# - INT, TERM or HUP (Ctrl-C, kill, a dropped ssh session), whether it is inside sbatch, squeue or
#   the wait between polls, scancel the job at once and end the launcher with that signal (exit
#   status 128 + its number). A signal during sbatch cancels whatever that sbatch submitted (found by
#   the token in the job's comment).
# - A job that Slurm requeues (preemption, node failure, scontrol requeue) is followed until it
#   ends: it is submitted with --requeue, its log gains a second start, and training resumes there
#   from its newest checkpoint. A task seen PREEMPTED or NODE_FAIL counts as ended only when it has
#   stayed so for CAPSV_SLURM_REQUEUE_GRACE seconds (default 120). A job Slurm holds after a requeue
#   (REQUEUE_HOLD, SPECIAL_EXIT) would wait for a person: it is cancelled and reported failed.
# - Every controller call is bounded (CAPSV_SLURM_CALL_TIMEOUT seconds, default 60). When squeue
#   keeps failing (CAPSV_SLURM_MAX_ERRORS times in a row, default 40, about 10 minutes), the job is
#   cancelled rather than left running unwatched, and the launcher fails saying so.
# - A job id of another cluster (`--sbatch-opt --clusters=X`, sbatch printing `<id>;<cluster>`) is
#   followed and cancelled with -M <cluster>.
# Jobs run in the submitting directory with the caller's environment (--chdir, --export=ALL), so
# what `. ./path.sh` set up (venv, PYTHONPATH, LC_ALL) carries over.
# Options (mapped to sbatch):
#   --mem 4G -> --mem=4G      --time T -> --time=T        --num-threads N -> --cpus-per-task=N
#   --gpu N -> --gres=gpu:N (0: none)    --nodes M -> --nodes=M --ntasks-per-node=1
#   --cpus-per-gpu N, --mem-per-gpu M -> the same (with --gpu 0: --cpus-per-task=N, --mem=M,
#      one GPU's share, unless --num-threads / --mem say otherwise)
#   --max-jobs-run N -> array throttle %N    --partition P   --account A
#   --sbatch-opt WORD (repeatable, passed to sbatch verbatim)
# An argument that is exactly a shell operator (| || && ; > >> < 2>&1) stays an operator, so
# `\|` pipes as in Kaldi; every other argument is passed quoted. As in Kaldi, JOB is replaced
# wherever it appears, $SLURM_JOB_ID included: use such variables in a script, not inline.
set -euo pipefail

prog=$(basename "$0")
steps=$(cd "$(dirname "$0")" && pwd)
. "$steps/job_wrapper.sh"
usage="usage: $prog [--mem M] [--time T] [--gpu N] [--nodes M] [--num-threads N] [--cpus-per-gpu N] [--mem-per-gpu M] [--max-jobs-run N] [--partition P] [--account A] [--sbatch-opt WORD]... [JOB=a:b] <log-file> <program> [args...]"
die() { echo "$prog: ERROR: $*" >&2; exit 1; }

mem=""; time_limit=""; gpu=0; nodes=1; num_threads=""; cpus_per_gpu=""; mem_per_gpu=""; max_jobs_run=0
partition=""; account=""; sbatch_opts=()
while [ $# -gt 0 ]; do
  case "$1" in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;   # --mem=4G is --mem 4G
    --mem|--time|--gpu|--nodes|--num-threads|--cpus-per-gpu|--mem-per-gpu|--max-jobs-run|--partition|--account|--sbatch-opt)
      [ $# -ge 2 ] || die "option $1 needs a value"
      case "$1" in
        --mem) mem=$2 ;;
        --time) time_limit=$2 ;;
        --gpu) gpu=$2 ;;
        --nodes) nodes=$2 ;;
        --num-threads) num_threads=$2 ;;
        --cpus-per-gpu) cpus_per_gpu=$2 ;;
        --mem-per-gpu) mem_per_gpu=$2 ;;
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
for v in nodes num_threads cpus_per_gpu; do
  [ -z "${!v}" ] || [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--${v//_/-} ${!v} is not a positive integer"
done

if job_range "${1:-}"; then
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
cmd=$(job_command "$@")   # JOB is substituted in the job itself

call_timeout=${CAPSV_SLURM_CALL_TIMEOUT:-60}
requeue_grace=${CAPSV_SLURM_REQUEUE_GRACE:-120}
max_errors=${CAPSV_SLURM_MAX_ERRORS:-40}

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
  log=$(job_subst "$logspec" "$id"); mkdir -p "$(dirname "$log")"; rm -f "$log"
done

# The job script: steps/job_wrapper.sh's run_job on the compute node, continuing its log when Slurm
# starts it again after a requeue.
script=$qdir/$name.sh
{
  echo '#!/usr/bin/env bash'
  echo "# Written by $prog for: $logspec (each array task runs it with its own $jobvar)"
  printf '. %q\n' "$steps/job_wrapper.sh"
  printf 'cmd=%q\nlog=%q\njobvar=%q\n' "$cmd" "$logspec" "$jobvar"
  cat <<'JOB'
if [ -n "$jobvar" ]; then
  id=${SLURM_ARRAY_TASK_ID:?not an array task}
  cmd=$(job_subst "$cmd" "$id"); log=$(job_subst "$log" "$id")
fi
unset CAPSV_CONCURRENT_JOBS   # this job's memory and GPUs are its own, not shared with its siblings
JOB_RESTART=${SLURM_RESTART_COUNT:-0}; JOB_RESTART_WHY="Slurm requeued the job"
echo "# $(date): job $SLURM_JOB_ID, start $((JOB_RESTART + 1)), on $(hostname); the job as Slurm sees it:"
timeout 20 scontrol show job -d "$SLURM_JOB_ID" 2>&1 || true
rc=0; run_job "$log" "$cmd" "${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}" || rc=$?
exit "$rc"
JOB
} > "$script"

token="capsv-launch:$(hostname):$$:$(date +%s%N)"   # finds this launch's job if sbatch is cut short
opts=(--parsable --chdir="$PWD" --export=ALL --job-name="$name" --comment="$token" --requeue --open-mode=append)
if [ -n "$jobvar" ]; then
  array=$first-$last
  [ "$max_jobs_run" -gt 0 ] && array+="%$max_jobs_run"
  opts+=(--array="$array" --output="$qdir/$name.%A_%a.out")
else
  opts+=(--output="$qdir/$name.%j.out")
fi
[ "$nodes" -gt 1 ] && opts+=(--nodes="$nodes" --ntasks-per-node=1)
if [ "$gpu" -gt 0 ]; then
  opts+=(--gres="gpu:$gpu")
  if [ -n "$cpus_per_gpu" ]; then opts+=(--cpus-per-gpu="$cpus_per_gpu"); num_threads=""; fi
  if [ -n "$mem_per_gpu" ]; then opts+=(--mem-per-gpu="$mem_per_gpu"); mem=""; fi
else   # no GPU: one GPU's share of CPUs and memory, unless stated for the job
  num_threads=${num_threads:-$cpus_per_gpu}; mem=${mem:-$mem_per_gpu}
fi
[ -n "$mem" ] && opts+=(--mem="$mem")
[ -n "$time_limit" ] && opts+=(--time="$time_limit")
[ -n "$num_threads" ] && opts+=(--cpus-per-task="$num_threads")
[ -n "$partition" ] && opts+=(--partition="$partition")
[ -n "$account" ] && opts+=(--account="$account")
opts+=(${sbatch_opts[@]+"${sbatch_opts[@]}"})

# -M <cluster> for every controller call, once the job's cluster is known (or named in the options)
clusters=()
for ((i = 0; i < ${#sbatch_opts[@]}; i++)); do
  case ${sbatch_opts[$i]} in
    --clusters=*|-M?*) c=${sbatch_opts[$i]#--clusters=}; clusters=(-M "${c#-M}") ;;
    --clusters|-M) clusters=(-M "${sbatch_opts[$((i + 1))]:-}") ;;
  esac
done

out=$(mktemp); err=$(mktemp)
trap 'rm -f "$out" "$err"' EXIT
# From here on a signal is noted and acted on at once by the main flow: every controller call
# runs in the background and the launcher waits for it with `wait`, which a trapped signal ends.
sig=""
for s in INT TERM HUP; do trap "sig=$s" "$s"; done
call_pid=""

# ctl CMD...: run a controller command (bounded by call_timeout) into $out/$err; its status, or
# 128+n if a signal came first (then the command may still be running: see cancel_and_leave)
ctl() {
  local rc=0
  timeout "$call_timeout" "$@" > "$out" 2> "$err" < /dev/null &
  call_pid=$!
  wait "$call_pid" || rc=$?
  [ -n "$sig" ] || call_pid=""
  return "$rc"
}
oneline() { tr '\n' ' ' < "$1" | sed 's/ *$//'; }
# the ids of this user's jobs that carry this launch's token (what a cut-short sbatch submitted)
submitted_by_token() {
  { timeout 20 squeue "${clusters[@]}" -h -u "$(id -un)" -o '%F %k' 2>/dev/null < /dev/null || true; } |
    awk -v t="$token" '$2 == t { print $1 }' | sort -u | tr '\n' ' ' | sed 's/ *$//'
}

jobid=""
# Cancel what this launch submitted, say so, and end with the signal that stopped us.
cancel_and_leave() {
  trap '' INT TERM HUP   # a second Ctrl-C must not cut the cancelling short
  if [ -n "$call_pid" ]; then   # the controller call we were waiting for: stop it, keep what it said
    kill -TERM "$call_pid" 2>/dev/null || true
    wait "$call_pid" 2>/dev/null || true
  fi
  if [ -z "$jobid" ]; then   # sbatch was cut short: did it submit something? (the token says)
    jobid=$(tail -n 1 "$out" 2>/dev/null || true); jobid=${jobid%%;*}
    [[ $jobid =~ ^[0-9]+$ ]] || jobid=$(submitted_by_token)
  fi
  if [ -n "$jobid" ]; then
    # shellcheck disable=SC2086   # several ids, if the sweep found several
    if timeout 20 scancel "${clusters[@]}" $jobid 2> "$err" < /dev/null ||
        timeout 20 scancel "${clusters[@]}" $jobid 2> "$err" < /dev/null; then
      echo "$prog: interrupted (SIG$sig); cancelled Slurm job $jobid" >&2
    else
      echo "$prog: interrupted (SIG$sig); scancel $jobid failed ($(oneline "$err")): cancel it yourself" >&2
    fi
  else
    echo "$prog: interrupted (SIG$sig) before anything was submitted" >&2
  fi
  rm -f "$out" "$err"
  trap - "$sig"; kill -s "$sig" $$
  exit $((128 + $(kill -l "$sig")))   # not reached: the signal ends the launcher
}

rc=0; ctl sbatch "${opts[@]}" "$script" || rc=$?
[ -z "$sig" ] || cancel_and_leave
if [ "$rc" -ne 0 ]; then
  if [ "$rc" -eq 124 ]; then   # no answer in time: it may have submitted all the same
    echo "sbatch did not answer within ${call_timeout}s" >> "$err"
    lost=$(submitted_by_token)
    if [ -n "$lost" ]; then
      # shellcheck disable=SC2086
      timeout 20 scancel "${clusters[@]}" $lost < /dev/null 2>/dev/null || true
      echo "(it had submitted $lost; cancelled)" >> "$err"
    fi
  fi
  die "sbatch refused the submission: $(cat "$out" "$err" | tr '\n' ' ' | sed 's/ *$//')"
fi
jobid=$(tail -n 1 "$out")   # --parsable: <id>[;cluster]
if [[ $jobid == *";"* ]]; then clusters=(-M "${jobid#*;}"); jobid=${jobid%%;*}; fi
[[ $jobid =~ ^[0-9]+$ ]] || die "sbatch printed no job id: $(oneline "$out") $(oneline "$err")"

# Wait until every task is in a final state (or gone from the controller's memory).
# States of finished tasks are kept for the failure report: "<task> <state>" lines.
final='^(COMPLETED|CANCELLED|FAILED|TIMEOUT|BOOT_FAIL|DEADLINE|OUT_OF_MEMORY|REVOKED)$'
maybe_requeued='^(PREEMPTED|NODE_FAIL)$'   # ended, unless Slurm requeues it (then PENDING follows)
held='^(REQUEUE_HOLD|SPECIAL_EXIT)$'       # requeued but held: nobody would release it
declare -A since=()   # task -> when it was first seen in its PREEMPTED/NODE_FAIL state
states=""; polls=0; errors=0
while :; do
  rc=0; ctl squeue "${clusters[@]}" -h -t all -j "$jobid" -o '%K %T' || rc=$?
  [ -z "$sig" ] || cancel_and_leave
  if [ "$rc" -eq 0 ]; then
    errors=0
    q=$(grep -v '^CLUSTER: ' "$out" || true)   # -M prints the cluster's name first
    done_=1; hold=""; now=$(date +%s)
    while read -r task state; do
      [ -n "$task" ] || continue
      if [[ $state =~ $final ]]; then :
      elif [[ $state =~ $maybe_requeued ]]; then
        [ "${since[$task]+x}" ] || since[$task]=$now
        [ $((now - since[$task])) -ge "$requeue_grace" ] || done_=0
        continue
      elif [[ $state =~ $held ]]; then hold+=" $task"
      else done_=0
      fi
      unset "since[$task]"
    done <<< "$q"
    if [ -n "$hold" ]; then
      timeout 20 scancel "${clusters[@]}" "$jobid" < /dev/null 2>/dev/null || true
      echo "$prog: Slurm job $jobid holds task(s)$hold after a requeue; cancelled it (release it with scontrol release to retry)" >&2
      states=$q; break
    fi
    if [ "$done_" -eq 1 ]; then states=$q; break; fi
  elif grep -q 'Invalid job id' "$err"; then
    break   # already purged by the controller (MinJobAge): the logs tell the rest
  else
    errors=$((errors + 1))   # the controller may be restarting: keep waiting, a while
    [ "$rc" -ne 124 ] || echo "squeue did not answer within ${call_timeout}s" >> "$err"
    if [ "$errors" -ge "$max_errors" ]; then
      what="cancelled it rather than leave it running unwatched"
      timeout 20 scancel "${clusters[@]}" "$jobid" < /dev/null 2>/dev/null ||
        what="and scancel failed too: cancel it yourself (scancel ${clusters[*]} $jobid)"
      die "squeue failed $errors times in a row while waiting for Slurm job $jobid ($(oneline "$err")); $what"
    fi
  fi
  polls=$((polls + 1))
  # 1 s at first, then 3 s, 10 s, and 30 s for jobs that run for hours; the wait ends at a signal
  sleep $(( polls < 10 ? 1 : polls < 40 ? 3 : polls < 100 ? 10 : 30 )) & call_pid=$!
  wait "$call_pid" || true
  [ -z "$sig" ] || cancel_and_leave
  call_pid=""
done
for s in INT TERM HUP; do trap - "$s"; done

task_state() {   # the Slurm state of one task, or "" when unknown
  local key=$1
  [ -n "$jobvar" ] || key=N/A
  awk -v k="$key" '$1 == k { print $2 }' <<< "$states"
}

# The log's last line carries the job's exit code; a job killed before writing it failed.
failed=0
for ((id = first; id <= last; id++)); do
  log=$(job_subst "$logspec" "$id")
  state=$(task_state "$id")
  # No footer yet although Slurm says the job succeeded (or no longer knows): a shared
  # filesystem may take a few seconds to show the log here.
  if [ "$state" = COMPLETED ] || [ -z "$state" ]; then
    for _ in 1 2 3 4 5 6 7 8 9 10; do job_ended "$log" && break; sleep 1; done
  fi
  job_ended_ok "$log" && continue
  failed=$((failed + 1))
  job_report_failed "$prog" "$log" "$([ -n "$jobvar" ] && echo "$id")" "$state"
  if ! job_ended "$log"; then
    if [ -n "$jobvar" ]; then sout=$qdir/$name.${jobid}_$id.out; else sout=$qdir/$name.$jobid.out; fi
    echo "$prog: it ended without a footer (killed or never started); Slurm's output: $sout" >&2
    { tail -n 5 "$sout" 2>/dev/null || true; } | sed 's/^/    /' >&2
  fi
done
if [ "$failed" -gt 0 ]; then
  [ -n "$jobvar" ] && echo "$prog: $failed of $((last - first + 1)) jobs of Slurm job $jobid failed" >&2
  exit 1
fi
exit 0
