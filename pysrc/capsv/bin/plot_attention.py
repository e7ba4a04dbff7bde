"""The attention picture of one trial: both utterances' fbank and, aligned in time under each, CAP's
cross-attention weights (w^s of the enroll side, w^q of the test side) and, for contrast, SAP's
self-attention weights.

    python -m capsv.bin.plot_attention --exp exp/mini_cap --trial "<enroll> <test>" \\
        [--sap-exp exp/mini_sap] [--data data/synth_test] [--crop-pair I J] [--out file.png]

The utterances are cropped and scored exactly as in stage 3 (eval.num_crops crops of eval.crop_frames,
the newest checkpoint of each exp); the title gives each model's score of the trial, the one stage 3
writes. By default the weights drawn are, for each enroll crop, the mean of its w^s over the test crops
(and likewise for w^q), averaged per frame over the crops that overlap there; --crop-pair I J draws
enroll crop I against test crop J only (1-based, in time order). The dashed line is the uniform weight
1/T'. --data defaults to the data dir whose trial lists stage 3 scored for --exp (from
<exp>/scores/*.score.json). Writes <exp>/attention_<enroll>_<test>.png unless --out is given.
"""
import argparse
import os

import torch

from capsv.attention import default_data_dir, load_exp, model_view, plot, trial_label
from capsv.device import pick_device
from capsv.data import ArkReader, read_data_dir
from capsv.utils import UserError, run_main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True, help="a CAP experiment dir (trained by stage 2)")
    p.add_argument("--trial", required=True,
                   help='"<enroll> <test>": two utterance ids of --data (a trials line with its label also works)')
    p.add_argument("--data", help="the test data dir (default: the one stage 3 scored for --exp)")
    p.add_argument("--sap-exp", help="a SAP experiment dir whose self-attention is drawn for contrast")
    p.add_argument("--crop-pair", nargs=2, type=int, metavar=("I", "J"),
                   help="draw enroll crop I against test crop J (1-based) instead of the mean over crop pairs")
    p.add_argument("--out", help="PNG to write (default <exp>/attention_<enroll>_<test>.png)")
    p.add_argument("--yscale", choices=("linear", "log"), default="linear",
                   help="the weights' axis; log shows small weights and the uniform level beside a sharp peak")
    p.add_argument("--frame-shift-ms", type=float, default=10.0, help="the features' frame shift, for the time axis")
    args = p.parse_args()

    toks = args.trial.split()
    if not (len(toks) == 2 or (len(toks) == 3 and toks[2] in ("target", "nontarget"))):
        raise UserError(f'--trial "{args.trial}": give two utterance ids, "<enroll> <test>"')
    enroll, test = toks[:2]
    net, cfg, epoch = load_exp(args.exp, "cap", "--exp")
    sap = load_exp(args.sap_exp, "sap", "--sap-exp") if args.sap_exp else None
    data = args.data or default_data_dir(args.exp)
    utt2spk, nframes, scp = read_data_dir(data)
    for u in (enroll, test):
        if u not in utt2spk:
            raise UserError(f"--trial: utterance {u} is not in {data}/utt2spk; give utterance ids of {data} "
                            f"(e.g. a line of {data}/trials)")
    crop_pair = None
    if args.crop_pair:
        k = cfg["eval"]["num_crops"]
        if not all(1 <= i <= k for i in args.crop_pair):
            raise UserError(f"--crop-pair {args.crop_pair[0]} {args.crop_pair[1]}: crops are numbered 1..{k}")
        if sap and sap[1]["eval"]["num_crops"] != k:
            raise UserError(f"--crop-pair: {args.sap_exp} crops utterances {sap[1]['eval']['num_crops']} times, "
                            f"{args.exp} {k} times; drop --crop-pair or --sap-exp")
        crop_pair = (args.crop_pair[0] - 1, args.crop_pair[1] - 1)
    suffix = f"_crops{crop_pair[0] + 1}-{crop_pair[1] + 1}" if crop_pair else ""
    out = args.out or os.path.join(args.exp, f"attention_{enroll}_{test}{suffix}.png")

    device = pick_device(cfg["device"])
    reader = ArkReader(scp)
    cap = model_view(net, cfg, reader, nframes, enroll, test, device)
    title = f"{enroll} vs {test}"
    label = trial_label(data, enroll, test)
    if label:
        title += f" ({label})"
    title += f"\nCAP {os.path.basename(os.path.normpath(args.exp))} (epoch {epoch}): score {cap['score']:.4f}"
    sap_view = None
    if sap:
        sap_view = model_view(sap[0], sap[1], reader, nframes, enroll, test, pick_device(sap[1]["device"]))
        title += f"   SAP {os.path.basename(os.path.normpath(args.sap_exp))} (epoch {sap[2]}): " \
                 f"score {sap_view['score']:.4f}"
    feats = [reader.read(u) for u in (enroll, test)]
    plot(out, (enroll, test), feats, cap, sap_view, crop_pair, title, args.frame_shift_ms / 1000, args.yscale)
    scores = f"CAP score {cap['score']:.6f}" + (f", SAP score {sap_view['score']:.6f}" if sap_view else "")
    print(f"{enroll} {test}: {scores} -> {out}")


if __name__ == "__main__":
    with torch.inference_mode():
        run_main(main)
