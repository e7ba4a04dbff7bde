"""Evaluation protocol (doc/design.md): 10 evenly spaced crops of 350 frames per utterance,
score = mean cosine over the 10 x 10 crop pairs of a trial.

Three steps, each done once for what it depends on:

1. the trunk runs once per utterance, all its crops in one batch (bf16 autocast on a GPU);
2. per utterance, what does not depend on the trial partner goes into a `ScoringCache` row.
   TAP/SAP: the mean of the unit-length crop embeddings (the 100 cosines average to one dot
   product). CAP, per crop (doc/design.md, doc/performance.md): the unit projected frames Ŝ, their sum m (divided
   by T·τ), the frames times the head's BatchNorm scale / T (U) and the BN-affine of the frame
   mean (c). The head is BN (eval: affine) -> ReLU -> fc, and the pooled vector is
   x̄ + (1/T) Σ_t w_t x_t, so the pre-ReLU vector of a crop pair is c + wᵀU; the fc is replaced
   by its C x C triangular factor R (RᵀR = WᵀW keeps every cosine);
3. trials are scored in batches from the cache: per crop pair and side, the attention logits
   (Ŝ_x G_y m_x with G_y m_x = Ŝ_yᵀ(Ŝ_y m_x), no Gram matrix held), a softmax over 88 frames,
   one weighted sum, a ReLU and a 128 x 128 product.

Stage 3 runs steps 1-2 once per utterance into Kaldi archives (capsv.embeddings) and scores every list
from them (`ScoringCache.from_rows`); in-process callers (verify, validation, the pictures, the bench) run
all three here (`utterance_cache`).

Memory is bounded by a budget, not by the number of utterances: a cache that does not fit is read back
from where its rows are kept (the archives, or a scratch file written here), and the trials are then scored
block by block (`_blocks`).
"""
import os
import tempfile
import weakref
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from capsv.data import crop
from capsv.device import resolve_precision
from capsv.models.pooling import cap_cross_logits, cap_unit_frames
from capsv.utils import progress

_EPS = 1e-12   # F.normalize's floor on a norm, kept so a zero embedding scores 0 as before
# A CAP trial gathers ~1.8 MB of cache rows; with 8 trials a batch, the batches of two workers stay in this
# CPU's 32 MB L3 (batches of 128 measured 1.4x slower per trial).
CPU_TRIAL_BATCH = 8


def crop_starts(num_frames, length, num_crops):
    """Evenly spaced crop offsets; a short utterance gives offsets 0 (it is repeated to fill)."""
    return np.linspace(0, max(num_frames - length, 0), num_crops).round().astype(int)


def utterance_crops(reader, utt, num_frames, length, num_crops):
    return np.stack([crop(reader, utt, num_frames, length, s) for s in crop_starts(num_frames, length, num_crops)])


@torch.no_grad()
def trunk_batches(net, reader, nframes, utts, ecfg, device, utts_per_batch=None):
    """Yield (utts, trunk outputs [n, num_crops, T', C] float32 on `device`), each utterance once.

    The trunk runs at the precision of eval.precision on `device` (capsv.device: by default bf16 or fp16
    autocast on a GPU, fp32 on the CPU), 64 utterances (640 crops) a batch on a GPU, 8 on a CPU. What
    follows is float32.
    """
    utts_per_batch = utts_per_batch or (64 if device.type == "cuda" else 8)
    precision = scoring_precision(ecfg, device)
    for i in progress(range(0, len(utts), utts_per_batch), desc="trunk", leave=False):
        chunk = utts[i:i + utts_per_batch]
        feats = np.concatenate([utterance_crops(reader, u, nframes[u], ecfg["crop_frames"], ecfg["num_crops"])
                                for u in chunk])
        with precision.autocast():
            frames = net.frames(torch.from_numpy(feats).to(device))
        yield chunk, frames.float().view(len(chunk), ecfg["num_crops"], *frames.shape[1:])


