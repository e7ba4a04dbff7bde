#!/usr/bin/env bash
# Stage 2: train a speaker network (capsv.bin.train) as one job of the launcher in --cmd, so on a
# cluster it is one job holding the GPUs. The config and data are checked here first (a typo costs
# seconds, not a place in a queue); the job's log, <exp-dir>/log/train.log, is shown as it grows.
# Training resumes from the newest checkpoint in <exp-dir>/models; the log of an earlier run is
# kept as log/train.log.<time>.
set -euo pipefail

# defaults (all can be set with --option value)
cmd=$(dirname "$0")/launch_local.sh
config=
gpus=0          # GPUs the job asks the launcher for (a Slurm launcher maps it to --gres=gpu:N)

echo "$0 $*"

help_message="usage: $0 [options] <train-data-dir> <exp-dir> [key=value ...]
e.g.: $0 --config conf/mini/cap.yaml data/synth_train exp/mini_cap train.epochs=4
options:
  --config <yaml>     training config (required)
  --cmd <launcher>    job launcher, run.pl-style (default $cmd)
  --gpus <n>          GPUs to ask the launcher for (default $gpus)"

. "$(dirname "$0")/parse_options.sh" || exit 1

if [ $# -lt 2 ] || [ -z "$config" ]; then
  echo "$help_message" >&2; exit 1
fi
data=${1%/}; dir=${2%/}; shift 2

python -m capsv.bin.train --check --config "$config" --data "$data" --exp "$dir" "$@"

mkdir -p "$dir/log"
log=$dir/log/train.log
[ -f "$log" ] && mv "$log" "$log.$(date +%Y%m%d-%H%M%S)"
$cmd --gpu "$gpus" "$log" python -m capsv.bin.train --config "$config" --data "$data" --exp "$dir" "$@" &
job=$!
# the launcher writes the log (here or on a compute node); tail follows it until the launcher ends
tail -n +1 -F --pid="$job" "$log" 2>/dev/null &
follow=$!
rc=0; wait "$job" || rc=$?
wait "$follow" || true
exit "$rc"   # on failure the launcher has named the log and shown its last lines
