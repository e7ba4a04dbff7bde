"""Training data: Kaldi data dirs, crop reads from ark files, episodic batches."""
import os
import struct
from collections import Counter

import kaldiio
import numpy as np
import torch

from capsv.utils import UserError, read_table


def _table(data_dir, name):
    """{key: value} of a two-column data-dir file; empty or repeated keys are errors naming the file."""
    path = os.path.join(data_dir, name)
    rows = read_table(path, 2)
    if not rows:
        raise UserError(f"{path} is empty (no utterances); re-run stage 0 and 1 for {data_dir}")
    table = dict(rows)
    if len(table) != len(rows):
        dup = next(k for k, n in Counter(k for k, _ in rows).items() if n > 1)
        raise UserError(f"{path} lists {dup} more than once; re-run stage 0 and 1 for {data_dir}")
    return table


def read_data_dir(data_dir, need=("feats.scp", "utt2spk", "utt2num_frames")):
    """The parts of a Kaldi data dir that training and scoring use, checked to agree."""
    for name in need:
        if not os.path.isfile(os.path.join(data_dir, name)):
            raise UserError(f"{data_dir}/{name} is missing; run stage 0 and 1 for this data dir first")
    utt2spk = _table(data_dir, "utt2spk")
    nframes = {}
    for utt, n in _table(data_dir, "utt2num_frames").items():
        if not (n.isascii() and n.isdigit() and int(n) > 0):   # a crop of a zero-frame matrix is meaningless
            raise UserError(f"{data_dir}/utt2num_frames: {utt} has '{n}' frames, not a positive integer; "
                            f"re-run stage 1 (steps/make_fbank.sh) for {data_dir}")
        nframes[utt] = int(n)
    scp = _table(data_dir, "feats.scp")
    if not (utt2spk.keys() == nframes.keys() == scp.keys()):
        raise UserError(f"{data_dir}: utt2spk, utt2num_frames and feats.scp list different utterances; "
                        f"re-run stage 1 (steps/make_fbank.sh) for it")
    return utt2spk, nframes, scp


class ArkReader:
    """Random access to feats.scp matrices, reading only the rows asked for.

    Uncompressed float matrices (what stage 1 writes) are read by seeking to the wanted
    rows; anything else falls back to kaldiio. File handles are opened per process, so a
    reader can be shared with DataLoader workers.
    """

    def __init__(self, scp):
        self.scp = scp              # utt -> "path:offset"
        self._files = {}

    def _file(self, path):
        f = self._files.get(path)
        if f is None:
            if len(self._files) > 64:
                for h in self._files.values():
                    h.close()
                self._files.clear()
            f = self._files[path] = open(path, "rb")
        return f

    def read(self, utt, start=0, count=None):
        """Rows start .. start+count-1 (to the end if count is None) of utt's matrix, as float32.

        Rows past the matrix's end are an error, not a short read: utt2num_frames says more
        frames than feats.scp holds, i.e. it is stale.
        """
        spec = self.scp[utt]
        path, _, offset = spec.rpartition(":")
        if path and offset.isdigit():
            try:
                f = self._file(path)
            except FileNotFoundError:
                raise UserError(f"feature archive {path} (for {utt}) is missing; re-run stage 1")
            f.seek(int(offset))
            head = f.read(15)
            if head[:6] in (b"\0BFM \4", b"\0BDM \4") and head[10:11] == b"\4":
                rows, cols = struct.unpack("<i", head[6:10])[0], struct.unpack("<i", head[11:15])[0]
                count = self._check_range(utt, path, rows, start, count)
                dtype = np.float32 if head[2:3] == b"F" else np.float64
                f.seek(int(offset) + 15 + start * cols * np.dtype(dtype).itemsize)
                data = np.fromfile(f, dtype=dtype, count=count * cols)
                if data.size != count * cols:
                    raise UserError(f"feature archive {path} is truncated at {utt}; re-run stage 1")
                return data.reshape(count, cols).astype(np.float32, copy=False)
        mat = kaldiio.load_mat(spec)
        count = self._check_range(utt, spec, len(mat), start, count)
        return np.asarray(mat[start:start + count], dtype=np.float32)

    @staticmethod
    def _check_range(utt, where, rows, start, count):
        count = rows - start if count is None else count
        if start < 0 or count < 0 or start + count > rows:
            raise UserError(f"{utt}: frames {start}-{start + count - 1} asked for, but its matrix in {where} has "
                            f"{rows} rows; utt2num_frames is stale, re-run stage 1 (steps/make_fbank.sh)")
        return count

    def __getstate__(self):
        return {"scp": self.scp, "_files": {}}


def crop(reader, utt, num_frames, length, start):
    """`length` rows from `start`; utterances shorter than a crop are repeated to fill it.

    NaN or Inf rows are an error naming the utterance: one would make the loss NaN and, once
    stepped, every weight, long before anyone looked.
    """
    if num_frames >= length:
        out = reader.read(utt, start, length)
    else:
        out = np.take(reader.read(utt, 0, num_frames), np.arange(length) % num_frames, axis=0)
    if not np.isfinite(out).all():
        raise UserError(f"{utt}: its features hold NaN or Inf (in {reader.scp[utt]}); re-run stage 1 for it, "
                        f"or remove it from the data dir")
    return out


