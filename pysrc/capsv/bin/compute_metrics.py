"""Stage 4: EER and minDCF from score files, one results.txt line per trial list, and a DET plot.

  python -m capsv.bin.compute_metrics --trials data/synth_test/trials \\
      --scores exp/cap/scores/synth_test.score --results exp/cap/results.txt --det exp/cap/det.png --name cap

--trials/--scores may be repeated (in pairs, in the same order): results.txt then holds one line
per trial list and the DET plot one curve per list. A line gives the list's name (its score
file's name), EER, minDCF at p_target 0.05 and 0.01 (C_miss = C_fa = 1), the numbers of trials
and targets, the checkpoint epoch (from the score file's .json, written by stage 3) and the
list's SHA-256 and path. A score file whose .json names other trials than the list as it is now
is refused: the scores are stale.
"""
import argparse
import json
import os
import sys

from capsv.metrics import eer_from_rates, error_rates, min_dcf_from_rates, plot_det
from capsv.trials import read_scores, read_trials
from capsv.utils import UserError, atomic_open, run_main, sha256

P_TARGETS = (0.05, 0.01)
HEADER = ("list", "EER(%)", "minDCF(0.05)", "minDCF(0.01)", "trials", "targets", "epoch", "sha256", "path")


def list_label(scores_path):
    """A trial list's name in results and plots: its score file's, `scores/vox1_test_o_clean.score` -> `vox1_test_o_clean`."""
    return os.path.splitext(os.path.basename(scores_path))[0]


def evaluate(trials_path, scores_path):
    """Metrics for one trial list; returns (dict of the results line's fields, (p_miss, p_fa))."""
    trials = read_trials(trials_path)
    if not trials:
        raise UserError(f"{trials_path}: the trials file has no trials; regenerate it (stage 0)")
    digest = sha256(trials_path)
    epoch = "-"
    if os.path.exists(scores_path + ".json"):
        with open(scores_path + ".json") as f:
            info = json.load(f)
        if info.get("trials_sha256") != digest:
            raise UserError(f"{scores_path} was scored on another version of {trials_path}; re-run stage 3")
        epoch = info.get("epoch", "-")
    scores = read_scores(scores_path, trials, trials_path=trials_path)
    labels = [t[2] for t in trials]
    try:
        rates = error_rates(scores, labels)   # one sort serves every metric and the DET curve
        eer, _ = eer_from_rates(*rates)
        dcfs = [min_dcf_from_rates(*rates, p_target=p)[0] for p in P_TARGETS]
        _, p_miss, p_fa = rates
    except UserError as e:
        raise UserError(f"{trials_path}: {e}") from None
    row = dict(zip(HEADER, (list_label(scores_path), f"{eer * 100:.2f}", f"{dcfs[0]:.4f}", f"{dcfs[1]:.4f}",
                            str(len(trials)), str(sum(labels)), str(epoch), digest, trials_path)))
    return row, (p_miss, p_fa)


def format_table(name, rows):
    """`# system: <name>`, a `#`-commented header, then one aligned line per list."""
    cols = [("# " + HEADER[0], *HEADER[1:])] + [[r[h] for h in HEADER] for r in rows]
    widths = [max(len(c[i]) for c in cols) for i in range(len(HEADER) - 1)]
    lines = [f"# system: {name}"]
    lines += ["  ".join(v.ljust(w) for v, w in zip(c, widths)) + "  " + c[-1] for c in cols]
    return "\n".join(lines) + "\n"


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

    rows, curves = [], {}
    for tp, sp in zip(args.trials, args.scores):
        row, curve = evaluate(tp, sp)
        rows.append(row)
        label = args.name if len(args.trials) == 1 else f"{args.name} {row['list']}"
        while label in curves:
            label += "'"
        curves[label] = curve

    text = format_table(args.name, rows)
    # the plot first: results.txt is the stage's completion marker
    if args.det:
        plot_det(curves, args.det, title=args.name)
    with atomic_open(args.results) as f:
        f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    run_main(main)
