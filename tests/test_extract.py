"""Stage 3 as extract, then score (capsv.embeddings; steps/extract_embeddings.sh, steps/score.sh, run.sh stage 3)
on the trained fixture and copies of its experiments:

- the fixture's own stage 3 (archives, then scores from them) equals the in-process path (capsv.scoring's
  utterance_cache + score_trials) for CAP and SAP, and TAP (the SAP network with mean pooling) too; the archives
  hold what doc/embeddings.md says;
- with --nj 3 the trunk runs once per utterance (each job's count; the parts are disjoint and cover the set);
- a second list is scored from the archives with the features gone; rows read block by block under a small
  memory budget give the same scores and no scratch file;
- archives of another checkpoint and lists naming an utterance without a row are refused in one line;
- a user's wav.scp is embedded through the entry point and through the step;
- stage 3 SIGKILLed while extracting and while scoring: the re-run removes what the dead run left and gives the
  same outputs; a live run's files are never touched.

Copies run with 3 crops of 120 frames so that the trunk costs little; the fixture's own run has the paper's crops.
"""
import fcntl
import json
import os
import shutil
import subprocess
import sys

import kaldiio
import numpy as np
import pytest
import torch
import yaml

from capsv import checkpoint
from capsv.config import load_config
from capsv.data import ArkReader, read_data_dir
from capsv.embeddings import CAP_FIELDS, EmbeddingArchive
from capsv.models.speaker_net import SpeakerNet
from capsv.scoring import score_trials, utterance_cache
from capsv.trials import read_trials
from conftest import ROOT, recipe_cmd
from test_asnorm import read_score_file, small_root
from test_kill_and_lock import KILL_HOOK

SMALL_EVAL = {"num_crops": 3, "crop_frames": 120}


def load_net(exp):
    state = checkpoint.load_for_inference(str(exp))
    net = SpeakerNet.from_config(state["config"])
    net.load_state_dict(state["model"])
    return net.eval(), state


def in_process(exp, data, trials, rows=False):
    """Today's in-process stage 3 on the utterances of `trials`: utterance_cache + score_trials (float64); with
    `rows`, also the cache (its rows: capsv.scoring.partner_independent of the trunk's outputs)."""
    net, _ = load_net(exp)
    ecfg = load_config(f"{exp}/config.yaml")["eval"]
    _, nframes, scp = read_data_dir(str(data))
    utts = sorted({u for e, t, *_ in trials for u in (e, t)})
    with torch.no_grad():
        cache = utterance_cache(net, ArkReader(scp), nframes, utts, ecfg, torch.device("cpu"))
        scores = score_trials(net, cache, trials, ecfg["trial_batch"])
    return (scores, cache) if rows else scores


