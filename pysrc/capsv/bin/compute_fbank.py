"""Stage 1 job: fbank features for one job's part of a wav.scp.

    python -m capsv.bin.compute_fbank [--fbank-config conf/fbank.conf] [--job J --njobs N] \\
        [--max-bad M] <wav.scp> <out-prefix> <record>

The job's part is the utterances whose id hashes (CRC-32) to J of N, so adding or removing a
line of wav.scp changes one job's part only. The outputs are named by the job's signature (a
SHA-256 of its part of wav.scp, each audio file's size and mtime, and the fbank options):
<out-prefix>.<sig>.{ark,scp,utt2num_frames,bad} and <out-prefix>.<sig>.done, written last.
<record> then gets the line `<out-prefix>.<sig>`, which tells steps/make_fbank.sh where this
run's outputs are. A re-run whose part has the signature of a finished job keeps that job's
outputs, so a killed stage 1 redoes only its unfinished jobs, and a re-run after a fix only the
jobs whose part changed. Since the names differ whenever the inputs do, a re-run never writes
into an ark that the data dir's feats.scp points at.

An utterance whose audio cannot be used (not found, not decodable, empty, too short for one
frame, NaN or Inf features) is left out and listed in the .bad file as `<utt> <reason>`; the
job goes on. It stops (exit 1, one ERROR line) once it has more than max(M, 10) of them: the
data dir allows M (make_fbank.sh decides), and ten named are enough to show a pattern. A
finished job whose part had bad utterances also answers to the signature of its good ones, so
the data dir fixed by make_fbank.sh (the bad lines removed) finds it complete. Every output is
written under a temporary name and renamed when complete; running out of disk is one line.
"""
import argparse
import errno
import hashlib
import os
import shlex
import sys
import time
import zlib

from capsv.trials import read_wav_scp
from capsv.utils import UserError, atomic_open, atomic_path, progress, run_main

# a job names this many bad utterances before it gives up, whatever the data dir allows
MIN_NAMED = 10


def job_of(utt, njobs):
    """The job (1-based) that computes `utt`: a hash of its id alone, so other lines do not move it."""
    return zlib.crc32(utt.encode()) % njobs + 1


def audio_files(spec):
    """The files an entry reads: its path, or the existing paths named in its command."""
    spec = spec.strip()
    if not spec.endswith("|"):
        return [spec]
    try:
        words = shlex.split(spec[:-1])
    except ValueError:
        return []
    return [w for w in words if os.sep in w and os.path.isfile(w)]


