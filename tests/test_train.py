"""Training: episodic batches, crop reads, checkpoints, identical resume, config errors."""
import os
import re
import struct
import subprocess
import sys
import time

import kaldiio
import numpy as np
import pandas as pd
import pytest
import torch

from capsv import checkpoint, trainer
from capsv.config import load_config
from capsv.data import ArkReader, EpisodeDataset, EpisodicBatches, crop, read_data_dir
from capsv.losses import NPSoftmaxLoss
from capsv.models.speaker_net import SpeakerNet

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
    write_data_dir(d, feats)
    return feats


def write_data_dir(d, feats):
    """feats.ark/scp, utt2spk (speaker = the id's prefix) and utt2num_frames of {utt: matrix}."""
    with kaldiio.WriteHelper(f"ark,scp:{d}/feats.ark,{d}/feats.scp") as w:
        for k in sorted(feats):
            w(k, feats[k])
    with open(f"{d}/utt2spk", "w") as f:
        f.writelines(f"{k} {k.split('-')[0]}\n" for k in sorted(feats))
    with open(f"{d}/utt2num_frames", "w") as f:
        f.writelines(f"{k} {len(feats[k])}\n" for k in sorted(feats))


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
    sa = torch.load(checkpoint.checkpoint_path(tmp_path / "a/models", 3), weights_only=True)
    sb = torch.load(checkpoint.checkpoint_path(tmp_path / "b/models", 3), weights_only=True)
    for k, v in sa["model"].items():
        torch.testing.assert_close(v, sb["model"][k], rtol=0, atol=0)
    la, lb = pd.read_csv(tmp_path / "a/train_log.csv"), pd.read_csv(tmp_path / "b/train_log.csv")
    assert list(la.epoch) == list(lb.epoch) == [1, 2, 3]
    np.testing.assert_array_equal(la["loss"], lb["loss"])
    assert {"loss", "np_acc", "ce_acc", "lr", "seconds", "data_wait"} <= set(la.columns)
    assert ((la["data_wait"] >= 0) & (la["data_wait"] < 1)).all()
    assert re.search(r"epoch 3: loss .* s, data wait \d+\.\d %", resumed.stderr)
    assert (tmp_path / "a/config.yaml").exists()
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


