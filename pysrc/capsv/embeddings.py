"""Embeddings kept on disk: stage 3 runs the trunk once per utterance into Kaldi archives, then scores any
trial list from them (capsv.bin.extract, capsv.bin.score; steps/extract_embeddings.sh, steps/score.sh).

An archive directory (exp/<name>/embeddings/<set>/ in the recipe) holds

    embedding.scp             <utt> <ark>:<offset>, one line per utterance, sorted (LC_ALL=C)
    embedding.<J>.ark         job J's rows (steps: --nj N jobs, J = 1..N; one process alone: embedding.ark)
    embedding.<J>.scp, .json  job J's part and its record (a re-run keeps a part made from the same inputs)
    crop_embedding.scp (+ .<J>.ark, .<J>.scp)   TAP and SAP only
    embedding.json            what made them, written last: without it the directory is not an archive

Rows are float32, written with kaldiio. For K = eval.num_crops evenly spaced crops of eval.crop_frames frames
(capsv.scoring.crop_starts), T = the trunk's frames per crop (crop_frames / 4, rounded up), C = the trunk's
channels (128), D = CAP's projection width (model.cap_proj_dim) and E = model.embed_dim (512):

TAP, SAP
    embedding       a vector [E] per utterance: the mean over the K crops of the unit-length crop embeddings
                    (the x-vector convention of one vector per utterance). A trial's score is the dot product
                    of its two vectors, which equals the mean of the K x K crop-pair cosines (stage 3's score);
                    the vectors are not unit length (their cosine is another score).
    crop_embedding  a matrix [K, E] per utterance: each crop's embedding as the network gives it (the fc's
                    output, not normalised), in crop order.
CAP
    embedding       a matrix [K, F] per utterance, F = D*T + D + T*C + C; row k holds crop k's quantities that
                    do not depend on the trial partner (capsv.scoring.partner_independent), side by side:
                      st  D*T  Ŝᵀ: the unit projected frames, transposed (row-major [D, T])
                      m   D    their sum divided by T * tau (model.cap_tau)
                      u   T*C  the trunk frames times the head BatchNorm's scale, divided by T (row-major [T, C])
                      c   C    the BatchNorm-affine of the frame mean (scale * mean + shift)
                    With the fc's triangular factor R (SpeakerNet.head_factor) they give a trial's score without
                    the trunk: per crop pair, softmax(Ŝ_x Ŝ_yᵀ Ŝ_y m_x) over x's frames, c + wᵀU, ReLU, times R,
                    then the cosine with the other side's, averaged over the K x K pairs.

embedding.json records the checkpoint (path, epoch, SHA-256 of its bytes), the eval settings that shape the rows
(num_crops, crop_frames, precision) and the precision used, the features' signature (SHA-256 of the data dir's
feats.scp and utt2num_frames, or of a wav.scp, its files' sizes and mtimes, and the fbank options), the AS-norm
cohort it is (if one), the row layout, and `signature`: the SHA-256 of what the rows depend on. A re-run with the
same signature keeps the rows; scoring refuses rows of another checkpoint, and score files record the signature.
"""
import glob
import hashlib
import json
import math
import os
import re
import time

from capsv.utils import UserError, atomic_open, atomic_path

# numpy, torch and the modules that need them are imported where used: merging the parts of an extraction
# (steps/extract_embeddings.sh) then starts in a tenth of a second, not two.

FORMAT = 1
META = "embedding.json"
CAP_FIELDS = ("st", "m", "u", "c")
# What the rows depend on; a record's `signature` is the SHA-256 of these (the features by their SHA-256 alone,
# so a data dir read from another path with the same features keeps its rows).
SIGNED = ("format", "pooling", "checkpoint_sha256", "eval", "precision", "device_type", "features", "cohort")
JOB_KEYS = ("job", "njobs", "first", "count", "utts_sha256")


def job_slice(n, job, njobs):
    """The contiguous part of n items that job `job` (1-based) of `njobs` takes."""
    return (job - 1) * n // njobs, job * n // njobs


def log(msg):
    print(f"extract: {msg}", flush=True)


def _sha_of_lines(lines):
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode() + b"\n")
    return h.hexdigest()