def run(*args, env=None):
    r = subprocess.run(["bash", *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env)
    return r


def ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def one_error_line(r):
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(lines) == 1, r.stdout[-2000:] + r.stderr
    return lines[0]


def copy_exp(src, dst, **eval_keys):
    """models/ and config.yaml of `src` into `dst`, eval keys set."""
    shutil.copytree(src / "models", dst / "models")
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    cfg["eval"].update(eval_keys)
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dst


def job_counts(exp, name, nj):
    """(crops, utterances) each job's log says the trunk ran on."""
    out = []
    for j in range(1, nj + 1):
        log = open(exp / f"log/extract_{name}.{j}.log").read().splitlines()
        lines = [line.split() for line in log if line.startswith("extract: trunk")]
        assert len(lines) == 1
        out.append((int(lines[0][4]), int(lines[0][7])))
    return out


# ---- the fixture's own stage 3 (run.sh, the paper's crops) ----

@pytest.mark.parametrize("name", ["small_cap", "small_sap"])
def test_fixture_stage3_scores_from_archives_equal_in_process(trained_recipe, name):
    exp, data = trained_recipe / "exp" / name, trained_recipe / "data/synth_test"
    archive = EmbeddingArchive(str(exp / "embeddings/synth_test"))
    state = checkpoint.load_for_inference(str(exp))
    assert archive.meta["checkpoint_sha256"] == state["sha256"] and archive.meta["n_utts"] == 60
    info = json.load(open(exp / "scores/synth_test.score.json"))
    assert info["embeddings"] == archive.signature and info["checkpoint_sha256"] == state["sha256"]
    trials = read_trials(str(data / "trials"))[:3]              # 3 trials: the trunk on at most 6 utterances
    pairs, got = read_score_file(exp / "scores/synth_test.score")
    assert pairs[:3] == [(e, t) for e, t, _ in trials]
    want, cache = in_process(exp, data, trials, rows=True)
    np.testing.assert_allclose(got[:3], want, rtol=0, atol=1e-6)
    assert np.ptp(want) > 1e-3

    # the rows are what doc/embeddings.md says: the scorer's quantities, from the trunk once per utterance
    utts = cache.utts
    fields = cache.data
    rows = archive.read_rows(utts)
    assert rows.keys() == fields.keys()
    for k, v in fields.items():
        np.testing.assert_allclose(rows[k].numpy(), v.numpy(), rtol=1e-5, atol=1e-5)
    if name == "small_cap":
        mats = np.stack([kaldiio.load_mat(archive.scp[u]) for u in utts])         # [n, K, F], crop by crop
        n, d, t = len(utts), *fields["st"].shape[-2:]
        assert (d, t) == (128, 88) and mats.shape[1:] == (10, 2 * d * t + d + 128)
        assert list(archive.meta["layout"]["fields"]) == list(CAP_FIELDS) == ["st", "m", "u", "c"]
        side_by_side = np.concatenate([fields[k].reshape(n, 10, -1).numpy() for k in CAP_FIELDS], axis=-1)
        np.testing.assert_allclose(mats, side_by_side, rtol=1e-5, atol=1e-5)
    else:
        vec = {u: kaldiio.load_mat(archive.scp[u]) for u in utts}                # a vector [512] per utterance
        crops = dict(kaldiio.load_scp(str(exp / "embeddings/synth_test/crop_embedding.scp")))
        for u in utts:
            c = crops[u]                                                          # [10, 512], not normalised
            assert vec[u].shape == (512,) and c.shape == (10, 512)
            np.testing.assert_allclose(vec[u], (c / np.linalg.norm(c, axis=1, keepdims=True)).mean(0), atol=1e-6)
        for (e, t, _), s in zip(trials, got[:3]):                                  # score = dot product
            assert abs(float(vec[e] @ vec[t]) - s) < 1e-6


def test_tap_scored_from_archives_equals_in_process(trained_recipe, tmp_path):
    """TAP: the SAP network's trunk and head with mean pooling, extracted and scored in one process
    (capsv.bin.score --data) against the in-process path."""
    root = small_root(trained_recipe, tmp_path)
    state = checkpoint.load_for_inference(trained_recipe / "exp/small_sap")
    state["config"]["model"]["pooling"] = "tap"
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("pool.")}
    exp = tmp_path / "exp/small_tap"
    checkpoint.save_checkpoint(str(exp / "models"), state["epoch"], state)
    cfg = yaml.safe_load((trained_recipe / "exp/small_sap/config.yaml").read_text())
    cfg["model"]["pooling"] = "tap"
    cfg["eval"].update(SMALL_EVAL)
    (exp / "config.yaml").write_text(yaml.safe_dump(cfg))
    data = root / "data/synth_test"
    r = subprocess.run([sys.executable, "-m", "capsv.bin.score", "--exp", str(exp), "--data", str(data),
                        "--trials", str(data / "trials"), "--out", str(exp / "scores/synth_test.score")],
                       cwd=ROOT, capture_output=True, text=True)
    ok(r)
    assert "extract: trunk ran on 24 crops of 8 utterances" in r.stdout
    trials = read_trials(str(data / "trials"))
    pairs, got = read_score_file(exp / "scores/synth_test.score")
    assert pairs == [(e, t) for e, t, _ in trials]
    want = in_process(exp, data, trials)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.ptp(want) > 1e-3
    archive = EmbeddingArchive(str(exp / "embeddings/synth_test"))
    assert archive.meta["pooling"] == "tap" and sorted(os.listdir(exp / "embeddings/synth_test")) == [
        "crop_embedding.ark", "crop_embedding.scp", "embedding.ark", "embedding.json", "embedding.scp"]


# ---- a copy of the CAP experiment through the steps (3 crops of 120 frames) ----

