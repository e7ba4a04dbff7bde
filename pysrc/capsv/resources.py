"""How much memory this process may still use: the job's limit, not the host's.

On a cluster a job is held to what it asked for, while /proc/meminfo describes the whole node; a
scoring job that sized its cache from the node would be killed by its own limit. The limits looked
at, the smallest headroom winning:

- the cgroup of this process (v2 `memory.max`, v1 `memory.limit_in_bytes`), and those above it up
  to the root (Slurm puts the job's limit on the job's cgroup and the task in one below it); the
  usage counted against it leaves out the page cache, which the kernel gives back under pressure;
- Slurm's `SLURM_MEM_PER_NODE`, or `SLURM_MEM_PER_CPU` x the job's CPUs on this node, or
  `SLURM_MEM_PER_GPU` x its GPUs there (MB), less what this process holds (a cluster without
  cgroups still kills a job that goes over);
- the host's available memory (`MemAvailable`).

Jobs of one launch that run at once on one machine (steps/launch_local.sh sets
CAPSV_CONCURRENT_JOBS) share its memory and its GPU, so each takes its share of either.
"""
import os
from dataclasses import dataclass

import torch

from capsv.utils import UserError

PROC_SELF_CGROUP = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"
MEMINFO = "/proc/meminfo"
UNLIMITED_V1 = 1 << 60   # cgroup v1 says "no limit" with a page-rounded 2^63 - 1

# The scoring cache holds two blocks at a time, a block at least one utterance's row: for CAP at the
# eval defaults 10 crops x (128 x 88 x 2 + 2 x 128) floats x 4 B = 0.91 MB.
MIN_BLOCK_BYTES = 911_360


@dataclass(frozen=True)
class Headroom:
    """Bytes this process may still allocate under one limit, and what that limit is (for messages)."""
    bytes: int
    source: str


def human(n):
    """Bytes as a short figure: 1.5 GB, 20 MB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _stat(path, key):
    text = _read(path) or ""
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == key and v.strip().isdigit():
            return int(v)
    return 0


def cgroup_headroom(self_cgroup=None, root=None):
    """The tightest memory limit on this process's cgroup or any above it, or None (no limit, no cgroup)."""
    text = _read(self_cgroup or PROC_SELF_CGROUP)
    root = root or CGROUP_ROOT
    if not text:
        return None
    best = None
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":            # v2: "0::/path"
            base, files = root, ("memory.max", "memory.current", "memory.stat", "file")
        elif "memory" in controllers.split(","):   # v1: "<n>:memory:/path" (or memory,...)
            base, files = os.path.join(root, "memory"), ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                         "memory.stat", "total_cache")
        else:
            continue
        limit_f, usage_f, stat_f, cache_key = files
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):   # this cgroup, then each one above it
            d = os.path.join(base, *parts[:depth])
            limit = _read(os.path.join(d, limit_f))
            if limit is None or not limit.isdigit() or int(limit) >= UNLIMITED_V1:
                continue   # "max", missing, or v1's no-limit
            usage = int(_read(os.path.join(d, usage_f)) or 0) - _stat(os.path.join(d, stat_f), cache_key)
            room = Headroom(int(limit) - max(usage, 0),
                            f"the cgroup limit {human(int(limit))} ({os.path.join(d, limit_f)}), "
                            f"{human(max(usage, 0))} in use")
            if best is None or room.bytes < best.bytes:
                best = room
    return best


def _own_rss():
    pages = _read("/proc/self/statm")
    return int(pages.split()[1]) * os.sysconf("SC_PAGE_SIZE") if pages else 0


def slurm_headroom(env=None, rss=None):
    """What the Slurm job's memory (SLURM_MEM_PER_NODE, or SLURM_MEM_PER_CPU x CPUs, or SLURM_MEM_PER_GPU x
    GPUs on this node; MB) leaves this process, or None outside a job with a memory request."""
    env = os.environ if env is None else env
    rss = _own_rss() if rss is None else rss
    if env.get("SLURM_MEM_PER_NODE", "").isdigit():
        mb, how = int(env["SLURM_MEM_PER_NODE"]), "SLURM_MEM_PER_NODE"
    elif env.get("SLURM_MEM_PER_CPU", "").isdigit():
        cpus = next((int(env[k]) for k in ("SLURM_CPUS_ON_NODE", "SLURM_CPUS_PER_TASK") if env.get(k, "").isdigit()), 1)
        mb, how = int(env["SLURM_MEM_PER_CPU"]) * cpus, f"SLURM_MEM_PER_CPU x {cpus} CPUs"
    elif env.get("SLURM_MEM_PER_GPU", "").isdigit():
        gpus = int(env["SLURM_GPUS_ON_NODE"]) if env.get("SLURM_GPUS_ON_NODE", "").isdigit() else 1
        mb, how = int(env["SLURM_MEM_PER_GPU"]) * gpus, f"SLURM_MEM_PER_GPU x {gpus} GPUs"
    else:
        return None
    if mb == 0:            # --mem=0: the whole node, which the other limits describe
        return None
    limit = mb << 20
    return Headroom(limit - rss, f"the Slurm job's memory {human(limit)} ({how}), {human(rss)} held by this process")


def host_headroom(meminfo=None):
    """The host's available memory (MemAvailable), or None if /proc/meminfo cannot be read."""
    text = _read(meminfo or MEMINFO) or ""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return Headroom(int(line.split()[1]) * 1024, "the host's available memory")
    return None


def memory_headroom(env=None):
    """The smallest headroom of the cgroup, the Slurm job and the host (4 GB if none can be read)."""
    rooms = [r for r in (cgroup_headroom(), slurm_headroom(env), host_headroom()) if r is not None]
    return min(rooms, key=lambda r: r.bytes) if rooms else Headroom(4 << 30, "an assumed 4 GB")


def concurrent_jobs(env=None):
    """How many jobs of one launch share this machine's memory and GPU (CAPSV_CONCURRENT_JOBS; 1 if unset)."""
    env = os.environ if env is None else env
    n = env.get("CAPSV_CONCURRENT_JOBS", "")
    return max(int(n), 1) if n.isdigit() else 1


def scoring_budget(device, env=None, block_bytes=MIN_BLOCK_BYTES):
    """Bytes a scoring cache may hold on `device`: half of this job's share of the GPU's memory (its free
    memory, at most total / jobs sharing it) or of the memory headroom on the host (divided among the
    jobs sharing it). A budget smaller than one block of `block_bytes` is a UserError."""
    sharing = concurrent_jobs(env)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        room = Headroom(min(free, total // sharing),
                        f"the free memory of {device} ({human(free)} of {human(total)})")
    else:
        room = memory_headroom(env)
        room = Headroom(room.bytes // sharing, room.source)
    shared = f", shared by {sharing} jobs at once" if sharing > 1 else ""
    budget = max(room.bytes, 0) // 2
    if budget < block_bytes:
        fix = ("run fewer scoring jobs on the GPU at once (--nj)" if device.type == "cuda" else
               "give the scoring jobs more memory (--mem in score_cmd, conf/cmd_slurm.sh) or run fewer at once (--nj)")
        raise UserError(f"the scoring cache's memory budget is {human(budget)} (half of {room.source}{shared}), "
                        f"less than one block of {human(block_bytes)}; {fix}")
    return budget
