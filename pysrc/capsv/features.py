"""Kaldi-compatible log Mel filterbank features: conf parsing, audio loading, fbank.

The options live in conf/fbank.conf in Kaldi syntax (`--num-mel-bins=40`) and are
handed to torchaudio.compliance.kaldi.fbank, which reproduces Kaldi's compute-fbank-feats.
Audio is read with soundfile (torchaudio.load needs torchcodec in this torchaudio).
"""
import inspect
import io
import os
import struct
import subprocess

import numpy as np
import soundfile
import torch
import torchaudio
import torchaudio.compliance.kaldi as kaldi

from capsv.utils import UserError

# The fbank options torchaudio accepts, with their types taken from its defaults.
_FBANK_PARAMS = {
    name: p.default
    for name, p in inspect.signature(kaldi.fbank).parameters.items()
    if name not in ("waveform", "channel")
}


def _convert(value, default, where, name):
    """Convert a conf value to the type of torchaudio's default for that option."""
    try:
        if isinstance(default, bool):
            low = value.lower()
            if low in ("true", "1"):
                return True
            if low in ("false", "0"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        return value
    except ValueError:
        kind = "true or false" if isinstance(default, bool) else type(default).__name__
        raise UserError(f"{where}: option --{name} expects {kind}, got '{value}'; fix the value") from None


def read_fbank_conf(path):
    """Read a Kaldi-syntax fbank conf into keyword arguments for torchaudio's kaldi.fbank.

    One `--option=value` per line (a bare `--flag` means true); `#` starts a comment.
    An option torchaudio's Kaldi fbank does not know is an error naming file, line and option.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"fbank config {path} not found; pass --fbank-config with an existing file")
    opts = {}
    with open(path) as f:
        for n, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            where = f"{path}:{n}"
            if not line.startswith("--") or len(line.split()) != 1:
                raise UserError(f"{where}: expected one '--option=value' per line, got '{line}'")
            key, sep, value = line[2:].partition("=")
            name = key.replace("-", "_")
            if name not in _FBANK_PARAMS:
                raise UserError(f"{where}: unknown fbank option --{key}; remove it or use a torchaudio "
                                f"Kaldi fbank option (e.g. --num-mel-bins)")
            default = _FBANK_PARAMS[name]
            if not sep:
                if not isinstance(default, bool):
                    raise UserError(f"{where}: option --{key} needs a value (--{key}=...)")
                value = "true"
            opts[name] = _convert(value, default, where, key)
    return opts


def _fix_wav_sizes(data):
    """Rewrite the RIFF and data chunk sizes of a WAV that was streamed through a pipe.

    A writer that cannot seek back (sox, some ffmpeg builds) may leave 0 there, which
    libsndfile reads as empty audio. Returns the patched bytes, or None if not a simple WAV.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    data = bytearray(data)
    data[4:8] = struct.pack("<I", min(len(data) - 8, 0xFFFFFFFF))
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if cid == b"data":
            data[pos + 4:pos + 8] = struct.pack("<I", min(len(data) - pos - 8, 0xFFFFFFFF))
            return bytes(data)
        pos += 8 + size + (size & 1)
    return None


def load_audio(spec, utt):
    """Load one wav.scp entry: a file path, or a shell command ending in `|` that writes audio.

    Returns (waveform float32 tensor [1, n] in [-1, 1), sample_rate); several channels are
    averaged to mono. Any problem is a UserError naming the utterance and what to do.
    """
    spec = spec.strip()
    if spec.endswith("|"):
        cmd = spec[:-1].strip()
        proc = subprocess.run(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            detail = f": {err[-1]}" if err else ""
            raise UserError(f"utterance {utt}: command '{cmd}' failed with exit status {proc.returncode}"
                            f"{detail}; fix its wav.scp line")
        data = proc.stdout
        if not data:
            raise UserError(f"utterance {utt}: command '{cmd}' wrote no audio; it must write a WAV "
                            f"file to stdout (e.g. ffmpeg ... -f wav -)")
        source = f"the output of '{cmd}'"
        try:
            audio, sr = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
            if audio.shape[0] == 0 and _fix_wav_sizes(data) is not None:
                audio, sr = soundfile.read(io.BytesIO(_fix_wav_sizes(data)), dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
            raise UserError(f"utterance {utt}: cannot read audio from {source} ({e}); "
                            f"it must write WAV to stdout") from None
    else:
        path = spec
        source = path
        if not os.path.isfile(path):
            raise UserError(f"utterance {utt}: audio file {path} not found; fix wav.scp or restore the file")
        try:
            audio, sr = soundfile.read(path, dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
            raise UserError(f"utterance {utt}: cannot read audio file {path} ({e}); "
                            f"the file is corrupt or not audio: replace it or remove the utterance") from None
    if audio.shape[0] == 0:
        raise UserError(f"utterance {utt}: {source} holds no audio samples; "
                        f"replace it or remove the utterance from the data dir")
    mono = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)).unsqueeze(0), int(sr)


def target_rate(opts):
    """The sample rate the fbank options expect (Kaldi's --sample-frequency)."""
    return int(opts.get("sample_frequency", _FBANK_PARAMS["sample_frequency"]))


def compute_fbank(wave, sr, opts, utt="<utterance>"):
    """Log Mel filterbank of a [1, n] float waveform: float32 numpy array [frames, bins].

    Audio at another rate is resampled to --sample-frequency (the caller reports that once).
    Samples are scaled to the 16-bit range first, as Kaldi reads integer PCM.
    """
    target = target_rate(opts)
    if sr != target:
        wave = torchaudio.functional.resample(wave, sr, target)
    n = wave.shape[-1]
    frame_len = int(target * opts.get("frame_length", _FBANK_PARAMS["frame_length"]) / 1000)
    if opts.get("snip_edges", True) and n < frame_len:
        raise UserError(f"utterance {utt}: audio too short for one frame ({n} samples at {target} Hz "
                        f"< {frame_len}); remove the utterance from the data dir")
    try:
        feats = kaldi.fbank(wave * 32768.0, **opts)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise UserError(f"utterance {utt}: fbank failed ({e}); check the audio and the fbank config") from None
    if feats.shape[0] == 0:
        raise UserError(f"utterance {utt}: audio too short for one frame ({n} samples); "
                        f"remove the utterance from the data dir")
    if not torch.isfinite(feats).all():
        raise UserError(f"utterance {utt}: its features hold NaN or Inf (the audio has non-finite samples); "
                        f"replace the file or remove the utterance from the data dir")
    return feats.numpy().astype(np.float32, copy=False)
