"""Stage 2: train a TAP/SAP/CAP speaker network from Kaldi fbank features.

    python -m capsv.bin.train --config conf/mini/cap.yaml --data data/synth_train --exp exp/mini_cap \
        [--valid-data data/synth_test [--valid-trials FILE]] [key=value ...]

Resumes from the newest checkpoint in <exp>/models. Writes <exp>/config.yaml, <exp>/models/,
<exp>/train_log.csv and <exp>/train_curves.png; log lines go to stderr (steps/train.sh puts them in
<exp>/log/train.log). With --valid-data, every train.validate_every epochs the trials of that data dir
are scored and their EER and minDCF logged (monitoring; capsv.trainer.Validation). The logic is in
capsv.trainer.
"""
import argparse

import torch

from capsv import distributed, trainer
from capsv.config import load_config
from capsv.device import pick_device
from capsv.distributed import SINGLE

# what local/gpu_check.sh times, as `from capsv.bin import train; train.build_training(...)`
build_training, train_epoch = trainer.build_training, trainer.train_epoch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training YAML (conf/*.yaml, conf/mini/*.yaml)")
    p.add_argument("--data", required=True, help="training data dir with feats.scp, utt2spk, utt2num_frames")
    p.add_argument("--exp", required=True, help="experiment dir")
    p.add_argument("--valid-data", help="data dir with features whose trials are scored every "
                                        "train.validate_every epochs (run.sh gives the test set)")
    p.add_argument("--valid-trials", help="the validation trial list (default <valid-data>/trials)")
    p.add_argument("--check", action="store_true",
                   help="only check the config, the data dir and the exp dir, then exit (steps/train.sh runs "
                        "this before it submits the job)")
    p.add_argument("--world-size", type=int, default=1,
                   help="with --check: the number of ranks the job will run (train.speakers_per_batch must divide)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.epochs=3")
    args = p.parse_args()

    env = distributed.launched()   # (rank, world, local rank, local world) under torchrun
    rank, world = (env[0], env[1]) if env else (0, 1 if not args.check else args.world_size)
    trainer.setup_logging(rank)
    cfg = load_config(args.config, args.overrides)
    trainer.check_same_experiment(args.exp, cfg, say=not args.check)   # the job's log says what changed
    # --check runs on the submitting host, which need not have the job's GPU
    device = torch.device("cpu") if args.check else pick_device(cfg["device"])
    trainer.check_world(cfg, world)
    data = trainer.TrainingData(args.data, cfg)
    valid = trainer.Validation.from_options(cfg, args.valid_data, args.valid_trials)
    if args.check:
        return

    part = SINGLE
    if env:
        device = distributed.rank_device(device, env[2], env[3])
        part = distributed.init(device, cfg["train"]["dist_timeout_s"])
    trainer.fit(cfg, data, args.exp, device, part, valid)


if __name__ == "__main__":
    distributed.run_ranks(main)
