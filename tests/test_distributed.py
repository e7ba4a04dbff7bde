"""Training on several ranks (capsv.distributed, gloo on the CPU): the 1-process objective, torchrun
runs that resume on any number of ranks, and failures that end the job in one clear line."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from capsv import checkpoint, distributed
from capsv.trainer import TrainStep
from capsv.config import load_config
from capsv.data import EpisodicBatches, read_data_dir
from capsv.losses import STATS, NPSoftmaxLoss
from capsv.models.speaker_net import SpeakerNet
from test_train import ROOT, SMALL, write_data_dir

N, M, T, CLASSES = 4, 3, 40, 6      # the global batch of the equivalence test: speakers, utterances, frames
DDP_SMALL = SMALL + ["train.speakers_per_batch=4", "train.lr=0.01"]
# A bound on waiting is for a job that never ends, with room for a loaded 2-core machine; what ended the job
# is asserted from its output (torchrun's report, the timeout's own message), not from the wall clock.
HANG = 300


# ---- one step on 2 ranks equals the 1-process step --------------------------------------------

def build(pooling):
    """A small float64 net and loss with non-trivial (frozen) BatchNorm statistics, and one global
    batch; the same in every process."""
    cfg = load_config(f"{ROOT}/conf/mini/cap.yaml", SMALL + [f"model.pooling={pooling}"])
    torch.manual_seed(0)
    net = SpeakerNet.from_config(cfg).double()
    loss_fn = NPSoftmaxLoss(cfg["model"]["embed_dim"], CLASSES).double()
    g = torch.Generator().manual_seed(1)
    for mod in net.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.copy_(0.3 * torch.randn(mod.running_mean.shape, generator=g, dtype=torch.float64))
            mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g, dtype=torch.float64))
    feats = torch.randn(N, M, T, 40, generator=g, dtype=torch.float64)
    return net, loss_fn, feats, torch.tensor([5, 0, 3, 1])


def one_step(pooling, part, device="cpu", bn="frozen"):
    """Loss stats and every parameter's gradient of one step on this rank's block of the batch,
    through DDP when a process group is up. BatchNorm: "frozen" statistics (eval-mode BN, affine
    trainable; on the CPU each rank's BN would otherwise see only its own block), "train" (batch
    statistics), or "sync" (CUDA: training mode as SyncBatchNorm)."""
    device = torch.device(device)
    net, loss_fn, feats, speakers = build(pooling)
    if bn == "sync":
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    step = TrainStep(net.to(device), loss_fn.to(device), part)
    model = distributed.wrap(step, device)
    model.train()
    if bn == "frozen":
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.eval()
    n = N // part.world
    block = slice(part.rank * n, (part.rank + 1) * n)
    loss, stats = model(feats[block].to(device), speakers[block].to(device))
    loss.backward()
    return stats, {k: p.grad.cpu() for k, p in step.named_parameters()}


def compare(out, pooling, ref_stats, ref_grads, rtol=1e-9):
    # gradients the step reaches (a squeeze-excite unit of width 1 can sit dead behind its ReLU)
    assert sum(bool(g.abs().sum() > 0) for g in ref_grads.values()) >= 0.9 * len(ref_grads)
    for rank in (0, 1):
        got = torch.load(out / f"{pooling}.rank{rank}.pt", weights_only=True)
        for k in STATS:
            assert got["stats"][k] == pytest.approx(ref_stats[k], rel=rtol, abs=rtol), (rank, k)
        assert got["grads"].keys() == ref_grads.keys()
        for k, g in ref_grads.items():
            torch.testing.assert_close(got["grads"][k], g, rtol=rtol, atol=rtol * 1e-3, msg=f"rank {rank}: {k}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank, world, port, out, poolings, cuda=False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    part = distributed.init(device, 60)
    for pooling in poolings:
        stats, grads = one_step(pooling, part, device, "sync" if cuda else "frozen")
        torch.save({"stats": stats, "grads": grads}, f"{out}/{pooling}.rank{rank}.pt")
    distributed.finish()


@pytest.fixture(scope="module")
def two_rank_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(rank_main, args=(2, free_port(), str(out), ("cap", "tap")), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("pooling", ["cap", "tap"])
def test_two_ranks_give_the_one_process_loss_and_gradients(two_rank_steps, pooling):
    compare(two_rank_steps, pooling, *one_step(pooling, distributed.SINGLE))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_with_sync_bn_give_the_one_gpu_step_in_training_mode(tmp_path):
    """On CUDA, SyncBatchNorm makes BN in training mode the 1-GPU BN too (nccl, float64)."""
    mp.spawn(rank_main, args=(2, free_port(), str(tmp_path), ("cap", "tap"), True), nprocs=2, join=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for pooling in ("cap", "tap"):
        compare(tmp_path, pooling, *one_step(pooling, distributed.SINGLE, "cuda:0", "train"), rtol=1e-7)


# ---- torchrun through the real entry point --------------------------------------------------------

def make_learnable_data_dir(d, n_spk=8, n_utt=6, seed=0):
    """Features with a speaker-specific pattern across mel bins that instance norm keeps (random
    walks in time, signed per bin by the speaker), so a short run's loss goes down."""
    rng = np.random.default_rng(seed)
    os.makedirs(d, exist_ok=True)
    sign = rng.choice([-1.0, 1.0], size=(n_spk, 40))
    feats = {}
    for s in range(n_spk):
        for u in range(n_utt):
            n = int(rng.integers(50, 90))
            walk = np.cumsum(rng.standard_normal(n))[:, None]
            feats[f"spk{s}-u{u}"] = (walk * sign[s] + 0.5 * rng.standard_normal((n, 40))).astype(np.float32)
    write_data_dir(d, feats)
    return feats