def inputs_signature(entries, conf_bytes):
    """SHA-256 of the fbank options, the entries, and each audio file's size and mtime."""
    h = hashlib.sha256(conf_bytes)
    for utt, spec in entries:
        h.update(f"{utt} {spec}\n".encode())
        for path in audio_files(spec):
            try:
                st = os.stat(path)
                h.update(f"{st.st_size} {st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(b"missing\n")
    return h.hexdigest()[:16]


def log(msg):
    print(f"compute_fbank: {msg}", file=sys.stderr, flush=True)


def complete(done_path):
    """The outputs prefix a .done file names, if that job's outputs are all there; else None."""
    try:
        with open(done_path) as f:
            target = f.read().strip()
    except FileNotFoundError:
        return None
    prefix = os.path.join(os.path.dirname(done_path), target)
    if target and all(os.path.exists(f"{prefix}.{x}") for x in ("ark", "scp", "utt2num_frames", "bad")):
        return prefix
    return None


def main():
    ap = argparse.ArgumentParser(prog="compute_fbank", description=__doc__.split("\n\n")[0])
    ap.add_argument("--fbank-config", default="conf/fbank.conf", help="Kaldi-syntax fbank options")
    ap.add_argument("--job", type=int, default=1, help="this job's index, 1..njobs")
    ap.add_argument("--njobs", type=int, default=1, help="number of jobs wav.scp is split into")
    ap.add_argument("--max-bad", type=int, default=0,
                    help="bad utterances the data dir allows; the job stops past max(this, 10)")
    ap.add_argument("wav_scp")
    ap.add_argument("out_prefix", help="outputs are <out-prefix>.<signature>.{ark,scp,utt2num_frames,bad,done}")
    ap.add_argument("record", help="file that gets the outputs' prefix when the job is complete")
    args = ap.parse_args()
    if not 1 <= args.job <= args.njobs:
        raise UserError(f"--job {args.job} is not in 1..--njobs {args.njobs}")
    if not os.path.isfile(args.fbank_config):
        raise UserError(f"fbank config {args.fbank_config} not found; pass --fbank-config with an existing file")

    entries = [e for e in read_wav_scp(args.wav_scp) if job_of(e[0], args.njobs) == args.job]
    with open(args.fbank_config, "rb") as f:
        conf_bytes = f.read()
    signature = inputs_signature(entries, conf_bytes)
    prefix = os.path.abspath(f"{args.out_prefix}.{signature}")
    kept = complete(prefix + ".done")
    if kept:
        log(f"{len(entries)} utterances: complete from an earlier run with the same inputs "
            f"({os.path.basename(kept)}); keeping it")
        write_record(args.record, kept)
        return
    # Missing files are found now, in seconds (and before the slow torch import), when there
    # are more than the data dir allows: the stage would fail at its end anyway.
    missing = [(u, s) for u, s in entries if not s.rstrip().endswith("|") and not os.path.isfile(s)]
    if len(missing) > args.max_bad:
        u, s = missing[0]
        more = f" (and {len(missing) - 1} more, e.g. {missing[1][0]})" if len(missing) > 1 else ""
        raise UserError(f"utterance {u}: audio file {s} not found{more}; fix wav.scp or restore the file")

    import torch

    from capsv.features import read_fbank_conf, target_rate

    # One thread: the parallelism is --nj jobs, and idle intra-op threads spinning between
    # utterances cost 4x the CPU of the features themselves (local/measure_m4a_decoding.py).
    torch.set_num_threads(1)
    opts = read_fbank_conf(args.fbank_config)
    target = target_rate(opts)
    log(f"job {args.job}/{args.njobs}: {len(entries)} utterances of {args.wav_scp} -> {prefix}.ark")
    start = time.time()
    try:
        resampled, bad = write_features(entries, prefix, opts, target, max(args.max_bad, MIN_NAMED))
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise UserError(f"no space left on the device of {prefix}.ark (writing its features); free some space or "
                        f"give another --fbankdir, then re-run stage 1 (the features in place are untouched)") from None
    # the .done of the part as given, and of its good utterances (the part once the data dir is fixed)
    target_name = os.path.basename(prefix)
    with atomic_open(prefix + ".done") as f:
        f.write(target_name + "\n")
    if bad:
        good = [e for e in entries if e[0] not in bad]
        alias = os.path.abspath(f"{args.out_prefix}.{inputs_signature(good, conf_bytes)}.done")
        with atomic_open(alias) as f:
            f.write(target_name + "\n")
    write_record(args.record, prefix)
    # make_fbank.sh sums the jobs' counts into one line per data dir
    for sr, n in sorted(resampled.items()):
        log(f"resampled {n} utterances from {sr} Hz to {target} Hz")
    log(f"done: {len(entries) - len(bad)} utterances, {len(bad)} left out, in {time.time() - start:.0f} s")


def write_record(path, prefix):
    with atomic_open(path) as f:
        f.write(prefix + "\n")


def write_features(entries, prefix, opts, target, stop_after):
    """Features of `entries` into <prefix>.{ark,scp,utt2num_frames}, the unusable ones into <prefix>.bad.

    Returns ({other sample rate: utterances}, {bad utt: reason}). Raises UserError once more than
    `stop_after` are bad.
    """
    import kaldiio

    from capsv.features import compute_fbank, load_audio

    resampled, bad = {}, {}
    ark = prefix + ".ark"
    start = last_log = time.time()
    bar = progress(entries, desc="fbank", unit="utt")
    # Listed so that the ark is renamed first and the scp last (context managers exit in reverse order).
    with atomic_path(prefix + ".bad") as tmp_bad, atomic_path(prefix + ".scp") as tmp_scp, \
            atomic_path(prefix + ".utt2num_frames") as tmp_u2nf, atomic_path(ark) as tmp_ark:
        tmp_ark = os.path.abspath(tmp_ark)
        with kaldiio.WriteHelper(f"ark,scp:{tmp_ark},{tmp_scp}") as writer, open(tmp_u2nf, "w") as u2nf:
            for i, (utt, spec) in enumerate(bar, 1):
                try:
                    wave, sr = load_audio(spec, utt)
                    feats = compute_fbank(wave, sr, opts, utt)
                except UserError as e:
                    reason = " ".join(str(e).removeprefix(f"utterance {utt}: ").split())
                    bad[utt] = reason
                    log(f"left out {utt}: {reason}")
                    if len(bad) > stop_after:
                        raise UserError(f"{len(bad)} utterances of this job could not be used (more than the "
                                        f"{stop_after} it may leave out), the last {utt}: {reason}") from None
                else:
                    if sr != target:
                        resampled[sr] = resampled.get(sr, 0) + 1
                    writer(utt, feats)
                    u2nf.write(f"{utt} {feats.shape[0]}\n")
                # Kaldi-style progress lines when the log is a file rather than a terminal
                if bar.disable and (time.time() - last_log > 30 or i == len(entries)):
                    last_log = time.time()
                    log(f"processed {i}/{len(entries)} utterances ({last_log - start:.0f} s)")
        # kaldiio wrote the temporary ark's name into the scp; point it at the final name.
        with open(tmp_scp) as f:
            lines = f.read().splitlines()
        prefix_tmp = tmp_ark + ":"
        with open(tmp_scp, "w") as f:
            for line in lines:
                utt, loc = line.split(" ", 1)
                if not loc.startswith(prefix_tmp):
                    raise RuntimeError(f"unexpected scp line from kaldiio: {line}")
                f.write(f"{utt} {ark}:{loc[len(prefix_tmp):]}\n")
        with open(tmp_bad, "w") as f:
            f.writelines(f"{u} {r}\n" for u, r in bad.items())
    return resampled, bad


if __name__ == "__main__":
    run_main(main)