def scoring_precision(ecfg, device):
    """The capsv.device.Precision of the trunk when scoring with eval settings `ecfg` on `device` (settings
    recorded before eval.precision existed mean auto)."""
    return resolve_precision(ecfg.get("precision", "auto"), device)


def utterance_cache(net, reader, nframes, utts, ecfg, device, utts_per_batch=None, mem_bytes=None, spill_dir=None):
    """The `ScoringCache` of `utts`: trunk once per utterance, then its partner-independent rows."""
    return build_cache(net, utts, trunk_batches(net, reader, nframes, utts, ecfg, device, utts_per_batch), device,
                       mem_bytes, spill_dir)


@torch.no_grad()
def partner_independent(net, frames):
    """The cache fields of utterances with trunk outputs frames [n, K, T, C], in their dtype (float32 from the trunk).

    CAP: st [n,K,D,T] unit projected frames (transposed), m [n,K,D] their sum / (T tau), u [n,K,T,C] frames *
    BN scale / T, c [n,K,C] BN scale * frame mean + BN shift. TAP/SAP: e [n,E] mean unit crop embedding.
    """
    if not net.pair_dependent:
        return {"e": mean_unit_embedding(crop_embeddings(net, frames))}
    t = frames.shape[-2]
    scale, shift = net.head_affine()
    s = cap_unit_frames(net.pool, frames)
    return {"st": s.transpose(-1, -2), "m": s.sum(-2) / (t * net.pool.tau), "u": frames * (scale / t),
            "c": frames.mean(-2) * scale + shift}


@torch.no_grad()
def crop_embeddings(net, frames):
    """TAP/SAP: the network's embedding of each crop, [n, K, E] from trunk outputs frames [n, K, T, C]."""
    return net.embed(net.pool.single(frames))


def mean_unit_embedding(emb):
    """The mean over crops of the unit-length crop embeddings [n, K, E] -> [n, E]: the dot product of two is
    the mean of their K x K crop-pair cosines (what a TAP/SAP trial scores)."""
    return (emb / emb.norm(dim=-1, keepdim=True).clamp_min(_EPS)).mean(1)


def build_cache(net, utts, batches, device, mem_bytes=None, spill_dir=None):
    """Fill a ScoringCache for `utts` from (chunk_utts, frames) batches given in `utts` order."""
    cache = None
    for chunk, frames in batches:
        fields = partner_independent(net, frames)
        if cache is None:
            cache = ScoringCache(utts, {k: v.shape[1:] for k, v in fields.items()}, device, mem_bytes, spill_dir,
                                 frames.dtype)
        cache.put(chunk, fields)
    if cache is None:      # no utterances (a scoring job with no trials): an empty cache
        cache = ScoringCache([], {}, device, mem_bytes, spill_dir)
    return cache


def default_budget(device):
    """Bytes a cache may hold: half of this job's share of the GPU's or the host's memory, the job's own
    limit (cgroup, Slurm) counting before the host's (capsv.resources.scoring_budget)."""
    from capsv import resources
    return resources.scoring_budget(device)


