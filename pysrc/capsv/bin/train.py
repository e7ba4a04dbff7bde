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

from capsv import checkpoint
from capsv.config import dump_config, flatten, load_config
from capsv.data import ArkReader, EpisodeDataset, EpisodicBatches, read_data_dir
from capsv.losses import NPSoftmaxLoss
from capsv.models.speaker_net import SpeakerNet
from capsv.utils import UserError, atomic_open, progress, run_main

# What may change between a run and its resumption; anything else means a different experiment.
RESUMABLE_KEYS = {"train.epochs", "train.num_workers", "train.keep_checkpoints", "device"}
log = logging.getLogger("capsv.train")


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda was asked for but no GPU is visible (torch.cuda.is_available() is False); "
                        "set device=auto or device=cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def setup_logging():
    """Log lines on stderr: steps/train.sh runs training through a job launcher, whose log
    (<exp>/log/train.log) holds them, here or on a cluster node."""
    h = logging.StreamHandler()
    h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.handlers[:] = [h]
    log.setLevel(logging.INFO)


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


def resume(models, net, loss_fn, opt, sched, speakers, data_dir):
    """Restore model, loss, optimiser, scheduler and RNGs from the newest checkpoint; its epoch, or 0."""
    # Loaded on the CPU whatever the device: torch.set_rng_state needs CPU ByteTensors, and
    # load_state_dict copies model and optimiser tensors onto the parameters' device.
    state = checkpoint.load_latest(models)
    if state is None:
        return 0
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


def train_epoch(net, loss_fn, opt, loader, device, amp, desc):
    net.train()
    loss_fn.train()
    totals, n = {}, 0
    bar = progress(loader, desc=desc, leave=False)
    batches = iter(bar)
    while True:
        try:
            feats, speakers = next(batches)
        except StopIteration:
            break
        except UserError as e:   # bad features met by a worker: one line, as from the main process
            raise UserError(worker_error_line(e)) from None
        feats, speakers = feats.to(device, non_blocking=True), speakers.to(device)
        nspk, m, t, f = feats.shape
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            frames = net.frames(feats.view(nspk * m, t, f))
        loss, stats = loss_fn(net, frames.float().view(nspk, m, *frames.shape[1:]), speakers)
        if not math.isfinite(stats["loss"]):   # stop before the step, so no checkpoint holds NaN weights
            raise UserError(f"{desc}, batch {n + 1}: the loss is {stats['loss']} on finite features, so training "
                            f"diverged; lower train.lr (re-running resumes from the last checkpoint)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v
        n += 1
        bar.set_postfix(loss=f"{totals['loss'] / n:.3f}", acc=f"{totals['np_acc'] / n:.3f}")
    return {k: v / max(n, 1) for k, v in totals.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training YAML (conf/*.yaml, conf/mini/*.yaml)")
    p.add_argument("--data", required=True, help="training data dir with feats.scp, utt2spk, utt2num_frames")
    p.add_argument("--exp", required=True, help="experiment dir")
    p.add_argument("--check", action="store_true",
                   help="only check the config, the data dir and the exp dir, then exit (steps/train.sh runs "
                        "this before it submits the job)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.epochs=3")
    args = p.parse_args()

    cfg = load_config(args.config, args.overrides)
    check_same_experiment(args.exp, cfg)
    setup_logging()
    device = pick_device(cfg["device"])
    tc = cfg["train"]
    amp = tc["amp"] and device.type == "cuda"

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

    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    net = SpeakerNet.from_config(cfg).to(device)
    loss_fn = NPSoftmaxLoss(cfg["model"]["embed_dim"], len(sampler.speakers), tc["softmax_weight"]).to(device)
    opt = torch.optim.Adam(list(net.parameters()) + list(loss_fn.parameters()), lr=tc["lr"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=tc["lr_decay_every"], gamma=tc["lr_decay"])

    models = os.path.join(args.exp, "models")
    start = resume(models, net, loss_fn, opt, sched, sampler.speakers, args.data) + 1
    if start > 1:
        log.info(f"resuming from {models} epoch {start - 1}")
    with atomic_open(os.path.join(args.exp, "config.yaml")) as f:
        f.write(dump_config(cfg))

    nparam = sum(p.numel() for p in net.parameters())
    log.info(f"{cfg['model']['pooling'].upper()} model, {nparam / 1e6:.3f} M parameters "
             f"(trunk {sum(p.numel() for p in net.trunk.parameters()) / 1e6:.3f} M), device {device}; "
             f"{len(utt2spk)} utterances, {len(sampler.speakers)} speakers; "
             f"batch {tc['speakers_per_batch']} x {tc['utts_per_speaker']} crops of {tc['crop_frames']} frames")
    if start > tc["epochs"]:
        log.info(f"already trained for {tc['epochs']} epochs; nothing to do")
        return

    reader = ArkReader(scp)
    csv_path = os.path.join(args.exp, "train_log.csv")
    history = pd.read_csv(csv_path) if os.path.exists(csv_path) else pd.DataFrame()
    if len(history):
        history = history[history["epoch"] < start]
    for epoch in range(start, tc["epochs"] + 1):
        t0 = time.time()
        data = EpisodeDataset(reader, nframes, sampler.epoch(epoch), tc["crop_frames"], cfg["seed"], epoch)
        loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=tc["num_workers"],
                                             pin_memory=device.type == "cuda")
        lr = opt.param_groups[0]["lr"]
        stats = train_epoch(net, loss_fn, opt, loader, device, amp, f"epoch {epoch}/{tc['epochs']}")
        sched.step()
        row = {"epoch": epoch, **stats, "lr": lr, "batches": len(data), "seconds": round(time.time() - t0, 2)}
        checkpoint.save_checkpoint(models, epoch, {
            "epoch": epoch, "config": cfg, "speakers": sampler.speakers,
            "model": net.state_dict(), "loss": loss_fn.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": checkpoint.rng_state()}, keep=tc["keep_checkpoints"])
        history = pd.concat([history, pd.DataFrame([row])], ignore_index=True)
        with atomic_open(csv_path) as f:
            history.to_csv(f, index=False, float_format="%.6g")
        log.info(f"epoch {epoch}: loss {stats['loss']:.4f} (np {stats['np_loss']:.4f}, ce {stats['ce_loss']:.4f}) "
                 f"np_acc {stats['np_acc']:.3f} ce_acc {stats['ce_acc']:.3f} lr {lr:.6g} "
                 f"{len(data)} batches {row['seconds']:.1f} s")


if __name__ == "__main__":
    run_main(main)
