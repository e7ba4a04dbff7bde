"""Benchmark the pooling head of one training step, side by side, in one run.

    python -m capsv.bin.bench_pooling [--speakers 200] [--utts 3] [--frames 200] [--device auto]

Times forward + backward of pooling -> embedding head -> NP + softmax loss on trunk-shaped
frames (the paper's batch by default: 200 speakers x 3 utterances, 2 s crops -> 50 frames of
128 channels) for TAP, SAP, CAP in the fast form used by the recipe, and CAP in the direct
form of eq. 9-12 batched over all query/support pairs (the N_q x N_s x T x T tensor the fast
form avoids). The trunk's own forward + backward on the same batch is the yardstick.
"""
import argparse
import time

import torch

from capsv.bin.train import pick_device
from capsv.config import load_config
from capsv.losses import NPSoftmaxLoss
from capsv.models.pooling import cap_grid_direct
from capsv.models.speaker_net import SpeakerNet
from capsv.utils import run_main


class DirectCAPNet(SpeakerNet):
    """SpeakerNet whose CAP grid is computed by the literal equations (benchmark only)."""

    def embed_grid(self, a, b):
        return self.embed_pairs(*cap_grid_direct(self.pool, a, b))


def timed(fn, device, repeats):
    times, peak = [], 0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated())
        times.append(time.perf_counter() - t0)
    return min(times), peak


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speakers", type=int, default=200)
    p.add_argument("--utts", type=int, default=3)
    p.add_argument("--frames", type=int, default=200, help="input frames per crop (the trunk keeps 1/4)")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-direct", action="store_true", help="leave out the direct CAP form")
    args = p.parse_args()
    device = pick_device(args.device)
    cfg = load_config(None)
    n, m, t = args.speakers, args.utts, args.frames
    torch.manual_seed(0)
    rows = []

    trunk_net = SpeakerNet.from_config(cfg).to(device)
    feats = torch.randn(n * m, t, cfg["model"]["n_mels"], device=device)

    def trunk_step():
        trunk_net.zero_grad(set_to_none=True)
        trunk_net.frames(feats).sum().backward()
    rows.append(("trunk (yardstick)",) + timed(trunk_step, device, args.repeats))
    with torch.no_grad():
        frames0 = trunk_net.frames(feats[:1])
    frames = torch.randn(n, m, frames0.shape[1], frames0.shape[2], device=device, requires_grad=True)

    methods = [("TAP", "tap", SpeakerNet), ("SAP", "sap", SpeakerNet), ("CAP fast (recipe)", "cap", SpeakerNet)]
    if not args.skip_direct:
        methods.append(("CAP direct eq. 9-12", "cap", DirectCAPNet))
    for label, pooling, cls in methods:
        cfg["model"]["pooling"] = pooling
        net = cls.from_config(cfg).to(device)
        loss_fn = NPSoftmaxLoss(cfg["model"]["embed_dim"], n).to(device)
        speakers = torch.arange(n, device=device)

        def head_step():
            net.zero_grad(set_to_none=True)
            frames.grad = None
            loss, _ = loss_fn(net, frames, speakers)
            loss.backward()
        try:
            rows.append((label,) + timed(head_step, device, args.repeats))
        except torch.OutOfMemoryError:
            rows.append((label, float("nan"), -1))
            if device.type == "cuda":
                torch.cuda.empty_cache()

    base = rows[0][1]
    print(f"pooling head, forward + backward, batch {n} speakers x {m} utterances x {t} frames, device {device}")
    print(f"{'':22s} {'seconds':>9s} {'x trunk':>8s} {'peak GB':>8s}")
    for label, sec, peak in rows:
        mem = "OOM" if peak < 0 else (f"{peak / 2**30:.2f}" if device.type == "cuda" else "-")
        print(f"{label:22s} {sec:9.3f} {sec / base:8.3f} {mem:>8s}")


if __name__ == "__main__":
    run_main(main)
