"""Stage 4: EER, minDCF and the calibrated measures from score files, one results.txt line per trial list,
LLR score files and a DET plot.

  python -m capsv.bin.compute_metrics --trials data/synth_test/trials \\
      --scores exp/cap/scores/synth_test.score --results exp/cap/results.txt --det exp/cap/det.png --name cap

--trials/--scores may be repeated (in pairs, in the same order): results.txt then holds one line
per trial list and the DET plot one curve per list. A line gives the list's name (its score
file's name), EER, minDCF at p_target 0.05 and 0.01 (C_miss = C_fa = 1), the numbers of trials
and targets, the checkpoint epoch (from the score file's .json, written by stage 3), the
list's SHA-256 and path, then the measures of its calibrated log-likelihood ratios: Cllr, minCllr,
actDCF at p_target 0.05 and 0.01, and the list they were calibrated on. A score file whose .json
names other trials than the list as it is now is refused: the scores are stale.

Calibration: LLR = a * score + b, fitted by prior-weighted logistic regression at p_target 0.05 on
one list (--calibrate, a list name as in results.txt; default the first list), applied to every list
of raw scores; AS-norm lists (<list>.asnorm) get their own map, fitted on <calibration list>.asnorm
when it is measured too (else their calibrated columns are `-`). Each list's LLRs are written beside
its scores as <list>.llr.score (same format and trial order), with a .json naming the map, the raw
score file and its SHA-256 (see capsv.calibration, capsv.metrics).

With --exp DIR (what run.sh's stage 4 gives) the scores must come from DIR's newest checkpoint
(their .json's checkpoint_sha256; an exp kept without its models is taken as it is): scores of an
earlier checkpoint (training went on after stage 3) are refused as stale. It also writes, before
results.txt:

- DIR/calibration.json: the EER and minDCF(0.05) thresholds and the LLR map of the calibration
  list's raw scores, the list's path and SHA-256, the epoch, the checkpoint's SHA-256, precision and
  device type of its scores, the fbank options of --fbank-config (checked against stage 1's features
  of --data) and the eval crops: what `python -m capsv.bin.verify` decides with (see capsv.calibration);
- DIR/score_hist.png: target and non-target score histograms, a panel per list;
- DIR/RESULTS.md: the results page (see capsv.results_page); the DET plot defaults to DIR/det.png.
"""
import argparse
import json
import os
import sys

import numpy as np

from capsv import calibration, results_page
from capsv.metrics import compute_act_dcf, compute_cllr, compute_min_cllr, eer_from_rates, error_rates, \
    min_dcf_from_rates, plot_det, plot_score_histograms, rates_at_threshold
from capsv.trials import read_scores, read_trials, write_scores
from capsv.utils import UserError, atomic_open, run_main, sha256

P_TARGETS = (0.05, 0.01)
# the first nine columns are those of earlier versions, in their order: tools read them by position
HEADER = ("list", "EER(%)", "minDCF(0.05)", "minDCF(0.01)", "trials", "targets", "epoch", "sha256", "path",
          "Cllr", "minCllr", "actDCF(0.05)", "actDCF(0.01)", "calibrated_on")
LLR_COLUMNS = HEADER[9:]
ASNORM = ".asnorm"


def list_label(scores_path):
    """A trial list's name in results and plots: its score file's, `scores/vox1_test_o_clean.score` -> `vox1_test_o_clean`."""
    return os.path.splitext(os.path.basename(scores_path))[0]


def llr_path(scores_path):
    """Where a score file's calibrated LLRs go: `scores/synth_test.score` -> `scores/synth_test.llr.score`."""
    return os.path.join(os.path.dirname(scores_path), list_label(scores_path) + ".llr.score")


def evaluate(trials_path, scores_path):
    """Metrics for one trial list: a dict with `row` (the results line's fields; the calibrated ones `-` until
    `calibrate_lists`), `rates` (thresholds, p_miss, p_fa), `scores`, `labels`, `trial_list` (the trials) and
    `info` (the score file's .json, {} if none)."""
    trials = read_trials(trials_path)
    if not trials:
        raise UserError(f"{trials_path}: the trials file has no trials; regenerate it (stage 0)")
    digest = sha256(trials_path)
    epoch = "-"
    info = {}
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
    except UserError as e:
        raise UserError(f"{trials_path}: {e}") from None
    row = dict(zip(HEADER, (list_label(scores_path), f"{eer * 100:.2f}", f"{dcfs[0]:.4f}", f"{dcfs[1]:.4f}",
                            str(len(trials)), str(sum(labels)), str(epoch), digest, trials_path)))
    row.update(dict.fromkeys(LLR_COLUMNS, "-"))   # filled in by `calibrate_lists`
    return {"row": row, "rates": rates, "scores": scores, "labels": labels, "info": info,
            "trials": trials_path, "scores_path": scores_path, "trial_list": trials}


