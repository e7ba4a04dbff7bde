#!/usr/bin/env python3
"""Measure the two ways of feeding VoxCeleb2's m4a to stage 1, side by side on the same files.

    python local/measure_m4a_decoding.py [--repeats 3] <dir-with-m4a-files>

  pipe     wav.scp holds `ffmpeg ... - |`; stage 1 decodes each file while computing features;
  convert  a one-time `ffmpeg -i x.m4a x.wav` for every file (its own stage), then stage 1
           reads the wavs.

Prints seconds of one CPU core per hour of audio for decoding and for the whole of stage 1's
work per file (decode + read + fbank), and the disk a conversion needs per hour of audio.
local/prepare_voxceleb.py writes pipes; doc/voxceleb.md gives the numbers and why.
"""
import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pysrc"))
from capsv.features import compute_fbank, load_audio, read_fbank_conf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prepare_voxceleb import ffmpeg_pipe  # noqa: E402


def cpu():
    """CPU seconds of this process and its finished children (ffmpeg runs as a child)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="take the fastest of this many passes")
    ap.add_argument("--fbank-config", default=os.path.join(os.path.dirname(__file__), "..", "conf", "fbank.conf"))
    ap.add_argument("m4a_dir")
    args = ap.parse_args()
    files = sorted(glob.glob(os.path.join(args.m4a_dir, "**", "*.m4a"), recursive=True))
    if not files:
        sys.exit(f"measure_m4a_decoding: ERROR: no .m4a files under {args.m4a_dir}")
    opts = read_fbank_conf(args.fbank_config)
    m4a_bytes = sum(os.path.getsize(f) for f in files)

    torch.set_num_threads(1)   # as in a stage 1 job: the parallelism is --nj jobs
    wave, sr = load_audio(ffmpeg_pipe(files[0]), files[0])
    compute_fbank(wave, sr, opts)   # torch's first call pays one-time set-up costs; keep them out
    best = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            # pipe: what stage 1 does with a `ffmpeg ... |` wav.scp entry
            t0 = cpu()
            samples = 0
            for f in files:
                wave, sr = load_audio(ffmpeg_pipe(f), f)
                samples += wave.shape[1]
                compute_fbank(wave, sr, opts)
            pipe_all = cpu() - t0
            t0 = cpu()
            for f in files:
                load_audio(ffmpeg_pipe(f), f)
            pipe_decode = cpu() - t0
            # convert: the one-time conversion, then stage 1 on the wavs
            t0 = cpu()
            wavs = [_decode_to(f, os.path.join(tmp, f"{i}.wav")) for i, f in enumerate(files)]
            convert = cpu() - t0
            t0 = cpu()
            for w in wavs:
                wave, sr = load_audio(w, w)
                compute_fbank(wave, sr, opts)
            wav_stage1 = cpu() - t0
            wav_bytes = sum(os.path.getsize(w) for w in wavs)
            for k, v in dict(pipe_decode=pipe_decode, pipe_all=pipe_all, convert=convert,
                             wav_stage1=wav_stage1).items():
                best[k] = min(best.get(k, float("inf")), v)
            hours = samples / sr / 3600

    per_h = {k: v / hours for k, v in best.items()}
    print(f"{len(files)} m4a files, {hours * 60:.2f} min of audio, {m4a_bytes / 1e6:.2f} MB; "
          f"fastest of {args.repeats}; CPU seconds per hour of audio:")
    print(f"  pipe:    decode {per_h['pipe_decode']:7.1f}   stage 1 (decode + fbank) {per_h['pipe_all']:7.1f}"
          f"   disk 0")
    print(f"  convert: decode {per_h['convert']:7.1f}   stage 1 (read wav + fbank) {per_h['wav_stage1']:7.1f}"
          f"   disk {wav_bytes / hours / 1e9:.3f} GB/h (m4a: {m4a_bytes / hours / 1e9:.3f} GB/h)")
    print(f"  one pass of stage 1: pipe {per_h['pipe_all']:.1f} s/h vs convert + stage 1 "
          f"{per_h['convert'] + per_h['wav_stage1']:.1f} s/h; a re-run of stage 1: pipe {per_h['pipe_all']:.1f} "
          f"vs convert {per_h['wav_stage1']:.1f} s/h")


def _decode_to(src, dst):
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", src, "-f", "wav", "-acodec", "pcm_s16le",
                    dst], check=True)
    return dst


if __name__ == "__main__":
    main()