class ScoringCache:
    """One row per utterance (float32 from the trunk) of each named field.

    Held in memory on `device` (one contiguous tensor per field: gathers from strided views measured
    several times slower) when N rows fit in `mem_bytes`; otherwise read back block by block when trials
    are scored: from `read_rows` (rows kept elsewhere, e.g. stage 3's archives: `from_rows`), or else from a
    scratch file written in `spill_dir` (rows of the fields side by side; removed with the cache).
    """

    def __init__(self, utts, shapes, device, mem_bytes=None, spill_dir=None, dtype=torch.float32, read_rows=None):
        self.utts = list(utts)
        self.row = {u: i for i, u in enumerate(self.utts)}
        self.shapes = {k: tuple(s) for k, s in shapes.items()}
        self.sizes = {k: int(np.prod(s)) for k, s in self.shapes.items()}
        self.row_floats = sum(self.sizes.values())
        self.device, self.dtype = device, dtype
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        self.mem_bytes = default_budget(device) if mem_bytes is None else mem_bytes
        self.nbytes = len(self.utts) * self.row_floats * self.itemsize
        self.in_memory = self.nbytes <= self.mem_bytes
        self.read_rows = None if self.in_memory else read_rows
        self.path = None
        if self.in_memory:
            self.data = {k: torch.empty(len(self.utts), *s, device=device, dtype=dtype) for k, s in self.shapes.items()}
        elif self.read_rows is None:
            fd, self.path = tempfile.mkstemp(prefix="capsv-cache.", suffix=".bin", dir=spill_dir)
            self._file = os.fdopen(fd, "w+b")
            self._cleanup = weakref.finalize(self, _remove, self._file, self.path)   # also at exit
        self.peak_bytes = self.nbytes if self.in_memory else 0   # most row bytes held at once (read by tests)

    @classmethod
    def from_rows(cls, utts, shapes, device, read_rows, mem_bytes=None, dtype=torch.float32, rows_per_read=64):
        """A cache of `utts` whose rows `read_rows(utts)` gives ({field: [n, *shape] CPU tensor}, in the order
        asked): read into memory when they fit in `mem_bytes`, else left where they are and read block by block
        (no scratch file)."""
        cache = cls(utts, shapes, device, mem_bytes, dtype=dtype, read_rows=read_rows)
        if cache.in_memory:
            for i in range(0, len(cache.utts), rows_per_read):
                chunk = cache.utts[i:i + rows_per_read]
                cache.put(chunk, read_rows(chunk))
        return cache

    @property
    def rows_per_block(self):
        """Rows in one block when spilled: scoring holds two blocks at a time."""
        return max(1, int(self.mem_bytes // (2 * self.row_floats * self.itemsize)))

    def put(self, utts, fields):
        if self.read_rows is not None:
            raise ValueError("ScoringCache.put: the rows of this cache are read from where they are kept")
        rows = [self.row[u] for u in utts]
        first = rows[0]
        if rows != list(range(first, first + len(rows))):
            raise ValueError("ScoringCache.put: utterances must come in cache order")
        if self.in_memory:
            for k, v in self.data.items():
                v[first:first + len(rows)] = fields[k]
        else:
            flat = torch.cat([fields[k].reshape(len(utts), -1).to(self.dtype) for k in self.shapes], dim=1)
            self._file.seek(first * self.row_floats * self.itemsize)
            self._file.write(flat.cpu().numpy().tobytes())

    def load(self, rows):
        """Rows (ascending row numbers) read back from where they are kept: {field: [n, *shape] on the device}."""
        if self.read_rows is not None:
            got = self.read_rows([self.utts[int(r)] for r in rows])
            return {k: got[k].to(device=self.device, dtype=self.dtype) for k in self.shapes}
        self._file.flush()
        out = {k: torch.empty(len(rows), *shape, dtype=self.dtype) for k, shape in self.shapes.items()}
        arrays = [out[k].numpy().reshape(len(rows), -1) for k in self.shapes]
        row_bytes = self.row_floats * self.itemsize
        for n, r in enumerate(rows):
            self._file.seek(int(r) * row_bytes)
            for a in arrays:      # straight into each field's row: no second copy of the block
                if self._file.readinto(memoryview(a[n]).cast("B")) != a[n].nbytes:
                    raise OSError(f"{self.path}: short read (scratch file changed or disk full?)")
        return {k: v.to(self.device) for k, v in out.items()}

    def close(self):
        """Remove the scratch file now (it goes anyway when the cache is garbage or the process exits)."""
        if self.path is not None:
            self._cleanup()


def _remove(f, path):
    f.close()
    if os.path.exists(path):
        os.remove(path)


def cache_from_frames(net, frames, utts_per_batch=64):
    """An in-memory ScoringCache from a {utt: trunk outputs [K, T', C]} dict (tests and benchmarks)."""
    utts = sorted(frames)
    device = next(iter(frames.values())).device
    batches = ((utts[i:i + utts_per_batch], torch.stack([frames[u] for u in utts[i:i + utts_per_batch]]))
               for i in range(0, len(utts), utts_per_batch))
    return build_cache(net, utts, batches, device, mem_bytes=float("inf"))


@torch.no_grad()
def score_trials(net, cache, trials, trial_batch, test_cache=None):
    """Mean cosine over all crop pairs, for each (enroll, test, ...) trial, in trial order (float64).

    `cache` is a ScoringCache (or a {utt: trunk outputs} dict, cached here in memory); with `test_cache` (a
    second one, e.g. AS-norm's cohort, both in memory) the test side's rows come from it. Trials are scored
    `trial_batch` at a time (at most CPU_TRIAL_BATCH on a CPU); memory beyond the cache is a few batch-sized
    tensors per worker.

    On a CPU the batches are spread over torch.get_num_threads() threads, each running its batches
    single-threaded: a CAP batch is ~20 small products, and splitting each of those over the cores
    made them wait on each other (measured 10x slower than one thread when the machine was busy).
    """
    if isinstance(cache, Mapping):
        cache = cache_from_frames(net, cache)
    scores = np.zeros(len(trials))
    if not trials:
        return scores
    ia = np.array([cache.row[e] for e, *_ in trials])
    tcache = cache if test_cache is None else test_cache
    ib = np.array([tcache.row[t] for _, t, *_ in trials])
    on_cpu = cache.device.type == "cpu"
    workers = torch.get_num_threads() if on_cpu else 1
    if on_cpu:
        trial_batch = min(trial_batch, CPU_TRIAL_BATCH)
    pairs = [_CapPairs(net) if net.pair_dependent else _dot for _ in range(workers)]
    bar = progress(None, total=len(trials), desc="trials", leave=False)

    @torch.no_grad()                     # grad mode is per thread: the caller's does not reach the workers
    def run(w, sel, fa, la, fb, lb):
        for i in range(w * trial_batch, len(sel), workers * trial_batch):
            j = slice(i, i + trial_batch)
            got = pairs[w](fa, torch.as_tensor(la[j], device=cache.device),
                           fb, torch.as_tensor(lb[j], device=cache.device))
            scores[sel[j]] = got.double().cpu().numpy()
            bar.update(len(got))

    threads = torch.get_num_threads()
    try:
        if workers > 1:
            torch.set_num_threads(1)
        with ThreadPoolExecutor(workers) as pool:
            for sel, fa, la, fb, lb in _blocks(cache, ia, ib, tcache):
                # in enrollment order, so consecutive batches find an enrollment's rows still in cache
                order = np.lexsort((lb, la))
                group = sel[order], fa, la[order], fb, lb[order]
                for done in [pool.submit(run, w, *group) for w in range(workers)]:
                    done.result()
    finally:
        torch.set_num_threads(threads)
        bar.close()
    return scores


def _blocks(cache, ia, ib, tcache=None):
    """Yield (trial numbers, enroll fields, their local rows, test fields, their local rows).

    In memory: one group, everything. Spilled: the rows are cut into blocks of `rows_per_block`; each trial
    goes to the lower block of its two utterances. For each such block p, p's rows are loaded once, and the
    rows its trials need from other blocks are streamed in chunks of at most `rows_per_block`: two blocks'
    worth of rows in memory at any time, whatever the number of utterances or trials.
    Test rows from another cache `tcache` (both in memory): one group.
    """
    if tcache is not None and tcache is not cache:
        if not (cache.in_memory and tcache.in_memory):
            raise ValueError("score_trials: rows from two caches need both in memory")
        yield np.arange(len(ia)), cache.data, ia, tcache.data, ib
        return
    if cache.in_memory:
        f = cache.data
        yield np.arange(len(ia)), f, ia, f, ib
        return
    per = cache.rows_per_block
    low = np.minimum(ia, ib) // per
    order = np.argsort(low, kind="stable")
    for p, sel in zip(*_groups(low[order], order)):
        start, end = p * per, min((p + 1) * per, len(cache.utts))
        home = cache.load(np.arange(start, end))
        a, b = ia[sel], ib[sel]
        a_home, b_home = (a >= start) & (a < end), (b >= start) & (b < end)
        both = a_home & b_home
        if both.any():
            yield sel[both], home, a[both] - start, home, b[both] - start
        row_bytes = cache.row_floats * cache.itemsize
        cache.peak_bytes = max(cache.peak_bytes, (end - start) * row_bytes)
        away = np.unique(np.concatenate([a[~a_home], b[~b_home]]))
        for k in range(0, len(away), per):
            rows = away[k:k + per]
            chunk = cache.load(rows)
            cache.peak_bytes = max(cache.peak_bytes, (end - start + len(rows)) * row_bytes)
            a_in, b_in = np.isin(a, rows), np.isin(b, rows)
            m = b_home & a_in                   # enrollment streamed, test at home
            if m.any():
                yield sel[m], chunk, np.searchsorted(rows, a[m]), home, b[m] - start
            m = a_home & b_in
            if m.any():
                yield sel[m], home, a[m] - start, chunk, np.searchsorted(rows, b[m])
            del chunk


def _groups(keys, order):
    """(distinct keys, the members of each) of sorted `keys`, members taken from `order`."""
    cuts = np.flatnonzero(np.diff(keys)) + 1
    return keys[np.concatenate(([0], cuts))], np.split(order, cuts)


def _dot(fa, ia, fb, ib):
    """TAP/SAP: the mean of the crop-pair cosines is the dot product of the mean unit crop embeddings."""
    return (fa["e"][ia] * fb["e"][ib]).sum(-1)


class _CapPairs:
    """CAP scores of a batch of trials from cached rows (see the module docstring)."""

    def __init__(self, net):
        self.r = net.head_factor()                  # [E', C], E' = min(E, C)
        self.buffers = {}

    def gather(self, name, src, idx):
        """src[idx] into a buffer kept across batches: fresh 10-100 MB tensors each batch cost page faults."""
        buf = self.buffers.get(name)
        if buf is None or buf.shape[1:] != src.shape[1:] or len(buf) < len(idx):
            buf = self.buffers[name] = torch.empty(len(idx), *src.shape[1:], dtype=src.dtype, device=src.device)
        return torch.index_select(src, 0, idx, out=buf[:len(idx)])

    def __call__(self, fa, ia, fb, ib):
        a = {k: self.gather("a" + k, v, ia) for k, v in fa.items()}
        b = {k: self.gather("b" + k, v, ib) for k, v in fb.items()}
        za = self.side(a["st"], a["m"], a["u"], a["c"], b["st"])      # [B, Ka, Kb, E']
        zb = self.side(b["st"], b["m"], b["u"], b["c"], a["st"])      # [B, Kb, Ka, E']
        zb = zb.transpose(1, 2)
        num = (za * zb).sum(-1)
        den = za.norm(dim=-1).clamp_min(_EPS) * zb.norm(dim=-1).clamp_min(_EPS)
        return (num / den).mean(dim=(1, 2))

    def side(self, sxt, mx, ux, cx, syt):
        """Head outputs (times R) of x's crops pooled against each of y's crops: [B, Kx, Ky, E']."""
        b, kx, _, tx = sxt.shape
        w = torch.softmax(cap_cross_logits(sxt, mx, syt), dim=-1)                  # [(B, i), j, t]
        h = torch.baddbmm(cx.reshape(b * kx, 1, -1), w, ux.reshape(b * kx, tx, -1))  # c + w^T U: BN(pooled)
        return (torch.relu_(h) @ self.r.T).view(b, kx, syt.shape[1], -1)