class EpisodicBatches:
    """N speakers x M utterances per batch, no speaker twice, fixed by (seed, epoch).

    Each epoch every speaker's utterances are shuffled and cut into groups of M (the
    remainder is left for that epoch); groups are shuffled and packed into batches of N
    distinct speakers, deferring a group whose speaker the open batch already holds.
    """

    def __init__(self, utt2spk, n_speakers, n_utts, seed):
        spk2utts = {}
        for utt, spk in sorted(utt2spk.items()):
            spk2utts.setdefault(spk, []).append(utt)
        # a speaker who cannot fill one group would never be in a batch (nor trained as a class)
        self.spk2utts = {s: u for s, u in spk2utts.items() if len(u) >= n_utts}
        self.skipped = sorted(s for s in spk2utts if s not in self.spk2utts)
        self.speakers = sorted(self.spk2utts)
        self.n, self.m, self.seed = n_speakers, n_utts, seed
        usable = len(self.speakers)
        if usable < n_speakers:
            raise UserError(f"only {usable} training speakers have >= {n_utts} utterances, but a batch needs "
                            f"{n_speakers}; lower train.speakers_per_batch or train.utts_per_speaker")

    def epoch(self, epoch):
        rng = np.random.default_rng([self.seed, epoch, 0])
        groups = []
        for k, spk in enumerate(self.speakers):
            utts = self.spk2utts[spk]
            order = rng.permutation(len(utts))
            for g in range(len(utts) // self.m):
                groups.append((k, [utts[i] for i in order[g * self.m:(g + 1) * self.m]]))
        groups = [groups[i] for i in rng.permutation(len(groups))]
        batches, open_batch, held, deferred = [], [], set(), []
        for group in groups:
            deferred.append(group)
            keep = []
            for g in deferred:
                if g[0] in held or len(open_batch) == self.n:
                    keep.append(g)
                    continue
                open_batch.append(g)
                held.add(g[0])
            deferred = keep
            if len(open_batch) == self.n:
                batches.append(open_batch)
                open_batch, held = [], set()
        return batches


def episode(reader, nframes, groups, crop_frames, seed, epoch, index, part=(0, 1)):
    """Batch `index` of an epoch, as the block of its speakers that rank part[0] of part[1] holds:
    features [n, M, crop, F] and speaker indices [n], n = N / part[1].

    Crop starts are fixed by (seed, epoch, index): every start of the whole batch is drawn, in
    the same order whatever the part, so a rank reads exactly the crops a 1-process run reads
    for its speakers (and only those).
    """
    rank, world = part
    n = len(groups) // world
    lo, hi = rank * n, (rank + 1) * n
    rng = np.random.default_rng([seed, epoch, 1, index])
    feats = []
    for g, (_, utts) in enumerate(groups):
        for utt in utts:
            nf = nframes[utt]
            start = int(rng.integers(0, max(nf - crop_frames, 0) + 1))
            if lo <= g < hi:
                feats.append(crop(reader, utt, nf, crop_frames, start))
    m = len(groups[0][1])
    x = torch.from_numpy(np.stack(feats)).view(n, m, crop_frames, -1)
    return x, torch.tensor([k for k, _ in groups[lo:hi]])


class EpisodeDataset(torch.utils.data.Dataset):
    """Item i of an epoch: features [n, M, crop, F] and speaker indices [n]; crops fixed by (seed, epoch, i)."""

    def __init__(self, reader, nframes, batches, crop_frames, seed, epoch, part=(0, 1)):
        self.reader, self.nframes, self.batches = reader, nframes, batches
        self.crop_frames, self.seed, self.epoch, self.part = crop_frames, seed, epoch, part

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return episode(self.reader, self.nframes, self.batches[i], self.crop_frames, self.seed, self.epoch, i,
                       self.part)


class _EpochKeys(torch.utils.data.Sampler):
    """The keys (epoch, index, groups) of the current epoch's batches; set in the main process,
    read by the loader there, so workers that persist across epochs get each epoch's batches."""

    def __init__(self):
        self.epoch, self.batches = 0, []

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return ((self.epoch, i, groups) for i, groups in enumerate(self.batches))


class _KeyedEpisodes(torch.utils.data.Dataset):
    def __init__(self, reader, nframes, crop_frames, seed, part):
        self.reader, self.nframes, self.crop_frames, self.seed, self.part = reader, nframes, crop_frames, seed, part

    def __getitem__(self, key):
        epoch, index, groups = key
        return episode(self.reader, self.nframes, groups, self.crop_frames, self.seed, epoch, index, self.part)


class EpisodeLoader:
    """Every epoch's batches (this rank's part of each) through one DataLoader.

    Workers read crops straight from the ark files; with num_workers > 0 they persist across
    epochs (no start-up stall, ark handles kept open) and each reads prefetch_factor batches
    ahead; pinned memory makes the copy to a GPU asynchronous. What a batch holds depends only
    on (seed, epoch, index), never on the number of workers or ranks.
    """

    def __init__(self, reader, nframes, crop_frames, seed, part=(0, 1), num_workers=0, pin_memory=False,
                 prefetch_factor=2):
        self.keys = _EpochKeys()
        kw = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if num_workers > 0 else {}
        # its own generator: making worker seeds must not advance the global RNG a checkpoint records
        self.loader = torch.utils.data.DataLoader(
            _KeyedEpisodes(reader, nframes, crop_frames, seed, part), batch_size=None, sampler=self.keys,
            num_workers=num_workers, pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed), **kw)

    def epoch(self, epoch, batches):
        """An iterable over the epoch's batches (len() = their number)."""
        self.keys.epoch, self.keys.batches = epoch, batches
        return self.loader
