"""Stage 3: score a trial list with a trained model.

    python -m capsv.bin.score --exp exp/mini_cap --data data/synth_test \
        --trials data/synth_test/trials --out exp/mini_cap/scores/trials.score [eval.key=value ...]

Uses the newest checkpoint in <exp>/models and the config saved in <exp>/config.yaml.
Writes `<enroll> <test> <score>` lines in trial order.
"""
import argparse
import os
import sys
import time

import torch

from capsv import checkpoint
from capsv.bin.train import pick_device
from capsv.config import load_config
from capsv.data import ArkReader, read_data_dir
from capsv.models.speaker_net import SpeakerNet
from capsv.scoring import crop_frames, score_trials
from capsv.trials import read_trials, write_scores
from capsv.utils import UserError, run_main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True)
    p.add_argument("--data", required=True, help="data dir holding the trial utterances' features")
    p.add_argument("--trials", required=True, help="Kaldi trials: <enroll> <test> target|nontarget")
    p.add_argument("--out", required=True, help="score file to write")
    p.add_argument("overrides", nargs="*", help="eval.* or device overrides, e.g. eval.trial_batch=64")
    args = p.parse_args()

    cfg_path = os.path.join(args.exp, "config.yaml")
    if not os.path.exists(cfg_path):
        raise UserError(f"{cfg_path} is missing; run stage 2 (training) for this experiment first")
    for o in args.overrides:
        if not (o.startswith("eval.") or o.startswith("device=")):
            raise UserError(f"override '{o}': scoring takes only eval.* and device overrides")
    cfg = load_config(cfg_path, args.overrides)
    device = pick_device(cfg["device"])
    state = checkpoint.load_for_inference(args.exp)
    if state["epoch"] < cfg["train"]["epochs"]:
        print(f"WARNING: {args.exp} has trained {state['epoch']} of {cfg['train']['epochs']} epochs; "
              f"scoring that checkpoint", file=sys.stderr)
    net = SpeakerNet.from_config(state["config"]).to(device)
    net.load_state_dict(state["model"])
    net.eval()

    utt2spk, nframes, scp = read_data_dir(args.data)
    trials = read_trials(args.trials, known_utts=set(utt2spk))
    utts = sorted({u for e, t, _ in trials for u in (e, t)})
    t0 = time.time()
    frames = crop_frames(net, ArkReader(scp), nframes, utts, cfg["eval"], device)
    t1 = time.time()
    scores = score_trials(net, frames, trials, cfg["eval"]["trial_batch"])
    write_scores(args.out, trials, scores)
    print(f"scored {len(trials)} trials over {len(utts)} utterances with epoch {state['epoch']} "
          f"({cfg['model']['pooling'].upper()}; trunk {t1 - t0:.1f} s, pairs {time.time() - t1:.1f} s) -> {args.out}")


if __name__ == "__main__":
    with torch.inference_mode():
        run_main(main)