def calibration_name(args):
    """The list (its results.txt name) that calibrates: --calibrate, else the first; checked before any work."""
    names = [list_label(s) for s in args.scores]
    name = args.calibrate or names[0]
    if name not in names:
        raise UserError(f"--calibrate {name}: not one of the lists measured here ({', '.join(names)}); "
                        f"name a list as results.txt does")
    if name.endswith(ASNORM):
        raise UserError(f"--calibrate {name}: AS-norm scores; verify computes raw scores, so calibrate on "
                        f"{name[:-len(ASNORM)]}")
    trials_path = args.trials[names.index(name)]
    labels = [t[2] for t in read_trials(trials_path)]
    calibration.check_both_classes(labels, f"the calibration list {name} ({trials_path})",
                                   "calibrate on a list with both (run.sh --calibration-list trials_<x>)")
    return name


def calibrate_lists(results, name):
    """Fit the LLR map of raw scores on list `name` (of AS-norm scores on `name`.asnorm), apply it to every list of
    that kind and fill in the rows' calibrated columns. Returns ({kind: map record}, {list: (path, LLRs, .json)})."""
    by_name = {r["row"]["list"]: r for r in results}
    maps = {}
    for kind in ("", ASNORM):
        r = by_name.get(name + kind)
        if r is not None:
            a, b = calibration.fit_llr_map(r["scores"], r["labels"], name=f"{name + kind} ({r['trials']})")
            maps[kind] = calibration.llr_map_record(a, b, name + kind, r["trials"], r["row"]["sha256"],
                                                    r["scores_path"], r["labels"])
    llr_files = {}
    for r in results:
        row = r["row"]
        m = maps.get(ASNORM if row["list"].endswith(ASNORM) else "")
        if m is None:
            continue
        # the LLRs as the score file holds them (6 decimals), so its readers get these numbers
        llrs = np.array([float(f"{x:.6f}") for x in calibration.apply_map(m, r["scores"])])
        row.update({"Cllr": f"{compute_cllr(llrs, r['labels']):.4f}",
                    "minCllr": f"{compute_min_cllr(llrs, r['labels']):.4f}",
                    "calibrated_on": m["list"]})
        for p in P_TARGETS:
            row[f"actDCF({p})"] = f"{compute_act_dcf(llrs, r['labels'], p):.4f}"
        info = {**r["info"], "score_kind": "llr", "raw_scores": r["scores_path"],
                "raw_scores_sha256": sha256(r["scores_path"]), "map": m}
        llr_files[row["list"]] = (llr_path(r["scores_path"]), llrs, info)
    return maps, llr_files


def write_llr_files(results, llr_files, calibration_file):
    """Each list's <list>.llr.score and its .json; a stale one of a list that got no map is removed."""
    for r in results:
        path = llr_path(r["scores_path"])
        if r["row"]["list"] not in llr_files:
            for f in (path, path + ".json"):
                if os.path.exists(f):
                    os.remove(f)
            continue
        path, llrs, info = llr_files[r["row"]["list"]]
        write_scores(path, r["trial_list"], llrs)
        with atomic_open(path + ".json") as f:
            json.dump({**info, "calibration": calibration_file}, f, indent=1)
            f.write("\n")


def check_checkpoint(exp, results):
    """Every score file was made by the experiment's newest checkpoint (stage 4 reports on it)."""
    from capsv import checkpoint

    if not checkpoint.list_checkpoints(os.path.join(exp, "models")):
        return   # an experiment kept without its models: its scores are all there is to report
    state = checkpoint.load_for_inference(exp)
    for r in results:
        made = r["info"].get("checkpoint_sha256")
        if made != state["sha256"]:
            what = f"epoch {r['info'].get('epoch', '?')}'s checkpoint" if made else "an unrecorded checkpoint (no .json)"
            raise UserError(f"{r['scores_path']} was scored with {what}, not with the newest one of {exp} "
                            f"({os.path.basename(state['file'])}): the scores are stale; re-run stage 3, then stage 4")


def format_table(name, rows):
    """`# system: <name>`, a `#`-commented header, then one aligned line per list."""
    cols = [("# " + HEADER[0], *HEADER[1:])] + [[r[h] for h in HEADER] for r in rows]
    widths = [max(len(c[i]) for c in cols) for i in range(len(HEADER) - 1)]
    lines = [f"# system: {name}"]
    lines += ["  ".join(v.ljust(w) for v, w in zip(c, widths)) + "  " + c[-1] for c in cols]
    return "\n".join(lines) + "\n"


