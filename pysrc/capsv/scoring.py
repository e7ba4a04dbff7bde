"""Evaluation protocol (DESIGN §2): 10 evenly spaced crops of 350 frames per utterance,
score = mean cosine over the 10 x 10 crop pairs of a trial.

The trunk runs once per utterance (all its crops in one batch). TAP/SAP embeddings do not
depend on the partner, so the mean of the 100 cosines is the dot product of the two mean
unit-length crop embeddings. CAP pools every crop pair jointly; trials are batched and the
fast identity keeps that a few small matrix products per pair.
"""
import numpy as np
import torch
import torch.nn.functional as F

from capsv.data import crop
from capsv.utils import progress


def crop_starts(num_frames, length, num_crops):
    """Evenly spaced crop offsets; a short utterance gives offsets 0 (it is repeated to fill)."""
    return np.linspace(0, max(num_frames - length, 0), num_crops).round().astype(int)


def utterance_crops(reader, utt, num_frames, length, num_crops):
    return np.stack([crop(reader, utt, num_frames, length, s) for s in crop_starts(num_frames, length, num_crops)])


@torch.no_grad()
def crop_frames(net, reader, nframes, utts, ecfg, device, utts_per_batch=8):
    """utt -> trunk outputs of its crops [num_crops, T', C] (float32, on `device`)."""
    out = {}
    for i in progress(range(0, len(utts), utts_per_batch), desc="trunk", leave=False):
        chunk = utts[i:i + utts_per_batch]
        feats = np.concatenate([utterance_crops(reader, u, nframes[u], ecfg["crop_frames"], ecfg["num_crops"])
                                for u in chunk])
        frames = net.frames(torch.from_numpy(feats).to(device)).float()
        for j, u in enumerate(chunk):
            out[u] = frames[j * ecfg["num_crops"]:(j + 1) * ecfg["num_crops"]]
    return out


@torch.no_grad()
def score_trials(net, frames, trials, trial_batch):
    """Mean cosine over all crop pairs, for each (enroll, test, ...) trial, in trial order."""
    if not net.pair_dependent:
        utts = sorted(frames)
        emb = {u: F.normalize(net.embed(net.pool.single(frames[u])), dim=-1).mean(0) for u in utts}
        return np.array([float(emb[e] @ emb[t]) for e, t, *_ in trials])
    scores = []
    for i in progress(range(0, len(trials), trial_batch), desc="CAP trials", leave=False):
        chunk = trials[i:i + trial_batch]
        a = torch.stack([frames[e] for e, *_ in chunk])        # [B, crops, T', C]
        b = torch.stack([frames[t] for _, t, *_ in chunk])
        ea, eb = net.embed_grid(a, b)                           # [B, crops_b, crops_a, E]
        cos = (F.normalize(ea, dim=-1) * F.normalize(eb, dim=-1)).sum(-1)
        scores.append(cos.mean(dim=(-1, -2)).cpu().numpy())
    return np.concatenate(scores) if scores else np.zeros(0)