@pytest.fixture(scope="module")
def steps_run(trained_recipe, tmp_path_factory):
    """small_root's 8 test utterances, extracted with --nj 3 and scored with --nj 3 by the steps."""
    tmp = tmp_path_factory.mktemp("extract_steps")
    root = small_root(trained_recipe, tmp)
    exp = copy_exp(trained_recipe / "exp/small_cap", tmp / "exp/small_cap", **SMALL_EVAL)
    extract = ok(run("steps/extract_embeddings.sh", "--nj", 3, exp, root / "data/synth_test"))
    score = ok(run("steps/score.sh", "--nj", 3, exp, root / "data/synth_test"))
    return root, exp, extract, score


def test_nj3_runs_the_trunk_once_per_utterance_and_scores_equal_in_process(steps_run):
    root, exp, extract, _ = steps_run
    emb = exp / "embeddings/synth_test"
    utts = sorted(line.split()[0] for line in open(root / "data/synth_test/utt2spk"))
    parts = [[line.split()[0] for line in open(emb / f"embedding.{j}.scp")] for j in (1, 2, 3)]
    counts = job_counts(exp, "synth_test", 3)
    assert [n for _, n in counts] == [len(p) for p in parts] == [2, 3, 3]
    assert [c for c, _ in counts] == [3 * len(p) for p in parts]          # 3 crops each, through the trunk once
    assert sum(parts, []) == utts                                         # disjoint, in order, all of them
    assert f"{emb}: trunk ran on 24 crops of 8 utterances in 3 jobs" in extract.stdout
    assert [line.split()[0] for line in open(emb / "embedding.scp")] == utts
    assert sorted(os.listdir(emb)) == [".extract.lock"] + sorted(
        f"embedding.{j}.{x}" for j in (1, 2, 3) for x in ("ark", "json", "scp")) + ["embedding.json", "embedding.scp"]
    for name, out in (("trials", "synth_test"), ("trials_x", "synth_test_x")):
        trials = read_trials(str(root / "data/synth_test" / name))
        pairs, got = read_score_file(exp / f"scores/{out}.score")
        assert pairs == [(e, t) for e, t, _ in trials]
        np.testing.assert_allclose(got, in_process(exp, root / "data/synth_test", trials), rtol=0, atol=1e-6)


def test_a_second_list_is_scored_without_the_trunk(steps_run, tmp_path):
    """A list the first run did not have, scored by --trials with the test set's features gone: only the
    archives are read."""
    root, src, _, _ = steps_run
    data = root / "data/synth_test"
    exp = copy_exp(src, tmp_path / "exp/small_cap")
    shutil.copytree(src / "embeddings", exp / "embeddings")       # its scp still names src's arks: read only
    trials = read_trials(str(data / "trials"))
    new = tmp_path / "synth_test"
    new.mkdir()
    (new / "trials_new").write_text("".join(f"{t} {e} {'target' if lab else 'nontarget'}\n"
                                            for e, t, lab in trials[1::2]))
    want = in_process(exp, data, read_trials(str(new / "trials_new")))
    hidden = [data / "feats.scp", data / "utt2num_frames"]
    for f in hidden:
        f.rename(f.with_suffix(".hidden"))
    try:
        r = ok(run("steps/score.sh", "--trials", new / "trials_new", exp, new))
        pairs, got = read_score_file(exp / "scores/synth_test_new.score")
        assert len(pairs) == 5 and "no trunk" in r.stdout
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    finally:
        for f in hidden:
            f.with_suffix(".hidden").rename(f)


def test_rows_read_block_by_block_score_the_same_without_a_scratch_file(steps_run, tmp_path):
    root, exp, _, _ = steps_run
    archive = EmbeddingArchive(str(exp / "embeddings/synth_test"))
    net, _ = load_net(exp)
    rng = np.random.default_rng(0)
    trials = [(archive.utts[a], archive.utts[b]) for a, b in rng.integers(0, 8, (40, 2))]
    before = sorted(os.listdir(exp / "embeddings/synth_test"))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with torch.no_grad():
            mem = archive.cache(archive.utts, torch.device("cpu"))
            small = mem.nbytes // 3
            blocks = archive.cache(archive.utts, torch.device("cpu"), mem_bytes=small)
            assert mem.in_memory and not blocks.in_memory and blocks.path is None
            want = score_trials(net, mem, trials, 8)
            # other trials share a batch (float32 rounding of the batched products), the same rows
            np.testing.assert_allclose(score_trials(net, blocks, trials, 8), want, rtol=0, atol=1e-6)
    finally:
        os.chdir(cwd)
    assert 0 < blocks.peak_bytes <= small
    assert sorted(os.listdir(exp / "embeddings/synth_test")) == before and os.listdir(tmp_path) == []


