"""VoxCeleb preparation (stage 0) on fake trees with the real layout, and m4a through stage 1.

The VoxCeleb1 tree holds a short generated wav at every path of the real Vox1-O list
(../shared/data/voxceleb1/veri_test.txt); the VoxCeleb2 tree holds real m4a files made with ffmpeg.
"""
import os
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERI_TEST = os.path.join(os.path.dirname(ROOT), "shared", "data", "voxceleb1", "veri_test.txt")

needs_list = pytest.mark.skipif(not os.path.isfile(VERI_TEST), reason=f"{VERI_TEST} not found (../shared beside the clone)")
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed (.ci/run installs it)")


def tone(path, seconds=0.12, sr=16000, seed=0):
    rng = np.random.default_rng(seed)
    x = 0.2 * np.sin(2 * np.pi * (150 + 50 * rng.random()) * np.arange(int(sr * seconds)) / sr)
    x += 0.01 * rng.standard_normal(x.size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, x.astype(np.float32), sr, subtype="PCM_16")


def vox_paths(list_path):
    with open(list_path) as f:
        return sorted({p for line in f for p in line.split()[1:]})


@pytest.fixture(scope="module")
def vox1(tmp_path_factory):
    root = tmp_path_factory.mktemp("voxceleb1")
    for i, rel in enumerate(vox_paths(VERI_TEST)):
        tone(str(root / "test" / "wav" / rel), seed=i)
    return root


@pytest.fixture(scope="module")
def vox2(tmp_path_factory):
    """3 speakers x 2 videos x 2 utterances of AAC in m4a, as VoxCeleb2 dev is distributed."""
    root = tmp_path_factory.mktemp("voxceleb2")
    tmp = tmp_path_factory.mktemp("wavs")
    for s in range(3):
        for v in ("vidA-_x", "vidB"):
            for n in (1, 2):
                wav = str(tmp / f"{s}{v}{n}.wav")
                tone(wav, seconds=1.0, seed=s * 10 + n)
                out = root / "dev" / "aac" / f"id0000{s + 1}" / v / f"0000{n}.m4a"
                out.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", wav, "-c:a", "aac", "-b:a", "48k",
                                str(out)], check=True)
    return root


def run(*args, cwd=ROOT):
    return subprocess.run(["bash", *map(str, args)], cwd=cwd, capture_output=True, text=True)


def recipe(tmp, *args):
    return run("run.sh", "--corpus", "voxceleb", "--data", tmp / "data", "--exp", tmp / "exp",
               "--fbankdir", tmp / "fbank", *args)