def signature(meta):
    signed = {k: meta.get(k) for k in SIGNED}
    signed["features"] = (meta.get("features") or {}).get("sha256")
    return hashlib.sha256(json.dumps(signed, sort_keys=True).encode()).hexdigest()


def read_json(path):
    """A record, or None if there is none; a damaged one is None too (it is then remade)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def differences(old, new):
    """One phrase saying what differs between the records of two extractions (None if nothing that matters)."""
    if old.get("format") != new["format"] or old.get("pooling") != new["pooling"]:
        return f"made by another version or pooling ({old.get('pooling')}, format {old.get('format')})"
    if old.get("checkpoint_sha256") != new["checkpoint_sha256"]:
        return (f"made by {old.get('checkpoint')} (epoch {old.get('epoch')}, SHA-256 "
                f"{str(old.get('checkpoint_sha256'))[:12]}), now {new['checkpoint']} (epoch {new['epoch']}, "
                f"SHA-256 {new['checkpoint_sha256'][:12]})")
    if old.get("eval") != new["eval"]:
        said = lambda e: " ".join(f"eval.{k}={v}" for k, v in (e or {}).items())   # noqa: E731
        return f"made with {said(old.get('eval'))}, now {said(new['eval'])}"
    if (old.get("precision"), old.get("device_type")) != (new["precision"], new["device_type"]):
        return (f"made at {old.get('precision')} on {old.get('device_type')}, now {new['precision']} on "
                f"{new['device_type']}")
    if (old.get("features") or {}).get("sha256") != new["features"]["sha256"]:
        what = new["features"].get("data") or new["features"].get("wav_scp")
        return f"the features of {what} changed since they were made"
    if old.get("cohort") != new["cohort"]:
        return "made for another AS-norm cohort"
    if old.get("signature") != new["signature"]:
        return "made from other inputs"
    return None


class _Features:
    """Feature matrices held in memory, read as data.ArkReader reads an ark (what the crops read)."""

    def __init__(self, mats, source):
        self.mats, self.scp = mats, source

    def read(self, utt, start=0, count=None):
        m = self.mats[utt]
        return m[start:] if count is None else m[start:start + count]


class DataDirFeatures:
    """Stage 1's features of a data dir: all its utterances, or with `cohort_size` its AS-norm cohort (one
    utterance per speaker, capsv.asnorm.cohort_utterances)."""

    def __init__(self, data_dir, cohort_size=None):
        from capsv.asnorm import cohort_utterances
        from capsv.data import read_data_dir

        utt2spk, self.nframes, self.scp = read_data_dir(data_dir)
        h = hashlib.sha256()
        for name in ("feats.scp", "utt2num_frames"):
            with open(os.path.join(data_dir, name), "rb") as f:
                h.update(f.read() + b"\0")
        self.features = {"data": data_dir, "sha256": h.hexdigest()}
        if cohort_size is None:
            self.utts, self.cohort = sorted(utt2spk), None
        else:
            self.utts, self.cohort = cohort_utterances(data_dir, utt2spk, cohort_size)
            self.cohort["utts_sha256"] = _sha_of_lines(self.utts)

    def parts(self, utts):
        """(utts, reader, nframes) to run through the trunk: here all at once, read from the arks."""
        from capsv.data import ArkReader

        yield utts, ArkReader({u: self.scp[u] for u in utts}), self.nframes

    def report(self):
        pass


class AudioFeatures:
    """A wav.scp read and featurised as stage 1 does (capsv.features with the options of `fbank_config`), a few
    utterances at a time: nothing is written but the archives."""

    def __init__(self, wav_scp, fbank_config, per_part=64):
        from capsv.trials import read_wav_scp
        from capsv.features import read_fbank_conf, target_rate

        entries = read_wav_scp(wav_scp)
        if not entries:
            raise UserError(f"{wav_scp} lists no recordings; give `<utt> <path-or-command |>` lines")
        self.spec = dict(entries)
        if len(self.spec) != len(entries):
            dup = next(u for u in self.spec if sum(1 for v, _ in entries if v == u) > 1)
            raise UserError(f"{wav_scp} lists {dup} more than once; keep each utterance id once")
        for utt, spec in entries:          # a missing file is found now, not after the others are embedded
            if not spec.rstrip().endswith("|") and not os.path.isfile(spec):
                raise UserError(f"utterance {utt}: audio file {spec} not found; fix {wav_scp} or restore the file")
        self.opts = read_fbank_conf(fbank_config)
        self.target = target_rate(self.opts)
        self.utts, self.cohort, self.per_part = sorted(self.spec), None, per_part
        h = hashlib.sha256()
        with open(fbank_config, "rb") as f:
            h.update(f.read() + b"\0")
        for utt in self.utts:
            spec = self.spec[utt]
            h.update(f"{utt} {spec}\n".encode())
            if not spec.rstrip().endswith("|"):
                st = os.stat(spec)
                h.update(f"{st.st_size} {st.st_mtime_ns}\n".encode())
        self.features = {"wav_scp": wav_scp, "fbank_config": fbank_config, "sha256": h.hexdigest()}
        self.resampled = {}

    def parts(self, utts):
        from capsv.features import compute_fbank, load_audio

        for i in range(0, len(utts), self.per_part):
            chunk = utts[i:i + self.per_part]
            mats = {}
            for utt in chunk:
                wave, sr = load_audio(self.spec[utt], utt)
                if sr != self.target:
                    self.resampled[sr] = self.resampled.get(sr, 0) + 1
                mats[utt] = compute_fbank(wave, sr, self.opts, utt)
            yield chunk, _Features(mats, self.spec), {u: len(m) for u, m in mats.items()}

    def report(self):
        for sr, n in sorted(self.resampled.items()):
            log(f"resampled {n} utterances from {sr} Hz to {self.target} Hz")


def describe(state, ecfg, device, source):
    """The record of rows made by checkpoint `state` with eval settings `ecfg` on `device` from `source`."""
    from capsv.scoring import scoring_precision

    meta = {"format": FORMAT, "pooling": state["config"]["model"]["pooling"], "checkpoint": state["file"],
            "checkpoint_sha256": state["sha256"], "epoch": state["epoch"],
            "eval": {"num_crops": ecfg["num_crops"], "crop_frames": ecfg["crop_frames"],
                     "precision": ecfg.get("precision", "auto")},
            **scoring_precision(ecfg, device).record(), "features": source.features, "cohort": source.cohort}
    meta["signature"] = signature(meta)
    return meta


def archive_rows(net, frames):
    """{archive: rows [n, ...] float32} of utterances with trunk outputs frames [n, K, T, C] (see the module
    docstring), and the layout of one utterance's cache row fields {field: shape}."""
    import torch

    from capsv.scoring import crop_embeddings, mean_unit_embedding, partner_independent

    n, k = frames.shape[:2]
    with torch.no_grad():
        if not net.pair_dependent:
            crops = crop_embeddings(net, frames)
            return {"embedding": mean_unit_embedding(crops), "crop_embedding": crops}, {"e": [crops.shape[-1]]}
        f = partner_independent(net, frames)
        rows = torch.cat([f[name].reshape(n, k, -1) for name in CAP_FIELDS], dim=-1)
    return {"embedding": rows}, {name: list(f[name].shape[2:]) for name in CAP_FIELDS}


