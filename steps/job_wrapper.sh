# The part of a job that both launchers share (sourced by steps/launch_local.sh, steps/launch_slurm.sh
# and the job scripts launch_slurm.sh writes): the job range and command line, the per-job log, and
# the report of a failed job. A fix to how a job is run, stopped or reported is made here, once.
#
# A job's log (Kaldi's run.pl format):
#   # <the command>
#   # Started at <date>
#   #
#   <the program's stdout and stderr>
#   # Accounting: time=<seconds> threads=<n>
#   # Ended (code <exit status>) at <date>, elapsed time <seconds> seconds
# A job started again (Slurm requeued it after a preemption or a node failure) appends a second
# header, "# Restarted at <date> (start <n>: <why>)", and its own lines and footer; the last footer
# is the job's result.

# job_range ARG: if ARG is JOB=a:b (or JOB=a), set jobvar, first, last and return 0; else return 1
# with the one-job defaults (jobvar empty, first = last = 1).
job_range() {
  jobvar=""; first=1; last=1
  [[ ${1:-} =~ ^([A-Za-z_][A-Za-z0-9_]*)=([0-9]+)(:([0-9]+))?$ ]] || return 1
  jobvar=${BASH_REMATCH[1]}; first=${BASH_REMATCH[2]}; last=${BASH_REMATCH[4]:-$first}
}

# job_command ARGS...: the command as one bash string. An argument that is exactly a shell operator
# (| || && ; > >> < 2>&1 2>) stays an operator, so `\|` pipes as in Kaldi; the others are quoted.
job_command() {
  local a cmd=""
  for a in "$@"; do
    case "$a" in
      '|'|'||'|'&&'|';'|'>'|'>>'|'<'|'2>&1'|'2>') cmd+="$a " ;;
      *) cmd+="$(printf '%q' "$a") " ;;
    esac
  done
  printf '%s' "${cmd% }"
}

# job_subst STRING ID: STRING with every $jobvar replaced by ID (unchanged without a job range)
job_subst() {
  if [ -n "$jobvar" ]; then printf '%s' "${1//$jobvar/$2}"; else printf '%s' "$1"; fi
}

# job_kill_tree SIGNAL PID: signal PID and every process below it (a pipeline under `bash -c` does
# not die with its shell), children first found, then signalled together.
job_kill_tree() {
  local sig=$1 pids=() todo=("$2") p kids
  while [ ${#todo[@]} -gt 0 ]; do
    p=${todo[0]}; todo=("${todo[@]:1}"); pids+=("$p")
    kids=$(ps -o pid= --ppid "$p" 2>/dev/null || true)
    for k in $kids; do todo+=("$k"); done
  done
  kill -s "$sig" "${pids[@]}" 2>/dev/null || true
}

# run_job LOG CMD [THREADS]: run CMD with bash (pipefail), its output in LOG between the header and
# the footer; return its exit status. INT, TERM or HUP stop the program (TERM to it and everything
# below it), and the footer still records how it ended. With JOB_RESTART=<n> (n > 0) set and LOG
# present, the log is continued rather than started anew; JOB_RESTART_WHY says why.
run_job() {
  local log=$1 cmd=$2 threads=${3:-1} start rc=0 child stopped=""
  mkdir -p "$(dirname "$log")"
  start=$(date +%s)
  if [ "${JOB_RESTART:-0}" -gt 0 ] && [ -s "$log" ]; then
    { echo "# $cmd"; echo "# Restarted at $(date) (start $((JOB_RESTART + 1)): ${JOB_RESTART_WHY:-started again})"; echo "#"; } >> "$log"
  else
    { echo "# $cmd"; echo "# Started at $(date)"; echo "#"; } > "$log"
  fi
  bash -o pipefail -c "$cmd" >> "$log" 2>&1 < /dev/null &
  child=$!
  trap 'stopped=1; job_kill_tree TERM "$child"' INT TERM HUP
  wait "$child" || rc=$?
  while [ -n "$stopped" ]; do   # a signal ended the wait, not the program: wait for the program itself
    stopped=""; rc=0; wait "$child" || rc=$?
  done
  trap - INT TERM HUP
  {
    echo "# Accounting: time=$(( $(date +%s) - start )) threads=$threads"
    echo "# Ended (code $rc) at $(date), elapsed time $(( $(date +%s) - start )) seconds"
  } >> "$log"
  return "$rc"
}

# job_ended LOG: the log's last line is a footer (the job ran to its end, well or not)
job_ended() { tail -n 1 "$1" 2>/dev/null | grep -q '^# Ended (code '; }
# job_ended_ok LOG: the job's last start ended with status 0
job_ended_ok() { tail -n 1 "$1" 2>/dev/null | grep -q '^# Ended (code 0) '; }

# job_last_words LOG [N]: the last N (5) lines the program wrote in its last start, indented
job_last_words() {
  awk -v n="${2:-5}" '
    { line[NR] = $0 }
    $0 == "#" && line[NR - 1] ~ /^# (Started|Restarted) at / { from = NR + 1 }
    END {
      k = 0
      for (i = from; i <= NR; i++) if (line[i] !~ /^# (Accounting: time=|Ended \(code )/) keep[++k] = line[i]
      for (i = (k > n ? k - n + 1 : 1); i <= k; i++) print "    " keep[i]
    }' "$1" 2>/dev/null || true
}

# job_report_failed PROG LOG ID [STATE]: the lines that say a job failed: which, where its log is,
# its last words; ID is the job index (empty for a single job), STATE the cluster's word for it
job_report_failed() {
  local prog=$1 log=$2 id=$3 state=${4:-} what=command
  [ -z "$id" ] || what="job $id"
  echo "$prog: $what failed${state:+ (Slurm: $state)}, see $log" >&2
  job_last_words "$log" >&2
}