def one_line_error(r):
    """The user-error convention: exit 1, one ERROR line (after any progress log lines), no traceback."""
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    errors = [l for l in lines if not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d capsv\.train ", l)]
    assert len(errors) == 1 and errors[0] == lines[-1] and errors[0].startswith("ERROR: "), r.stderr
    return errors[0]


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_resume_loads_on_cpu_whatever_the_device(tmp_path):
    # On a GPU, loading with map_location=<the training device> moved the saved RNG states to it
    # and torch.set_rng_state (CPU ByteTensors only) crashed every resume. The 'meta' device
    # stands in for the GPU here: the model and optimiser live there, the RNG states must not.
    make_data_dir(tmp_path / "data")
    assert run_train(tmp_path / "data", tmp_path / "exp", "train.epochs=1").returncode == 0
    models = tmp_path / "exp/models"
    saved = checkpoint.load_latest(models)
    cfg = load_config(f"{ROOT}/conf/mini/cap.yaml", SMALL)
    net = SpeakerNet.from_config(cfg).to("meta")
    loss_fn = NPSoftmaxLoss(cfg["model"]["embed_dim"], len(saved["speakers"]), 1.0).to("meta")
    opt = torch.optim.Adam(list(net.parameters()) + list(loss_fn.parameters()), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.95)
    before = torch.get_rng_state()
    try:
        state = trainer.resume(str(models), net, loss_fn, opt, sched, saved["speakers"], "data")
        assert state["epoch"] == 1
        assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])
        moments = [v for st in opt.state.values() for k, v in st.items() if k == "exp_avg"]
        assert moments and all(v.device.type == "meta" for v in moments)   # optimiser state follows the params
    finally:
        torch.set_rng_state(before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_resume_on_gpu_is_identical(tmp_path):
    make_data_dir(tmp_path / "data")
    gpu = ["device=cuda", "train.amp=off"]
    assert run_train(tmp_path / "data", tmp_path / "a", "train.epochs=2", *gpu).returncode == 0
    assert run_train(tmp_path / "data", tmp_path / "b", "train.epochs=1", *gpu).returncode == 0
    r = run_train(tmp_path / "data", tmp_path / "b", "train.epochs=2", *gpu)
    assert r.returncode == 0 and "resuming" in r.stderr, r.stderr
    la, lb = pd.read_csv(tmp_path / "a/train_log.csv"), pd.read_csv(tmp_path / "b/train_log.csv")
    np.testing.assert_allclose(la["loss"], lb["loss"], rtol=1e-5)


@pytest.mark.parametrize("override,message", [
    ("train.epochs=ten", "'train.epochs' must be an integer >= 1, got 'ten'"),
    ("train.lr=-1", "'train.lr' must be a number > 0, got -1.0"),
    ("eval.num_crops=0", "'eval.num_crops' must be an integer >= 1, got 0"),
    ("train.lr_decay_every=0", "'train.lr_decay_every' must be an integer >= 1, got 0"),
])
def test_bad_config_value_fails_at_start(tmp_path, override, message):
    make_data_dir(tmp_path / "data")
    err = one_line_error(run_train(tmp_path / "data", tmp_path / "x", override))
    assert message in err
    assert not (tmp_path / "x").exists()     # failed before anything was written, not an epoch later


def drop_utts(d, utts):
    for name in ("utt2spk", "utt2num_frames", "feats.scp"):
        p = d / name
        p.write_text("".join(l for l in p.read_text().splitlines(keepends=True) if l.split()[0] not in utts))


@pytest.mark.parametrize("case,message", [
    ("non-integer frames", "utt2num_frames: spk2-u3 has 'abc' frames, not a positive integer; re-run stage 1"),
    ("empty feats.scp", "feats.scp is empty (no utterances); re-run stage 0 and 1"),
    ("empty data dir", "utt2spk is empty (no utterances); re-run stage 0 and 1"),
])
def test_bad_data_dir_is_one_line(tmp_path, case, message):
    d = tmp_path / "data"
    make_data_dir(d)
    if case == "non-integer frames":
        p = d / "utt2num_frames"
        p.write_text("".join("spk2-u3 abc\n" if l.startswith("spk2-u3 ") else l
                             for l in p.read_text().splitlines(keepends=True)))
    elif case == "empty feats.scp":
        (d / "feats.scp").write_text("")
    else:
        for name in ("utt2spk", "utt2num_frames", "feats.scp"):
            (d / name).write_text("")
    assert message in one_line_error(run_train(d, tmp_path / "x", "train.epochs=1"))


def test_stale_utt2num_frames_stops_training_naming_the_utterance(tmp_path):
    d = tmp_path / "data"
    make_data_dir(d)
    # features re-made shorter while utt2num_frames was kept: every count is now too large
    (d / "utt2num_frames").write_text("".join(f"{u} {int(n) + 1000}\n" for u, n in
                                              (l.split() for l in (d / "utt2num_frames").read_text().splitlines())))
    err = one_line_error(run_train(d, tmp_path / "x", "train.epochs=1"))
    assert re.search(r"spk\d-u\d: frames \d+-\d+ asked for, but its matrix in .* has \d+ rows; "
                     r"utt2num_frames is stale, re-run stage 1", err), err


@pytest.mark.parametrize("workers", [0, 1])
def test_nan_features_stop_training_naming_the_utterance(tmp_path, workers):
    d = tmp_path / "data"
    feats = make_data_dir(d)
    utt2spk, _, _ = read_data_dir(d)
    first = EpisodicBatches(utt2spk, 3, 2, seed=1).epoch(1)[0][0][1][0]   # read in the first batch
    feats[first][:] = np.nan
    with kaldiio.WriteHelper(f"ark,scp:{d}/feats.ark,{d}/feats.scp") as w:
        for k in sorted(feats):
            w(k, feats[k])
    r = run_train(d, tmp_path / "x", "train.epochs=1", f"train.num_workers={workers}")
    assert f"ERROR: {first}: its features hold NaN or Inf" in one_line_error(r)   # a worker's error too
    assert not (tmp_path / "x/models").exists()


def test_speakers_with_too_few_utterances_are_logged_and_left_out(tmp_path):
    d = tmp_path / "data"
    make_data_dir(d, n_spk=6)
    drop_utts(d, {"spk5-u1", "spk5-u2", "spk5-u3"})       # spk5 keeps one utterance; a group needs 2
    r = run_train(d, tmp_path / "x", "train.epochs=1")
    assert r.returncode == 0, r.stderr
    assert "1 speakers with fewer than 2 utterances are not used" in r.stderr
    state = checkpoint.load_latest(tmp_path / "x/models")
    assert state["speakers"] == [f"spk{s}" for s in range(5)]


def test_resume_with_another_pooling_is_refused(tmp_path):
    make_data_dir(tmp_path / "data")
    assert run_train(tmp_path / "data", tmp_path / "x", "train.epochs=1").returncode == 0
    saved = (tmp_path / "x/config.yaml").read_text()
    err = one_line_error(run_train(tmp_path / "data", tmp_path / "x", "train.epochs=2", "model.pooling=sap"))
    assert "was trained with different model.pooling" in err and "use another --exp" in err
    assert (tmp_path / "x/config.yaml").read_text() == saved
    assert not (tmp_path / "x/models/epoch_0002.pt").exists()
    # what may change on resumption (more epochs, workers) resumes
    r = run_train(tmp_path / "data", tmp_path / "x", "train.epochs=2", "train.num_workers=1")
    assert r.returncode == 0 and "resuming" in r.stderr, r.stderr


def test_diverging_training_stops_before_saving_nan_weights(tmp_path):
    make_data_dir(tmp_path / "data")
    err = one_line_error(run_train(tmp_path / "data", tmp_path / "x", "train.epochs=1", "train.lr=1e30"))
    assert "training diverged; lower train.lr" in err
    assert not (tmp_path / "x/models").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_checkpoint_write_out_of_disk_keeps_the_previous_one(tmp_path):
    """The exp dir on a tmpfs sized so that epoch 1's checkpoint fits and epoch 2's does not:
    one line, the previous checkpoint intact, no partial file left."""
    make_data_dir(tmp_path / "data")
    assert run_train(tmp_path / "data", tmp_path / "probe", "train.epochs=1").returncode == 0
    size = sum(f.stat().st_size for f in (tmp_path / "probe").rglob("*") if f.is_file())
    exp = tmp_path / "exp"
    exp.mkdir()
    kb = (size * 3 // 2 + 4095) // 4096 * 4   # room for one epoch's files and half a checkpoint more
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(exp)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        r = run_train(tmp_path / "data", exp, "train.epochs=3")
        line = one_line_error(r)
        assert f"no space left on the device of {exp}/models writing epoch 2's checkpoint" in line
        assert "epoch_0001.pt, is intact" in line
        assert sorted(os.listdir(exp / "models")) == ["epoch_0001.pt", "epoch_0001.pt.sha256"]
        assert checkpoint.load_latest(str(exp / "models"))["epoch"] == 1
    finally:
        subprocess.run(["umount", str(exp)])


class SlowLoader:
    """Batches that take `delay` seconds each to arrive."""

    def __init__(self, batches, delay):
        self.batches, self.delay = batches, delay

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            time.sleep(self.delay)
            yield b


@pytest.mark.parametrize("delay", [0.0, 0.2])
def test_data_wait_is_the_share_of_step_time_blocked_on_the_loader(tmp_path, delay):
    cfg = load_config(f"{ROOT}/conf/mini/cap.yaml", SMALL)
    torch.manual_seed(0)
    net = SpeakerNet.from_config(cfg)
    loss_fn = NPSoftmaxLoss(cfg["model"]["embed_dim"], 5)
    opt = torch.optim.Adam(list(net.parameters()) + list(loss_fn.parameters()), lr=1e-3)
    batches = [(torch.randn(3, 2, 40, 40), torch.tensor([0, 1, 2])) for _ in range(3)]
    step = trainer.TrainStep(net, loss_fn)
    trainer.train_epoch(step, opt, batches[:1], torch.device("cpu"), "warm-up")   # first calls are slow
    t0 = time.perf_counter()
    stats = trainer.train_epoch(step, opt, SlowLoader(batches, delay), torch.device("cpu"), "epoch 1/1")
    total = time.perf_counter() - t0
    assert stats["data_wait"] == pytest.approx(3 * delay / total, abs=0.05)
    assert (stats["data_wait"] > trainer.DATA_WAIT_WARN) == (delay > 0)   # each step here takes well under 0.2 s


def test_a_loader_bound_epoch_is_warned(caplog):
    stats = {"loss": 1.0, "np_loss": 0.5, "ce_loss": 0.5, "np_acc": 0.5, "ce_acc": 0.5}
    caplog.set_level("INFO", logger="capsv.train")
    trainer.report_epoch(3, {**stats, "data_wait": 0.08}, 1e-3, 10, 5.0, 4)
    assert "data wait 8.0 %" in caplog.text and "WARNING" not in caplog.text
    trainer.report_epoch(4, {**stats, "data_wait": 0.25}, 1e-3, 10, 5.0, 4)
    assert "WARNING: epoch 4 spent 25 % of its step time waiting for data (over 10 %); raise train.num_workers " \
           "(now 4)" in caplog.text


# Validation during training, the train log and the curves ------------------------------------------------------

def make_valid_dir(d):
    """A test-like data dir: 12 utterances of 4 speakers and every pair of them as trials."""
    feats = make_data_dir(d, n_spk=4, n_utt=3, seed=5)
    utts = sorted(feats)
    with open(f"{d}/trials", "w") as f:
        for i, a in enumerate(utts):
            for b in utts[i + 1:]:
                f.write(f"{a} {b} {'target' if a.split('-')[0] == b.split('-')[0] else 'nontarget'}\n")


def run_train_valid(data, exp, valid, *overrides):
    """capsv.bin.train with --valid-data, eval crops made small (the scorer's cost is not what is tested)."""
    return subprocess.run([sys.executable, "-m", "capsv.bin.train", "--config", f"{ROOT}/conf/mini/cap.yaml",
                           "--data", str(data), "--exp", str(exp), "--valid-data", str(valid), *SMALL,
                           "eval.num_crops=2", "eval.crop_frames=50", *overrides], capture_output=True, text=True)


VALID_LINE = re.compile(r"epoch (\d+): loss .*; validation EER (\d+\.\d\d) % minDCF\(0\.05\) (\d\.\d{4}) "
                        r"\((\d+) trials, (\d+\.\d) s\)")


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def test_validation_changes_nothing_is_logged_and_resumes_without_repeating(tmp_path):
    make_data_dir(tmp_path / "data")
    make_valid_dir(tmp_path / "valid")
    plain = run_train(tmp_path / "data", tmp_path / "plain", "train.epochs=3")
    assert plain.returncode == 0, plain.stderr
    exp = tmp_path / "valid_exp"
    r = run_train_valid(tmp_path / "data", exp, tmp_path / "valid", "train.epochs=2", "train.validate_every=2")
    assert r.returncode == 0, r.stderr
    assert "validation every 2 epochs: 66 trials of" in r.stderr
    assert [int(m.group(1)) for m in VALID_LINE.finditer(r.stderr)] == [2]
    # killed between epoch 2's checkpoint and its train_log.csv row: the row comes back from the checkpoint
    csv = exp / "train_log.csv"
    logged = pd.read_csv(csv)
    csv.write_text("".join(csv.read_text().splitlines(keepends=True)[:-1]))
    r = run_train_valid(tmp_path / "data", exp, tmp_path / "valid", "train.epochs=3", "train.validate_every=1")
    assert r.returncode == 0, r.stderr
    assert "train.epochs 2 -> 3, train.validate_every 2 -> 1" in r.stderr
    assert [int(m.group(1)) for m in VALID_LINE.finditer(r.stderr)] == [3]   # epoch 2's is not repeated
    log = pd.read_csv(csv)
    assert list(log.epoch) == [1, 2, 3]
    pd.testing.assert_frame_equal(log.iloc[:2][logged.columns], logged, check_exact=False, rtol=1e-5)
    assert log["valid_eer_pct"].isna().tolist() == [True, False, False]
    line = [m for m in VALID_LINE.finditer(r.stderr)][0]
    assert float(line.group(2)) == pytest.approx(log["valid_eer_pct"].iloc[2], abs=0.005)
    assert float(line.group(5)) == pytest.approx(log["valid_seconds"].iloc[2], abs=0.05)
    # the same weights and losses as a run without validation
    a = checkpoint.load_latest(tmp_path / "plain/models")
    b = checkpoint.load_latest(exp / "models")
    for k, v in a["model"].items():
        torch.testing.assert_close(v, b["model"][k], rtol=0, atol=0)
    np.testing.assert_array_equal(pd.read_csv(tmp_path / "plain/train_log.csv")["loss"], log["loss"])


def test_validation_naming_utterances_without_features_stops_at_start(tmp_path):
    make_data_dir(tmp_path / "data")
    make_valid_dir(tmp_path / "valid")
    drop_utts(tmp_path / "valid", {"spk1-u0", "spk2-u2"})
    r = run_train_valid(tmp_path / "data", tmp_path / "x", tmp_path / "valid", "train.epochs=1")
    assert one_line_error(r) == (
        f"ERROR: {tmp_path}/valid/trials: the validation trials name utterance 'spk1-u0', which has no features in "
        f"{tmp_path}/valid/feats.scp (2 such utterance(s)); give --valid-data the data dir of these trials, or set "
        f"train.validate_every=0")
    assert not (tmp_path / "x").exists()     # before any epoch: nothing written


def test_validation_subset_is_fixed_by_the_seed(tmp_path):
    make_valid_dir(tmp_path / "valid")
    cfg = load_config(f"{ROOT}/conf/mini/cap.yaml", SMALL + ["train.validate_trials=20"])
    one = trainer.Validation.from_options(cfg, str(tmp_path / "valid"))
    again = trainer.Validation.from_options(cfg, str(tmp_path / "valid"))
    other = trainer.Validation.from_options(load_config(f"{ROOT}/conf/mini/cap.yaml", SMALL + [
        "train.validate_trials=20", "seed=2"]), str(tmp_path / "valid"))
    everything = trainer.Validation.from_options(load_config(f"{ROOT}/conf/mini/cap.yaml", SMALL + [
        "train.validate_trials=0"]), str(tmp_path / "valid"))
    assert len(one.trials) == 20 and one.trials == again.trials and one.trials != other.trials
    assert set(one.trials) < set(everything.trials) and len(everything.trials) == 66
    assert len(one.utts) == 7   # all 21 pairs of 7 utterances hold 20 trials: the trunk runs on 7 of the 12
    assert trainer.Validation.from_options(load_config(f"{ROOT}/conf/mini/cap.yaml", SMALL + [
        "train.validate_every=0"]), str(tmp_path / "valid")) is None


def test_the_recipe_validates_during_training_as_stage_3_scores(trained_recipe):
    """run.sh gives the test set to stage 2: the mini config (every 8 epochs, a fixed subset) validated epoch 8 of
    the 10, logged in train.log and train_log.csv, and drew train_curves.png (a run of 10 epochs of about 3 s:
    long enough to draw). Validation scores are stage 3's."""
    exp = trained_recipe / "exp/small_cap"
    lines = list(VALID_LINE.finditer((exp / "log/train.log").read_text()))
    assert [int(m.group(1)) for m in lines] == [8] and int(lines[0].group(4)) == 150
    log = pd.read_csv(exp / "train_log.csv")
    assert log["valid_eer_pct"].notna().tolist() == [e == 8 for e in log.epoch]
    assert float(lines[0].group(2)) == pytest.approx(log.set_index("epoch").loc[8, "valid_eer_pct"], abs=0.005)
    assert png_size(exp / "train_curves.png") == (1080, 594)
    # the validation's scores of the final weights are stage 3's scores of the same trials
    state = checkpoint.load_for_inference(exp)
    net = SpeakerNet.from_config(state["config"])
    net.load_state_dict(state["model"])
    cfg = load_config(exp / "config.yaml", ["train.validate_trials=8"])
    valid = trainer.Validation.from_options(cfg, str(trained_recipe / "data/synth_test"))
    stage3 = {(e, t): float(s) for e, t, s in (l.split() for l in open(exp / "scores/synth_test.score"))}
    got = valid.scores(net, torch.device("cpu"))
    np.testing.assert_allclose(got, [stage3[e, t] for e, t, _ in valid.trials], atol=2e-6)