def archive_names(pooling):
    return ["embedding"] if pooling == "cap" else ["embedding", "crop_embedding"]


def _part_name(name, job, ext):
    return f"{name}.{ext}" if job is None else f"{name}.{job}.{ext}"


def _remove(paths):
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def _other_layout_files(out_dir, njobs):
    """Rows of another split (job files with an index above `njobs`, or of one process when split; with
    njobs None, every job file): no scp will name them again."""
    out = []
    for path in glob.glob(os.path.join(out_dir, "*embedding.*")):
        m = re.fullmatch(r"(crop_)?embedding\.(?:(\d+)\.)?(ark|scp|json)", os.path.basename(path))
        if not m:
            continue
        job = m.group(2)
        if njobs is None and job is not None:
            out.append(path)
        elif njobs is not None and (job is None and m.group(3) == "ark" or job is not None and int(job) > njobs):
            out.append(path)
    return sorted(out)


def _write_rows(out_dir, job, names, batches):
    """Write each archive's ark and scp (temporary names, arks renamed first, scps last); returns the layout."""
    import contextlib

    import kaldiio

    layout = None
    with contextlib.ExitStack() as stack:
        scps = {n: stack.enter_context(atomic_path(os.path.join(out_dir, _part_name(n, job, "scp")))) for n in names}
        arks = {n: os.path.abspath(os.path.join(out_dir, _part_name(n, job, "ark"))) for n in names}
        tmp_arks = {n: os.path.abspath(stack.enter_context(atomic_path(arks[n]))) for n in names}
        writers = {n: stack.enter_context(kaldiio.WriteHelper(f"ark,scp:{tmp_arks[n]},{scps[n]}")) for n in names}
        for chunk, rows, fields in batches:
            layout = layout or fields
            arrays = {n: rows[n].float().cpu().numpy() for n in names}
            for i, utt in enumerate(chunk):
                for n in names:
                    writers[n](utt, arrays[n][i])
        for w in writers.values():
            w.close()
        for n in names:        # kaldiio wrote the temporary ark's name into the scp: name the final one
            with open(scps[n]) as f:
                lines = f.read().splitlines()
            prefix = tmp_arks[n] + ":"
            with open(scps[n], "w") as f:
                for line in lines:
                    utt, loc = line.split(" ", 1)
                    if not loc.startswith(prefix):
                        raise RuntimeError(f"unexpected scp line from kaldiio: {line}")
                    f.write(f"{utt} {arks[n]}:{loc[len(prefix):]}\n")
    return layout


