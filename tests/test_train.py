"""Training: episodic batches, crop reads, checkpoints, identical resume, config errors."""
import os
import subprocess
import sys

import kaldiio
import numpy as np
import pandas as pd
import pytest
import torch

from capsv import checkpoint
from capsv.data import ArkReader, EpisodeDataset, EpisodicBatches, crop, read_data_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["model.channels=[4, 4, 8, 8]", "model.layers=[1, 1, 1, 1]", "model.embed_dim=16",
         "model.cap_proj_dim=8", "train.speakers_per_batch=3", "train.utts_per_speaker=2",
         "train.crop_frames=40", "train.num_workers=0", "train.keep_checkpoints=0", "device=cpu"]


def make_data_dir(d, n_spk=5, n_utt=4, seed=0):
    """A data dir of random 40-dim features, some utterances shorter than a crop."""
    rng = np.random.default_rng(seed)
    os.makedirs(d, exist_ok=True)
    feats = {}
    for s in range(n_spk):
        for u in range(n_utt):
            n = int(rng.integers(25, 90))
            feats[f"spk{s}-u{u}"] = (rng.standard_normal((n, 40)) + s).astype(np.float32)
    with kaldiio.WriteHelper(f"ark,scp:{d}/feats.ark,{d}/feats.scp") as w:
        for k in sorted(feats):
            w(k, feats[k])
    with open(f"{d}/utt2spk", "w") as f:
        f.writelines(f"{k} {k.split('-')[0]}\n" for k in sorted(feats))
    with open(f"{d}/utt2num_frames", "w") as f:
        f.writelines(f"{k} {len(feats[k])}\n" for k in sorted(feats))
    return feats


def test_ark_reader_reads_row_ranges_like_kaldiio(tmp_path):
    feats = make_data_dir(tmp_path)
    _, nframes, scp = read_data_dir(tmp_path)
    reader = ArkReader(scp)
    for utt, mat in feats.items():
        np.testing.assert_array_equal(reader.read(utt), mat)
        np.testing.assert_array_equal(reader.read(utt, 5, 7), mat[5:12])
        # shorter than the crop: repeated from the start
        c = crop(reader, utt, nframes[utt], 100, 0)
        np.testing.assert_array_equal(c, mat[np.arange(100) % len(mat)])


def test_episodic_batches_unique_speakers_and_deterministic():
    utt2spk = {f"s{s:02d}-u{u}": f"s{s:02d}" for s in range(12) for u in range(3 + s % 4)}
    b = EpisodicBatches(utt2spk, n_speakers=4, n_utts=2, seed=3)
    e1, e1b, e2 = b.epoch(1), b.epoch(1), b.epoch(2)
    assert e1 == e1b and e1 != e2
    used = []
    for batch in e1:
        assert len(batch) == 4 and len({k for k, _ in batch}) == 4
        for k, utts in batch:
            assert len(utts) == 2 and all(utt2spk[u] == b.speakers[k] for u in utts)
            used += utts
    assert len(used) == len(set(used))        # an utterance at most once per epoch


def test_too_few_speakers_is_a_clear_error():
    from capsv.utils import UserError
    with pytest.raises(UserError, match="speakers_per_batch"):
        EpisodicBatches({"a-1": "a", "a-2": "a"}, n_speakers=2, n_utts=2, seed=0)


def test_episode_crops_fixed_by_seed(tmp_path):
    make_data_dir(tmp_path)
    utt2spk, nframes, scp = read_data_dir(tmp_path)
    batches = EpisodicBatches(utt2spk, 3, 2, seed=1).epoch(1)
    d1 = EpisodeDataset(ArkReader(scp), nframes, batches, 40, 1, 1)
    d2 = EpisodeDataset(ArkReader(scp), nframes, batches, 40, 1, 1)
    x, spk = d1[0]
    assert x.shape == (3, 2, 40, 40) and spk.shape == (3,)
    torch.testing.assert_close(x, d2[0][0])


def run_train(data, exp, *overrides):
    return subprocess.run([sys.executable, "-m", "capsv.bin.train", "--config", f"{ROOT}/conf/mini/cap.yaml",
                           "--data", str(data), "--exp", str(exp), *SMALL, *overrides],
                          capture_output=True, text=True)


def test_training_resumes_identically(tmp_path):
    make_data_dir(tmp_path / "data")
    straight = run_train(tmp_path / "data", tmp_path / "a", "train.epochs=3")
    assert straight.returncode == 0, straight.stderr
    first = run_train(tmp_path / "data", tmp_path / "b", "train.epochs=1")
    assert first.returncode == 0, first.stderr
    resumed = run_train(tmp_path / "data", tmp_path / "b", "train.epochs=3")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    sa = torch.load(checkpoint.checkpoint_path(tmp_path / "a/models", 3), weights_only=False)
    sb = torch.load(checkpoint.checkpoint_path(tmp_path / "b/models", 3), weights_only=False)
    for k, v in sa["model"].items():
        torch.testing.assert_close(v, sb["model"][k], rtol=0, atol=0)
    la, lb = pd.read_csv(tmp_path / "a/train_log.csv"), pd.read_csv(tmp_path / "b/train_log.csv")
    assert list(la.epoch) == list(lb.epoch) == [1, 2, 3]
    np.testing.assert_array_equal(la["loss"], lb["loss"])
    assert {"loss", "np_acc", "ce_acc", "lr", "seconds"} <= set(la.columns)
    assert (tmp_path / "a/config.yaml").exists() and (tmp_path / "a/log/train.log").exists()
    # the lr follows the step decay: x0.95 every lr_decay_every (1 in the mini configs) epochs
    np.testing.assert_allclose(la["lr"], [1e-3, 0.95e-3, 0.95 ** 2 * 1e-3])


def test_truncated_newest_checkpoint_falls_back(tmp_path):
    make_data_dir(tmp_path / "data")
    assert run_train(tmp_path / "data", tmp_path / "e", "train.epochs=2").returncode == 0
    newest = checkpoint.checkpoint_path(tmp_path / "e/models", 2)
    with open(newest, "r+b") as f:
        f.truncate(100)
    state = checkpoint.load_latest(tmp_path / "e/models")
    assert state["epoch"] == 1


def test_unknown_config_key_names_nearest(tmp_path):
    make_data_dir(tmp_path / "data")
    r = run_train(tmp_path / "data", tmp_path / "x", "train.speakers_per_btch=4")
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "train.speakers_per_btch" in err[0] and "train.speakers_per_batch" in err[0]
    assert not (tmp_path / "x").exists()


def test_gpu_asked_but_absent_is_clear(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    make_data_dir(tmp_path / "data")
    r = run_train(tmp_path / "data", tmp_path / "g", "device=cuda")
    assert r.returncode == 1 and "no GPU" in r.stderr and r.stderr.count("\n") == 1
