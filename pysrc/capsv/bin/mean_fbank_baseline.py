"""The no-training reference: cosine between utterance-mean fbank vectors.

    python -m capsv.bin.mean_fbank_baseline --data data/synth_test --trials data/synth_test/trials \
        --out exp/baseline_mean_fbank/scores/synth_test.score

The mean over all trial utterances is subtracted first (without it every log-mel mean points
the same way and the baseline is weaker), so this is the stronger of the two simple variants.
"""
import argparse

import numpy as np

from capsv.data import ArkReader, read_data_dir
from capsv.trials import read_trials, write_scores
from capsv.utils import run_main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--trials", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    utt2spk, _, scp = read_data_dir(args.data)
    trials = read_trials(args.trials, known_utts=set(utt2spk))
    utts = sorted({u for e, t, _ in trials for u in (e, t)})
    reader = ArkReader(scp)
    means = np.stack([reader.read(u).mean(0) for u in utts]).astype(np.float64)
    means -= means.mean(0)
    means /= np.linalg.norm(means, axis=1, keepdims=True) + 1e-12
    index = {u: i for i, u in enumerate(utts)}
    scores = np.array([means[index[e]] @ means[index[t]] for e, t, _ in trials])
    write_scores(args.out, trials, scores)


if __name__ == "__main__":
    run_main(main)
