"""Stage 3: score trial lists with a trained model.

    python -m capsv.bin.score --exp exp/mini_cap --data data/synth_test \\
        --trials data/synth_test/trials --out exp/mini_cap/scores/synth_test.score \\
        [--trials T2 --out O2 ...] [--job J --njobs N] [eval.key=value ...]
    python -m capsv.bin.score --merge --njobs N --trials T --out O [--trials T2 --out O2 ...]

Uses the newest checkpoint in <exp>/models and the config saved in <exp>/config.yaml. Writes
`<enroll> <test> <score>` lines in trial order, and beside each score file a `.json` record of
the checkpoint epoch and the SHA-256 of the trials it scored (stage 4 reports and checks both).
All lists are scored in one pass, so the trunk runs once per utterance however many lists name it.
With --job J --njobs N (steps/score.sh runs one per job) the J-th contiguous N-th of each list
goes to <out>.J; --merge joins the N parts into <out> in trial order, checking that they cover
the list once and come from the same checkpoint.
"""
import argparse
import json
import os
import sys
import time

import torch

from capsv import checkpoint
from capsv.bin.train import pick_device
from capsv.config import load_config
from capsv.data import ArkReader, read_data_dir
from capsv.models.speaker_net import SpeakerNet
from capsv.scoring import score_trials, utterance_cache
from capsv.trials import read_trials, write_scores
from capsv.utils import UserError, atomic_open, run_main, sha256


def job_slice(n, job, njobs):
    """The contiguous part of n trials that job `job` (1-based) of `njobs` scores."""
    return (job - 1) * n // njobs, job * n // njobs


def write_info(path, info):
    with atomic_open(path + ".json") as f:
        json.dump(info, f, indent=1)
        f.write("\n")


def read_info(path):
    try:
        with open(path + ".json") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}.json is missing (a scoring job did not finish?); re-run stage 3") from None
    except json.JSONDecodeError:
        raise UserError(f"{path}.json is not valid JSON; re-run stage 3") from None


def merge(pairs, njobs):
    """Join <out>.1 .. <out>.N into <out> (and <out>.json), then remove the parts."""
    for trials_path, out in pairs:
        infos = [read_info(f"{out}.{j}") for j in range(1, njobs + 1)]
        n = infos[0]["n_trials"]
        expect = 0
        for j, info in enumerate(infos, 1):
            if (info["trials_sha256"], info["epoch"], info["n_trials"]) != \
                    (infos[0]["trials_sha256"], infos[0]["epoch"], n) or info["first"] != expect:
                raise UserError(f"{out}.{j}: this part does not belong with {out}.1 (other trials, checkpoint "
                                f"or split); re-run stage 3")
            expect = info["first"] + info["count"]
        if expect != n or infos[0]["trials_sha256"] != sha256(trials_path):
            raise UserError(f"{out}.*: the parts do not cover {trials_path} as it is now; re-run stage 3")
        with atomic_open(out) as f:
            for j in range(1, njobs + 1):
                with open(f"{out}.{j}") as part:
                    f.write(part.read())
        info = {k: v for k, v in infos[0].items() if k not in ("first", "count")}
        write_info(out, info)
        for j in range(1, njobs + 1):
            os.remove(f"{out}.{j}")
            os.remove(f"{out}.{j}.json")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp")
    p.add_argument("--data", help="data dir holding the trial utterances' features")
    p.add_argument("--trials", action="append", required=True,
                   help="Kaldi trials `<enroll> <test> target|nontarget` (repeatable)")
    p.add_argument("--out", action="append", required=True, help="score file to write, one per --trials")
    p.add_argument("--job", type=int, default=1, help="this job's index, 1..njobs")
    p.add_argument("--njobs", type=int, default=1, help="number of jobs the trials are split into")
    p.add_argument("--merge", action="store_true", help="join the parts <out>.1..<out>.N of --njobs jobs")
    p.add_argument("overrides", nargs="*", help="eval.* or device overrides, e.g. eval.trial_batch=64")
    args = p.parse_args()
    if len(args.trials) != len(args.out):
        raise UserError(f"got {len(args.trials)} --trials but {len(args.out)} --out; give one --out per --trials")
    if not 1 <= args.job <= args.njobs:
        raise UserError(f"--job {args.job} is not in 1..--njobs {args.njobs}")
    pairs = list(zip(args.trials, args.out))
    if args.merge:
        return merge(pairs, args.njobs)
    if not args.exp or not args.data:
        raise UserError("--exp and --data are needed to score")

    cfg_path = os.path.join(args.exp, "config.yaml")
    if not os.path.exists(cfg_path):
        raise UserError(f"{cfg_path} is missing; run stage 2 (training) for this experiment first")
    for o in args.overrides:
        if not (o.startswith("eval.") or o.startswith("device=")):
            raise UserError(f"override '{o}': scoring takes only eval.* and device overrides")
    cfg = load_config(cfg_path, args.overrides)
    utt2spk, nframes, scp = read_data_dir(args.data)
    lists = []
    for trials_path, out in pairs:
        trials = read_trials(trials_path, known_utts=set(utt2spk))
        first, end = job_slice(len(trials), args.job, args.njobs)
        out_path = out if args.njobs == 1 else f"{out}.{args.job}"
        lists.append((trials_path, out_path, trials[first:end], first, len(trials)))

    device = pick_device(cfg["device"])
    state = checkpoint.load_for_inference(args.exp)
    if state["epoch"] < cfg["train"]["epochs"]:
        print(f"WARNING: {args.exp} has trained {state['epoch']} of {cfg['train']['epochs']} epochs; "
              f"scoring that checkpoint", file=sys.stderr)
    net = SpeakerNet.from_config(state["config"]).to(device)
    net.load_state_dict(state["model"])
    net.eval()

    utts = sorted({u for _, _, part, _, _ in lists for e, t, _ in part for u in (e, t)})
    t0 = time.time()
    frames = utterance_cache(net, ArkReader(scp), nframes, utts, cfg["eval"], device,
                             spill_dir=os.path.dirname(os.path.abspath(lists[0][1])))
    t1 = time.time()
    for trials_path, out_path, part, first, total in lists:
        scores = score_trials(net, frames, part, cfg["eval"]["trial_batch"])
        write_scores(out_path, part, scores)
        write_info(out_path, {"epoch": state["epoch"], "checkpoint": checkpoint.checkpoint_path(
            os.path.join(args.exp, "models"), state["epoch"]), "trials": trials_path,
            "trials_sha256": sha256(trials_path), "n_trials": total, "first": first, "count": len(part)})
        print(f"scored {len(part)} trials of {trials_path} with epoch {state['epoch']} -> {out_path}")
    print(f"{cfg['model']['pooling'].upper()}: trunk on {len(utts)} utterances {t1 - t0:.1f} s, "
          f"trial pairs {time.time() - t1:.1f} s")


if __name__ == "__main__":
    with torch.inference_mode():
        run_main(main)