def calibrate(args, results, name, llr_map):
    """The calibration record for --exp: the thresholds and LLR map of list `name`'s raw scores, fbank options, crops."""
    from capsv.config import load_config

    res = next(r for r in results if r["row"]["list"] == name)
    if "epoch" not in res["info"]:
        raise UserError(f"{res['scores_path']}.json (the checkpoint that made the scores) is missing; "
                        f"re-run stage 3, then stage 4")
    if "checkpoint_sha256" not in res["info"]:
        raise UserError(f"{res['scores_path']}.json does not name its checkpoint's SHA-256 (scored by an older "
                        f"version of stage 3); re-run stage 3, then stage 4")
    cfg_path = os.path.join(args.exp, "config.yaml")
    if not os.path.exists(cfg_path):
        raise UserError(f"{cfg_path} is missing: --exp {args.exp} is not a trained experiment dir")
    # the crops stage 3 used: its record if it keeps one, else the experiment's config
    eval_cfg = res["info"].get("eval") or load_config(cfg_path)["eval"]
    fbank = calibration.fbank_record(args.fbank_config, args.data)
    return calibration.make_calibration(args.name, name, res["trials"], res["scores_path"], res["info"],
                                        res["rates"], res["scores"], res["labels"], fbank, eval_cfg, llr_map)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", action="append", required=True,
                    help="Kaldi trials file `<enroll> <test> target|nontarget` (repeatable)")
    ap.add_argument("--scores", action="append", required=True,
                    help="score file `<enroll> <test> <score>` in trial order (repeatable, one per --trials)")
    ap.add_argument("--results", required=True, help="results file to write (EER, minDCF)")
    ap.add_argument("--det", help="DET plot to write (PNG); with --exp, default <exp>/det.png")
    ap.add_argument("--name", default="system", help="system name for results and the DET legend")
    ap.add_argument("--exp", help="experiment dir: also write its calibration.json, score_hist.png and RESULTS.md")
    ap.add_argument("--calibrate", help="the list (name as in results.txt) whose scores fit the LLR map (and with "
                                        "--exp verify's thresholds); default: the first list")
    ap.add_argument("--fbank-config", default="conf/fbank.conf",
                    help="with --exp: stage 1's fbank options, recorded for verify (default conf/fbank.conf)")
    ap.add_argument("--data", help="with --exp: the test data dir, whose stage-1 features --fbank-config must give")
    args = ap.parse_args(argv)
    if len(args.trials) != len(args.scores):
        raise UserError(f"got {len(args.trials)} --trials but {len(args.scores)} --scores; "
                        f"give one --scores per --trials, in the same order")
    if not args.exp and args.data:
        raise UserError("--data goes with --exp (the experiment to calibrate)")

    cal_name = calibration_name(args)
    results = [evaluate(tp, sp) for tp, sp in zip(args.trials, args.scores)]
    maps, llr_files = calibrate_lists(results, cal_name)
    rows, curves = [r["row"] for r in results], {}
    for row, r in zip(rows, results):
        label = args.name if len(results) == 1 else f"{args.name} {row['list']}"
        while label in curves:
            label += "'"
        curves[label] = r["rates"][1:]

    cal = cal_file = None
    if args.exp:
        check_checkpoint(args.exp, results)
        cal = calibrate(args, results, cal_name, maps[""])
        cal_file = os.path.abspath(os.path.join(args.exp, calibration.FILE))
        args.det = args.det or os.path.join(args.exp, "det.png")
    text = format_table(args.name, rows)
    # the plots, the page and the LLR files first: results.txt is the stage's completion marker
    if args.det:
        plot_det(curves, args.det, title=args.name)
    if cal is not None:
        write_exp_outputs(args, results, cal)
    write_llr_files(results, llr_files, cal_file)
    with atomic_open(args.results) as f:
        f.write(text)
    sys.stdout.write(text)


def write_exp_outputs(args, results, cal):
    """calibration.json, the score histograms and RESULTS.md of --exp."""
    hist = os.path.join(args.exp, "score_hist.png")
    raw = [r for r in results if not r["row"]["list"].endswith(ASNORM)]   # the thresholds are raw scores'
    panels = {r["row"]["list"]: (r["scores"], r["labels"], cal["thresholds"] if r in raw else None) for r in results}
    plot_score_histograms(panels, hist, title=f"{args.name}: scores, target vs non-target")
    decisions = {r["row"]["list"]: {k: rates_at_threshold(r["scores"], r["labels"], t)
                                    for k, t in cal["thresholds"].items()} for r in raw}
    calibration.write_calibration(os.path.join(args.exp, calibration.FILE), cal)
    results_page.write(os.path.join(args.exp, "RESULTS.md"), args.name, args.exp, [r["row"] for r in results], cal,
                       decisions, args.det, hist)


if __name__ == "__main__":
    run_main(main)
