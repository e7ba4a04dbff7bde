"""Training data: Kaldi data dirs, crop reads from ark files, episodic batches.

The per-utterance tables of a data dir (utt2spk, utt2num_frames, feats.scp) are held in numpy
arrays (UttTable), not dicts of strings: DataLoader workers forked from the training process
share its memory pages until they write to them, and looking up a Python object writes its
reference count, so every worker would end up with a private copy of most of a 1.09 M-entry
dict. Arrays hold no per-entry objects (python -m capsv.bin.bench --only scale measures both).
"""
import collections
import gc
import os
import struct

import kaldiio
import numpy as np
import torch

from capsv.utils import UserError, read_table

MAX_OPEN_ARKS = 64   # ark handles a reader keeps open, least recently used closed first


class UttTable(collections.abc.Mapping):
    """A read-only {utterance: value} over a sorted array of ids (bytes) and an array of values.

    `column[i]` is the value of `keys_array[i]`, or an index into `labels` (speakers, ark paths) when
    those are given; lookups are a binary search. Iterating yields the ids in sorted (LC_ALL=C) order.
    """

    def __init__(self, keys, column, labels=None):
        self.keys_array, self.column, self.labels = keys, column, labels

    def index(self, utt):
        b = utt.encode()
        i = int(np.searchsorted(self.keys_array, b))
        if i == len(self.keys_array) or self.keys_array[i] != b:
            raise KeyError(utt)
        return i

    def value_at(self, i):
        v = self.column[i]
        if self.labels is not None:
            return self.labels[v]
        return v.decode() if isinstance(v, bytes) else v.item()

    def __getitem__(self, utt):
        return self.value_at(self.index(utt))

    def __contains__(self, utt):
        try:
            self.index(utt)
        except (KeyError, AttributeError):
            return False
        return True

    def __iter__(self):
        return (k.decode() for k in self.keys_array)

    def __len__(self):
        return len(self.keys_array)

    def items(self):
        return _Items(self)

    def values(self):
        return _Values(self)


class _Items(collections.abc.ItemsView):
    def __iter__(self):   # in order, without a search per key
        t = self._mapping
        return zip(iter(t), (t.value_at(i) for i in range(len(t))))


class _Values(collections.abc.ValuesView):
    def __iter__(self):
        t = self._mapping
        return (t.value_at(i) for i in range(len(t)))


class FeatsTable(UttTable):
    """feats.scp as arrays: each utterance's ark (an index into `labels`, the ark paths) and byte offset."""

    def __init__(self, keys, ark_index, offsets, arks):
        super().__init__(keys, offsets, arks)
        self.ark_index = ark_index

    def locate(self, utt):
        """(ark path, byte offset) of utt's matrix."""
        i = self.index(utt)
        return self.labels[self.ark_index[i]], int(self.column[i])

    def value_at(self, i):
        return f"{self.labels[self.ark_index[i]]}:{self.column[i]}"


def _columns(data_dir, name):
    """(keys, values): the two columns of a data-dir file as bytes arrays, sorted by key; an empty file,
    a line without exactly two fields or a repeated key is an error naming the file."""
    path = os.path.join(data_dir, name)
    with open(path, "rb") as f:
        data = f.read()
    tokens = data.split()
    lines = data.count(b"\n") + (not data.endswith(b"\n") and bool(data))
    if len(tokens) != 2 * lines:   # blank lines, or a line of other than two fields: say which, as read_table does
        rows = read_table(path, 2)
        tokens = [t.encode() for row in rows for t in row]
    if not tokens:
        raise UserError(f"{path} is empty (no utterances); re-run stage 0 and 1 for {data_dir}")
    keys, values = np.array(tokens[0::2]), np.array(tokens[1::2])
    if not (keys[1:] > keys[:-1]).all():   # not sorted, or a key repeats
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], values[order]
        same = keys[1:] == keys[:-1]
        if same.any():
            dups = set(keys[1:][same].tolist())
            dup = next(k for k in tokens[0::2] if k in dups)
            raise UserError(f"{path} lists {dup.decode()} more than once; re-run stage 0 and 1 for {data_dir}")
    return keys, values


def _frame_counts(data_dir, keys, values):
    ok = np.char.isdigit(values)
    if ok.all():
        counts = values.astype(np.int64)
        ok = counts > 0
    if not ok.all():   # a crop of a zero-frame matrix is meaningless
        i = int(np.flatnonzero(~ok)[0])
        raise UserError(f"{data_dir}/utt2num_frames: {keys[i].decode()} has '{values[i].decode()}' frames, not a "
                        f"positive integer; re-run stage 1 (steps/make_fbank.sh) for {data_dir}")
    return counts.astype(np.int32)


def _labels(column):
    """(labels, index) with labels[index[i]] == column[i]: by runs when the column is grouped and sorted
    (speakers in a Kaldi utt2spk), else by sorting; both linear in practice."""
    if len(column) and (column[1:] >= column[:-1]).all():
        starts = np.concatenate([[True], column[1:] != column[:-1]])
        return column[starts], (np.cumsum(starts) - 1).astype(np.int32)
    labels, index = np.unique(column, return_inverse=True)
    return labels, index.astype(np.int32)


