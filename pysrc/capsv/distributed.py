"""Training on several processes (torchrun + DDP) with the single-process objective (doc/multi-gpu.md).

Each global batch of N speakers (train.speakers_per_batch) is cut into W contiguous blocks of N/W
speakers, one per rank: rank r holds speakers [r N/W, (r+1) N/W) and reads only their crops. A
rank runs the trunk on its own crops, gathers every rank's support frames [N/W, T', C] with
autograd (`Part.gather`), and computes the loss of its own queries against all N supports: the
normalised-prototypical logits use every rank's prototypes, and CAP pools each query against
every support of the global batch.

Why this gives the 1-process gradient: every rank holds the same number of queries and of
utterances, so the 1-process loss (a mean over the batch's queries plus a mean over its
utterances) is the mean of the ranks' local mean losses. DDP averages the ranks' gradients, which
is the gradient of that mean; and the gather's backward sums, onto the rank that owns a support,
the gradients of every rank's loss with respect to it. BatchNorm is the one place where a rank
sees less than the global batch: on CUDA train.sync_bn converts it to SyncBatchNorm, whose
statistics are then those of the 1-process batch (TAP/SAP normalise all N supports on every rank:
W copies of a set have the set's mean and variance); on the CPU (gloo, tests) they are per rank.
"""
import datetime
import os
import re
import sys
import warnings

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather

from capsv.utils import UserError


# how gloo says that a peer is gone or silent
LOST_PEER = re.compile(r"gloo.*(Timed out|[Cc]onnection (closed|reset)|[Bb]roken pipe)|Connection closed by peer", re.S)


class RankError(UserError):
    """A user error that one rank meets on its own (a bad crop in its part of a batch): every rank
    that meets it says so, naming itself; other UserErrors are met by every rank alike and said once."""


class Part:
    """Which block of each global batch this process holds, and the collectives the loss needs."""

    def __init__(self, rank=0, world=1, group=None, device=None):
        self.rank, self.world, self.group, self.device = rank, world, group, device

    def gather(self, x):
        """Every rank's x concatenated along dim 0 in rank order, differentiable with respect to
        each rank's own x (one process: x itself)."""
        if self.world == 1:
            return x
        return torch.cat(all_gather(x.contiguous(), group=self.group))

    def mean(self, t):
        """Mean over ranks of a tensor of statistics (no gradient)."""
        if self.world == 1:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, group=self.group)
        return t / self.world

    def max(self, x):
        if self.world == 1:
            return x
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.item()

    def broadcast_int(self, x):
        """Rank 0's x on every rank."""
        if self.world == 1:
            return x
        t = torch.tensor([int(x)], dtype=torch.int64, device=self.device)
        dist.broadcast(t, 0, group=self.group)
        return int(t.item())


SINGLE = Part()


def launched():
    """(rank, world size, local rank, local world size) when torchrun started this process, else None."""
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    e = os.environ
    return int(e["RANK"]), int(e["WORLD_SIZE"]), int(e["LOCAL_RANK"]), int(e.get("LOCAL_WORLD_SIZE", 1))


def rank_device(device, local_rank, local_world):
    """The device of this rank: its own GPU (cuda:<local rank>), or the CPU."""
    if device.type != "cuda":
        return device
    have = torch.cuda.device_count()
    if local_world > have:
        raise UserError(f"{local_world} processes per node were started but this node has {have} GPUs visible; "
                        f"lower --ngpu to {have} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init(device, timeout_s):
    """Join torchrun's process group (nccl on CUDA, gloo on the CPU); the Part of this rank.

    A collective that waits longer than timeout_s raises (nccl: its watchdog ends the process),
    so a rank that hangs ends the job instead of holding every GPU; a rank that dies is noticed
    sooner by torchrun, which then stops the others.
    """
    # torch 2.14 marks this autograd all_gather deprecated in favour of a private module's; it is
    # still the public one that works on gloo and nccl alike, so its per-call notice is muted
    warnings.filterwarnings("ignore", r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                            FutureWarning)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    kw = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=timeout, **kw)
    # The loss's gather and statistics get a communicator of their own, so their order can never
    # interleave with DDP's gradient all-reduces on the default group.
    group = dist.new_group(backend=backend, timeout=timeout)
    return Part(dist.get_rank(), dist.get_world_size(), group, device)


def wrap(step, device):
    """DDP around the training step when a process group is up; the step itself otherwise."""
    if not dist.is_initialized():
        return step
    return torch.nn.parallel.DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)


def finish():
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(main):
    """Run an entry point under torchrun or alone, with the one-line user-error convention.

    A UserError every rank meets alike (config, data dir, a diverged loss) is printed by rank 0
    alone, so it appears once; a RankError by every rank that meets it, with the rank's number;
    either way the process exits 1 and torchrun stops the other ranks.
    """
    env = launched()
    rank, world = (env[0], env[1]) if env else (0, 1)
    try:
        main()
        finish()   # only after a clean end: after a failure a peer may be gone
    except RankError as e:
        print(f"ERROR: rank {rank}: {e}" if world > 1 else f"ERROR: {e}", file=sys.stderr)
        sys.exit(1)
    except UserError as e:
        if rank == 0:
            print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:
        # A peer died or hung (gloo raises plain RuntimeErrors for both): torchrun's summary names
        # it; this rank says why it stopped, in a line. Anything else is a bug: its traceback stays.
        if world == 1 or not (isinstance(e, dist.DistError) or LOST_PEER.search(str(e))):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)   # gloo's [source-file:line] prefix
        print(f"ERROR: rank {rank}: lost contact with another rank ({type(e).__name__}: {first[:200]}); "
              f"torchrun's report names the rank that failed", file=sys.stderr)
        sys.exit(1)