def train_cmd(data, exp, *overrides, nproc=2):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc else [sys.executable]
    return [*launcher, "-m", "capsv.bin.train", "--config", f"{ROOT}/conf/mini/cap.yaml", "--data", str(data),
            "--exp", str(exp), *DDP_SMALL, *overrides]


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV)


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("ERROR: ")]


def train_sh(*args):
    return subprocess.run(["bash", "steps/train.sh", *args], cwd=ROOT, capture_output=True, text=True, env=ENV)


def test_two_ranks_train_and_resume_on_one_and_back(tmp_path):
    """steps/train.sh --ngpu 2 (torchrun --standalone), then 1 process, then 2 nodes of 1 rank each
    (torchrun's c10d rendezvous on localhost), all resuming from the same checkpoints."""
    make_learnable_data_dir(tmp_path / "data")
    exp = tmp_path / "exp"
    opts = ["--config", f"{ROOT}/conf/mini/cap.yaml", str(tmp_path / "data"), str(exp), *DDP_SMALL]
    r = train_sh("--ngpu", "2", *opts, "train.epochs=3", "train.num_workers=1")
    log = (exp / "log/train.log").read_text()
    assert r.returncode == 0, r.stderr[-3000:] + log[-3000:]
    assert "# env OMP_NUM_THREADS=1 torchrun --standalone --nnodes 1 --nproc-per-node 2 -m capsv.bin.train " in log
    assert "device cpu x 2 ranks (2 speakers of each batch per rank)" in log
    assert "train.sync_bn: CUDA only, ignored on cpu (BatchNorm statistics are per rank)" in log
    assert len(re.findall(r"capsv\.train epoch 3: loss", log)) == 1      # rank 0 alone logs
    state = checkpoint.load_latest(exp / "models")
    assert state["epoch"] == 3 and not any(k.startswith(("module.", "net.")) for k in state["model"])
    # 2 ranks -> 1 process -> 2 ranks, from the same checkpoints
    one = run(train_cmd(tmp_path / "data", exp, "train.epochs=4", nproc=0))
    assert one.returncode == 0 and "resuming from" in one.stderr and "epoch 4: loss" in one.stderr, one.stderr
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(["bash", "steps/train.sh", "--ngpu", "1", "--nnodes", "2", "--node-rank", str(k),
                               "--rdzv-endpoint", endpoint, *opts, "train.epochs=5"], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in (1, 0)]
    outs = [p.communicate(timeout=HANG)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs
    logs = (exp / "log/train.log").read_text() + (exp / "log/train.node1.log").read_text()
    assert (f"torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint {endpoint} --rdzv-id exp "
            f"--rdzv-conf is_host=1 -m capsv.bin.train") in logs and "is_host=0" in logs
    assert "resuming from" in logs and "epoch 5: loss" in logs and "x 2 ranks" in logs
    history = pd.read_csv(exp / "train_log.csv")
    assert list(history.epoch) == [1, 2, 3, 4, 5]
    assert history["loss"].iloc[-1] < history["loss"].iloc[0] - 0.3, list(history["loss"])
    assert ((history["data_wait"] >= 0) & (history["data_wait"] <= 1)).all()


def test_train_sh_checks_the_split_and_the_options_before_launching(tmp_path):
    make_learnable_data_dir(tmp_path / "data")
    opts = ["--config", f"{ROOT}/conf/mini/cap.yaml", str(tmp_path / "data"), str(tmp_path / "x"), *DDP_SMALL]
    r = train_sh("--ngpu", "2", *opts, "train.speakers_per_batch=3")
    assert r.returncode == 1 and error_lines(r.stderr) == [
        "ERROR: train.speakers_per_batch=3 cannot be split over 2 ranks (GPUs x nodes); each rank takes an equal "
        "block of a batch's speakers: make it a multiple of 2"], r.stderr
    assert not (tmp_path / "x").exists()
    r = train_sh("--ngpu", "2", "--nnodes", "2", *opts)
    assert r.returncode == 1 and "--nnodes 2 needs --rdzv-endpoint HOST:PORT" in r.stderr
    r = train_sh("--ngpu", "2", "--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1", *opts)
    assert r.returncode == 1 and "--node-rank 2 is not below --nnodes 2" in r.stderr


def children(pid):
    kids = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(p))
        except (OSError, IndexError):
            pass
    return kids