def test_another_checkpoint_and_missing_utterances_are_refused_in_one_line(steps_run, tmp_path):
    """A newer checkpoint (a retrained exp) makes the archives stale: scoring refuses them naming both checkpoints,
    and the extraction says why it remakes them. A list naming an utterance without a row is refused."""
    root, src, _, _ = steps_run
    data = root / "data/synth_test"
    exp = copy_exp(src, tmp_path / "exp/small_cap")
    shutil.copytree(src / "embeddings", exp / "embeddings")       # its scp still names src's arks: read only
    state = checkpoint.load_for_inference(exp)
    state["model"]["head.0.running_mean"] += 0.5
    checkpoint.save_checkpoint(str(exp / "models"), state["epoch"] + 1, state)
    line = one_error_line(run("steps/score.sh", exp, data))
    assert f"{exp}/embeddings/synth_test: made by checkpoint {src}/models/epoch_0010.pt" in line
    assert f"but the newest of {exp} is {exp}/models/epoch_0011.pt" in line
    assert line.endswith(f"re-run extraction (steps/extract_embeddings.sh {exp} {data})")
    assert not (exp / "scores").exists() or not list((exp / "scores").glob("*.score"))

    r = ok(run("steps/extract_embeddings.sh", exp, data))
    said = [line for line in r.stdout.splitlines() if "re-extracting" in line]
    assert len(said) == 1 and f"made by {src}/models/epoch_0010.pt" in said[0] and "epoch_0011.pt" in said[0]
    assert job_counts(exp, "synth_test", 1) == [(24, 8)]
    assert EmbeddingArchive(str(exp / "embeddings/synth_test")).meta["checkpoint"] == f"{exp}/models/epoch_0011.pt"

    bad = tmp_path / "synth_test"
    bad.mkdir()
    (bad / "trials").write_text("te0001-u001 te0002-u001 nontarget\nte0001-u001 te0009-u004 nontarget\n")
    line = one_error_line(run("steps/score.sh", exp, bad))
    assert line == (f"ERROR: {bad}/trials: trials name utterance 'te0009-u004' that has no embedding in "
                    f"{exp}/embeddings/synth_test (1 such utterance(s) in all); extract the data dir that holds "
                    f"them (steps/extract_embeddings.sh) or fix the trials")
    assert not (exp / "scores").exists() or not list((exp / "scores").glob("*.score"))


