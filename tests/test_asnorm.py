"""AS-norm (capsv.asnorm, stage 3's --cohort-data): the formula against a numpy oracle; the cohort scores of a
spilled cache and of two caches against one cache's; the entry points (steps/extract_embeddings.sh --cohort true,
steps/score.sh --cohort-data, run.sh --asnorm) on copies of the trained fixture's experiments, against AS-norm
recomputed independently from raw and cohort scores scored through capsv.scoring on explicit pairs; --nj 2 equal
to --nj 1; the cohort extracted once and reused; K clamped to a small cohort."""
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
import yaml

from capsv import asnorm, checkpoint
from capsv.asnorm import as_norm, asnorm_path, cohort_stats, select_cohort, top_k_stats
from capsv.config import load_config
from capsv.data import ArkReader, read_data_dir
from capsv.models.speaker_net import SpeakerNet
from capsv.scoring import build_cache, cache_from_frames, score_trials, trunk_batches
from capsv.trials import read_trials
from capsv.utils import sha256
from conftest import ROOT, recipe_cmd

from test_scoring import small_net


def test_formula_against_numpy_oracle():
    rng = np.random.default_rng(0)
    n_enr, n_test, n_coh, k = 7, 9, 40, 5
    enr, test = rng.normal(0.3, 0.2, (n_enr, n_coh)), rng.normal(0.1, 0.3, (n_test, n_coh))
    raw = rng.normal(0, 1, (n_enr, n_test))
    me, se = top_k_stats(enr, k)
    mt, st = top_k_stats(test, k)
    got = as_norm(raw, me[:, None], se[:, None], mt[None, :], st[None, :])
    for i in range(n_enr):
        for j in range(n_test):
            te, tt = np.sort(enr[i])[::-1][:k], np.sort(test[j])[::-1][:k]
            want = 0.5 * ((raw[i, j] - te.mean()) / te.std() + (raw[i, j] - tt.mean()) / tt.std())
            assert abs(got[i, j] - want) < 1e-12
    # K = the whole cohort is plain S-norm
    m, s = top_k_stats(enr, n_coh)
    np.testing.assert_allclose(m, enr.mean(1), atol=1e-15)
    np.testing.assert_allclose(s, enr.std(1), atol=1e-15)


def test_cohort_selection_one_per_speaker_evenly_spread():
    utt2spk = {f"s{s}-u{u}": f"s{s}" for s in range(10) for u in (3, 1, 2)}
    assert select_cohort(utt2spk, 4) == ["s0-u1", "s2-u1", "s5-u1", "s7-u1"]
    assert select_cohort(utt2spk, 100) == [f"s{s}-u1" for s in range(10)]   # more than there are: all
    assert asnorm_path("exp/x/scores/synth_test_o.score") == "exp/x/scores/synth_test_o.asnorm.score"


@pytest.mark.parametrize("pooling", ["cap", "tap", "sap"])
def test_cohort_stats_two_caches_and_spilled_equal_one_cache(tmp_path, pooling):
    """Per-utterance top-K stats from the test cache (in memory, then spilled to disk) and a separate cohort cache
    equal those of all pairs scored in one cache; blocks smaller than the utterances exercise the block loop."""
    g = torch.Generator().manual_seed(7)
    net = small_net(pooling, dtype=torch.float32)
    test = {f"t{i}": torch.randn(3, 9, 8, generator=g) for i in range(5)}
    coh = {f"c{i}": torch.randn(3, 9, 8, generator=g) for i in range(6)}
    with torch.no_grad():
        one = cache_from_frames(net, {**test, **coh})
        pairs = [(t, c) for t in sorted(test) for c in sorted(coh)]
        full = score_trials(net, one, pairs, 4).reshape(len(test), len(coh))
        want_m, want_s = top_k_stats(full, 3)
        coh_cache = cache_from_frames(net, coh)
        utts = sorted(test)
        in_mem = cache_from_frames(net, test)
        spilled = build_cache(net, utts, [(utts, torch.stack([test[u] for u in utts]))], torch.device("cpu"),
                              mem_bytes=1, spill_dir=tmp_path)
        assert not spilled.in_memory
        old = asnorm.PAIRS_PER_BLOCK, asnorm.DOT_PAIRS_PER_BLOCK
        asnorm.PAIRS_PER_BLOCK = asnorm.DOT_PAIRS_PER_BLOCK = 12       # blocks of 2 utterances
        try:
            for cache in (in_mem, spilled):
                stats = cohort_stats(net, cache, utts[::-1], coh_cache, 3, 4)
                got = np.array([stats[u] for u in utts])
                np.testing.assert_allclose(got[:, 0], want_m, atol=1e-6)
                np.testing.assert_allclose(got[:, 1], want_s, atol=1e-6)
        finally:
            asnorm.PAIRS_PER_BLOCK, asnorm.DOT_PAIRS_PER_BLOCK = old
    assert np.ptp(want_m) > 1e-3


