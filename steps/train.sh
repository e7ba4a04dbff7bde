#!/usr/bin/env bash
# Stage 2: train a speaker network (capsv.bin.train) as one job of the launcher in --cmd, so on a
# cluster it is one job holding the GPUs. The config and data are checked here first (a typo costs
# seconds, not a place in a queue); the job's log, <exp-dir>/log/train.log, is shown as it grows.
# Training resumes from the newest checkpoint in <exp-dir>/models; the log of an earlier run is
# kept as log/train.log.<time>.
#
# GPUs: with --cluster slurm (conf/cmd_slurm.sh sets it) the job asks for --ngpu GPUs per node, 1
# unless told otherwise; --ngpu 0 trains on the CPU (device=cpu, so a GPU the job did not ask for is
# never used). With --cluster none the job runs here, and --ngpu 0 (the default) is one process on
# this machine's GPU if it has one (device: auto), else on its CPU.
#
# With --ngpu N > 1 (or --nnodes > 1) the job is torchrun with N ranks per node (DDP, the global
# batch split over the ranks, the 1-GPU objective kept; capsv/distributed.py):
#   one node:  torchrun --standalone --nnodes 1 --nproc-per-node N -m capsv.bin.train ...
#   Slurm:     one job of M nodes x N GPUs; in it steps/srun_torchrun.sh starts one torchrun per node
#              with srun, the c10d rendezvous on the allocation's first host (also for M = 1)
#   M nodes without Slurm: torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d
#                --rdzv-endpoint HOST:PORT --rdzv-id <exp name> --rdzv-conf is_host=<1 on node 0, else 0>
#              run on every node with its --node-rank (node 0 hosts the rendezvous at HOST:PORT).
# The exp dir must be on a filesystem all nodes see. Without Slurm, node k > 0 logs to
# log/train.node<k>.log; under Slurm all nodes write to log/train.log.
#
# INT, TERM and HUP (Ctrl-C, kill, a dropped ssh session) stop the job through its launcher (which
# cancels a Slurm job) and then end this script with the same signal.
set -euo pipefail

# defaults (all can be set with --option value)
cmd=$(dirname "$0")/launch_local.sh
config=
ngpu=           # GPUs per node: 0 or 1 runs one process; N > 1 runs N ranks under torchrun. The launcher
                # is asked for N GPUs (a Slurm launcher maps it to --gres=gpu:N). Empty: 1 on a cluster, else 0
nnodes=1        # nodes of a multi-node run, each running this script
node_rank=0     # this node's index, 0 .. nnodes-1
rdzv_endpoint=  # HOST:PORT of node 0's c10d rendezvous (--nnodes > 1 without Slurm)
cluster=none    # none: --cmd runs the job on this machine; slurm: --cmd submits it to Slurm
valid_data=     # data dir (features, trials) scored every train.validate_every epochs; empty: no validation

echo "$0 $*"

help_message="usage: $0 [options] <train-data-dir> <exp-dir> [key=value ...]
e.g.: $0 --config conf/mini/cap.yaml data/synth_train exp/mini_cap train.epochs=4
      $0 --ngpu 4 --config conf/cap.yaml data/vox2_dev exp/cap     # 4 GPUs, torchrun + DDP
      $0 --cluster slurm --cmd steps/launch_slurm.sh --nnodes 2 --ngpu 4 --config conf/cap.yaml data/vox2_dev exp/cap
options:
  --config <yaml>          training config (required)
  --cmd <launcher>         job launcher, run.pl-style (default $cmd)
  --ngpu <n>               GPUs per node (default: 1 with --cluster slurm, else 0): 0/1 one process, n > 1 torchrun
  --nnodes <m>             nodes (default $nnodes); Slurm: one job; else run this on each with its --node-rank
  --node-rank <k>          this node's index (default $node_rank)
  --rdzv-endpoint <h:p>    node 0's rendezvous address, for --nnodes > 1 without Slurm
  --cluster none|slurm     what --cmd does: run here, or submit to Slurm (default $cluster)
  --valid-data <dir>       validation data dir, its trials scored every train.validate_every epochs"

. "$(dirname "$0")/parse_options.sh" || exit 1

if [ $# -lt 2 ] || [ -z "$config" ]; then
  echo "$help_message" >&2; exit 1
fi
data=${1%/}; dir=${2%/}; shift 2

die() { echo "$0: ERROR: $*" >&2; exit 1; }
case $cluster in
  none) ngpu=${ngpu:-0} ;;
  slurm) ngpu=${ngpu:-1} ;;
  *) die "--cluster must be none or slurm, got '$cluster' (conf/cmd.sh and conf/cmd_slurm.sh set it)" ;;
