"""The attention picture: CAP's cross-attention weights (and SAP's self-attention) of one trial, over time.

A trial is scored as in stage 3: each utterance gives 10 evenly spaced crops of 350 frames (capsv.scoring),
the trunk turns each crop into T' = 88 frames, and CAP pools every enroll crop i against every test crop j
with weights w^s_ij (over the enroll crop's T' frames) and w^q_ij (over the test crop's). To draw them under
the fbank, each trunk frame is mapped back to the utterance frames nearest its centre, and where crops
overlap the crops' weights are averaged per utterance frame.
"""
import glob
import json
import os

import numpy as np
import torch

from capsv import checkpoint
from capsv.config import load_config
from capsv.models.pooling import cap_cross_weights
from capsv.models.speaker_net import SpeakerNet
from capsv.scoring import crop_starts, score_trials, trunk_batches
from capsv.utils import UserError, atomic_path


def trunk_time_stride(trunk):
    """Input frames per trunk frame: the product of the time strides of the trunk's convolutions."""
    stride = trunk.conv1.stride[1]
    for block in trunk.blocks:
        stride *= block.conv1.stride[1]
    return stride


def crop_to_trunk_frame(length, t_out, stride):
    """For each frame c of a crop of `length`, the trunk frame k whose centre is nearest: [length] ints.

    With 3x3 convolutions of padding 1, a stride-2 layer's output j is centred on its input 2j, so trunk frame k
    is centred on crop frame stride * k (not stride * k + 1.5); ties go to the earlier frame.
    """
    c = np.arange(length)
    return np.minimum((c + (stride - 1) // 2) // stride, t_out - 1)


def utterance_curve(weights, starts, length, num_frames, stride):
    """Per-utterance-frame weights [num_frames] from per-crop weights [K, T'] of crops at `starts`.

    Each frame takes the mean over the crops covering it (NaN where none does). An utterance shorter than a
    crop was repeated to fill it (capsv.data.crop), so its crop frames wrap around.
    """
    weights = np.asarray(weights, dtype=np.float64)
    k = crop_to_trunk_frame(length, weights.shape[-1], stride)
    total, count = np.zeros(num_frames), np.zeros(num_frames)
    for w, start in zip(weights, starts):
        frames = start + np.arange(length) if num_frames >= length else np.arange(length) % num_frames
        np.add.at(total, frames, w[k])
        np.add.at(count, frames, 1)
    with np.errstate(invalid="ignore"):
        return total / count


def cap_trial_weights(net, fe, ft):
    """w^s [Ke, Kt, T'] of the enroll crops fe [Ke, T', C] against each test crop, and w^q [Kt, Ke, T']."""
    return cap_cross_weights(net.pool, fe, ft), cap_cross_weights(net.pool, ft, fe)


def load_exp(exp, pooling, option):
    """(net in eval mode, config, checkpoint epoch) of an experiment trained with `pooling`."""
    cfg_path = os.path.join(exp, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{option} {exp}: no {cfg_path}; give an experiment dir that stage 2 trained")
    cfg = load_config(cfg_path)
    if cfg["model"]["pooling"] != pooling:
        hint = " (give it as --sap-exp for the contrast)" if cfg["model"]["pooling"] == "sap" else ""
        raise UserError(f"{option} {exp} was trained with {cfg['model']['pooling'].upper()} pooling; {option} needs "
                        f"a {pooling.upper()} experiment{hint}")
    state = checkpoint.load_for_inference(exp)
    return SpeakerNet.from_checkpoint(state), cfg, state["epoch"]


def scored_data_dirs(exp):
    """The data dirs whose trial lists stage 3 scored for `exp` (from its score files' .json records)."""
    dirs = set()
    for path in glob.glob(os.path.join(exp, "scores", "*.score.json")):
        try:
            with open(path) as f:
                trials = json.load(f).get("trials")
        except (OSError, ValueError):
            continue
        if trials:
            dirs.add(os.path.dirname(trials))
    return sorted(dirs)


def default_data_dir(exp):
    dirs = scored_data_dirs(exp)
    if not dirs:
        raise UserError(f"{exp}/scores holds no score file naming its data dir; give --data <test data dir>")
    if len(dirs) > 1:
        raise UserError(f"{exp} was scored on several data dirs ({', '.join(dirs)}); choose one with --data")
    if not os.path.isfile(os.path.join(dirs[0], "feats.scp")):
        raise UserError(f"{exp} was scored on {dirs[0]}, which has no feats.scp from here; run from the directory "
                        f"stage 3 ran in, or give --data")
    return dirs[0]


def trial_label(data, enroll, test):
    """'target' or 'nontarget' from the data dir's trial lists, or None if none holds the trial."""
    for path in sorted(glob.glob(os.path.join(data, "trials*"))):
        with open(path) as f:
            for line in f:
                toks = line.split()
                if len(toks) == 3 and toks[0] == enroll and toks[1] == test:
                    return toks[2]
    return None


@torch.no_grad()
def model_view(net, cfg, reader, nframes, enroll, test, device):
    """What one model sees of the trial: its crops' trunk outputs, per-crop weights and stage 3's score."""
    ecfg = cfg["eval"]
    net = net.to(device)
    utts = sorted({enroll, test})
    frames = {}
    for chunk, out in trunk_batches(net, reader, nframes, utts, ecfg, device):
        frames.update(zip(chunk, out))
    score = float(score_trials(net, {u: frames[u] for u in utts}, [(enroll, test)], ecfg["trial_batch"])[0])
    fe, ft = frames[enroll].cpu(), frames[test].cpu()
    net = net.cpu()
    if net.pair_dependent:
        we, wt = cap_trial_weights(net, fe, ft)       # [Ke, Kt, T'], [Kt, Ke, T']
    else:
        we, wt = net.pool.weights(fe), net.pool.weights(ft)    # [K, T']
    return {"score": score, "frames": (fe, ft), "weights": (we.numpy(), wt.numpy()),
            "length": ecfg["crop_frames"], "num_crops": ecfg["num_crops"],
            "stride": trunk_time_stride(net.trunk), "t_out": fe.shape[-2]}


def side_curves(view, side, nframes, crop_pair=None):
    """Per-utterance-frame weights of one side (0 enroll, 1 test) of a model view.

    CAP: the mean over the partner's crops (or, with crop_pair (i, j), enroll crop i against test crop j
    only); SAP: per crop (with crop_pair, that side's crop only).
    """
    w = view["weights"][side]
    starts = crop_starts(nframes, view["length"], view["num_crops"])
    keep = slice(None)
    if crop_pair is not None:
        own, other = crop_pair[side], crop_pair[1 - side]
        keep = [own]
        if w.ndim == 3:
            w = w[:, other]
    elif w.ndim == 3:
        w = w.mean(1)
    return utterance_curve(w[keep], starts[keep], view["length"], nframes, view["stride"])


def plot(path, utts, feats, cap, sap=None, crop_pair=None, title="", frame_shift=0.01, yscale="linear"):
    """The picture: for each utterance its fbank, and under it, aligned in time, CAP's (and SAP's) weights."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 8.5))
    grid = fig.add_gridspec(5, 1, height_ratios=[2, 1.3, 0.55, 2, 1.3], hspace=0.08,
                            left=0.07, right=0.79, top=0.9, bottom=0.09)
    try:
        for side, (utt, x) in enumerate(zip(utts, feats)):
            n = len(x)
            t = (np.arange(n) + 0.5) * frame_shift
            ax_f = fig.add_subplot(grid[3 * side])
            ax_w = fig.add_subplot(grid[3 * side + 1], sharex=ax_f)
            ax_f.imshow(x.T, origin="lower", aspect="auto", cmap="magma", extent=(0, n * frame_shift, 0, x.shape[1]))
            ax_f.set_ylabel("mel bin")
            repeated = f", repeated to fill a {cap['length']}-frame crop" if n < cap["length"] else ""
            ax_f.set_title(f"{'enroll' if side == 0 else 'test'}: {utt} ({n} frames{repeated})", fontsize=10,
                           loc="left")
            ax_f.tick_params(labelbottom=False)
            sym = "$w^s$" if side == 0 else "$w^q$"
            how = (f"enroll crop {crop_pair[0] + 1}\nvs test crop {crop_pair[1] + 1}" if crop_pair is not None
                   else f"mean over the\n{cap['num_crops']}x{cap['num_crops']} crop pairs")
            ax_w.plot(t, side_curves(cap, side, n, crop_pair), color="C0", lw=1.2, label=f"CAP {sym} ({how})")
            if sap is not None:
                ax_w.plot(t, side_curves(sap, side, n, crop_pair), color="C1", lw=1.0, alpha=0.85,
                          label="SAP self-attention" + (" (same crop)" if crop_pair is not None else ""))
            ax_w.axhline(1 / cap["t_out"], color="0.4", ls="--", lw=0.8, label=f"uniform 1/T' = 1/{cap['t_out']}")
            if crop_pair is not None:
                s = crop_starts(n, cap["length"], cap["num_crops"])[crop_pair[side]]
                ax_w.axvspan(s * frame_shift, min(s + cap["length"], n) * frame_shift, color="0.92", zorder=0)
            ax_w.set_xlim(0, n * frame_shift)
            if yscale == "log":    # CAP's weights reach 1e-40: below 1e-4 is off the axis
                ax_w.set_yscale("log")
                ax_w.set_ylim(1e-4, 1.5)
            else:
                ax_w.set_ylim(bottom=0)
            ax_w.set_ylabel("weight")
            ax_w.set_xlabel("time (s)")
            ax_w.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        fig.suptitle(title, fontsize=10)
        fig.text(0.01, 0.005, f"Each trunk frame's weight is drawn over the {cap['stride']} input frames nearest its "
                 "centre; where crops overlap, the crops' weights are averaged. Each crop's weights sum to 1 over "
                 f"its {cap['t_out']} trunk frames.", fontsize=7, color="0.3")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