def one_error_line(r):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode != 0 and len(lines) == 1, r.stdout[-2000:] + r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def vox_features(vox1, vox2, tmp_path_factory):
    """Stages 0-1 of run.sh on the fake trees: data/vox1_test (Vox1-O) and data/vox2_dev with features."""
    tmp = tmp_path_factory.mktemp("vox_recipe")
    r = recipe(tmp, "--voxceleb1-root", vox1, "--voxceleb2-root", vox2, "--trial-lists", VERI_TEST,
               "--stage", "0", "--stop-stage", "1", "--nj", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp


@needs_list
@needs_ffmpeg
def test_stage0_vox1_o_counts_and_vox2_m4a_through_stage1(vox1, vox_features):
    tmp_path = vox_features
    test = tmp_path / "data" / "vox1_test"
    trials = (test / "trials").read_text().splitlines()
    assert len(trials) == 37720 and sum(t.endswith(" target") for t in trials) == 18860
    utts = (test / "utt2spk").read_text().splitlines()
    assert len(utts) == 4715 and len((test / "spk2utt").read_text().splitlines()) == 40
    assert sorted(utts) == utts                                   # Python's str order is LC_ALL=C's for ASCII ids
    with open(VERI_TEST) as f:
        first = f.readline().split()
    assert trials[0] == f"{first[1][:-4].replace('/', '-')} {first[2][:-4].replace('/', '-')} target"
    wav = dict(l.split(" ", 1) for l in (test / "wav.scp").read_text().splitlines())
    assert wav["id10270-x6uYqmx31kE-00001"] == str(vox1 / "test/wav/id10270/x6uYqmx31kE/00001.wav")
    assert len((test / "feats.scp").read_text().splitlines()) == 4715

    train = tmp_path / "data" / "vox2_dev"
    wav = dict(l.split(" ", 1) for l in (train / "wav.scp").read_text().splitlines())
    assert sorted(wav) == [f"id0000{s}-{v}-0000{n}" for s in (1, 2, 3) for v in ("vidA-_x", "vidB") for n in (1, 2)]
    assert wav["id00001-vidA-_x-00001"].startswith("ffmpeg ") and wav["id00001-vidA-_x-00001"].endswith(" - |")
    frames = dict(l.split() for l in (train / "utt2num_frames").read_text().splitlines())
    assert all(abs(int(n) - 98) <= 3 for n in frames.values()), frames   # 1 s of audio, AAC priming aside
    import kaldiio
    feats = kaldiio.load_mat((train / "feats.scp").read_text().split()[1])
    assert feats.shape[1] == 40 and np.isfinite(feats).all() and feats.std() > 0.1


@pytest.fixture(scope="module")
def vox_model(vox_features, tmp_path_factory):
    """`run.sh --stage 2` after the VoxCeleb stages 0-1, with no corpus option: one epoch of a tiny config."""
    tmp = tmp_path_factory.mktemp("vox_model")
    cfg = yaml.safe_load(open(os.path.join(ROOT, "conf/mini/cap.yaml")))
    cfg["train"].update(epochs=1, speakers_per_batch=3, num_workers=0)
    (tmp / "vox_cap.yaml").write_text(yaml.safe_dump(cfg))
    r = run("run.sh", "--stage", "2", "--stop-stage", "2", "--config", tmp / "vox_cap.yaml",
            "--data", vox_features / "data", "--exp", tmp / "exp")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp / "exp/vox_cap", r


@needs_list
@needs_ffmpeg
def test_stage2_without_corpus_options_trains_on_the_recorded_vox2_dev(vox_features, vox_model):
    exp, r = vox_model
    data = vox_features / "data"
    assert f"the sets recorded in {data}/prepared: {data}/vox2_dev and {data}/vox1_test, VoxCeleb (--corpus " \
        f"voxceleb --train-sets 'vox2_dev')" in r.stdout
    from capsv.checkpoint import read_checkpoint
    assert read_checkpoint(exp / "models/epoch_0001.pt")["speakers"] == ["id00001", "id00002", "id00003"]
    assert "12 utterances, 3 speakers" in (exp / "log/train.log").read_text()


@needs_list
@needs_ffmpeg
def test_an_option_naming_another_corpus_than_stage_0_prepared_is_one_line(vox_features, tmp_path):
    data = vox_features / "data"
    for opt, value in (("--corpus", "synth"), ("--train-sets", "vox2_dev vox1_dev")):
        r = run("run.sh", "--stage", "2", opt, value, "--config", "conf/mini/cap.yaml", "--data", data,
                "--exp", tmp_path / "exp")
        given = f"{opt} '{value}'" if opt == "--train-sets" else f"{opt} {value}"
        assert one_error_line(r) == (
            f"run.sh: ERROR: {given} disagrees with {data}/prepared: stage 0 prepared VoxCeleb (--corpus voxceleb "
            f"--train-sets 'vox2_dev') into {data}/vox2_dev and {data}/vox1_test; leave the option out to use "
            f"those, or prepare the data you name from --stage 0 (or under another --data)")
    assert not (tmp_path / "exp").exists()
    # --synth-size matters only to the embedded corpus: passed along with VoxCeleb, it is not a contradiction
    r = run("run.sh", "--stage", "3", "--synth-size", "small", "--config", "conf/mini/cap.yaml", "--data", data,
            "--exp", tmp_path / "exp")
    assert f"the sets recorded in {data}/prepared: {data}/vox2_dev" in r.stdout
    assert f"{tmp_path}/exp/mini_cap/config.yaml not found; run stage 2" in one_error_line(r)


@needs_list
@needs_ffmpeg
def test_vox1_o_scored_in_two_jobs_equals_one_job(vox_features, vox_model):
    """Stage 3 at Vox1-O's size (37,720 trials over 4,715 utterances): the trunk once per utterance into the archives,
    then scoring in --nj 2 jobs writes the same score file as --nj 1. The model is trained one epoch on the fake
    vox2_dev; two short crops per utterance keep it fast."""
    exp, _ = vox_model
    data = vox_features / "data"
    r = run("steps/extract_embeddings.sh", "--nj", 2, exp, data / "vox1_test", "eval.num_crops=2",
            "eval.crop_frames=40")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "trunk ran on 9430 crops of 4715 utterances in 2 jobs" in r.stdout       # each utterance once
    scores = {}
    for nj in (1, 2):
        (exp / "scores/vox1_test.score").unlink(missing_ok=True)
        r = run("steps/score.sh", "--nj", nj, exp, data / "vox1_test", "eval.num_crops=2", "eval.crop_frames=40")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        scores[nj] = (exp / "scores/vox1_test.score").read_bytes()
    lines = scores[1].decode().splitlines()
    assert scores[2] == scores[1] and len(lines) == 37720
    assert [l.split()[:2] for l in lines] == [t.split()[:2] for t in (data / "vox1_test/trials").read_text().splitlines()]
    assert len({l.split()[2] for l in lines}) > 1000      # real, distinct scores


@needs_list
def test_two_train_sets_and_cleaned_list(vox1, tmp_path):
    """vox1_dev as a training set beside a cleaned list found in the root under its distributed name."""
    root = tmp_path / "vox1"
    shutil.copytree(vox1, root, symlinks=True)
    for s, v, n in [("id10001", "a", 1), ("id10001", "a", 2), ("id10002", "b", 1)]:
        tone(str(root / "dev" / "wav" / s / v / f"0000{n}.wav"))
    with open(VERI_TEST) as f:
        head = f.readlines()[:10]
    (root / "veri_test2.txt").write_text("".join(head))
    r = run("local/prepare_voxceleb.sh", "--voxceleb1-root", root, "--train-sets", "vox1_dev", tmp_path / "data")
    assert r.returncode == 0, r.stderr
    test = tmp_path / "data" / "vox1_test"
    assert len((test / "trials_o_clean").read_text().splitlines()) == 10
    assert not (test / "trials").exists()
    used = {u for l in (test / "trials_o_clean").read_text().splitlines() for u in l.split()[:2]}
    assert set((test / "utt2spk").read_text().split()[::2]) == used   # exactly the utterances its lists use
    assert (tmp_path / "data/vox1_dev/utt2spk").read_text() == \
        "id10001-a-00001 id10001\nid10001-a-00002 id10001\nid10002-b-00001 id10002\n"


def test_vox1_root_with_wav_one_level_down(tmp_path):
    """`wav/` directly in the root (not under test/): one line naming where it is and where it goes."""
    tone(str(tmp_path / "v1" / "wav" / "id10270" / "x" / "00001.wav"))
    (tmp_path / "list.txt").write_text("1 id10270/x/00001.wav id10270/x/00001.wav\n")
    r = recipe(tmp_path, "--voxceleb1-root", tmp_path / "v1", "--train-sets", "vox1_dev",
               "--trial-lists", tmp_path / "list.txt", "--stage", "0", "--stop-stage", "0")
    line = one_error_line(r)
    assert f"--voxceleb1-root {tmp_path}/v1: no dev/wav/ folder" in line
    assert f"found {tmp_path}/v1/wav: move it to {tmp_path}/v1/dev/wav" in line
    written = [p.name for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert set(written) <= {".run.lock"}   # run.sh's locks, nothing of stage 0


def test_vox2_root_missing_dev_aac(tmp_path):
    (tmp_path / "v1" / "test" / "wav").mkdir(parents=True)
    (tmp_path / "v2" / "vox2" / "dev" / "aac").mkdir(parents=True)
    (tmp_path / "list.txt").write_text("1 id10270/x/00001.wav id10270/x/00002.wav\n")
    r = run("local/prepare_voxceleb.sh", "--voxceleb1-root", tmp_path / "v1", "--voxceleb2-root", tmp_path / "v2",
            "--trial-lists", tmp_path / "list.txt", tmp_path / "data")
    line = one_error_line(r)
    assert "no dev/aac/ folder" in line and f"found {tmp_path}/v2/vox2/dev/aac" in line


def test_malformed_list_line(tmp_path):
    tone(str(tmp_path / "v1" / "test" / "wav" / "id10270" / "x" / "00001.wav"))
    (tmp_path / "veri_test.txt").write_text("1 id10270/x/00001.wav id10270/x/00001.wav\n"
                                            "yes id10270/x/00001.wav id10270/x/00001.wav\n")
    r = run("local/prepare_voxceleb.sh", "--voxceleb1-root", tmp_path / "v1", "--train-sets", "",
            "--trial-lists", tmp_path / "veri_test.txt", tmp_path / "data")
    line = one_error_line(r)
    assert f"{tmp_path}/veri_test.txt:2: expected `1|0 <enroll-path> <test-path>`" in line
    assert not (tmp_path / "data").exists()


def test_list_naming_missing_audio_and_no_list(tmp_path):
    tone(str(tmp_path / "v1" / "test" / "wav" / "id10270" / "x" / "00001.wav"))
    (tmp_path / "l.txt").write_text("1 id10270/x/00001.wav id10270/x/00002.wav\n0 id10270/x/00001.wav id10300/y/00009.wav\n")
    r = run("local/prepare_voxceleb.sh", "--voxceleb1-root", tmp_path / "v1", "--train-sets", "",
            "--trial-lists", tmp_path / "l.txt", tmp_path / "data")
    line = one_error_line(r)
    assert "2 of the 3 utterances the trial lists name are not in" in line and "id10270/x/00002.wav" in line
    r = run("local/prepare_voxceleb.sh", "--voxceleb1-root", tmp_path / "v1", "--train-sets", "", tmp_path / "data")
    assert "no trial list in" in one_error_line(r)
    assert not (tmp_path / "data").exists()