def extract(out_dir, net, state, source, ecfg, device, job=None, njobs=1):
    """Rows of `source`'s utterances (job `job` of `njobs`'s contiguous part, or all) into `out_dir`.

    Kept as they are when the record beside them says they were made from the same inputs; otherwise remade,
    said in one line. The trunk runs once per utterance of the part; the count is logged (`trunk ran on`).
    Returns the record written (or kept).
    """
    from capsv.scoring import trunk_batches

    os.makedirs(out_dir, exist_ok=True)
    meta = describe(state, ecfg, device, source)
    first, end = job_slice(len(source.utts), job, njobs) if job is not None else (0, len(source.utts))
    part = source.utts[first:end]
    if job is not None:
        meta.update(job=job, njobs=njobs, first=first, count=len(part), utts_sha256=_sha_of_lines(part),
                    n_utts=len(source.utts))
    names = archive_names(meta["pooling"])
    record = os.path.join(out_dir, META if job is None else f"embedding.{job}.json")
    # one process alone keeps rows merged from jobs as well: its record and scps are theirs
    files = [os.path.join(out_dir, _part_name(n, job, e)) for n in names for e in (("ark", "scp") if job else ("scp",))]
    old = read_json(record)
    what = f"{out_dir}" if job is None else f"{out_dir} (job {job} of {njobs})"
    if old is not None and all(os.path.exists(f) for f in files):
        reason = differences(old, meta)
        if reason is None and all(old.get(k) == meta.get(k) for k in JOB_KEYS):
            log(f"{what}: rows of {len(part)} utterances are up to date (same checkpoint, eval settings, precision "
                f"and features); kept")
            log("trunk ran on 0 crops of 0 utterances")
            return old
        log(f"re-extracting {what}: {reason or 'made for another split of the utterances'}")
    # Nothing may trust the rows while they change: the directory's record goes first, this part's with it.
    _remove([os.path.join(out_dir, META)] + [os.path.join(out_dir, f"{n}.scp") for n in names] + [record])
    counted = [0]
    hook = net.trunk.register_forward_hook(lambda m, args, out: counted.__setitem__(0, counted[0] + len(args[0])))
    t0, c0 = time.time(), time.process_time()
    try:
        def batches():
            for utts, reader, nframes in source.parts(part):
                for chunk, frames in trunk_batches(net, reader, nframes, utts, ecfg, device):
                    rows, fields = archive_rows(net, frames)
                    yield chunk, rows, fields
        layout = _write_rows(out_dir, job, names, batches())
    finally:
        hook.remove()
    seconds, cpu = time.time() - t0, time.process_time() - c0
    source.report()
    meta["layout"] = {"crops": ecfg["num_crops"], "fields": layout}
    meta["n_utts"] = meta.get("n_utts", len(part))
    with atomic_open(record) as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    if job is None:
        _remove(_other_layout_files(out_dir, None))
    per = (f"{seconds / len(part) * 1e3:.0f} ms per utterance (CPU time {cpu / len(part) * 1e3:.0f} ms)"
           if part else "nothing to do")
    log(f"trunk ran on {counted[0]} crops of {len(part)} utterances ({ecfg['num_crops']} per utterance) in "
        f"{seconds:.1f} s: {per}")
    return meta