esac
for v in ngpu nnodes node_rank; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "--${v//_/-} must be a non-negative integer, got '${!v}'"
done
[ "$nnodes" -ge 1 ] || die "--nnodes must be at least 1"
[ "$node_rank" -lt "$nnodes" ] || die "--node-rank $node_rank is not below --nnodes $nnodes"
nproc=$(( ngpu > 1 ? ngpu : 1 ))
world=$(( nproc * nnodes ))
# Slurm runs every node of a multi-process training as one job (srun + torchrun); without Slurm, or
# with a rendezvous given, each node runs this script.
slurm_job=false
[ "$cluster" = slurm ] && [ "$world" -gt 1 ] && [ -z "$rdzv_endpoint" ] && slurm_job=true
if [ "$nnodes" -gt 1 ]; then
  [ "$ngpu" -ge 1 ] || die "--nnodes $nnodes needs --ngpu >= 1 (GPUs per node)"
  if [ "$slurm_job" = true ]; then
    [ "$node_rank" -eq 0 ] || die "--node-rank $node_rank: under Slurm the $nnodes nodes are one job, started once (leave --node-rank out)"
  else
    [[ $rdzv_endpoint =~ ^[^:[:space:]]+:[0-9]+$ ]] ||
      die "--nnodes $nnodes needs --rdzv-endpoint HOST:PORT (node 0's address and a free port), got '$rdzv_endpoint'; on Slurm (conf/cmd_slurm.sh) the nodes are one job and need none"
  fi
fi
# on a cluster, a job without GPUs must not use one it did not ask for
cpu_only=(); [ "$cluster" = slurm ] && [ "$ngpu" -eq 0 ] && cpu_only=(device=cpu)

valid=(); [ -z "$valid_data" ] || valid=(--valid-data "$valid_data")
python -m capsv.bin.train --check --world-size "$world" --config "$config" --data "$data" --exp "$dir" \
  ${valid[@]+"${valid[@]}"} ${cpu_only[@]+"${cpu_only[@]}"} "$@"

train=(python -m capsv.bin.train)
launch=(--gpu "$ngpu")
if [ "$slurm_job" = true ]; then
  train=("$(dirname "$0")/srun_torchrun.sh" "$nproc" -m capsv.bin.train)
  launch+=(--nodes "$nnodes")
elif [ "$world" -gt 1 ]; then
  # OMP_NUM_THREADS=1 is what torchrun sets for several ranks anyway; set here, it spares the log its banner
  if [ "$nnodes" -eq 1 ]; then
    train=(env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" torchrun --standalone --nnodes 1 --nproc-per-node "$nproc")
  else
    train=(env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" torchrun --nnodes "$nnodes" --nproc-per-node "$nproc"
           --rdzv-backend c10d --rdzv-endpoint "$rdzv_endpoint" --rdzv-id "$(basename "$dir")"
           --rdzv-conf "is_host=$([ "$node_rank" -eq 0 ] && echo 1 || echo 0)")
  fi
  train+=(-m capsv.bin.train)
fi

mkdir -p "$dir/log"
log=$dir/log/train.log
[ "$node_rank" -eq 0 ] || log=$dir/log/train.node$node_rank.log
[ -f "$log" ] && mv "$log" "$log.$(date +%Y%m%d-%H%M%S)"
# A signal is noted, passed on to the launcher (which stops the job: scancel on Slurm), and this
# script ends with it once the launcher has. The launcher runs in the background so that its log can
# be shown meanwhile; a background job would ignore Ctrl-C, hence `trap - INT` before it starts.
sig=""; job=""
for s in INT TERM HUP; do trap "sig=$s; [ -z \"\$job\" ] || kill -s $s \"\$job\" 2>/dev/null || true" "$s"; done
(trap - INT; exec $cmd "${launch[@]}" "$log" "${train[@]}" --config "$config" --data "$data" --exp "$dir" ${valid[@]+"${valid[@]}"} \
  ${cpu_only[@]+"${cpu_only[@]}"} "$@") &
job=$!
# the launcher writes the log (here or on a compute node); tail follows it until the launcher ends
tail -n +1 -F --pid="$job" "$log" 2>/dev/null &
follow=$!
rc=0; wait "$job" || rc=$?
while kill -0 "$job" 2>/dev/null; do rc=0; wait "$job" || rc=$?; done   # a signal ended the wait, not the launcher
wait "$follow" || true
if [ -n "$sig" ]; then
  trap - "$sig"; kill -s "$sig" $$
  exit $((128 + $(kill -l "$sig")))   # not reached
fi
if [ "$rc" -ne 0 ] && [ "$world" -gt 1 ]; then
  # torchrun's report ends the log; the ranks' own first error line is what to read first
  first=$(grep -m 1 '^ERROR: ' "$log" 2>/dev/null || true)
  [ -z "$first" ] || echo "$0: the first error of the ranks: $first" >&2
fi
exit "$rc"   # on failure the launcher has named the log and shown its last lines
