"""Stage 1 job: fbank features for the utterances of one wav.scp (one part of a split).

    python -m capsv.bin.compute_fbank --fbank-config conf/fbank.conf \\
        <wav.scp> <out-ark> <out-scp> <out-utt2num_frames>

Writes float32 matrices with kaldiio. The ark, scp and utt2num_frames are written under
temporary names and renamed only when every utterance is done, so an interrupted job never
leaves an scp (what later stages trust) pointing into a half-written ark. The scp names the
final ark by its absolute path. <out-scp>.done, written last, holds a signature of the inputs
(the entries, each file's size and mtime, the fbank options): a re-run with the same inputs
keeps the outputs, so a killed stage 1 redoes only its unfinished jobs. Running out of disk
is one clear line.
"""
import argparse
import errno
import hashlib
import os
import sys
import time

from capsv.utils import UserError, atomic_open, atomic_path, progress, run_main


def read_wav_scp(path):
    """(utt, spec) pairs of a wav.scp; spec may contain spaces (a command ending in `|`)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; run data preparation (stage 0) first")
    entries = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.strip().split(maxsplit=1)
            if not parts:
                continue
            if len(parts) < 2:
                raise UserError(f"{path}:{n}: expected '<utt> <path-or-command |>', got '{line.strip()}'")
            entries.append((parts[0], parts[1]))
    return entries


def inputs_signature(entries, fbank_config):
    """SHA-256 of the entries, each file's size and mtime, and the fbank options; None if a file is missing."""
    h = hashlib.sha256()
    try:
        with open(fbank_config, "rb") as f:
            h.update(f.read())
        for utt, spec in entries:
            h.update(f"{utt} {spec}\n".encode())
            if not spec.rstrip().endswith("|"):
                st = os.stat(spec)
                h.update(f"{st.st_size} {st.st_mtime_ns}\n".encode())
    except OSError:
        return None
    return h.hexdigest()


def log(msg):
    print(f"compute_fbank: {msg}", file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(prog="compute_fbank", description=__doc__.split("\n\n")[0])
    ap.add_argument("--fbank-config", default="conf/fbank.conf", help="Kaldi-syntax fbank options")
    ap.add_argument("wav_scp")
    ap.add_argument("out_ark")
    ap.add_argument("out_scp")
    ap.add_argument("out_utt2num_frames")
    args = ap.parse_args()

    entries = read_wav_scp(args.wav_scp)
    # A job that finished leaves <out-scp>.done holding the signature of its inputs; a re-run with
    # the same inputs (a killed stage 1 run again) keeps its outputs and redoes only the other jobs.
    done = args.out_scp + ".done"
    signature = inputs_signature(entries, args.fbank_config)
    if signature is not None and all(os.path.exists(p) for p in (args.out_ark, args.out_utt2num_frames)):
        try:
            with open(done) as f:
                if f.read().strip() == signature:
                    log(f"{args.out_scp} is complete from an earlier run with the same inputs; keeping it")
                    return
        except FileNotFoundError:
            pass
    # A missing file is found now, in seconds, not after hours of work on the others
    # (and before the slow torch import).
    for utt, spec in entries:
        if not spec.rstrip().endswith("|") and not os.path.isfile(spec):
            raise UserError(f"utterance {utt}: audio file {spec} not found; fix wav.scp or restore the file")

    import torch

    from capsv.features import read_fbank_conf, target_rate

    # One thread: the parallelism is --nj jobs, and idle intra-op threads spinning between
    # utterances cost 4x the CPU of the features themselves (local/measure_m4a_decoding.py).
    torch.set_num_threads(1)
    opts = read_fbank_conf(args.fbank_config)
    target = target_rate(opts)
    ark = os.path.abspath(args.out_ark)
    log(f"{len(entries)} utterances from {args.wav_scp} -> {ark}")
    start = time.time()
    try:
        resampled = write_features(entries, ark, args.out_scp, args.out_utt2num_frames, opts, target)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise UserError(f"no space left on the device of {ark} (writing its features); free some space or "
                        f"give another --fbankdir, then re-run stage 1 (the features in place are untouched)") from None
    if signature is not None:
        with atomic_open(done) as f:
            f.write(signature + "\n")
    # make_fbank.sh sums the jobs' counts into one line per data dir
    for sr, n in sorted(resampled.items()):
        log(f"resampled {n} utterances from {sr} Hz to {target} Hz")
    log(f"done: {len(entries)} utterances in {time.time() - start:.0f} s")


def write_features(entries, ark, out_scp, out_utt2num_frames, opts, target):
    """Features of `entries` into ark/scp/utt2num_frames; returns {other sample rate: utterances}."""
    import kaldiio

    from capsv.features import compute_fbank, load_audio

    resampled = {}
    start = last_log = time.time()
    bar = progress(entries, desc="fbank", unit="utt")
    # Listed so that the ark is renamed first and the scp last (context managers exit in reverse order).
    with atomic_path(out_scp) as tmp_scp, atomic_path(out_utt2num_frames) as tmp_u2nf, \
            atomic_path(ark) as tmp_ark:
        tmp_ark = os.path.abspath(tmp_ark)
        with kaldiio.WriteHelper(f"ark,scp:{tmp_ark},{tmp_scp}") as writer, open(tmp_u2nf, "w") as u2nf:
            for i, (utt, spec) in enumerate(bar, 1):
                wave, sr = load_audio(spec, utt)
                if sr != target:
                    resampled[sr] = resampled.get(sr, 0) + 1
                feats = compute_fbank(wave, sr, opts, utt)
                writer(utt, feats)
                u2nf.write(f"{utt} {feats.shape[0]}\n")
                # Kaldi-style progress lines when the log is a file rather than a terminal
                if bar.disable and (time.time() - last_log > 30 or i == len(entries)):
                    last_log = time.time()
                    log(f"processed {i}/{len(entries)} utterances ({last_log - start:.0f} s)")
        # kaldiio wrote the temporary ark's name into the scp; point it at the final name.
        with open(tmp_scp) as f:
            lines = f.read().splitlines()
        prefix = tmp_ark + ":"
        with open(tmp_scp, "w") as f:
            for line in lines:
                utt, loc = line.split(" ", 1)
                if not loc.startswith(prefix):
                    raise RuntimeError(f"unexpected scp line from kaldiio: {line}")
                f.write(f"{utt} {ark}:{loc[len(prefix):]}\n")
    return resampled


if __name__ == "__main__":
    run_main(main)
