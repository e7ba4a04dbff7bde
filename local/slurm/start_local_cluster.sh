#!/usr/bin/env bash
# Start a real Slurm cluster on this machine (as root), for testing and demos of the Slurm path
# of the recipe (conf/cmd_slurm.sh, steps/launch_slurm.sh): two nodes, each a slurmd of its own on
# this host (NodeName <host> and <host>-2, both at 127.0.0.1), so a job of 2 nodes really runs a
# task on each (srun) as on a real cluster.
#   bash local/slurm/start_local_cluster.sh      # then: sinfo; sbatch ...
#   bash local/slurm/stop_local_cluster.sh
# It starts munged (creating a key if there is none), writes a minimal slurm.conf for the two
# nodes, starts slurmctld and both slurmd, and waits until the nodes are idle. Idempotent: if the
# nodes are up (idle or busy) with the configuration this script writes, it does nothing; a
# configuration from an older version of it is rewritten and the daemons restarted. Any missing
# piece is one clear line, exit 1.
# No cgroups (proctrack/linuxproc, task/none) and no accounting, so it also runs in a
# container or a small VM; memory is still a scheduled resource (CR_Core_Memory), so --mem
# requests are checked and exported to jobs as on a real cluster. Each node has this machine's
# CPUs and memory (so the two together promise twice what there is: jobs here are small) and 2 GPUs
# that are not there: Slurm 22.05's gres/gpu drops a GPU without a File=, so each is a stand-in
# file under the spool dir (a character device like /dev/null where mknod is allowed; a plain file,
# which slurmd logs as an error and accepts, where not). --gres=gpu:N is then scheduled and shows in
# `scontrol show job` as on a GPU cluster, while a job sees no GPU and trains on the CPU.
# A requeued job may start again after 5 s (AuthInfo cred_expire; Slurm's default is 120 s).
set -euo pipefail

prog=$(basename "$0")
conf=/etc/slurm/slurm.conf          # where Debian's slurm-wlm reads it
gres_conf=/etc/slurm/gres.conf
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

# Both nodes schedule: each idle, mixed or allocated, and responding (no * suffix).
node_up() {
  local states
  states=$(timeout 5 sinfo -h -N -o %t 2>/dev/null) || return 1
  [ "$(grep -cxE 'idle|mix|alloc' <<< "$states")" -eq 2 ]
}

# --- the configuration for this node, sized as slurmd itself sees the machine
if [ -f "$conf" ] && ! grep -qxF "$marker" "$conf"; then
  die "$conf exists and was not written by this script; move it away to use the local test cluster"
fi
if [ -f "$gres_conf" ] && ! grep -qxF "$marker" "$gres_conf"; then
  die "$gres_conf exists and was not written by this script; move it away to use the local test cluster"