def oracle(root, exp, cohort_utts, k):
    """AS-norm of the test dir's lists, recomputed: test and cohort utterances in ONE cache, raw scores and all
    (utterance, cohort) pair scores through score_trials on explicit pairs, then the formula in numpy.

    The trunk and cache rows are made in stage 3's batches (8 test, then the cohort): the tiny model's top-K
    spreads are ~1e-5, so the 1e-7 float32 differences of other batch sizes would show in s' at 1e-2."""
    state = checkpoint.load_for_inference(str(exp))
    cfg = load_config(f"{exp}/config.yaml")
    net = SpeakerNet.from_config(state["config"])
    net.load_state_dict(state["model"])
    net.eval()
    lists = {name: read_trials(str(root / "data/synth_test" / name)) for name in ("trials", "trials_x")}
    test_utts = sorted({u for trials in lists.values() for e, t, _ in trials for u in (e, t)})
    batches, keys = [], []
    with torch.no_grad():
        for data, utts, tag in ((root / "data/synth_test", test_utts, ""),
                                (root / "data/synth_train", cohort_utts, "c:")):
            _, nframes, scp = read_data_dir(str(data))
            for chunk, f in trunk_batches(net, ArkReader(scp), nframes, utts, cfg["eval"], torch.device("cpu")):
                batches.append(([tag + u for u in chunk], f))
                keys += batches[-1][0]
        cache = build_cache(net, keys, batches, torch.device("cpu"), mem_bytes=float("inf"))
        coh = score_trials(net, cache, [(u, "c:" + c) for u in test_utts for c in cohort_utts], 8)
        raw = {name: score_trials(net, cache, trials, 8) for name, trials in lists.items()}
    top = -np.sort(-coh.reshape(len(test_utts), -1), axis=1)[:, :k]
    row = {u: i for i, u in enumerate(test_utts)}
    mu, sd = top.mean(1), top.std(1)
    out = {}
    for name, trials in lists.items():
        e = np.array([row[e] for e, _, _ in trials])
        t = np.array([row[t] for _, t, _ in trials])
        out[name] = trials, 0.5 * ((raw[name] - mu[e]) / sd[e] + (raw[name] - mu[t]) / sd[t])
    return out


def read_score_file(path):
    rows = [line.split() for line in open(path)]
    return [(e, t) for e, t, _ in rows], np.array([float(s) for *_, s in rows])


def small_root(trained_recipe, tmp_path):
    """data/ with the fixture's training dir and a test dir cut to the 8 utterances u001/u002 of its first 4 speakers
    (10 trials, and a second list trials_x of 5), so each scoring run's trunk sees few utterances; features stay the fixture's."""
    root = tmp_path / "root"
    shutil.copytree(trained_recipe / "data/synth_train", root / "data/synth_train")
    src, dst = trained_recipe / "data/synth_test", root / "data/synth_test"
    dst.mkdir(parents=True)
    keep = lambda u: u.endswith(("-u001", "-u002")) and u < "te0005"   # noqa: E731
    for name in ("utt2spk", "feats.scp", "utt2num_frames"):
        (dst / name).write_text("".join(line for line in open(src / name) if keep(line.split()[0])))
    trials = [line for line in open(src / "trials") if keep(line.split()[0]) and keep(line.split()[1])]
    (dst / "trials").write_text("".join(trials))
    (dst / "trials_x").write_text("".join(f"{t} {e} {lab}" for e, t, lab in (line.split(" ", 2) for line in
                                                                            trials[::2])))
    assert len(trials) == 10
    return root


