"""Stage 3: score trial lists with a trained model.

    python -m capsv.bin.score --exp exp/mini_cap --data data/synth_test \\
        --trials data/synth_test/trials --out exp/mini_cap/scores/synth_test.score \\
        [--trials T2 --out O2 ...] [--job J --njobs N] [--cohort-data data/synth_train] [eval.key=value ...]
    python -m capsv.bin.score --merge --njobs N --trials T --out O [--trials T2 --out O2 ...]

Uses the newest checkpoint in <exp>/models and the config saved in <exp>/config.yaml. Writes
`<enroll> <test> <score>` lines in trial order, and beside each score file a `.json` record of
the checkpoint epoch and the SHA-256 of the trials it scored (stage 4 reports and checks both).
All lists are scored in one pass, so the trunk runs once per utterance however many lists name it.
With --job J --njobs N (steps/score.sh runs one per job) the J-th contiguous N-th of each list
goes to <out>.J; --merge joins the N parts into <out> in trial order, checking that they cover
the list once and come from the same checkpoint (and cohort).

With --cohort-data DIR (the training data dir) each list is also AS-norm normalised (capsv.asnorm) into
<list>.asnorm.score beside <list>.score, same format and trial order, its .json holding the raw one's
fields plus the cohort (data dir, SHA-256 of its utt2spk, speakers, size, top_k); its log line says
what the normalisation cost per trial. Merge those parts with --out <list>.asnorm.score.
"""
import argparse
import json
import os
import sys
import time

import torch

from capsv import checkpoint
from capsv.asnorm import Cohort, asnorm_path, cohort_stats, normalise_trials
from capsv.device import pick_device
from capsv.config import load_config
from capsv.data import ArkReader, read_data_dir
from capsv.models.speaker_net import SpeakerNet
from capsv.scoring import score_trials, scoring_precision, utterance_cache
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
            same = ("trials_sha256", "epoch", "checkpoint_sha256", "n_trials", "cohort", "precision")
            if [info.get(k) for k in same] != [infos[0].get(k) for k in same] or info["first"] != expect:
                raise UserError(f"{out}.{j}: this part does not belong with {out}.1 (other trials, checkpoint, "
                                f"cohort or split); re-run stage 3")
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
    p.add_argument("--cohort-data", help="AS-norm cohort data dir (the training set's, with features): also write "
                   "<list>.asnorm.score per list")
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
    cohort = Cohort(args.cohort_data, cfg["eval"]) if args.cohort_data else None
    if cohort and cohort.warning:
        print(cohort.warning, file=sys.stderr)
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
    spill_dir = os.path.dirname(os.path.abspath(lists[0][1]))
    t_cohort = cohort.build(net, cfg["eval"], device, spill_dir) if cohort and utts else 0.0
    t0 = time.time()
    frames = utterance_cache(net, ArkReader(scp), nframes, utts, cfg["eval"], device, spill_dir=spill_dir)
    t1 = time.time()
    raw = []
    for trials_path, out_path, part, first, total in lists:
        scores = score_trials(net, frames, part, cfg["eval"]["trial_batch"])
        info = {"epoch": state["epoch"], "checkpoint": state["file"], "checkpoint_sha256": state["sha256"],
                "trials": trials_path,
            "trials_sha256": sha256(trials_path), "n_trials": total, "first": first, "count": len(part),
            "eval": cfg["eval"],     # the crops that made these scores: verify's calibration reproduces them
            **scoring_precision(cfg["eval"], device).record()}
        write_scores(out_path, part, scores)
        write_info(out_path, info)
        raw.append((scores, info))
        print(f"scored {len(part)} trials of {trials_path} with epoch {state['epoch']} -> {out_path}")
    t2 = time.time()
    print(f"{cfg['model']['pooling'].upper()}: trunk on {len(utts)} utterances {t1 - t0:.1f} s, "
          f"trial pairs {t2 - t1:.1f} s")
    if cohort:
        stats = cohort_stats(net, frames, utts, cohort.cache, cohort.top_k, cfg["eval"]["trial_batch"]) \
            if utts else {}
        for (_, out), (_, _, part, _, _), (scores, info) in zip(pairs, lists, raw):
            norm_path = asnorm_path(out) + (f".{args.job}" if args.njobs > 1 else "")
            write_scores(norm_path, part, normalise_trials(part, scores, stats))
            write_info(norm_path, {**info, "cohort": cohort.info})
            print(f"AS-norm scored {len(part)} trials -> {norm_path}")
        n_trials = sum(len(part) for _, _, part, _, _ in lists)
        pair_scores = len(utts) * len(cohort.utts)
        t3 = time.time()
        print(f"AS-norm: cohort {len(cohort.utts)} utterances of {cohort.info['data']}, top {cohort.top_k}; "
              f"{len(utts)} utterances x {len(cohort.utts)} = {pair_scores} cohort scores for {n_trials} trials "
              f"({pair_scores / max(n_trials, 1):.1f} per trial): {t3 - t2:.1f} s, "
              f"{(t3 - t2) / max(n_trials, 1) * 1e3:.2f} ms per trial (raw {(t2 - t1) / max(n_trials, 1) * 1e3:.2f}); "
              f"cohort trunk {t_cohort:.1f} s")


if __name__ == "__main__":
    with torch.inference_mode():
        run_main(main)
