"""Verify recordings: the score of two audio files, accept/reject at the thresholds stage 4 calibrated, and the
calibrated log-likelihood ratio with its Bayes decision.

    python -m capsv.bin.verify --exp exp/mini_cap a.wav b.wav
    python -m capsv.bin.verify --exp exp/mini_cap --pairs pairs.txt     # lines `<a> <b>` of audio paths
    python -m capsv.bin.verify --exp exp/mini_cap --p-target 0.01 a.wav b.wav

Prints one line per pair on stdout:

    <a> <b> <score> <decision at the EER threshold> <decision at the minDCF(0.05) threshold> <llr> <bayes decision>

each decision `accept` or `reject`: at a threshold, accept iff score >= threshold; <llr> = a * score + b, the
calibrated log-likelihood ratio, and the Bayes decision at prior --p-target (default the calibration's, 0.05)
accepts iff llr > log((1 - P) / P). On stderr, three `#` lines name the thresholds, the map and the trial list
they were calibrated on (<exp>/calibration.json, written by stage 4), then the columns; and one `WARNING:`
line when verify runs at another precision than the scores that set them (their device and eval.precision).
Audio is read as stage 1 reads it (any format libsndfile reads, any sample rate, channels averaged) with
the fbank options recorded at calibration, and scored as stage 3 scores (the same crops, checkpoint and
code), so a trial's score equals its stage-3 score. Each distinct file is read and run through the network
once. The newest checkpoint must be the one whose scores were calibrated, by content (SHA-256), not only by
epoch number (else: re-run stages 3 and 4).
"""
import argparse
import os
import sys

from capsv.calibration import THRESHOLDS, apply_map, bayes_decide, check_checkpoint, decide, load_calibration, \
    read_files, read_pairs, score_files
from capsv.metrics import bayes_threshold
from capsv.utils import UserError, run_main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exp", required=True, help="experiment dir, trained, scored and calibrated (stages 2-4)")
    ap.add_argument("--pairs", help="file of `<a> <b>` lines, two audio paths each, instead of two files")
    ap.add_argument("--device", help="cpu, cuda or auto (default: the experiment's config, as in stage 3)")
    ap.add_argument("--p-target", type=float, help="prior of the Bayes decision on the LLR (default: the "
                                                       "calibration's, 0.05)")
    ap.add_argument("files", nargs="*", help="two audio files: enrollment and test")
    args = ap.parse_args()
    if args.pairs and args.files:
        raise UserError("give either two audio files or --pairs FILE, not both")
    if not args.pairs and len(args.files) != 2:
        raise UserError(f"give two audio files (got {len(args.files)}), or --pairs FILE")
    if args.p_target is not None and not 0 < args.p_target < 1:
        raise UserError(f"--p-target {args.p_target}: a prior is a probability strictly between 0 and 1")

    cal = load_calibration(args.exp)
    p_target = cal["map"]["p_target"] if args.p_target is None else args.p_target
    pairs = read_pairs(args.pairs) if args.pairs else [tuple(args.files)]
    reader, trials = read_files(pairs, cal["fbank"]["options"])   # a bad file is found before the model loads
    import torch   # here: a usage or input error is reported without the seconds of importing torch

    from capsv import checkpoint
    from capsv.config import load_config
    from capsv.device import pick_device, same_precision
    from capsv.models.speaker_net import SpeakerNet
    from capsv.scoring import scoring_precision

    cfg = load_config(os.path.join(args.exp, "config.yaml"),
                      [f"device={args.device}"] if args.device else [])
    device = pick_device(cfg["device"])
    state = checkpoint.load_for_inference(args.exp)
    check_checkpoint(cal, state, args.exp)
    differs = same_precision(cal if cal.get("precision") else None, scoring_precision(cal["eval"], device))
    if differs:
        print(f"WARNING: {differs}", file=sys.stderr)
    net = SpeakerNet.from_checkpoint(state, device)

    with torch.inference_mode():
        scores = score_files(net, reader, trials, cal["eval"], device, cfg["eval"]["trial_batch"])

    t = cal["thresholds"]
    show = {k: "none (rejects all)" if t[k] is None else f"{t[k]:.6f}" for k in THRESHOLDS}
    print(f"# {args.exp}, epoch {state['epoch']}: thresholds eer {show['eer']}, min_dcf_0.05 "
          f"{show['min_dcf_0.05']}, calibrated on {cal['list']} ({cal.get('trials')}, {cal['score_kind']} scores)",
          file=sys.stderr)
    m = cal["map"]
    print(f"# llr = {m['a']:.6g} * score {'+-'[m['b'] < 0]} {abs(m['b']):.6g}, fitted on {m['list']} at P_target "
          f"{m['p_target']}; "
          f"Bayes decision at P_target {p_target}: accept iff llr > {bayes_threshold(p_target):.6f}", file=sys.stderr)
    print("# <a> <b> <score> <decision at the eer threshold> <decision at the min_dcf_0.05 threshold> <llr> "
          f"<bayes decision at P_target {p_target}>", file=sys.stderr)
    for (a, b), s in zip(pairs, scores):
        s = float(f"{s:.6f}")   # decided as printed: the thresholds come from stage 3's 6-decimal scores
        llr = float(f"{apply_map(m, s):.6f}")   # as stage 4's LLR files hold it
        print(f"{a} {b} {s:.6f} " + " ".join(decide(s, t[k]) for k in THRESHOLDS)
              + f" {llr:.6f} {bayes_decide(llr, p_target)}")


if __name__ == "__main__":
    run_main(main)
