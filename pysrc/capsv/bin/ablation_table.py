"""The ablation table of local/run_ablation.sh: TAP / SAP / CAP over seeds, in the paper's Table 2 form.

    python -m capsv.bin.ablation_table --run tap:1:exp/ablation/seed1/mini_tap --run cap:1:... \\
        --data data/synth_test [--trials data/synth_test/trials] [--boot 1000] --out exp/ablation/ablation.md

Each --run is POOLING:SEED:EXP_DIR of a finished run (trained, scored, results.txt). Per pooling: minDCF
(p = 0.05) and EER as mean ± standard deviation over seeds, each seed's EER, training time, and the paper's
VoxCeleb numbers beside; then, per pair of poolings, the EER difference with a 95 % interval and p-value
from a paired bootstrap over test speakers. Written to --out and printed.
"""
import argparse
import os
import sys

from capsv.ablation import Run, table
from capsv.data import read_data_dir
from capsv.utils import UserError, atomic_open, run_main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="POOLING:SEED:EXP_DIR (repeatable)")
    ap.add_argument("--data", required=True, help="the test data dir the runs scored (utt2spk, trials)")
    ap.add_argument("--trials", help="the trial list to compare on (default: <data>/trials)")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap replicates (default 1000)")
    ap.add_argument("--out", required=True, help="Markdown file to write")
    args = ap.parse_args(argv)
    trials = args.trials or os.path.join(args.data, "trials")
    list_name = os.path.basename(args.data.rstrip("/")) + os.path.basename(trials)[len("trials"):]
    runs = []
    for spec in args.run:
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            raise UserError(f"--run {spec}: expected POOLING:SEED:EXP_DIR, e.g. cap:1:exp/ablation/seed1/mini_cap")
        runs.append(Run(*parts, list_name))
    if args.boot < 100:
        raise UserError(f"--boot {args.boot}: use at least 100 replicates")
    utt2spk, _, _ = read_data_dir(args.data, need=("utt2spk",))
    text = table(runs, trials, utt2spk, args.boot)
    with atomic_open(args.out) as f:
        f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    run_main(main)