def _feats_table(keys, specs):
    """feats.scp as ark indices and offsets when every entry is `<path>:<offset>`; else the specs as they are."""
    parts = [s.rpartition(b":") for s in specs.tolist()]
    if all(sep and path and off.isdigit() for path, sep, off in parts):
        arks = {}
        index = np.array([arks.setdefault(path, len(arks)) for path, _, _ in parts], dtype=np.int32)
        offsets = np.array([off for _, _, off in parts]).astype(np.int64)
        return FeatsTable(keys, index, offsets, [a.decode() for a in arks])
    return UttTable(keys, specs)


def read_data_dir(data_dir, need=("feats.scp", "utt2spk", "utt2num_frames")):
    """The parts of a Kaldi data dir that training and scoring use, checked to agree: utt2spk,
    utt2num_frames and feats.scp as read-only mappings (UttTable) over one shared array of ids."""
    for name in need:
        if not os.path.isfile(os.path.join(data_dir, name)):
            raise UserError(f"{data_dir}/{name} is missing; run stage 0 and 1 for this data dir first")
    keys, spk = _columns(data_dir, "utt2spk")
    speakers, spk_index = _labels(spk)
    utt2spk = UttTable(keys, spk_index, [s.decode() for s in speakers.tolist()])
    if not all(os.path.isfile(os.path.join(data_dir, n)) for n in ("utt2num_frames", "feats.scp")):
        return utt2spk, None, None   # not needed (`need`), and not there
    k2, counts = _columns(data_dir, "utt2num_frames")
    nframes = _frame_counts(data_dir, k2, counts)
    k3, specs = _columns(data_dir, "feats.scp")
    if not (len(keys) == len(k2) == len(k3) and (keys == k2).all() and (keys == k3).all()):
        raise UserError(f"{data_dir}: utt2spk, utt2num_frames and feats.scp list different utterances; "
                        f"re-run stage 1 (steps/make_fbank.sh) for it")
    return utt2spk, UttTable(keys, nframes), _feats_table(keys, specs)


class ArkReader:
    """Random access to feats.scp matrices, reading only the rows asked for.

    Uncompressed float matrices (what stage 1 writes) are read by seeking to the wanted
    rows; anything else falls back to kaldiio. File handles are opened per process (at most
    MAX_OPEN_ARKS, the least recently used closed first), so a reader can be shared with
    DataLoader workers.
    """

    def __init__(self, scp):
        self.scp = scp              # utt -> "path:offset" (a FeatsTable, or any mapping)
        self._files = collections.OrderedDict()

    def _file(self, path):
        f = self._files.get(path)
        if f is not None:
            self._files.move_to_end(path)
            return f
        f = open(path, "rb")
        self._files[path] = f
        if len(self._files) > MAX_OPEN_ARKS:
            self._files.popitem(last=False)[1].close()
        return f

    def read(self, utt, start=0, count=None):
        """Rows start .. start+count-1 (to the end if count is None) of utt's matrix, as float32.

        Rows past the matrix's end are an error, not a short read: utt2num_frames says more
        frames than feats.scp holds, i.e. it is stale.
        """
        locate = getattr(self.scp, "locate", None)
        if locate is not None:
            path, offset = locate(utt)
            spec, offset = f"{path}:{offset}", str(offset)
        else:
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
        return {"scp": self.scp, "_files": collections.OrderedDict()}


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
        if isinstance(utt2spk, UttTable) and utt2spk.labels is not None:   # by speaker index, in id order
            utts = [k.decode() for k in utt2spk.keys_array]
            order = np.argsort(utt2spk.column, kind="stable")
            spk = utt2spk.column[order]
            cuts = np.flatnonzero(spk[1:] != spk[:-1]) + 1
            for part in np.split(order, cuts):
                spk2utts[utt2spk.labels[utt2spk.column[part[0]]]] = [utts[i] for i in part.tolist()]
        else:
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
        # The groups made here hold no reference cycles; with the collector on, its passes over a
        # VoxCeleb-sized heap, one per few hundred new lists, would double the time.
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._epoch(epoch)
        finally:
            if enabled:
                gc.enable()

    def _epoch(self, epoch):
        rng = np.random.default_rng([self.seed, epoch, 0])
        groups = []
        for k, spk in enumerate(self.speakers):
            utts = self.spk2utts[spk]
            shuffled = [utts[i] for i in rng.permutation(len(utts)).tolist()]
            for g in range(len(utts) // self.m):
                groups.append((k, shuffled[g * self.m:(g + 1) * self.m]))
        groups = [groups[i] for i in rng.permutation(len(groups)).tolist()]
        # Deferred groups are tried again, in order, only after a batch is closed: until then their
        # speakers stay in the open batch (a full batch is closed at once), so a new group alone is tried.
        batches, open_batch, held, deferred, retry = [], [], set(), [], False
        for group in groups:
            if retry:
                deferred.append(group)
                keep = []
                for g in deferred:
                    if g[0] in held or len(open_batch) == self.n:
                        keep.append(g)
                        continue
                    open_batch.append(g)
                    held.add(g[0])
                deferred, retry = keep, False
            elif group[0] in held:
                deferred.append(group)
            else:
                open_batch.append(group)
                held.add(group[0])
            if len(open_batch) == self.n:
                batches.append(open_batch)
                open_batch, held, retry = [], set(), bool(deferred)
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
