"""Stage 4: EER and minDCF from score files, written to results.txt, plus a DET plot.

  python -m capsv.bin.compute_metrics --trials data/synth_test/trials \\
      --scores exp/cap/scores/trials.score --results exp/cap/results.txt --det exp/cap/det.png --name cap

--trials/--scores may be repeated (in pairs, in the same order): results.txt then holds one
block per trial list and the DET plot one curve per list.
"""
import argparse
import os
import sys

from capsv.metrics import compute_eer, compute_min_dcf, error_rates, plot_det
from capsv.trials import read_scores, read_trials
from capsv.utils import UserError, atomic_open, run_main

P_TARGETS = (0.05, 0.01)


def list_label(trials_path):
    """A short name for a trial list: `data/synth_test/trials` -> `synth_test`."""
    p = os.path.normpath(trials_path)
    base = os.path.basename(p)
    if base == "trials" and os.path.dirname(p):
        return os.path.basename(os.path.dirname(p))
    return base


def evaluate(trials_path, scores_path):
    """Metrics for one trial list; returns (block of result lines, (p_miss, p_fa))."""
    trials = read_trials(trials_path)
    if not trials:
        raise UserError(f"{trials_path}: the trials file has no trials; regenerate it (stage 0)")
    scores = read_scores(scores_path, trials, trials_path=trials_path)
    labels = [t[2] for t in trials]
    try:
        eer, eer_thr = compute_eer(scores, labels)
        dcfs = [compute_min_dcf(scores, labels, p_target=p) for p in P_TARGETS]
        _, p_miss, p_fa = error_rates(scores, labels)
    except UserError as e:
        raise UserError(f"{trials_path}: {e}") from None
    n_tar = sum(labels)
    lines = [
        f"trials: {trials_path}",
        f"scores: {scores_path}",
        f"n_trials: {len(trials)} ({n_tar} target, {len(trials) - n_tar} nontarget)",
        f"EER: {eer * 100:.2f} % (threshold {eer_thr:.6f})",
    ]
    for p, (dcf, thr) in zip(P_TARGETS, dcfs):
        lines.append(f"minDCF(p={p:g}): {dcf:.4f} (threshold {thr:.6f}, C_miss=1, C_fa=1)")
    return lines, (p_miss, p_fa)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", action="append", required=True,
                    help="Kaldi trials file `<enroll> <test> target|nontarget` (repeatable)")
    ap.add_argument("--scores", action="append", required=True,
                    help="score file `<enroll> <test> <score>` in trial order (repeatable, one per --trials)")
    ap.add_argument("--results", required=True, help="results file to write (EER, minDCF)")
    ap.add_argument("--det", help="DET plot to write (PNG)")
    ap.add_argument("--name", default="system", help="system name for results and the DET legend")
    args = ap.parse_args(argv)
    if len(args.trials) != len(args.scores):
        raise UserError(f"got {len(args.trials)} --trials but {len(args.scores)} --scores; "
                        f"give one --scores per --trials, in the same order")

    blocks, curves = [], {}
    for tp, sp in zip(args.trials, args.scores):
        lines, curve = evaluate(tp, sp)
        blocks.append(lines)
        label = args.name if len(args.trials) == 1 else f"{args.name} {list_label(tp)}"
        while label in curves:
            label += "'"
        curves[label] = curve

    text = f"name: {args.name}\n\n" + "\n\n".join("\n".join(b) for b in blocks) + "\n"
    # the plot first: results.txt is the stage's completion marker
    if args.det:
        plot_det(curves, args.det, title=args.name)
    with atomic_open(args.results) as f:
        f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    run_main(main)
