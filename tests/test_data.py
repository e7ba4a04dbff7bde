"""Data dirs and feature reads: stale, malformed or empty inputs are one clear UserError."""
import kaldiio
import numpy as np
import pytest
import torch

from capsv.data import ArkReader, EpisodeDataset, EpisodeLoader, EpisodicBatches, crop, read_data_dir
from capsv.utils import UserError
from test_train import make_data_dir


def rewrite(path, edit):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(edit(lines)))


@pytest.mark.parametrize("bad", ["12x", "-3", "0", "1.5", "²"])
def test_non_integer_frame_count_is_one_line(tmp_path, bad):
    make_data_dir(tmp_path)
    rewrite(tmp_path / "utt2num_frames", lambda ls: [f"spk0-u1 {bad}\n" if l.startswith("spk0-u1 ") else l
                                                     for l in ls])
    with pytest.raises(UserError, match=f"utt2num_frames: spk0-u1 has '{bad}' frames, not a positive integer; "
                                        f"re-run stage 1"):
        read_data_dir(tmp_path)


@pytest.mark.parametrize("name", ["feats.scp", "utt2spk", "utt2num_frames"])
def test_empty_file_is_named(tmp_path, name):
    make_data_dir(tmp_path)
    (tmp_path / name).write_text("")
    with pytest.raises(UserError, match=f"{name} is empty \\(no utterances\\)"):
        read_data_dir(tmp_path)


def test_repeated_utterance_is_named(tmp_path):
    make_data_dir(tmp_path)
    rewrite(tmp_path / "feats.scp", lambda ls: ls + ls[:1])
    with pytest.raises(UserError, match="feats.scp lists spk0-u0 more than once"):
        read_data_dir(tmp_path)


def write_compressed(d, feats):
    kaldiio.save_ark(f"{d}/c.ark", feats, scp=f"{d}/c.scp", compression_method=2)
    return dict(line.split() for line in open(f"{d}/c.scp"))


@pytest.mark.parametrize("kind", ["plain", "compressed"])
def test_read_past_the_matrix_end_is_stale_utt2num_frames(tmp_path, kind):
    feats = make_data_dir(tmp_path)
    _, _, scp = read_data_dir(tmp_path)
    if kind == "compressed":                         # the kaldiio fallback path
        scp = write_compressed(tmp_path, feats)
    reader = ArkReader(scp)
    n = len(feats["spk1-u2"])
    assert reader.read("spk1-u2", n - 10, 10).shape == (10, 40)       # the last rows are fine
    with pytest.raises(UserError, match=f"spk1-u2: frames {n - 5}-{n + 4} asked for, but its matrix in .* has {n} "
                                        f"rows; utt2num_frames is stale, re-run stage 1"):
        reader.read("spk1-u2", n - 5, 10)


def test_short_utterance_with_stale_count_is_caught_too(tmp_path):
    feats = make_data_dir(tmp_path)
    _, _, scp = read_data_dir(tmp_path)
    utt = min(feats, key=lambda u: len(feats[u]))
    n = len(feats[utt])
    assert n < 40
    # utt2num_frames says n+2 rows (still shorter than the crop): the repeat-to-fill read must not
    # quietly repeat fewer rows than it believes it has
    with pytest.raises(UserError, match=f"{utt}: frames 0-{n + 1} asked for.*has {n} rows"):
        crop(ArkReader(scp), utt, n + 2, 40, 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_name_the_utterance(tmp_path, bad):
    feats = make_data_dir(tmp_path)
    feats["spk3-u1"][7, 5] = bad
    kaldiio.save_ark(f"{tmp_path}/bad.ark", {"spk3-u1": feats["spk3-u1"]}, scp=f"{tmp_path}/bad.scp")
    _, nframes, scp = read_data_dir(tmp_path)
    scp = {**scp, **dict(line.split() for line in open(f"{tmp_path}/bad.scp"))}
    reader = ArkReader(scp)
    with pytest.raises(UserError, match="spk3-u1: its features hold NaN or Inf"):
        crop(reader, "spk3-u1", nframes["spk3-u1"], min(nframes["spk3-u1"], 20), 0)   # the crop holds row 7
    crop(reader, "spk3-u1", nframes["spk3-u1"], 10, 10)                                # rows 10-19 are fine


def test_speakers_with_too_few_utterances_are_left_out():
    utt2spk = {f"s{s}-u{u}": f"s{s}" for s in range(4) for u in range(3)}
    utt2spk.update({"s8-u0": "s8", "s9-u0": "s9", "s9-u1": "s9"})
    b = EpisodicBatches(utt2spk, n_speakers=2, n_utts=3, seed=0)
    assert b.speakers == ["s0", "s1", "s2", "s3"] and b.skipped == ["s8", "s9"]
    for epoch in (1, 2):
        used = {b.speakers[k] for batch in b.epoch(epoch) for k, _ in batch}
        assert used == {"s0", "s1", "s2", "s3"}
    with pytest.raises(UserError, match="only 4 training speakers have >= 3 utterances, but a batch needs 5"):
        EpisodicBatches(utt2spk, n_speakers=5, n_utts=3, seed=0)


def load_epochs(d, part, workers, epochs=(1, 2)):
    """Every batch of `epochs` as one EpisodeLoader yields them (its workers persist across epochs)."""
    utt2spk, nframes, scp = read_data_dir(d)
    sampler = EpisodicBatches(utt2spk, 4, 2, seed=3)
    loader = EpisodeLoader(ArkReader(scp), nframes, 40, 3, part, num_workers=workers)
    return [[(x.clone(), s.clone()) for x, s in loader.epoch(e, sampler.epoch(e))] for e in epochs]


def test_batches_are_the_same_whatever_the_workers_and_ranks(tmp_path):
    make_data_dir(tmp_path, n_spk=6, n_utt=5)
    one = load_epochs(tmp_path, (0, 1), 0)
    assert len(one[0]) >= 2 and not torch.equal(one[0][0][0], one[1][0][0])   # epochs differ
    for e, batches in enumerate(load_epochs(tmp_path, (0, 1), 2)):
        for (x, s), (x1, s1) in zip(batches, one[e], strict=True):
            assert torch.equal(x, x1) and torch.equal(s, s1)
    # two ranks: rank r holds speakers [2r, 2r + 2) of each batch, with the 1-process crops
    r0, r1 = load_epochs(tmp_path, (0, 2), 2), load_epochs(tmp_path, (1, 2), 0)
    for e in range(2):
        for (x0, s0), (x1, s1), (x, s) in zip(r0[e], r1[e], one[e], strict=True):
            assert x0.shape == (2, 2, 40, 40)
            assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([s0, s1]), s)
    # and the per-epoch dataset gives the same batches
    utt2spk, nframes, scp = read_data_dir(tmp_path)
    batches = EpisodicBatches(utt2spk, 4, 2, seed=3).epoch(2)
    ds = EpisodeDataset(ArkReader(scp), nframes, batches, 40, 3, 2, part=(1, 2))
    assert all(torch.equal(ds[i][0], r1[1][i][0]) for i in range(len(ds)))


