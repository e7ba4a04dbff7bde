"""exp/<name>/RESULTS.md: one page saying what was measured, with what, and how it came out.

Written by stage 4 (capsv.bin.compute_metrics --exp) from the same numbers as results.txt: the system,
the SHA-256 of its config.yaml, the checkpoint, the software versions, a table of every trial list
(raw and, where stage 3 made them, AS-norm scores), the measures of the calibrated log-likelihood ratios
(Cllr, minCllr, actDCF) and the map that made them, the calibrated thresholds `verify` uses and what
they do on each list, and the DET plot and score histograms, linked by paths relative to the page.
"""
import os
import platform

import yaml

from capsv.metrics import bayes_threshold
from capsv.utils import atomic_open, sha256

COLUMNS = (("list", "list"), ("path", "path"), ("sha256", "SHA-256"), ("trials", "trials"),
           ("targets", "targets"), ("epoch", "epoch"), ("EER(%)", "EER (%)"), ("minDCF(0.05)", "minDCF (0.05)"),
           ("minDCF(0.01)", "minDCF (0.01)"))
LLR_COLUMNS = (("list", "list"), ("calibrated_on", "calibrated on"), ("Cllr", "Cllr"), ("minCllr", "minCllr"),
               ("actDCF(0.05)", "actDCF (0.05)"), ("minDCF(0.05)", "minDCF (0.05)"), ("actDCF(0.01)", "actDCF (0.01)"),
               ("minDCF(0.01)", "minDCF (0.01)"))


def versions():
    """(python, torch, torchaudio) versions of this process."""
    import torch
    import torchaudio
    return platform.python_version(), torch.__version__, torchaudio.__version__