def rank_pid(agent, rank):
    for pid in children(agent):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no process of rank {rank} under torchrun {agent}")


def start_long_run(tmp_path, *overrides):
    make_learnable_data_dir(tmp_path / "data")
    out = open(tmp_path / "out.txt", "w+")
    proc = subprocess.Popen(train_cmd(tmp_path / "data", tmp_path / "exp", "train.epochs=500", *overrides),
                            stdout=out, stderr=subprocess.STDOUT, env=ENV)
    deadline = time.time() + HANG
    while not (tmp_path / "exp/models/epoch_0001.pt").exists():   # training under way on both ranks
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "out.txt").read_text()[-3000:]
        time.sleep(0.1)
    return proc, out


def test_a_killed_rank_ends_the_job_naming_it(tmp_path):
    proc, out = start_long_run(tmp_path)
    try:
        os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
        rc = proc.wait(timeout=HANG)
    finally:
        proc.kill()
    text = (tmp_path / "out.txt").read_text()
    assert rc != 0, text[-3000:]
    # torchrun's report: the root cause is rank 1, killed
    assert re.search(r"Root Cause.*?rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: -9", text, re.S), text[-3000:]
    assert "[rank0]: Traceback" not in text    # rank 0, if it noticed first, said so in a line


def test_a_hung_rank_ends_the_job_after_the_collective_timeout(tmp_path):
    proc, out = start_long_run(tmp_path, "train.dist_timeout_s=3")
    hung = rank_pid(proc.pid, 1)
    try:
        os.kill(hung, signal.SIGSTOP)           # alive but silent: only the timeout can notice
        t0 = time.time()
        while "ERROR: rank 0: lost contact" not in (tmp_path / "out.txt").read_text():
            assert time.time() - t0 < HANG and proc.poll() is None, (tmp_path / "out.txt").read_text()[-3000:]
            time.sleep(0.2)
        waited = time.time() - t0
        os.kill(hung, signal.SIGCONT)           # stuck, not stopped: it can take torchrun's SIGTERM
        rc = proc.wait(timeout=HANG)
    finally:
        proc.kill()
    text = (tmp_path / "out.txt").read_text()
    # the collective timeout (3 s) ended it: rank 0's line quotes it, and it cannot fire sooner
    assert rc != 0 and waited > 2, (waited, text[-3000:])
    lines = error_lines(text)
    assert re.fullmatch(r"ERROR: rank 0: lost contact with another rank \(RuntimeError: Timed out waiting 3000ms "
                        r"for \w+ operation to complete\); torchrun's report names the rank that failed", lines[0]), lines
    # rank 1, woken, may find its own wait timed out before torchrun's SIGTERM lands
    assert all("lost contact" in line for line in lines), lines
    assert "[rank0]: Traceback" not in text


def test_user_errors_appear_once(tmp_path):
    make_learnable_data_dir(tmp_path / "data")
    # met by every rank alike (a batch that does not split over the ranks): said by rank 0 alone
    r = run(train_cmd(tmp_path / "data", tmp_path / "x", "train.speakers_per_batch=5", "train.epochs=1"))
    assert r.returncode != 0
    assert error_lines(r.stderr) == ["ERROR: train.speakers_per_batch=5 cannot be split over 2 ranks (GPUs x nodes); "
                                     "each rank takes an equal block of a batch's speakers: make it a multiple of 2"]
    # bad features in rank 1's block of the first batch: rank 1 says so, once, naming itself
    feats = make_learnable_data_dir(tmp_path / "bad")
    utt2spk, _, _ = read_data_dir(tmp_path / "bad")
    first = EpisodicBatches(utt2spk, 4, 2, seed=1).epoch(1)[0]
    utt = first[2][1][0]                      # group 2 of 4: the first of rank 1's two speakers
    feats[utt][:] = np.nan
    write_data_dir(tmp_path / "bad", feats)
    r = run(train_cmd(tmp_path / "bad", tmp_path / "y", "train.epochs=1"))
    assert r.returncode != 0
    lines = error_lines(r.stderr)
    nan = [line for line in lines if "NaN" in line]
    assert len(nan) == 1 and re.fullmatch(rf"ERROR: rank 1: {utt}: its features hold NaN or Inf \(in \S+\); "
                                          r"re-run stage 1 for it, or remove it from the data dir", nan[0]), lines
    assert all("NaN" in l or "lost contact" in l for l in lines), lines   # rank 0 at most says it lost rank 1
    assert not (tmp_path / "y/models").exists()