def test_own_recordings_through_the_entry_point_and_the_step(trained_recipe, steps_run, tmp_path):
    """A wav.scp of three of the test recordings, read and featurised as stage 1 does: the same rows as the
    test set's archive, in an ark/scp kaldiio reads."""
    _, exp, _, _ = steps_run
    archive = EmbeddingArchive(str(exp / "embeddings/synth_test"))
    utts = archive.utts[:3]
    wav = dict(line.strip().split(" ", 1) for line in open(trained_recipe / "data/synth_test/wav.scp"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "wav.scp").write_text("".join(f"{u} {wav[u]}\n" for u in utts))
    r = subprocess.run([sys.executable, "-m", "capsv.bin.extract", "--exp", str(exp), "--wav-scp",
                        str(mine / "wav.scp"), "--out", str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True)
    ok(r)
    assert "extract: trunk ran on 9 crops of 3 utterances" in r.stdout
    want = {u: kaldiio.load_mat(archive.scp[u]) for u in utts}
    for out in ("out", "out2"):
        if out == "out2":
            ok(run("steps/extract_embeddings.sh", exp, mine, tmp_path / out))
        got = dict(kaldiio.load_scp(str(tmp_path / out / "embedding.scp")))
        assert sorted(got) == utts
        for u in utts:      # the same features; the trunk's batches differ (float32 rounding of values up to ~3)
            np.testing.assert_allclose(got[u], want[u], rtol=1e-5, atol=1e-5)
        assert json.load(open(tmp_path / out / "embedding.json"))["features"]["wav_scp"] == str(mine / "wav.scp")


# ---- stage 3 killed (run.sh --stage 3) ----

KILL_AT_RENAME = '''
import os, signal, sys
_want = os.environ.get("CAPSV_TEST_KILL_AT_RENAME")
def _hook(event, args):
    if event == "os.rename" and _want and isinstance(args[0], str) and _want in args[0]:
        os.kill(os.getpid(), signal.SIGKILL)
if _want:
    sys.addaudithook(_hook)
'''


def test_stage3_killed_while_extracting_and_while_scoring_leaves_nothing(steps_run, tmp_path):
    """run.sh stage 3 (--nj 3) with a job SIGKILLed as it is about to rename its finished temporary: first an
    extraction job (its partial ark and scp are left), then, on the re-run, a scoring job (its partial score
    file and the other jobs' parts are left). Each re-run removes what the dead run left, says so, redoes only
    what is missing; the last gives the steps' uninterrupted outputs byte for byte, and nothing else."""
    root, ref, _, _ = steps_run
    exp_root = tmp_path / "exp"
    exp = copy_exp(ref, exp_root / "small_cap")
    shutil.copy(exp / "config.yaml", exp_root / "small_cap.yaml")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_AT_RENAME)
    emb, scores = exp / "embeddings/synth_test", exp / "scores"

    def stage3(kill=None):
        env = dict(os.environ, PYTHONPATH=str(hook), CAPSV_TEST_KILL_AT_RENAME=kill) if kill else None
        return subprocess.run(recipe_cmd(root, "--exp", str(exp_root), "--config", str(exp_root / "small_cap.yaml"),
                                         "--stage", "3", "--stop-stage", "3", "--nj", "3"),
                              cwd=ROOT, capture_output=True, text=True, env=env)

    r = stage3(kill="/.embedding.3.ark.")
    assert r.returncode != 0 and "job 3 failed" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    left = sorted(p.name.split(".")[1:4] for p in emb.glob(".*.tmp"))
    assert left == [["embedding", "3", "ark"], ["embedding", "3", "scp"]] and not (emb / "embedding.json").exists()

    r = stage3(kill="/.synth_test.score.2.")
    assert r.returncode != 0 and "job 2 failed" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"removing 2 file(s) left in {emb} by a run that did not finish" in r.stdout
    assert job_counts(exp, "synth_test", 3) == [(0, 0), (0, 0), (9, 3)]          # only the dead job's part
    assert len(list(scores.glob(".synth_test.score.2.*.tmp"))) == 1 and not (scores / "synth_test.score").exists()
    (scores / "capsv-cache.x1y2z3.bin").write_bytes(bytes(4096))   # a scratch file of an older version's scoring

    r = ok(stage3())
    # the partial score file, jobs 1 and 3's parts of both lists with their .json, the scratch file
    assert f"removing 10 file(s) left in {scores} by a run that did not finish" in r.stdout
    assert job_counts(exp, "synth_test", 3) == [(0, 0)] * 3
    for made, want in ((emb, ref / "embeddings/synth_test"), (scores, ref / "scores")):
        assert sorted(os.listdir(made)) == sorted(os.listdir(want))
        for name in os.listdir(want):
            if name.endswith((".ark", ".score")):
                assert (made / name).read_bytes() == (want / name).read_bytes(), name
            elif name.endswith(".scp"):
                assert (made / name).read_text() == (want / name).read_text().replace(str(ref), str(exp)), name


def test_a_live_runs_files_are_never_touched(steps_run, tmp_path):
    """A scoring run holding the lock of the scores dir: another stops in one line naming it, and the live
    run's temporary stays. An archive being written (its lock held) is not scored from."""
    root, ref, _, _ = steps_run
    exp = copy_exp(ref, tmp_path / "exp/small_cap")
    shutil.copytree(ref / "embeddings", exp / "embeddings")
    scores = exp / "scores"
    scores.mkdir()
    live = scores / ".synth_test.score.1.abc123.tmp"
    live.write_text("half a score file")
    for lock, cmd, said in ((scores / ".score.lock", "score", "is in use by"),
                            (exp / "embeddings/synth_test/.extract.lock", "extract", "is being written by")):
        with open(lock, "w") as f:
            f.write(f"steps/{cmd}.sh pid 1 on host h since then\n")
            f.flush()
            fcntl.flock(f, fcntl.LOCK_EX)
            line = one_error_line(run("steps/score.sh", exp, root / "data/synth_test"))
        assert line.startswith(f"steps/score.sh: ERROR: {lock.parent} {said} steps/{cmd}.sh pid 1 on host h since then")
        if cmd == "score":
            assert live.read_text() == "half a score file"
    assert not list(scores.glob("*.score"))
