#!/usr/bin/env bash
# Run inside a Slurm job of M nodes (steps/train.sh submits it with steps/launch_slurm.sh --nodes M
# --gpu N): one torchrun per node, started with srun, every node meeting at a c10d rendezvous on the
# first host of the allocation (`scontrol show hostnames`, at the address Slurm has for it), so
# nobody has to know a host name before the job is scheduled.
#   steps/srun_torchrun.sh <ranks-per-node> <torchrun's program and args...>
#   e.g. steps/srun_torchrun.sh 4 -m capsv.bin.train --config conf/cap.yaml --data data/vox2_dev --exp exp/cap
# The rendezvous port is 29500 + (job id mod 10000), so two jobs that share a first node do not
# collide; CAPSV_RDZV_PORT sets another. The rendezvous id is the job id (a requeued job starts a
# new rendezvous under the same id). Every node's output goes to the job's log.
set -euo pipefail
self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")

if [ "${1:-}" = --on-node ]; then   # one node's part, started by srun below
  nproc=$2 endpoint=$3; shift 3
  # OMP_NUM_THREADS=1 is what torchrun sets for several ranks anyway; set here, it spares the log its banner
  exec env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" torchrun --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$nproc" \
    --rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "$SLURM_JOB_ID" \
    --rdzv-conf "is_host=$([ "$SLURM_NODEID" = 0 ] && echo 1 || echo 0)" "$@"
fi

if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 <ranks-per-node> <program and args...> (inside a Slurm job)" >&2; exit 1
fi
[ -n "${SLURM_JOB_ID:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ] ||
  { echo "$0: ERROR: not inside a Slurm job (no SLURM_JOB_ID / SLURM_JOB_NODELIST)" >&2; exit 1; }
nproc=$1; shift
nodes=${SLURM_JOB_NUM_NODES:-1}
host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# the node's address as Slurm reaches it (a node name need not be a host name the others resolve)
addr=$(scontrol show node "$host" 2>/dev/null | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
port=${CAPSV_RDZV_PORT:-$((29500 + SLURM_JOB_ID % 10000))}
echo "$(basename "$0"): $nodes node(s) x $nproc ranks, rendezvous at ${addr:-$host}:$port on $host (nodes: $SLURM_JOB_NODELIST)"
host=${addr:-$host}
# One task per node holding all of the job's CPUs there (the step gets every GPU of the job by default).
exec srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  "$self" --on-node "$nproc" "$host:$port" "$@"
