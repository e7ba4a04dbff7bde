"""Stage 3, second half: score trial lists from the archives of capsv.bin.extract; the trunk never runs.

    python -m capsv.bin.score --exp exp/mini_cap --embeddings exp/mini_cap/embeddings/synth_test \\
        --trials data/synth_test/trials --out exp/mini_cap/scores/synth_test.score \\
        [--trials T2 --out O2 ...] [--job J --njobs N] \\
        [--cohort-embeddings exp/mini_cap/embeddings/synth_train_cohort] [eval.key=value ...]
    python -m capsv.bin.score --merge --njobs N --trials T --out O [--trials T2 --out O2 ...]
    python -m capsv.bin.score --exp exp/mini_cap --data data/synth_test --trials T --out O [--cohort-data D]

Uses the config saved in <exp>/config.yaml and the head of the newest checkpoint in <exp>/models; archives
made by another checkpoint, of other crops, or lacking an utterance of a list are refused in one line.
Writes `<enroll> <test> <score>` lines in trial order, and beside each score file a `.json` record of the
checkpoint (epoch, path, SHA-256), the SHA-256 of the trials, the crops and precision of the rows, and the
archives' signature (`embeddings`); stage 4 reports and checks them. With --check, only the checks run, and
each list is printed as `keep <out>` (already scored from these archives, the list unchanged) or `score <out>`.
With --job J --njobs N (steps/score.sh runs one per job) the J-th contiguous N-th of each list goes to <out>.J;
--merge joins the N parts into <out> in trial order, checking that they cover the list once and come from
the same checkpoint, archives (and cohort). Rows are held in memory when they fit the memory budget
(capsv.scoring.default_budget), else read from the archives block by block.
--data DIR (one process) first extracts DIR into <exp>/embeddings/<set> (kept when made from the same inputs).

With --cohort-embeddings DIR (the training set's AS-norm cohort) each list is also AS-norm normalised
(capsv.asnorm) into <list>.asnorm.score beside <list>.score, same format and trial order, its .json holding
the raw one's fields plus the cohort (data dir, SHA-256 of its utt2spk, speakers, size, top_k) and the cohort
archives' signature; its log line says what the normalisation cost per trial. Merge those parts with
--out <list>.asnorm.score.
"""
import argparse
import json
import os
import sys
import time

from capsv.config import load_exp_config
from capsv.trials import read_trials, write_scores
from capsv.utils import UserError, atomic_open, run_main, sha256


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
            same = ("trials_sha256", "epoch", "checkpoint_sha256", "n_trials", "cohort", "precision", "embeddings",
                    "cohort_embeddings")
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


