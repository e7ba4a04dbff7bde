"""Stage 3, first half: every utterance through the trunk once, into Kaldi archives (layout: capsv.embeddings).

    python -m capsv.bin.extract --exp exp/mini_cap --data data/synth_test \\
        [--out exp/mini_cap/embeddings/synth_test] [--job J --njobs N] [--cohort] [eval.key=value ...]
    python -m capsv.bin.extract --merge --njobs N --out DIR
    python -m capsv.bin.extract --exp exp/mini_cap --wav-scp my.scp --out DIR [--fbank-config conf/fbank.conf]

Uses the newest checkpoint in <exp>/models and the eval settings of <exp>/config.yaml (crops, precision).
--data: stage 1's features of a data dir; --out defaults to <exp>/embeddings/<set> (<set>_cohort with
--cohort: only the AS-norm cohort, one utterance per speaker of at most eval.cohort_size speakers).
--wav-scp: your own recordings (`<utt> <path>` or `<utt> <command> |`), read and featurised as stage 1 does
with the options of --fbank-config; nothing but the archives is written.
With --job J --njobs N (steps/extract_embeddings.sh runs one per job) the J-th contiguous N-th of the sorted
utterances goes to <out>/embedding.J.{ark,scp,json}; --merge joins the parts into <out>/embedding.scp and
writes <out>/embedding.json last. Without --job one process writes <out>/embedding.{ark,scp,json}.
Rows made from the same inputs (checkpoint, eval settings, precision, features) are kept, not remade.
Each job logs `extract: trunk ran on <crops> crops of <n> utterances`.
"""
import argparse
import os
import sys

from capsv.utils import UserError, run_main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", help="experiment dir (config.yaml, models/)")
    p.add_argument("--data", help="data dir with stage 1's features (feats.scp, utt2num_frames)")
    p.add_argument("--wav-scp", help="your own recordings: `<utt> <path>` or `<utt> <command> |` lines")
    p.add_argument("--fbank-config", default="conf/fbank.conf", help="fbank options for --wav-scp (stage 1's)")
    p.add_argument("--out", help="archive dir (default with --data: <exp>/embeddings/<set>[_cohort])")
    p.add_argument("--cohort", action="store_true", help="only the AS-norm cohort of --data (the training set)")
    p.add_argument("--job", type=int, help="this job's index, 1..njobs")
    p.add_argument("--njobs", type=int, default=1, help="number of jobs the utterances are split into")
    p.add_argument("--merge", action="store_true", help="join the parts of --njobs jobs in --out")
    p.add_argument("overrides", nargs="*", help="eval.* or device overrides, e.g. eval.num_crops=5 device=cpu")
    args = p.parse_args()
    if args.njobs < 1 or args.job is not None and not 1 <= args.job <= args.njobs:
        raise UserError(f"--job {args.job} is not in 1..--njobs {args.njobs}")
    if args.merge:
        if not args.out:
            raise UserError("--merge needs --out (the archive dir)")
        from capsv.embeddings import merge
        meta = merge(args.out, args.njobs)
        print(f"extract: {meta['n_utts']} utterances in {args.out}/embedding.scp ({meta['pooling'].upper()}, "
              f"epoch {meta['epoch']})")
        return
    if not args.exp or bool(args.data) == bool(args.wav_scp):
        raise UserError("give --exp and one of --data (a data dir after stage 1) or --wav-scp (your recordings)")
    if args.cohort and not args.data:
        raise UserError("--cohort takes the cohort from --data (the training data dir)")
    out = args.out
    if not out:
        if not args.data:
            raise UserError("--wav-scp needs --out (where the archives go)")
        out = os.path.join(args.exp, "embeddings", os.path.basename(os.path.normpath(args.data)) +
                           ("_cohort" if args.cohort else ""))

    from capsv.config import load_exp_config
    from capsv.embeddings import AudioFeatures, DataDirFeatures

    cfg = load_exp_config(args.exp, args.overrides, "extraction")
    if args.data:   # the inputs are checked before the model is loaded
        source = DataDirFeatures(args.data, cfg["eval"]["cohort_size"] if args.cohort else None)
    else:
        source = AudioFeatures(args.wav_scp, args.fbank_config)

    import torch

    from capsv import checkpoint
    from capsv.device import pick_device
    from capsv.embeddings import extract
    from capsv.models.speaker_net import SpeakerNet

    device = pick_device(cfg["device"])
    state = checkpoint.load_for_inference(args.exp)
    if state["epoch"] < cfg["train"]["epochs"]:
        print(f"WARNING: {args.exp} has trained {state['epoch']} of {cfg['train']['epochs']} epochs; "
              f"extracting with that checkpoint", file=sys.stderr)
    net = SpeakerNet.from_checkpoint(state, device)
    with torch.inference_mode():
        extract(out, net, state, source, cfg["eval"], device, args.job, args.njobs)


if __name__ == "__main__":
    run_main(main)
