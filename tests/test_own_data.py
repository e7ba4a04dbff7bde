"""Your own Kaldi data dirs through stages 0-4: 22.05 kHz audio, a stereo file, `cmd |` entries,
two trial lists; and stage 3 (embeddings split over jobs by utterance, scoring by trial) giving the same score
files as one job. 8 kHz audio with conf/fbank_8k.conf, the later stages run without corpus or fbank options
(data/prepared remembers them)."""
import json
import os
import subprocess

import kaldiio
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_dir(d, wav_scp, trials=None):
    d.mkdir(parents=True)
    utts = sorted(wav_scp)
    (d / "wav.scp").write_text("".join(f"{u} {wav_scp[u]}\n" for u in utts))
    (d / "utt2spk").write_text("".join(f"{u} {u.split('-')[0]}\n" for u in utts))   # no spk2utt: stage 0 makes it
    for name, lines in (trials or {}).items():
        (d / name).write_text("".join(f"{l}\n" for l in lines))


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """The tiny embedded corpus re-written at 22.05 kHz as a user's data dirs, then run.sh stages 0-4."""
    tmp = tmp_path_factory.mktemp("own")
    subprocess.run(["python", "local/make_synth_corpus.py", "--size", "tiny", "--nj", "2", str(tmp / "c"),
                    str(tmp / "synth")], cwd=ROOT, check=True, capture_output=True)
    sets = {}
    for name in ("synth_train", "synth_test"):
        scp = dict(l.split() for l in (tmp / "synth" / name / "wav.scp").read_text().splitlines())
        out = {}
        for k, (utt, path) in enumerate(sorted(scp.items())):
            x, sr = sf.read(path, dtype="float32")
            y = torchaudio.functional.resample(torch.from_numpy(x)[None], sr, 22050)[0].numpy()
            dst = tmp / "audio" / f"{utt}.wav"
            dst.parent.mkdir(exist_ok=True)
            if k == 1:    # a stereo file: the channels are averaged
                sf.write(dst, np.stack([y, y], axis=1), 22050, subtype="PCM_16")
            else:
                sf.write(dst, y, 22050, subtype="PCM_16")
            out[utt] = f"cat {dst} |" if k == 2 else str(dst)   # a command writing audio to stdout
        sets[name] = out
    trials = (tmp / "synth" / "synth_test" / "trials").read_text().splitlines()
    write_dir(tmp / "mine" / "own_train", sets["synth_train"])
    write_dir(tmp / "mine" / "own_test", sets["synth_test"], {"trials": trials, "trials_b": trials[::-3]})
    with open(f"{ROOT}/conf/mini/cap.yaml") as f:
        cfg = yaml.safe_load(f)
    cfg["train"].update(epochs=2, speakers_per_batch=4, num_workers=0)
    (tmp / "tiny_cap.yaml").write_text(yaml.safe_dump(cfg))
    r = run_recipe(tmp, "--nj", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, r


def run_recipe(tmp, *args):
    return subprocess.run(["bash", "run.sh", "--train-set", str(tmp / "mine/own_train"),
                           "--test-set", str(tmp / "mine/own_test"), "--config", str(tmp / "tiny_cap.yaml"),
                           "--data", str(tmp / "data"), "--exp", str(tmp / "exp"), "--fbankdir", str(tmp / "fbank"),
                           *args], cwd=ROOT, capture_output=True, text=True)


def test_resampled_once_per_data_dir_and_copied_not_written_into(own):
    tmp, r = own
    lines = [l for l in r.stdout.splitlines() if "resampled" in l]
    assert lines == [f"make_fbank.sh: {tmp}/data/own_train: resampled 32 utterances to 16000 Hz (32 from 22050 Hz)",
                     f"make_fbank.sh: {tmp}/data/own_test: resampled 16 utterances to 16000 Hz (16 from 22050 Hz)"]
    assert sorted(os.listdir(tmp / "mine/own_test")) == ["trials", "trials_b", "utt2spk", "wav.scp"]
    assert (tmp / "data/own_train/spk2utt").read_text().startswith("tr0001 tr0001-u001 tr0001-u002")
    frames = dict(l.split() for l in (tmp / "data/own_test/utt2num_frames").read_text().splitlines())
    assert len(frames) == 16 and all(int(n) > 200 for n in frames.values())


def test_every_trial_list_scored_and_reported(own):
    tmp, _ = own
    rows = [l.split() for l in (tmp / "exp/tiny_cap/results.txt").read_text().splitlines() if not l.startswith("#")]
    assert [r[0] for r in rows] == ["own_test", "own_test_b"]
    assert [r[4] for r in rows] == ["48", "16"] and all(r[6] == "2" for r in rows)
    assert [r[8] for r in rows] == [str(tmp / "data/own_test/trials"), str(tmp / "data/own_test/trials_b")]
    for r in rows:
        assert 0.0 <= float(r[1]) <= 100.0
    b = (tmp / "data/own_test/trials_b").read_text().splitlines()
    scores = (tmp / "exp/tiny_cap/scores/own_test_b.score").read_text().splitlines()
    assert [s.split()[:2] for s in scores] == [t.split()[:2] for t in b]


def test_scoring_split_over_jobs_equals_one_job(own):
    """Stage 3 ran with --nj 2 (utterances split for the trunk, trials for scoring); one scoring job from the same
    archives writes the same score files, and leaves no part behind."""
    tmp, _ = own
    scores = tmp / "exp/tiny_cap/scores"
    two = {n: (scores / n).read_text() for n in ("own_test.score", "own_test_b.score")}
    assert sorted(os.listdir(tmp / "exp/tiny_cap/embeddings/own_test")) == [".extract.lock"] + sorted(
        f"embedding.{j}.{x}" for j in (1, 2) for x in ("ark", "json", "scp")) + ["embedding.json", "embedding.scp"]
    for n in two:
        (scores / n).unlink()
    r = subprocess.run(["bash", "steps/score.sh", "--nj", "1", str(tmp / "exp/tiny_cap"), str(tmp / "data/own_test")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    one = {n: (scores / n).read_text() for n in two}
    assert one == two
    assert sorted(os.listdir(scores)) == [".score.lock"] + sorted(   # no job's part left behind
        f"{n}{x}" for n in ("own_test", "own_test_b") for x in (".score", ".score.json", ".llr.score", ".llr.score.json"))


# ---- 8 kHz audio with conf/fbank_8k.conf; later stages remember the sets and the fbank conf ----

def recipe_8k(tmp, *args):
    return subprocess.run(["bash", "run.sh", "--config", str(tmp / "tiny_cap.yaml"), "--nj", "1",
                           "--data", str(tmp / "data"), "--exp", str(tmp / "exp"), "--fbankdir", str(tmp / "fbank"),
                           *args], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def tel(tmp_path_factory):
    """The tiny corpus at 8 kHz as your data dirs: stages 0-1 with --fbank-conf conf/fbank_8k.conf, then
    stage 2 and stages 3-4 each started alone with no corpus option and no --fbank-conf."""
    tmp = tmp_path_factory.mktemp("tel")
    subprocess.run(["python", "local/make_synth_corpus.py", "--size", "tiny", "--nj", "2", str(tmp / "c"),
                    str(tmp / "synth")], cwd=ROOT, check=True, capture_output=True)
    for name in ("train", "test"):
        scp = dict(l.split() for l in (tmp / "synth" / f"synth_{name}" / "wav.scp").read_text().splitlines())
        out = {}
        for utt, path in scp.items():
            x, sr = sf.read(path, dtype="float32")
            dst = tmp / "audio8k" / f"{utt}.wav"
            dst.parent.mkdir(exist_ok=True)
            sf.write(dst, torchaudio.functional.resample(torch.from_numpy(x), sr, 8000).numpy(), 8000,
                     subtype="PCM_16")
            out[utt] = str(dst)
        trials = (tmp / "synth/synth_test/trials").read_text().splitlines() if name == "test" else None
        write_dir(tmp / "mine" / f"tel_{name}", out, {"trials": trials} if trials else None)
    cfg = yaml.safe_load(open(f"{ROOT}/conf/mini/cap.yaml"))
    cfg["train"].update(epochs=1, speakers_per_batch=4, num_workers=0)
    (tmp / "tiny_cap.yaml").write_text(yaml.safe_dump(cfg))
    runs = {"0-1": recipe_8k(tmp, "--train-set", str(tmp / "mine/tel_train"), "--test-set",
                             str(tmp / "mine/tel_test"), "--fbank-conf", "conf/fbank_8k.conf",
                             "--stage", "0", "--stop-stage", "1")}
    runs["2"] = recipe_8k(tmp, "--stage", "2", "--stop-stage", "2")
    runs["3-4"] = recipe_8k(tmp, "--stage", "3")
    for k, r in runs.items():
        assert r.returncode == 0, k + ": " + r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, runs


def test_8k_audio_with_fbank_8k_conf_is_not_resampled_and_has_100_frames_per_second(tel):
    tmp, runs = tel
    assert "resampled" not in runs["0-1"].stdout + runs["0-1"].stderr
    for name in ("tel_train", "tel_test"):
        d = tmp / "data" / name
        frames = dict(l.split() for l in (d / "utt2num_frames").read_text().splitlines())
        wavs = dict(l.split() for l in (d / "wav.scp").read_text().splitlines())
        for utt, path in wavs.items():
            info = sf.info(path)
            assert info.samplerate == 8000
            # 25 ms frames every 10 ms at 8 kHz: 200 samples, shifted by 80 (Kaldi's snip-edges count)
            assert int(frames[utt]) == 1 + (info.frames - 200) // 80
        feats = dict(kaldiio.load_scp(str(d / "feats.scp")))
        assert sorted(feats) == sorted(wavs)
        assert all(m.shape == (int(frames[u]), 40) for u, m in feats.items())
    rec = dict(l.split("=", 1) for l in (tmp / "data/prepared").read_text().splitlines() if not l.startswith("#"))
    assert rec["corpus"] == "own" and rec["fbank_conf"] == "conf/fbank_8k.conf"
    assert (rec["train"], rec["test"]) == ("tel_train", "tel_test")
    assert rec["train_set"] == str((tmp / "mine/tel_train").resolve())


def test_later_stages_alone_use_the_recorded_sets_and_fbank_conf(tel):
    """Stage 2 trains on tel_train, stage 3 started alone scores tel_test, stage 4 checks and records
    fbank_8k.conf (its check of the features against the conf would stop it under conf/fbank.conf)."""
    tmp, runs = tel
    for k in ("2", "3-4"):
        assert f"the sets recorded in {tmp}/data/prepared: {tmp}/data/tel_train and {tmp}/data/tel_test, your " \
            f"data dirs (--train-set {tmp}/mine/tel_train --test-set {tmp}/mine/tel_test)" in runs[k].stdout
    assert f"{tmp}/data/tel_train {tmp}/exp/tiny_cap" in runs["2"].stdout        # steps/train.sh's command line
    assert "32 utterances, 8 speakers" in (tmp / "exp/tiny_cap/log/train.log").read_text()
    scores = (tmp / "exp/tiny_cap/scores/tel_test.score").read_text().splitlines()
    trials = (tmp / "data/tel_test/trials").read_text().splitlines()
    assert [s.split()[:2] for s in scores] == [t.split()[:2] for t in trials]
    assert f"stage 3: embeddings of {tmp}/data/tel_test" in runs["3-4"].stdout
    cal = json.loads((tmp / "exp/tiny_cap/calibration.json").read_text())
    assert cal["fbank"]["path"] == "conf/fbank_8k.conf" and cal["fbank"]["options"]["sample_frequency"] == 8000
    assert cal["fbank"]["checked_against"]["data"] == f"{tmp}/data/tel_test"


@pytest.mark.parametrize("opts, given, prepared", [
    (["--corpus", "synth"], "--corpus synth", "your data dirs (--train-set {tmp}/mine/tel_train"),
    (["--train-set", "{tmp}/mine/tel_test", "--test-set", "{tmp}/mine/tel_train"],
     "--train-set {tmp}/mine/tel_test --test-set {tmp}/mine/tel_train", "--test-set {tmp}/mine/tel_test)"),
    (["--fbank-conf", "conf/fbank.conf"], "--fbank-conf conf/fbank.conf",
     "stage 1 made the features of {tmp}/data/tel_train and {tmp}/data/tel_test with conf/fbank_8k.conf"),
])
def test_an_option_naming_other_data_is_one_line(tel, opts, given, prepared):
    tmp, _ = tel
    before = {p: p.stat().st_mtime_ns for p in (tmp / "data/prepared", tmp / "exp/tiny_cap/scores/tel_test.score")}
    r = recipe_8k(tmp, "--stage", "3", *[o.format(tmp=tmp) for o in opts])
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode != 0 and len(lines) == 1, r.stdout + r.stderr
    assert lines[0].startswith(f"run.sh: ERROR: {given.format(tmp=tmp)} disagrees with {tmp}/data/prepared: ")
    assert prepared.format(tmp=tmp) in lines[0]
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_8k_audio_up_sampled_for_the_16k_conf_leaves_the_top_bins_without_speech(tel):
    """Under conf/fbank.conf, 8 kHz audio is up-sampled to 16 kHz: the 9 of 40 bins wholly above 4 kHz hold
    only the resampler's residue, far below the same speech recorded at 16 kHz (bins 32-33 lie in the
    resampler's transition band); the bins below 3.5 kHz match."""
    from capsv.features import compute_fbank, read_fbank_conf
    tmp, _ = tel
    conf = read_fbank_conf(f"{ROOT}/conf/fbank.conf")
    native, up = [], []
    for line in (tmp / "synth/synth_test/wav.scp").read_text().splitlines()[:6]:
        x, sr = sf.read(line.split()[1], dtype="float32")
        x = torch.from_numpy(x)[None]
        native.append(compute_fbank(x, sr, conf))
        up.append(compute_fbank(torchaudio.functional.resample(x, sr, 8000), 8000, conf))
    native, up = np.concatenate(native), np.concatenate(up)
    assert native.shape == up.shape and native.shape[1] == 40
    gap = native.mean(0) - up.mean(0)                     # log energy per bin, native minus up-sampled
    assert gap[31:].mean() > 5.0, gap                     # bins 32-40 (1-based): on average > 5 nats (22 dB) down
    assert np.all(gap[33:] > 5.0), gap                    # bins 34-40 (centres 5.0-7.5 kHz): each of them
    assert np.all(np.abs(gap[:27]) < 0.5), gap            # bins 1-27 (below 3.5 kHz): the same speech
