"""Stage 2: train a TAP/SAP/CAP speaker network from Kaldi fbank features.

    python -m capsv.bin.train --config conf/mini/cap.yaml --data data/synth_train --exp exp/mini_cap \
        [key=value ...]

Resumes from the newest checkpoint in <exp>/models. Writes <exp>/config.yaml, <exp>/models/ and
<exp>/train_log.csv; log lines go to stderr (steps/train.sh puts them in <exp>/log/train.log).
"""
import argparse
import logging
import math
import os
import time

import numpy as np
import pandas as pd
import torch

from torch import nn

from capsv import checkpoint, distributed
from capsv.config import dump_config, flatten, load_config
from capsv.data import ArkReader, EpisodeLoader, EpisodicBatches, read_data_dir
from capsv.device import Precision, pick_device, resolve_precision, resolve_switch
from capsv.distributed import SINGLE, RankError
from capsv.losses import NPSoftmaxLoss
from capsv.models.speaker_net import SpeakerNet
from capsv.utils import UserError, atomic_open, progress

# What may change between a run and its resumption; anything else means a different experiment.
# The number of ranks is not a key: a run resumes on any number of GPUs (the objective is the same).
RESUMABLE_KEYS = {"train.epochs", "train.num_workers", "train.prefetch_factor", "train.keep_checkpoints", "device",
                  "train.channels_last", "train.compile", "train.dist_timeout_s",
                  "eval.cohort_size", "eval.asnorm_top_k"}   # AS-norm: scoring only; older configs lack them
DATA_WAIT_WARN = 0.10   # share of step time spent waiting for the loader above which the log warns
log = logging.getLogger("capsv.train")


def setup_logging(rank=0):
    """Log lines on stderr: steps/train.sh runs training through a job launcher, whose log
    (<exp>/log/train.log) holds them, here or on a cluster node. Only rank 0 logs."""
    h = logging.StreamHandler()
    h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.handlers[:] = [h]
    log.setLevel(logging.INFO if rank == 0 else logging.ERROR)


def check_same_experiment(exp, cfg):
    path = os.path.join(exp, "config.yaml")
    if not os.path.exists(path):
        return
    old = flatten(load_config(path))
    new = flatten(cfg)
    changed = sorted(k for k in new if k not in RESUMABLE_KEYS and old.get(k) != new[k])
    if changed:
        raise UserError(f"{path} was trained with different {', '.join(changed)}; "
                        f"use another --exp, or delete {exp} to start over")


