"""Stage 1 job: fbank features for the utterances of one wav.scp (one part of a split).

    python -m capsv.bin.compute_fbank --fbank-config conf/fbank.conf \\
        <wav.scp> <out-ark> <out-scp> <out-utt2num_frames>

Writes float32 matrices with kaldiio. The ark, scp and utt2num_frames are written under
temporary names and renamed only when every utterance is done, so an interrupted job never
leaves an scp (what later stages trust) pointing into a half-written ark. The scp names the
final ark by its absolute path.
"""
import argparse
import os
import sys
import time

from capsv.utils import UserError, atomic_path, progress, run_main


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


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    # A missing file is found now, in seconds, not after hours of work on the others
    # (and before the slow torch import).
    for utt, spec in entries:
        if not spec.rstrip().endswith("|") and not os.path.isfile(spec):
            raise UserError(f"utterance {utt}: audio file {spec} not found; fix wav.scp or restore the file")

    import kaldiio
    import torch

    from capsv.features import compute_fbank, load_audio, read_fbank_conf, target_rate

    # One thread: the parallelism is --nj jobs, and idle intra-op threads spinning between
    # utterances cost 4x the CPU of the features themselves (local/measure_m4a_decoding.py).
    torch.set_num_threads(1)
    opts = read_fbank_conf(args.fbank_config)
    target = target_rate(opts)
    ark = os.path.abspath(args.out_ark)
    log(f"{len(entries)} utterances from {args.wav_scp} -> {ark}")

    resampled = {}   # rate -> utterances; make_fbank.sh sums the jobs' counts into one line per data dir
    start = time.time()
    last_log = start
    bar = progress(entries, desc="fbank", unit="utt")
    # Listed so that the ark is renamed first (context managers exit in reverse order).
    with atomic_path(args.out_scp) as tmp_scp, atomic_path(args.out_utt2num_frames) as tmp_u2nf, \
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
        # mkstemp made the temporaries private (0600); give them the usual umask permissions
        for p in (tmp_ark, tmp_scp, tmp_u2nf):
            os.chmod(p, 0o666 & ~_umask())
    for sr, n in sorted(resampled.items()):
        log(f"resampled {n} utterances from {sr} Hz to {target} Hz")
    log(f"done: {len(entries)} utterances in {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_main(main)