def _rel(path, start):
    """`path` relative to `start` when inside it (a page that moves with its exp dir), else as given."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(start))
    return path if rel.startswith("..") else rel


def _pct(p):
    return f"{p * 100:.2f} %"


def llr_section(rows, cal):
    """The page's lines on the calibrated LLRs: the map, the measures' definitions and a table of every list."""
    m = cal["map"]
    lines = [
        "",
        "## Calibrated log-likelihood ratios",
        "",
        f"LLR = a · score + b, a = {m['a']:.6g}, b = {m['b']:.6g}: fitted on the {cal['score_kind']} scores of "
        f"**{m['list']}** (`{m['trials']}`, SHA-256 `{m['trials_sha256']}`) by prior-weighted logistic regression "
        f"at P_target {m['p_target']}, and written beside each score file as `scores/<list>.llr.score` "
        f"(AS-norm lists get a map of their own, fitted on the same list's AS-norm scores). The Bayes decision at "
        f"prior P accepts iff LLR > log((1 − P)/P): {bayes_threshold(0.05):.4f} at 0.05, "
        f"{bayes_threshold(0.01):.4f} at 0.01.",
        "",
        "Cllr = ½[mean over targets of log2(1 + e^(−LLR)) + mean over non-targets of log2(1 + e^(LLR))], in bits "
        "(0 perfect, 1 for LLRs that say nothing); minCllr is the Cllr after the best monotone (PAV) recalibration "
        "on the list itself; actDCF is the normalised DCF of the Bayes decisions, to be read beside minDCF, the "
        "same cost at the list's own best threshold. actDCF − minDCF and Cllr − minCllr are what calibration costs.",
        "",
        "| " + " | ".join(title for _, title in LLR_COLUMNS) + " |",
        "|---|---|" + "---:|" * (len(LLR_COLUMNS) - 2),
    ]
    lines += ["| " + " | ".join(r[k] for k, _ in LLR_COLUMNS) + " |" for r in rows]
    lines += ["", f"On {m['list']} itself Cllr and actDCF are optimistic: the map is fitted to it."]
    return lines


def render(system, exp, rows, cal, decisions, det_path, hist_path, page_dir=None):
    """The page's Markdown.

    rows: results.txt's rows (dicts keyed by compute_metrics.HEADER); cal: the calibration record;
    decisions: {list name: {threshold name: (p_miss, p_fa)}} for the lists with raw scores;
    the plots are linked relative to page_dir (default: exp, where the page lives).
    """
    page_dir = exp if page_dir is None else page_dir
    cfg = os.path.join(exp, "config.yaml")
    py, torch_v, ta_v = versions()
    ckpt = cal.get("checkpoint")
    with open(cfg) as f:
        pooling = (yaml.safe_load(f) or {}).get("model", {}).get("pooling", "?")
    lines = [
        f"# Results: {system}",
        "",
        "Written by stage 4 (`capsv.bin.compute_metrics`); the numbers are those of `results.txt`.",
        "",
        "| | |",
        "|---|---|",
        f"| system | {system} ({pooling.upper()} pooling) |",
        f"| experiment | `{exp}` |",
        f"| config | `config.yaml`, SHA-256 `{sha256(cfg)}` |",
        f"| checkpoint | `{_rel(ckpt, exp) if ckpt else '-'}`, epoch {cal['epoch']} |",
        f"| software | python {py}, torch {torch_v}, torchaudio {ta_v} |",
        f"| fbank options | `{cal['fbank']['path']}` (SHA-256 `{cal['fbank']['sha256']}`), "
        f"recorded in `calibration.json` |",
        "",
        "## Trial lists",
        "",
        "EER and minDCF (C_miss = C_fa = 1, P_target 0.05 and 0.01) at each list's own best threshold. "
        "A `.asnorm` list holds the same trials with adaptive symmetric score normalisation.",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * 3 + "---:|" * (len(COLUMNS) - 3),
    ]
    for r in rows:
        cells = [f"`{r[k]}`" if k in ("path", "sha256") else r[k] for k, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += llr_section(rows, cal)
    t = cal["thresholds"]
    show = {k: "none: reject every trial" if v is None else f"{v:.6f}" for k, v in t.items()}
    lines += [
        "",
        "## Calibrated thresholds (`python -m capsv.bin.verify`)",
        "",
        f"Fixed on the {cal['score_kind']} scores of **{cal['list']}** (`{cal['trials']}`, SHA-256 "
        f"`{cal['trials_sha256']}`, epoch {cal['epoch']}); a trial is accepted iff score >= threshold. "
        f"EER threshold **{show['eer']}**, minDCF(0.05) threshold **{show['min_dcf_0.05']}**. "
        f"Miss and false-alarm rates these fixed thresholds give on each list:",
        "",
        "| list | miss at EER thr. | false alarm at EER thr. | miss at minDCF(0.05) thr. | "
        "false alarm at minDCF(0.05) thr. |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, d in decisions.items():
        (m1, f1), (m2, f2) = d["eer"], d["min_dcf_0.05"]
        lines.append(f"| {name} | {_pct(m1)} | {_pct(f1)} | {_pct(m2)} | {_pct(f2)} |")
    lines += [
        "",
        f"On {cal['list']} itself these are optimistic: the thresholds are that list's best. "
        + ("Only one raw list was scored, so no independent measurement of them exists here."
           if len(decisions) == 1 else "The other lists measure them honestly."),
        "",
        "## Plots",
        "",
        f"![DET curves]({os.path.relpath(det_path, page_dir)})",
        "",
        f"![Score histograms, target and non-target]({os.path.relpath(hist_path, page_dir)})",
        "",
    ]
    curves = os.path.join(exp, "train_curves.png")   # stage 2's, when the run drew them
    if os.path.exists(curves):
        lines += [f"![Training curves: losses, accuracies, learning rate, validation]"
                  f"({os.path.relpath(curves, page_dir)})", ""]
    return "\n".join(lines)


def write(path, *args):
    text = render(*args, page_dir=os.path.dirname(os.path.abspath(path)))
    with atomic_open(path) as f:
        f.write(text)
    return text