def merge(out_dir, njobs):
    """Join the parts embedding.1..N into embedding.scp (crop_embedding.scp) and write embedding.json last,
    after checking that the parts are of one extraction and cover its utterances once, in order. Files of
    another split are removed. Returns the record."""
    parts = []
    for j in range(1, njobs + 1):
        info = read_json(os.path.join(out_dir, f"embedding.{j}.json"))
        if info is None:
            raise UserError(f"{out_dir}/embedding.{j}.json is missing (an extraction job did not finish?); re-run "
                            f"steps/extract_embeddings.sh")
        parts.append(info)
    expect = 0
    for j, info in enumerate(parts, 1):
        if info["signature"] != parts[0]["signature"] or info["njobs"] != njobs or info["first"] != expect:
            raise UserError(f"{out_dir}/embedding.{j}.json: this part does not belong with part 1 (another "
                            f"checkpoint, eval settings, features or split); re-run steps/extract_embeddings.sh")
        expect += info["count"]
    n = parts[0]["n_utts"]
    if expect != n:
        raise UserError(f"{out_dir}: the parts cover {expect} of {n} utterances; re-run steps/extract_embeddings.sh")
    names = archive_names(parts[0]["pooling"])
    for name in names:
        with atomic_open(os.path.join(out_dir, f"{name}.scp")) as out:
            lines = 0
            for j in range(1, njobs + 1):
                with open(os.path.join(out_dir, f"{name}.{j}.scp")) as f:
                    text = f.read()
                lines += text.count("\n")
                out.write(text)
        if lines != n:
            raise UserError(f"{out_dir}/{name}.*.scp: {lines} rows for {n} utterances; re-run "
                            f"steps/extract_embeddings.sh")
    meta = {k: v for k, v in parts[0].items() if k not in JOB_KEYS}
    meta["layout"] = next((p["layout"] for p in parts if p["count"]), parts[0]["layout"])
    with atomic_open(os.path.join(out_dir, META)) as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    _remove(_other_layout_files(out_dir, njobs))
    return meta