def test_a_rank_reads_only_its_own_speakers(tmp_path):
    make_data_dir(tmp_path, n_spk=6, n_utt=5)
    utt2spk, nframes, scp = read_data_dir(tmp_path)
    batch = EpisodicBatches(utt2spk, 4, 2, seed=3).epoch(1)[0]

    class Counting(ArkReader):
        def read(self, utt, start=0, count=None):
            self.seen.add(utt)
            return super().read(utt, start, count)
    reader = Counting(scp)
    reader.seen = set()
    EpisodeDataset(reader, nframes, [batch], 40, 3, 1, part=(1, 2))[0]
    assert reader.seen == {u for _, utts in batch[2:] for u in utts}


def test_tables_are_arrays_that_read_like_the_files(tmp_path):
    """read_data_dir's tables: numpy arrays behind a read-only mapping (so forked loader workers share their
    pages), equal to the files' contents whatever their order, and one array of ids shared by all three."""
    feats = make_data_dir(tmp_path)
    want = {name: dict(l.split() for l in (tmp_path / name).read_text().splitlines())
            for name in ("utt2spk", "utt2num_frames", "feats.scp")}
    for name in want:                                 # unsorted files read the same
        rewrite(tmp_path / name, lambda ls: ls[::-1])
    utt2spk, nframes, scp = read_data_dir(tmp_path)
    assert dict(utt2spk) == want["utt2spk"] and dict(scp) == want["feats.scp"]
    assert dict(nframes) == {u: int(n) for u, n in want["utt2num_frames"].items()}
    assert list(utt2spk) == sorted(feats) and list(utt2spk.items()) == sorted(want["utt2spk"].items())
    assert sorted(set(utt2spk.values())) == sorted(set(want["utt2spk"].values()))
    assert utt2spk.keys_array is nframes.keys_array is scp.keys_array
    assert all(t.column.dtype != object for t in (utt2spk, nframes, scp))
    assert "nosuch" not in scp and "spk0-u0" in scp
    with pytest.raises(KeyError):
        nframes["nosuch"]
    path, offset = want["feats.scp"]["spk1-u2"].rsplit(":", 1)
    assert scp.locate("spk1-u2") == (path, int(offset))


def test_ark_handles_are_a_bounded_lru(tmp_path, monkeypatch):
    """More arks than MAX_OPEN_ARKS: at most that many open, the least recently used closed first (a hot ark
    keeps its handle), and every read is right."""
    import capsv.data
    monkeypatch.setattr(capsv.data, "MAX_OPEN_ARKS", 4)
    mats = {f"u{i}": np.full((3, 2), i, dtype=np.float32) for i in range(10)}
    scp = {}
    for u, m in mats.items():
        kaldiio.save_ark(f"{tmp_path}/{u}.ark", {u: m}, scp=f"{tmp_path}/{u}.scp")
        scp.update(l.split() for l in open(f"{tmp_path}/{u}.scp"))
    reader = ArkReader(scp)
    reader.read("u0")
    hot = reader._files[f"{tmp_path}/u0.ark"]
    for i in range(1, 10):
        assert np.array_equal(reader.read(f"u{i}"), mats[f"u{i}"])
        assert np.array_equal(reader.read("u0"), mats["u0"])
        assert len(reader._files) <= 4
    assert reader._files[f"{tmp_path}/u0.ark"] is hot and not hot.closed
    assert list(reader._files)[-2:] == [f"{tmp_path}/u9.ark", f"{tmp_path}/u0.ark"]
