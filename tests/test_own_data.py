"""Your own Kaldi data dirs through stages 0-4: 22.05 kHz audio, a stereo file, `cmd |` entries,
two trial lists; and stage 3's scoring split over jobs giving the same score files as one job."""
import os
import subprocess

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
    assert sorted(os.listdir(scores)) == [
        ".score.lock", "own_test.score", "own_test.score.json", "own_test_b.score", "own_test_b.score.json"]