def resume(models, net, loss_fn, opt, sched, speakers, data_dir, part=SINGLE):
    """Restore model, loss, optimiser, scheduler and RNGs from the newest checkpoint; its epoch, or 0.

    Across ranks, rank 0 picks the checkpoint (and alone reports damaged ones) and every rank
    loads that same file: the un-wrapped model's state, whatever the number of ranks that wrote it.
    """
    # Loaded on the CPU whatever the device: torch.set_rng_state needs CPU ByteTensors, and
    # load_state_dict copies model and optimiser tensors onto the parameters' device.
    state = checkpoint.load_latest(models) if part.rank == 0 else None
    epoch = part.broadcast_int(state["epoch"] if state is not None else 0)
    if epoch == 0:
        return 0
    if part.rank != 0:
        try:
            state = checkpoint.read_checkpoint(checkpoint.checkpoint_path(models, epoch))
        except ValueError as e:
            raise RankError(f"{checkpoint.checkpoint_path(models, epoch)} read by rank 0 cannot be read here ({e}); "
                            f"is {models} on a filesystem every node sees?") from None
    if state["speakers"] != speakers:
        raise UserError(f"the checkpoints in {models} were trained on other speakers than {data_dir}; "
                        f"use another --exp")
    net.load_state_dict(state["model"])
    loss_fn.load_state_dict(state["loss"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    checkpoint.set_rng_state(state["rng"])
    return state["epoch"]


def worker_error_line(e):
    """A UserError raised in a DataLoader worker arrives with the worker's traceback: keep its own line."""
    text = str(e).strip()
    return text.splitlines()[-1].rsplit("UserError: ", 1)[-1] if "\n" in text else text


class TrainStep(nn.Module):
    """One training step's forward as one module, so DDP can wrap it: the trunk on this rank's
    crops (autocast at `precision`, a capsv.device.Precision), then the loss over the global batch
    (capsv.losses) in fp32."""

    def __init__(self, net, loss_fn, part=SINGLE, precision=Precision("fp32", "cpu", "off")):
        super().__init__()
        self.net, self.loss_fn, self.part, self.precision = net, loss_fn, part, precision
        self.scaler = precision.grad_scaler()   # loss scaling for fp16; disabled, a pass-through

    def forward(self, feats, speakers):
        nspk, m, t, f = feats.shape
        with self.precision.autocast():
            frames = self.net.frames(feats.view(nspk * m, t, f))
        if frames.dtype in (torch.bfloat16, torch.float16):   # the head and loss run in full precision
            frames = frames.float()
        return self.loss_fn(self.net, frames.view(nspk, m, *frames.shape[1:]), speakers, self.part)


def train_epoch(step, opt, loader, device, desc, part=SINGLE):
    """One epoch; the mean stats of its batches, and `data_wait`: the share of the epoch's step time
    spent blocked on the loader (across ranks, the largest: the slowest loader holds everyone up)."""
    step.train()
    scaler = getattr(step, "module", step).scaler   # under DDP the TrainStep is step.module
    totals, n = {}, 0
    bar = progress(loader, desc=desc, leave=False) if part.rank == 0 else None   # other ranks stay quiet
    batches = iter(bar if bar is not None else loader)
    wait = 0.0
    t_start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        try:
            feats, speakers = next(batches)
        except StopIteration:
            break
        except UserError as e:   # bad features met by a worker (or here): one line, naming the rank
            raise RankError(worker_error_line(e)) from None
        wait += time.perf_counter() - t0
        feats, speakers = feats.to(device, non_blocking=True), speakers.to(device)
        loss, stats = step(feats, speakers)
        if not math.isfinite(stats["loss"]):   # stop before the step, so no checkpoint holds NaN weights
            raise UserError(f"{desc}, batch {n + 1}: the loss is {stats['loss']} on finite features, so training "
                            f"diverged; lower train.lr (re-running resumes from the last checkpoint)")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()   # fp16: the loss scaled so small gradients survive; else as is
        scaler.step(opt)
        scaler.update()
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v
        n += 1
        if bar is not None:
            bar.set_postfix(loss=f"{totals['loss'] / n:.3f}", acc=f"{totals['np_acc'] / n:.3f}")
    total = time.perf_counter() - t_start
    out = {k: v / max(n, 1) for k, v in totals.items()}
    out["data_wait"] = part.max(wait / total if total > 0 else 0.0)
    return out


def report_epoch(epoch, stats, lr, nbatches, seconds, num_workers):
    log.info(f"epoch {epoch}: loss {stats['loss']:.4f} (np {stats['np_loss']:.4f}, ce {stats['ce_loss']:.4f}) "
             f"np_acc {stats['np_acc']:.3f} ce_acc {stats['ce_acc']:.3f} lr {lr:.6g} "
             f"{nbatches} batches {seconds:.1f} s, data wait {100 * stats['data_wait']:.1f} %")
    if stats["data_wait"] > DATA_WAIT_WARN:
        log.warning(f"WARNING: epoch {epoch} spent {100 * stats['data_wait']:.0f} % of its step time waiting for "
                    f"data (over {100 * DATA_WAIT_WARN:.0f} %); raise train.num_workers (now {num_workers}) or put "
                    f"the feature arks on faster storage")


def gpu_switches(tc, device, world):
    """The precision (capsv.device) and throughput switches this run uses on `device`, TF32 applied."""
    use = {k: resolve_switch(tc[k], device) for k in ("tf32", "channels_last", "compile")}
    use["precision"] = resolve_precision(tc["amp"], device)
    use["sync_bn"] = world > 1 and tc["sync_bn"] and device.type == "cuda"
    if world > 1 and tc["sync_bn"] and device.type != "cuda":
        log.info(f"train.sync_bn: CUDA only, ignored on {device.type} (BatchNorm statistics are per rank)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = use["tf32"]
        torch.backends.cudnn.allow_tf32 = use["tf32"]
    log.info(f"precision {use['precision']}; tf32 {use['tf32']}, channels_last {use['channels_last']}, "
             f"compile {use['compile']}")
    return use


def build_training(cfg, n_speakers, device, part=SINGLE):
    """Net, loss, optimiser, scheduler and the (DDP-wrapped) training step, as training runs them
    on `device`, the CUDA switches applied; local/gpu_check.sh times this very step."""
    tc = cfg["train"]
    use = gpu_switches(tc, device, part.world)
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    net = SpeakerNet.from_config(cfg)
    if use["sync_bn"]:   # BatchNorm over the global batch, as one GPU computes it
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = net.to(device)
    if use["channels_last"]:
        net.trunk.to(memory_format=torch.channels_last)
    if use["compile"]:   # in place: the state_dict keeps its keys, so checkpoints do not change
        net.trunk.compile()
    loss_fn = NPSoftmaxLoss(cfg["model"]["embed_dim"], n_speakers, tc["softmax_weight"]).to(device)
    opt = torch.optim.Adam(list(net.parameters()) + list(loss_fn.parameters()), lr=tc["lr"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=tc["lr_decay_every"], gamma=tc["lr_decay"])
    # DDP may wrap before a checkpoint is loaded: it holds the parameters themselves, which
    # load_state_dict fills in place, from the same file on every rank.
    step = distributed.wrap(TrainStep(net, loss_fn, part, use["precision"]), device)
    return net, loss_fn, opt, sched, step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training YAML (conf/*.yaml, conf/mini/*.yaml)")
    p.add_argument("--data", required=True, help="training data dir with feats.scp, utt2spk, utt2num_frames")
    p.add_argument("--exp", required=True, help="experiment dir")
    p.add_argument("--check", action="store_true",
                   help="only check the config, the data dir and the exp dir, then exit (steps/train.sh runs "
                        "this before it submits the job)")
    p.add_argument("--world-size", type=int, default=1,
                   help="with --check: the number of ranks the job will run (train.speakers_per_batch must divide)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.epochs=3")
    args = p.parse_args()

    env = distributed.launched()   # (rank, world, local rank, local world) under torchrun
    rank, world = (env[0], env[1]) if env else (0, 1 if not args.check else args.world_size)
    setup_logging(rank)
    cfg = load_config(args.config, args.overrides)
    check_same_experiment(args.exp, cfg)
    # --check runs on the submitting host, which need not have the job's GPU
    device = torch.device("cpu") if args.check else pick_device(cfg["device"])
    tc = cfg["train"]
    if world < 1 or tc["speakers_per_batch"] % world:
        raise UserError(f"train.speakers_per_batch={tc['speakers_per_batch']} cannot be split over {world} ranks "
                        f"(GPUs x nodes); each rank takes an equal block of a batch's speakers: make it a multiple "
                        f"of {world}")

    utt2spk, nframes, scp = read_data_dir(args.data)
    feat_dim = ArkReader(scp).read(next(iter(scp)), 0, 1).shape[1]
    if feat_dim != cfg["model"]["n_mels"]:
        raise UserError(f"{args.data}/feats.scp has {feat_dim}-dim features but model.n_mels is "
                        f"{cfg['model']['n_mels']}; fix conf/fbank.conf or the config")
    sampler = EpisodicBatches(utt2spk, tc["speakers_per_batch"], tc["utts_per_speaker"], cfg["seed"])
    if sampler.skipped:
        log.info(f"{len(sampler.skipped)} speakers with fewer than {tc['utts_per_speaker']} utterances are not used "
                 f"(train.utts_per_speaker), e.g. {sampler.skipped[0]}")
    if args.check:
        return

    part = SINGLE
    if env:
        device = distributed.rank_device(device, env[2], env[3])
        part = distributed.init(device, tc["dist_timeout_s"])
    net, loss_fn, opt, sched, step = build_training(cfg, len(sampler.speakers), device, part)

    models = os.path.join(args.exp, "models")
    start = resume(models, net, loss_fn, opt, sched, sampler.speakers, args.data, part) + 1
    if start > 1:
        log.info(f"resuming from {models} epoch {start - 1}")
    if rank == 0:
        with atomic_open(os.path.join(args.exp, "config.yaml")) as f:
            f.write(dump_config(cfg))

    nparam = sum(p.numel() for p in net.parameters())
    ranks = f" x {world} ranks ({tc['speakers_per_batch'] // world} speakers of each batch per rank)" if world > 1 else ""
    log.info(f"{cfg['model']['pooling'].upper()} model, {nparam / 1e6:.3f} M parameters "
             f"(trunk {sum(p.numel() for p in net.trunk.parameters()) / 1e6:.3f} M), device {device}{ranks}; "
             f"{len(utt2spk)} utterances, {len(sampler.speakers)} speakers; batch {tc['speakers_per_batch']} x "
             f"{tc['utts_per_speaker']} crops of {tc['crop_frames']} frames")
    if start > tc["epochs"]:
        log.info(f"already trained for {tc['epochs']} epochs; nothing to do")
        return

    loader = EpisodeLoader(ArkReader(scp), nframes, tc["crop_frames"], cfg["seed"], (part.rank, part.world),
                           tc["num_workers"], pin_memory=device.type == "cuda", prefetch_factor=tc["prefetch_factor"])
    csv_path = os.path.join(args.exp, "train_log.csv")
    history = pd.read_csv(csv_path) if rank == 0 and os.path.exists(csv_path) else pd.DataFrame()
    if len(history):
        history = history[history["epoch"] < start]
    for epoch in range(start, tc["epochs"] + 1):
        t0 = time.time()
        batches = sampler.epoch(epoch)
        lr = opt.param_groups[0]["lr"]
        stats = train_epoch(step, opt, loader.epoch(epoch, batches), device, f"epoch {epoch}/{tc['epochs']}", part)
        sched.step()
        if rank != 0:
            continue
        row = {"epoch": epoch, **stats, "lr": lr, "batches": len(batches), "seconds": round(time.time() - t0, 2)}
        checkpoint.save_checkpoint(models, epoch, {
            "epoch": epoch, "config": cfg, "speakers": sampler.speakers,
            "model": net.state_dict(), "loss": loss_fn.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": checkpoint.rng_state()}, keep=tc["keep_checkpoints"])
        history = pd.concat([history, pd.DataFrame([row])], ignore_index=True)
        with atomic_open(csv_path) as f:
            history.to_csv(f, index=False, float_format="%.6g")
        report_epoch(epoch, stats, lr, len(batches), row["seconds"], tc["num_workers"])


if __name__ == "__main__":
    distributed.run_ranks(main)
