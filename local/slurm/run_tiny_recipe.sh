#!/usr/bin/env bash
# Demo of the recipe's Slurm path on this machine: starts the single-node test cluster
# (start_local_cluster.sh, as root), then runs run.sh stages 0-4 on the tiny embedded corpus with
# local/slurm/cmd_local_cluster.sh (conf/cmd_slurm.sh sized for this 2-CPU cluster), so features
# (stage 1), training (stage 2, one GPU asked for) and scoring (stage 3) are Slurm jobs
# (steps/launch_slurm.sh). Then shows the jobs Slurm ran, their logs and the results.
#   bash local/slurm/run_tiny_recipe.sh [work-dir]      (default /tmp/capsv_slurm_demo; a few minutes)
# Everything goes under the work dir, including a tiny training config (conf/mini/cap.yaml with
# 2 epochs of 4-speaker batches); a work dir this script made earlier is cleared first.
set -euo pipefail
cd "$(dirname "$0")/../.."
prog=$(basename "$0")
work=${1:-/tmp/capsv_slurm_demo}
stamp=.capsv_slurm_demo   # marks a work dir as ours, so only ours is ever deleted

if [[ $(bash run.sh --help) != *--cmd-conf* ]]; then   # (not grep -q: pipefail and SIGPIPE)
  echo "$prog: ERROR: this run.sh has no --cmd-conf option, so it cannot use conf/cmd_slurm.sh" >&2; exit 1
fi
if [ -e "$work" ] && [ ! -e "$work/$stamp" ]; then
  echo "$prog: ERROR: $work exists and was not made by this script; give another work dir" >&2; exit 1
fi
bash local/slurm/start_local_cluster.sh

rm -rf "$work"; mkdir -p "$work/conf/mini"; touch "$work/$stamp"
work=$(cd "$work" && pwd)
. ./path.sh
python - conf/mini/cap.yaml "$work/conf/mini/cap.yaml" <<'PY'
import sys
import yaml
with open(sys.argv[1]) as f:
    cfg = yaml.safe_load(f)
cfg["train"].update(epochs=2, speakers_per_batch=4, num_workers=0)
with open(sys.argv[2], "w") as f:
    yaml.safe_dump(cfg, f)
PY

first_job=$(( $(scontrol show config | sed -n 's/^NEXT_JOB_ID *= *//p') ))
set -x
bash run.sh --synth-size tiny --cmd-conf local/slurm/cmd_local_cluster.sh --config "$work/conf/mini/cap.yaml" \
  --data "$work/data" --exp "$work/exp" --fbankdir "$work/fbank" --corpusdir "$work/corpus"
{ set +x; } 2>/dev/null

echo
echo "== the recipe's Slurm jobs (squeue -t all keeps finished jobs for a few minutes)"
squeue -t all -o '%.10i %.24j %.10T %.8M %.5C %.8m %.12b %R' |
  awk -v f="$first_job" 'NR == 1 || $1 + 0 >= f'
echo
echo "== per-job logs (written by the jobs) and Slurm's own output files"
find "$work/exp" -name '*.log' -o -path '*/slurm/*.out' | sort
echo
train_log=$(find "$work/exp" -path '*/log/train.log' | head -n 1)
echo "== $train_log: header, last lines, footer"
head -n 3 "$train_log"; echo "    ..."; tail -n 4 "$train_log"
echo
echo "== results"
for r in "$work"/exp/*/results.txt; do echo "-- $r"; cat "$r"; done
