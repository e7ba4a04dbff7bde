#!/usr/bin/env bash
# Start a real single-node Slurm cluster on this machine (as root), for testing and demos of
# the Slurm path of the recipe (conf/cmd_slurm.sh, steps/launch_slurm.sh):
#   bash local/slurm/start_local_cluster.sh      # then: sinfo; sbatch ...
#   bash local/slurm/stop_local_cluster.sh
# It starts munged (creating a key if there is none), writes a minimal slurm.conf for this
# one node, starts slurmctld and slurmd, and waits until the node is idle. Idempotent: if a
# node is already idle (or busy) it does nothing. Any missing piece is one clear line, exit 1.
# No cgroups (proctrack/linuxproc, task/none) and no accounting, so it also runs in a
# container or a small VM; memory is still a scheduled resource (CR_Core_Memory), so --mem
# requests are checked and exported to jobs as on a real cluster.
set -euo pipefail

prog=$(basename "$0")
conf=/etc/slurm/slurm.conf          # where Debian's slurm-wlm reads it
spool=/var/spool/slurm-capsv        # slurmctld state and slurmd spool
logdir=/var/log/slurm
marker="# written by local/slurm/start_local_cluster.sh"
wait_s=60

die() { echo "$prog: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run me as root (it starts munged, slurmctld and slurmd)"
for c in munged munge unmunge slurmctld slurmd sinfo sbatch scontrol; do
  command -v "$c" > /dev/null ||
    die "$c not found: Slurm or munge is not installed; install them with: apt-get install slurm-wlm munge"
done

# Something that schedules: a node idle, mixed or allocated, and responding (no * suffix).
node_up() { timeout 5 sinfo -h -o %t 2>/dev/null | grep -qxE 'idle|mix|alloc'; }

if node_up; then
  echo "$prog: Slurm is already up: $(sinfo -h -o '%P %D %t %N' | head -n 1)"
  exit 0
fi

# --- munge: a key, and the daemon running as its own user
key=/etc/munge/munge.key
if [ ! -s "$key" ]; then
  mkdir -p /etc/munge
  if command -v mungekey > /dev/null; then
    mungekey --create --keyfile="$key" > /dev/null
  else
    dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
  fi
  echo "$prog: created munge key $key"
fi
mkdir -p /run/munge /var/lib/munge /var/log/munge
if id munge > /dev/null 2>&1; then
  chown munge:munge "$key" /etc/munge /run/munge /var/lib/munge /var/log/munge
fi
chmod 400 "$key"
if ! munge -n 2>/dev/null | unmunge > /dev/null 2>&1; then
  if id munge > /dev/null 2>&1; then
    runuser -u munge -- munged || die "munged did not start; see /var/log/munge/munged.log"
  else
    munged --force || die "munged did not start; see /var/log/munge/munged.log"
  fi
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge > /dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge > /dev/null 2>&1 || die "munged is running but munge -n | unmunge fails"
fi

# --- slurm.conf for this node, sized as slurmd itself sees the machine
if [ -f "$conf" ] && ! grep -qxF "$marker" "$conf"; then
  die "$conf exists and was not written by this script; move it away to use the local test cluster"
fi
hw=$(slurmd -C | head -n 1)   # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
node=$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' <<< "$hw")
[ -n "$node" ] || die "slurmd -C printed no NodeName line: $hw"
mkdir -p /etc/slurm "$spool/ctld" "$spool/d" "$logdir"
cat > "$conf.tmp" <<CONF
$marker
# A single-node test cluster on $node; delete this file (or run stop_local_cluster.sh) to drop it.
ClusterName=capsv
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$spool/ctld
SlurmdSpoolDir=$spool/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$logdir/slurmctld.log
SlurmdLogFile=$logdir/slurmd.log
# no cgroups: works in containers and VMs without a delegated cgroup tree
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
# a node that was down comes back as soon as its slurmd registers again
ReturnToService=2
SchedulerParameters=sched_interval=2
MinJobAge=300
KillWait=10
$hw State=UNKNOWN NodeAddr=127.0.0.1
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
mv "$conf.tmp" "$conf"

# --- the daemons (each forks into the background itself), unless running already. By pid file:
# a container's init may not reap, so an exited daemon can linger as a zombie of the same name.
running() { local p; p=$(cat "$1" 2>/dev/null) && [ -n "$p" ] && [[ $(ps -o stat= -p "$p" 2>/dev/null) =~ ^[^Z] ]]; }
running /run/slurmctld.pid || slurmctld || die "slurmctld did not start; see $logdir/slurmctld.log"
running /run/slurmd.pid || slurmd || die "slurmd did not start; see $logdir/slurmd.log"

SECONDS=0
for ((i = 0; SECONDS < wait_s; i++)); do
  if node_up; then
    echo "$prog: Slurm is up: $(sinfo -h -o '%P %D %t %N' | head -n 1) (config $conf, logs $logdir)"
    exit 0
  fi
  # a node left down or drained by an earlier run (e.g. a killed slurmd) is put back once
  if [ "$i" -eq 5 ] && sinfo -h -o %t 2>/dev/null | grep -qE '^(down|drain|drng)'; then
    scontrol update nodename="$node" state=resume 2>/dev/null || true
  fi
  sleep 1
done

echo "$prog: ERROR: node $node not idle after ${SECONDS}s; sinfo says '$(sinfo -h -o '%t %E' 2>&1 | head -n 1)'; last lines of the logs:" >&2
tail -n 5 "$logdir/slurmctld.log" "$logdir/slurmd.log" >&2 2>/dev/null || true
exit 1