fi
hw=$(slurmd -C | head -n 1)   # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
node=$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' <<< "$hw")
[ -n "$node" ] || die "slurmd -C printed no NodeName line: $hw"
node2=$node-2
hw=${hw#NodeName=* }   # CPUs=.. Boards=.. ... RealMemory=..
want=$(cat <<CONF
$marker
# A two-node test cluster on $node; delete this file (or run stop_local_cluster.sh) to drop it.
ClusterName=capsv
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again after 5 s, not the default 120 s
AuthInfo=cred_expire=5
StateSaveLocation=$spool/ctld
SlurmdSpoolDir=$spool/d.%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.%n.pid
SlurmctldLogFile=$logdir/slurmctld.log
SlurmdLogFile=$logdir/slurmd.%n.log
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
# GPUs as a counted resource (gres.conf: Count, no device files)
GresTypes=gpu
# a node that was down comes back as soon as its slurmd registers again
ReturnToService=2
SchedulerParameters=sched_interval=2
MinJobAge=300
KillWait=10
# two slurmd on this host, told apart by their ports
NodeName=$node NodeHostname=$node NodeAddr=127.0.0.1 Port=6818 $hw Gres=gpu:2 State=UNKNOWN
NodeName=$node2 NodeHostname=$node NodeAddr=127.0.0.1 Port=6819 $hw Gres=gpu:2 State=UNKNOWN
PartitionName=local Nodes=$node,$node2 Default=YES MaxTime=INFINITE State=UP
CONF
)
want_gres=$(cat <<GRES
$marker
# 2 GPUs a node, stand-in files, no devices: jobs asking for them are scheduled, none sees a GPU
AutoDetect=off
NodeName=$node Name=gpu File=$spool/gpu[0-1]
NodeName=$node2 Name=gpu File=$spool/gpu[2-3]
GRES
)
current() { [ "$(cat "$conf" 2>/dev/null)" = "$want" ] && [ "$(cat "$gres_conf" 2>/dev/null)" = "$want_gres" ]; }

# the pid in a pid file, if that process is alive (a container's init may not reap, so an exited
# daemon can linger as a zombie of the same name)
alive() { local p; p=$(cat "$1" 2>/dev/null) && [ -n "$p" ] && [[ $(ps -o stat= -p "$p" 2>/dev/null) =~ ^[^Z] ]] && echo "$p"; }
any_alive() { local f; for f in "$@"; do alive "$f" > /dev/null && return 0; done; return 1; }

if current && node_up; then
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

mkdir -p /etc/slurm "$spool/ctld" "$logdir"
for i in 0 1 2 3; do   # the GPUs' stand-ins (see the top)
  [ -e "$spool/gpu$i" ] || mknod "$spool/gpu$i" c 1 3 2>/dev/null || : > "$spool/gpu$i"
done
if ! current; then
  # daemons running with another configuration (an older version of this script) stop first:
  # a node's GRES count is read when they start
  pidfiles=(/run/slurmctld.pid /run/slurmd*.pid)   # /run/slurmd.pid: a single-node version of this script
  if any_alive "${pidfiles[@]}"; then
    echo "$prog: the configuration changed; restarting slurmctld and slurmd"
    scontrol shutdown > /dev/null 2>&1 || true
    for _ in $(seq 30); do any_alive "${pidfiles[@]}" || break; sleep 1; done
    for f in "${pidfiles[@]}"; do
      if p=$(alive "$f"); then kill "$p"; sleep 1; fi
    done
  fi
  printf '%s\n' "$want" > "$conf.tmp" && mv "$conf.tmp" "$conf"
  printf '%s\n' "$want_gres" > "$gres_conf.tmp" && mv "$gres_conf.tmp" "$gres_conf"
fi

# --- the daemons (each forks into the background itself), unless running already
alive /run/slurmctld.pid > /dev/null || slurmctld || die "slurmctld did not start; see $logdir/slurmctld.log"
for n in "$node" "$node2"; do
  alive "/run/slurmd.$n.pid" > /dev/null || slurmd -N "$n" || die "slurmd -N $n did not start; see $logdir/slurmd.$n.log"
done

SECONDS=0
for ((i = 0; SECONDS < wait_s; i++)); do
  if node_up; then
    echo "$prog: Slurm is up: $(sinfo -h -o '%P %D %t %N' | head -n 1) (config $conf, logs $logdir)"
    exit 0
  fi
  # a node left down or drained by an earlier run (e.g. a killed slurmd) is put back once
  if [ "$i" -eq 5 ] && sinfo -h -o %t 2>/dev/null | grep -qE '^(down|drain|drng)'; then
    scontrol update nodename="$node,$node2" state=resume 2>/dev/null || true
  fi
  sleep 1
done

echo "$prog: ERROR: nodes $node, $node2 not idle after ${SECONDS}s; sinfo says '$(sinfo -h -o '%t %E' 2>&1 | head -n 1)'; last lines of the logs:" >&2
tail -n 5 "$logdir/slurmctld.log" "$logdir/slurmd.$node.log" "$logdir/slurmd.$node2.log" >&2 2>/dev/null || true
exit 1
