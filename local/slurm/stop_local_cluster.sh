#!/usr/bin/env bash
# Stop the test cluster started by local/slurm/start_local_cluster.sh: slurmctld and each node's
# slurmd (scontrol shutdown), then munged, each by the id in its pid file. The config and the
# state stay, so start_local_cluster.sh brings the same cluster back. A cluster whose slurm.conf
# this script's partner did not write is left alone.
set -euo pipefail

prog=$(basename "$0")
conf=/etc/slurm/slurm.conf
marker="# written by local/slurm/start_local_cluster.sh"

if [ ! -f "$conf" ] || ! grep -qxF "$marker" "$conf"; then
  echo "$prog: $conf was not written by start_local_cluster.sh; not stopping anything" >&2
  exit 1
fi

# the pid of a daemon from its pid file, if that process is still alive (an exited daemon may
# linger as a zombie where the container's init does not reap)
alive() {
  local p; p=$(cat "$1" 2>/dev/null) && [ -n "$p" ] && [[ $(ps -o stat= -p "$p" 2>/dev/null) =~ ^[^Z] ]] && echo "$p"
}

daemons=(/run/slurmctld.pid /run/slurmd*.pid)   # one slurmd per node
scontrol shutdown 2>/dev/null || true
for _ in $(seq 30); do
  up=0; for f in "${daemons[@]}"; do alive "$f" > /dev/null && up=1; done
  [ "$up" -eq 1 ] || break
  sleep 1
done
for f in "${daemons[@]}" /run/munge/munged.pid; do
  if p=$(alive "$f"); then kill "$p"; fi   # what scontrol did not stop, and munged
done
echo "$prog: stopped slurmctld, slurmd and munged (config kept in $conf)"