class EmbeddingArchive:
    """The rows of an archive directory, read by utterance (for scoring: `cache`)."""

    def __init__(self, out_dir, fix=None):
        self.dir = out_dir
        self.fix = fix or "run steps/extract_embeddings.sh for it"
        meta = read_json(os.path.join(out_dir, META))
        if meta is None:
            raise UserError(f"{out_dir}: no embeddings there ({META} is missing or unreadable); {self.fix}")
        if meta.get("format") != FORMAT or meta.get("signature") != signature(meta):
            raise UserError(f"{out_dir}/{META}: made by another version of the recipe or edited; {self.fix}")
        self.meta = meta
        self.signature = meta["signature"]
        self.pair_dependent = meta["pooling"] == "cap"
        path = os.path.join(out_dir, "embedding.scp")
        try:
            with open(path) as f:
                self.scp = dict(line.split(" ", 1) for line in f.read().splitlines() if line)
        except FileNotFoundError:
            raise UserError(f"{path} is missing; {self.fix}") from None
        self.scp = {u: loc.strip() for u, loc in self.scp.items()}
        if len(self.scp) != meta["n_utts"]:
            raise UserError(f"{path} has {len(self.scp)} rows, {META} says {meta['n_utts']}; {self.fix}")
        self.utts = sorted(self.scp)
        fields = (meta.get("layout") or {}).get("fields") or {}
        k = meta["layout"]["crops"] if meta.get("layout") else meta["eval"]["num_crops"]
        if self.pair_dependent:
            self.shapes = {n: (k, *fields.get(n, ())) for n in CAP_FIELDS}
            self.sizes = [math.prod(fields.get(n, [0])) for n in CAP_FIELDS]
        else:
            self.shapes = {"e": tuple(fields.get("e", ()))}

    def check_checkpoint(self, state, exp):
        """One line unless the rows were made by checkpoint `state` (the experiment's newest)."""
        if state["sha256"] != self.meta["checkpoint_sha256"]:
            raise UserError(f"{self.dir}: made by checkpoint {self.meta['checkpoint']} (epoch {self.meta['epoch']}, "
                            f"SHA-256 {self.meta['checkpoint_sha256'][:12]}), but the newest of {exp} is "
                            f"{state['file']} (epoch {state['epoch']}, SHA-256 {state['sha256'][:12]}); re-run "
                            f"extraction ({self.command(exp)})")

    def command(self, exp):
        """The command that remakes these rows."""
        features = self.meta.get("features") or {}
        if "data" not in features:
            return f"python -m capsv.bin.extract --exp {exp} --wav-scp {features.get('wav_scp')} --out {self.dir}"
        cohort = "--cohort true " if self.meta.get("cohort") else ""
        return f"steps/extract_embeddings.sh {cohort}{exp} {features['data']}"

    def check_eval(self, ecfg):
        """One line unless the rows are of the crops `ecfg` asks for."""
        want = {k: ecfg[k] for k in ("num_crops", "crop_frames")}
        have = {k: self.meta["eval"][k] for k in want}
        if want != have:
            raise UserError(f"{self.dir}: made with eval.num_crops={have['num_crops']} eval.crop_frames="
                            f"{have['crop_frames']}, but the config asks eval.num_crops={want['num_crops']} "
                            f"eval.crop_frames={want['crop_frames']}; re-run extraction with the settings you want "
                            f"(steps/extract_embeddings.sh ... eval.key=value)")

    def check_utterances(self, trials, trials_path):
        """One line naming the first utterance of `trials` that has no row here."""
        missing = sorted({u for e, t, *_ in trials for u in (e, t) if u not in self.scp})
        if missing:
            first = next(u for e, t, *_ in trials for u in (e, t) if u not in self.scp)
            raise UserError(f"{trials_path}: trials name utterance {first!r} that has no embedding in {self.dir} "
                            f"({len(missing)} such utterance(s) in all); extract the data dir that holds them "
                            f"(steps/extract_embeddings.sh) or fix the trials")

    def _load(self, utt):
        import kaldiio
        import numpy as np

        spec = self.scp[utt]
        try:
            return np.array(kaldiio.load_mat(spec), dtype=np.float32)   # writable: torch shares it
        except FileNotFoundError:
            raise UserError(f"{spec.rpartition(':')[0]} (the rows of {utt}) is missing; {self.fix}") from None
        except Exception as e:       # a truncated or overwritten ark: kaldiio raises several kinds
            raise UserError(f"cannot read the rows of {utt} from {spec} ({e}); {self.fix}") from None

    def read_rows(self, utts):
        """{cache field: CPU tensor [n, *shape]} of `utts`, in that order (capsv.scoring's cache layout). Each
        utterance's rows go straight into place: a block costs its own size and one utterance more."""
        import torch

        out = {n: torch.empty(len(utts), *s) for n, s in self.shapes.items()}
        want = (self.shapes["st"][0], sum(self.sizes)) if self.pair_dependent else self.shapes["e"]
        for i, u in enumerate(utts):
            m = torch.from_numpy(self._load(u))
            if tuple(m.shape) != tuple(want):
                raise UserError(f"{self.scp[u]}: the rows of {u} are {tuple(m.shape)}, {META} says {tuple(want)}; "
                                f"{self.fix}")
            if not self.pair_dependent:
                out["e"][i] = m
                continue
            at = 0
            for name, size in zip(CAP_FIELDS, self.sizes):
                out[name][i] = m[:, at:at + size].reshape(self.shapes[name])
                at += size
        return out

    def cache(self, utts, device, mem_bytes=None):
        """A ScoringCache of `utts` (sorted): in memory when it fits the budget, else read block by block from
        the archive (no scratch file)."""
        from capsv.scoring import ScoringCache

        return ScoringCache.from_rows(sorted(utts), self.shapes, device, self.read_rows, mem_bytes)