def list_is_current(out, trials_path, archive, cohort_archive=None, top_k=None):
    """Whether <out> (and its AS-norm file) were scored from these archives for the list as it is now."""
    from capsv.asnorm import asnorm_path
    from capsv.embeddings import read_json

    info = read_json(out + ".json")
    current = (os.path.exists(out) and info is not None and info.get("trials_sha256") == sha256(trials_path) and
               info.get("embeddings") == archive.signature)
    if current and cohort_archive is not None:
        norm = asnorm_path(out)
        ninfo = read_json(norm + ".json")
        current = (os.path.exists(norm) and ninfo is not None and
                   ninfo.get("trials_sha256") == info["trials_sha256"] and
                   ninfo.get("embeddings") == archive.signature and
                   ninfo.get("cohort_embeddings") == cohort_archive.signature and
                   (ninfo.get("cohort") or {}).get("top_k") == top_k)
    return current


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp")
    p.add_argument("--embeddings", help="archive dir of the trial utterances (steps/extract_embeddings.sh)")
    p.add_argument("--data", help="instead of --embeddings: a data dir with features, extracted here first into "
                   "<exp>/embeddings/<set> (rows made from the same inputs are kept)")
    p.add_argument("--trials", action="append", required=True,
                   help="Kaldi trials `<enroll> <test> target|nontarget` (repeatable)")
    p.add_argument("--out", action="append", required=True, help="score file to write, one per --trials")
    p.add_argument("--job", type=int, default=1, help="this job's index, 1..njobs")
    p.add_argument("--njobs", type=int, default=1, help="number of jobs the trials are split into")
    p.add_argument("--merge", action="store_true", help="join the parts <out>.1..<out>.N of --njobs jobs")
    p.add_argument("--check", action="store_true", help="only check the inputs, and print `keep <out>` for each list "
                   "already scored from these archives, `score <out>` for the others")
    p.add_argument("--cohort-embeddings", help="AS-norm cohort archive dir (steps/extract_embeddings.sh --cohort "
                   "true): also write <list>.asnorm.score per list")
    p.add_argument("--cohort-data", help="with --data: the training data dir whose cohort is extracted here first")
    p.add_argument("overrides", nargs="*", help="eval.* or device overrides, e.g. eval.trial_batch=64")
    args = p.parse_args()
    if len(args.trials) != len(args.out):
        raise UserError(f"got {len(args.trials)} --trials but {len(args.out)} --out; give one --out per --trials")
    if not 1 <= args.job <= args.njobs:
        raise UserError(f"--job {args.job} is not in 1..--njobs {args.njobs}")
    pairs = list(zip(args.trials, args.out))
    if args.merge:
        return merge(pairs, args.njobs)
    if not args.exp or bool(args.embeddings) == bool(args.data):
        raise UserError("give --exp and one of --embeddings (an archive dir) or --data (a data dir with features)")
    if args.data and args.njobs > 1:
        raise UserError("--data scores in one process; split jobs with steps/extract_embeddings.sh, then "
                        "steps/score.sh --nj N")
    if args.cohort_data and not args.data or args.cohort_embeddings and args.data:
        raise UserError("--cohort-data goes with --data, --cohort-embeddings with --embeddings")

    cfg = load_exp_config(args.exp, args.overrides, "scoring")
    ecfg = cfg["eval"]

    import torch

    from capsv import checkpoint
    from capsv.asnorm import Cohort, asnorm_path, cohort_stats, normalise_trials
    from capsv.data import read_data_dir
    from capsv.device import pick_device
    from capsv.embeddings import DataDirFeatures, EmbeddingArchive, extract, job_slice
    from capsv.models.speaker_net import SpeakerNet
    from capsv.scoring import score_trials

    device = pick_device(cfg["device"])
    emb_dir, cohort_dir, state, net = args.embeddings, args.cohort_embeddings, None, None
    if args.data:
        # the trials and the cohort are checked against the data dirs before the model is loaded
        utt2spk, _, _ = read_data_dir(args.data)
        for trials_path, _ in pairs:
            read_trials(trials_path, known_utts=set(utt2spk))
        sources = [(DataDirFeatures(args.data), "")]
        if args.cohort_data:
            sources.append((DataDirFeatures(args.cohort_data, ecfg["cohort_size"]), "_cohort"))
        state = checkpoint.load_for_inference(args.exp)
        net = SpeakerNet.from_checkpoint(state, device)
        dirs = []
        for source, suffix in sources:
            data = source.features["data"]
            dirs.append(os.path.join(args.exp, "embeddings", os.path.basename(os.path.normpath(data)) + suffix))
            extract(dirs[-1], net, state, source, ecfg, device)
        emb_dir, cohort_dir = dirs[0], (dirs[1] if args.cohort_data else None)

    archive = EmbeddingArchive(emb_dir)
    cohort_archive = EmbeddingArchive(cohort_dir) if cohort_dir else None
    lists = []
    for trials_path, out in pairs:
        trials = read_trials(trials_path)
        archive.check_utterances(trials, trials_path)
        first, end = job_slice(len(trials), args.job, args.njobs)
        out_path = out if args.njobs == 1 else f"{out}.{args.job}"
        lists.append((trials_path, out_path, trials[first:end], first, len(trials)))
    state = state or checkpoint.load_for_inference(args.exp)
    for a in filter(None, (archive, cohort_archive)):
        a.check_checkpoint(state, args.exp)
        a.check_eval(ecfg)
    if args.check:
        top_k = min(ecfg["asnorm_top_k"], len(cohort_archive.utts)) if cohort_archive else None
        for trials_path, out in pairs:
            current = list_is_current(out, trials_path, archive, cohort_archive, top_k)
            print(f"{'keep' if current else 'score'} {out}")
        return
    if state["epoch"] < cfg["train"]["epochs"]:
        print(f"WARNING: {args.exp} has trained {state['epoch']} of {cfg['train']['epochs']} epochs; "
              f"scoring that checkpoint", file=sys.stderr)
    if net is None:   # (with --data, the network that extracted): the head only, the rows are the trunk's
        net = SpeakerNet.from_checkpoint(state, device)

    t0, c0 = time.time(), time.process_time()
    cohort = Cohort(cohort_archive, ecfg, device) if cohort_archive else None
    if cohort and cohort.warning:
        print(cohort.warning, file=sys.stderr)
    utts = sorted({u for _, _, part, _, _ in lists for e, t, _ in part for u in (e, t)})
    cache = archive.cache(utts, device)
    t1, c1 = time.time(), time.process_time()
    raw = []
    for trials_path, out_path, part, first, total in lists:
        with torch.inference_mode():
            scores = score_trials(net, cache, part, ecfg["trial_batch"])
        info = {"epoch": state["epoch"], "checkpoint": state["file"], "checkpoint_sha256": state["sha256"],
                "trials": trials_path, "trials_sha256": sha256(trials_path), "n_trials": total, "first": first,
                "count": len(part),
                # the crops that made these scores (verify's calibration reproduces them) and their precision
                "eval": {**ecfg, **archive.meta["eval"]},
                "precision": archive.meta["precision"], "device_type": archive.meta["device_type"],
                "embeddings": archive.signature}
        if os.path.exists(out_path + ".json"):    # the record of other scores must not outlive them
            os.remove(out_path + ".json")
        write_scores(out_path, part, scores)
        write_info(out_path, info)
        raw.append((scores, info))
        print(f"scored {len(part)} trials of {trials_path} with epoch {state['epoch']} -> {out_path}")
    t2, c2 = time.time(), time.process_time()
    n_trials = sum(len(part) for _, _, part, _, _ in lists)
    how = "in memory" if cache.in_memory else f"read block by block, {cache.rows_per_block} rows a block"
    print(f"{archive.meta['pooling'].upper()}: rows of {len(utts)} utterances from {emb_dir} ({how}) "
          f"{t1 - t0:.1f} s, {n_trials} trials {t2 - t1:.1f} s ({(t2 - t1) / max(n_trials, 1) * 1e3:.2f} ms per "
          f"trial, CPU time {(c2 - c1) / max(n_trials, 1) * 1e3:.2f} ms); no trunk")
    if cohort:
        with torch.inference_mode():
            stats = cohort_stats(net, cache, utts, cohort.cache, cohort.top_k, ecfg["trial_batch"]) if utts else {}
        for (_, out), (_, _, part, _, _), (scores, info) in zip(pairs, lists, raw):
            norm_path = asnorm_path(out) + (f".{args.job}" if args.njobs > 1 else "")
            write_scores(norm_path, part, normalise_trials(part, scores, stats))
            write_info(norm_path, {**info, "cohort": cohort.info, "cohort_embeddings": cohort_archive.signature})
            print(f"AS-norm scored {len(part)} trials -> {norm_path}")
        pair_scores = len(utts) * len(cohort.utts)
        t3 = time.time()
        print(f"AS-norm: cohort {len(cohort.utts)} utterances of {cohort.info['data']}, top {cohort.top_k}; "
              f"{len(utts)} utterances x {len(cohort.utts)} = {pair_scores} cohort scores for {n_trials} trials "
              f"({pair_scores / max(n_trials, 1):.1f} per trial): {t3 - t2:.1f} s, "
              f"{(t3 - t2) / max(n_trials, 1) * 1e3:.2f} ms per trial (raw {(t2 - t1) / max(n_trials, 1) * 1e3:.2f})")


if __name__ == "__main__":
    run_main(main)