def copy_exp(trained_recipe, tmp_path, name, dest="exp", **eval_keys):
    """A copy of the fixture's exp dir (models and config only) to score into, eval keys set in its config."""
    src, dst = trained_recipe / "exp" / name, tmp_path / dest / name
    shutil.copytree(src / "models", dst / "models")
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    cfg["eval"].update(eval_keys)
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dst


def score_sh(root, exp, *opts, overrides=()):
    r = subprocess.run(["bash", "steps/score.sh", *opts, str(exp), str(root / "data/synth_test"), *overrides],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def extract_sh(exp, data, *opts, overrides=()):
    r = subprocess.run(["bash", "steps/extract_embeddings.sh", *opts, str(exp), str(data), *overrides],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def run_sh(root, exp_root, *opts):
    return subprocess.run(recipe_cmd(root, "--exp", str(exp_root), "--config", str(exp_root / "small_cap.yaml"),
                                     "--stage", "3", "--stop-stage", "3", *opts),
                          cwd=ROOT, capture_output=True, text=True)


def test_cap_through_score_sh_and_run_sh_equals_independent_asnorm(trained_recipe, tmp_path):
    """steps/score.sh --cohort-data (cohort of 4 of the 40 training speakers, K=3, extracted once by
    steps/extract_embeddings.sh --cohort true) against the oracle, per list and in trial order; run.sh --asnorm true
    --nj 2 gives the same files; a plain re-run removes the stale AS-norm; K=50 with a cohort of 3 is clamped to 3
    (S-norm) with a warning."""
    root = small_root(trained_recipe, tmp_path)
    train = root / "data/synth_train"
    utt2spk = dict(line.split() for line in open(train / "utt2spk"))
    speakers = sorted(set(utt2spk.values()))
    assert len(speakers) == 40 and len(select_cohort(utt2spk, 6000)) == 40      # more asked than there are: all
    cohort = [min(u for u in utt2spk if utt2spk[u] == speakers[i]) for i in (0, 10, 20, 30)]
    assert select_cohort(utt2spk, 4) == cohort

    a = copy_exp(trained_recipe, tmp_path, "small_cap", "exp_a")
    extract_sh(a, root / "data/synth_test")
    r = extract_sh(a, train, "--cohort", "true", overrides=["eval.cohort_size=4"])
    assert f"{a}/embeddings/synth_train_cohort: trunk ran on 40 crops of 4 utterances in 1 jobs" in r.stdout
    r = score_sh(root, a, "--nj", "1", "--cohort-data", str(train),
                 overrides=["eval.cohort_size=4", "eval.asnorm_top_k=3"])
    assert "8 utterances x 4 = 32 cohort scores for 15 trials" in r.stdout    # once per utterance, not per trial
    want = oracle(root, a, cohort, 3)
    for name, out in (("trials", "synth_test"), ("trials_x", "synth_test_x")):
        trials, expect = want[name]
        pairs, got = read_score_file(a / f"scores/{out}.asnorm.score")
        assert pairs == [(e, t) for e, t, _ in trials]                # the list's trial order
        np.testing.assert_allclose(got, expect, rtol=0, atol=1e-6)    # 6 printed decimals
        assert np.ptp(expect) > 1.0
        raw_pairs, raw = read_score_file(a / f"scores/{out}.score")
        assert raw_pairs == pairs and np.abs(raw - got).max() > 0.1    # the raw file is there, as it was
        raw_info = json.load(open(a / f"scores/{out}.score.json"))
        info = json.load(open(a / f"scores/{out}.asnorm.score.json"))
        assert {k: info[k] for k in raw_info} == raw_info
        assert info["cohort"] == {"data": str(train), "utt2spk_sha256": sha256(str(train / "utt2spk")),
                                  "speakers": 40, "size": 4, "top_k": 3}
        assert info["cohort_embeddings"] == json.load(open(a / "embeddings/synth_train_cohort/embedding.json"))[
            "signature"]

    # run.sh --asnorm true --nj 2 (the same keys, from the exp's config) writes the same files as --nj 1
    b = copy_exp(trained_recipe, tmp_path, "small_cap", "exp_b", cohort_size=4, asnorm_top_k=3)
    shutil.copy(b / "config.yaml", tmp_path / "exp_b/small_cap.yaml")
    r = run_sh(root, tmp_path / "exp_b", "--asnorm", "true", "--nj", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for f in ("synth_test.asnorm.score", "synth_test_x.asnorm.score", "synth_test.score"):
        assert (b / "scores" / f).read_text() == (a / "scores" / f).read_text(), f
    assert sorted(p.name for p in (b / "scores").iterdir()) == sorted(p.name for p in (a / "scores").iterdir())

    # re-scoring without AS-norm removes the now stale AS-norm scores; a bad --asnorm is one line
    r = run_sh(root, tmp_path / "exp_b", "--asnorm", "maybe")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == \
        ["run.sh: ERROR: option --asnorm expects true or false, got 'maybe'"]
    r = run_sh(root, tmp_path / "exp_b", "--nj", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "trunk ran on 0 crops of 0 utterances in 2 jobs (2 job(s) kept" in r.stdout      # the archives reused
    assert f"{b}/scores/synth_test_x.score up to date (scored from these embeddings, the list unchanged); kept" \
        in r.stdout                                                                        # and the raw scores
    assert sorted(p.name for p in (b / "scores").iterdir()) == \
        [".score.lock", "synth_test.score", "synth_test.score.json", "synth_test_x.score", "synth_test_x.score.json"]

    # K above the cohort: clamped, said once, recorded; the cohort of another size is extracted anew
    r = extract_sh(a, train, "--cohort", "true", overrides=["eval.cohort_size=3"])
    assert "re-extracting" in r.stdout and "made for another AS-norm cohort" in r.stdout
    r = score_sh(root, a, "--nj", "2", "--cohort-data", str(train),
                 overrides=["eval.cohort_size=3", "eval.asnorm_top_k=50"])
    assert r.stdout.count("WARNING: eval.asnorm_top_k=50 is more than the cohort's 3 utterances; using all 3 "
                          "(S-norm)") == 1
    cohort3 = select_cohort(utt2spk, 3)
    assert cohort3 == [min(u for u in utt2spk if utt2spk[u] == speakers[i]) for i in (0, 13, 26)]
    trials, expect = oracle(root, a, cohort3, 3)["trials"]
    np.testing.assert_allclose(read_score_file(a / "scores/synth_test.asnorm.score")[1], expect, rtol=0, atol=1e-6)
    assert json.load(open(a / "scores/synth_test.asnorm.score.json"))["cohort"]["top_k"] == 3


def test_bad_cohort_dir_is_one_line(trained_recipe, tmp_path):
    d = copy_exp(trained_recipe, tmp_path, "small_cap")
    r = subprocess.run(["bash", "steps/extract_embeddings.sh", "--cohort", "true", str(d), str(tmp_path / "nowhere")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"steps/extract_embeddings.sh: ERROR: --cohort true: {tmp_path}/nowhere has no feats.scp; give the training "
        f"data dir after stage 1"]
    r = subprocess.run(["bash", "steps/score.sh", "--cohort-data", str(tmp_path / "nowhere"), str(d),
                        str(trained_recipe / "data/synth_test")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"steps/score.sh: ERROR: no AS-norm cohort embeddings in {d}/embeddings/nowhere_cohort; extract them first: "
        f"steps/extract_embeddings.sh --cohort true {d} {tmp_path}/nowhere"]
    assert not (d / "scores").exists() and not (d / "embeddings").exists()
