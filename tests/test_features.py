"""capsv.features: the fbank conf, audio loading and Kaldi-compatible filterbanks."""
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
import torchaudio.compliance.kaldi as kaldi

from capsv.features import compute_fbank, load_audio, read_fbank_conf
from capsv.utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf", "fbank.conf")


def write_wav(path, n, sr=16000, channels=1, seed=0):
    """A 16-bit WAV of a sine plus noise; returns the int16 samples written."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    sig = 0.3 * np.sin(2 * np.pi * 220 * t)[:, None] + 0.05 * rng.standard_normal((n, channels))
    pcm = np.clip(sig * 32768, -32768, 32767).astype(np.int16)
    sf.write(str(path), pcm if channels > 1 else pcm[:, 0], sr, subtype="PCM_16")
    return pcm


def test_conf_parsing():
    opts = read_fbank_conf(CONF)
    assert opts == {"sample_frequency": 16000.0, "num_mel_bins": 40, "frame_length": 25.0,
                    "frame_shift": 10.0, "window_type": "hamming", "dither": 0.0}
    assert isinstance(opts["num_mel_bins"], int) and isinstance(opts["dither"], float)


def test_conf_comments_and_flags(tmp_path):
    conf = tmp_path / "f.conf"
    conf.write_text("# comment\n\n--num-mel-bins=64   # inline\n--snip-edges=false\n--use-energy\n")
    assert read_fbank_conf(conf) == {"num_mel_bins": 64, "snip_edges": False, "use_energy": True}


@pytest.mark.parametrize("text,expect", [
    ("--num-mel-bins=40\n--bogus-option=3\n", r"f\.conf:2: unknown fbank option --bogus-option"),
    ("--num-mel-bins=forty\n", r"f\.conf:1: option --num-mel-bins expects int"),
    ("num-mel-bins=40\n", r"f\.conf:1: expected one '--option=value'"),
    ("--snip-edges=maybe\n", r"--snip-edges expects true or false"),
])
def test_conf_errors(tmp_path, text, expect):
    conf = tmp_path / "f.conf"
    conf.write_text(text)
    with pytest.raises(UserError, match=expect):
        read_fbank_conf(conf)


def test_conf_missing(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_fbank_conf(tmp_path / "nope.conf")


def test_fbank_matches_torchaudio(tmp_path):
    pcm = write_wav(tmp_path / "a.wav", 16000)
    opts = read_fbank_conf(CONF)
    wave, sr = load_audio(str(tmp_path / "a.wav"), "u1")
    feats = compute_fbank(wave, sr, opts, "u1")
    direct = kaldi.fbank(torch.from_numpy(pcm[:, 0].astype(np.float32)).unsqueeze(0), **opts).numpy()
    assert feats.dtype == np.float32 and feats.shape == (1 + (16000 - 400) // 160, 40)
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-4)


def test_resample_8k(tmp_path):
    pcm = write_wav(tmp_path / "a.wav", 8000, sr=8000)
    opts = read_fbank_conf(CONF)
    wave, sr = load_audio(str(tmp_path / "a.wav"), "u1")
    assert sr == 8000
    feats = compute_fbank(wave, sr, opts, "u1")
    assert feats.shape == (98, 40)   # 1 s at 16 kHz
    up = torchaudio.functional.resample(torch.from_numpy(pcm[:, 0] / 32768.0).float().unsqueeze(0), 8000, 16000)
    np.testing.assert_allclose(feats, kaldi.fbank(up * 32768, **opts).numpy(), rtol=1e-4, atol=1e-3)


def test_stereo_downmix(tmp_path):
    pcm = write_wav(tmp_path / "s.wav", 4000, channels=2)
    wave, sr = load_audio(str(tmp_path / "s.wav"), "u1")
    assert wave.shape == (1, 4000) and wave.dtype == torch.float32
    np.testing.assert_allclose(wave[0].numpy(), pcm.astype(np.float32).mean(axis=1) / 32768, atol=1e-6)


def test_pipe_command(tmp_path):
    write_wav(tmp_path / "a.wav", 5000)
    direct, sr = load_audio(str(tmp_path / "a.wav"), "u1")
    piped, sr2 = load_audio(f"cat {tmp_path / 'a.wav'} |", "u1")
    assert sr2 == sr and torch.equal(piped, direct)


def test_pipe_streamed_wav_header(tmp_path):
    """A WAV streamed through a pipe may carry 0 as its sizes; it is still read."""
    write_wav(tmp_path / "a.wav", 5000)
    data = bytearray((tmp_path / "a.wav").read_bytes())
    data[4:8] = struct.pack("<I", 0)
    i = data.find(b"data")
    data[i + 4:i + 8] = struct.pack("<I", 0)
    (tmp_path / "z.wav").write_bytes(bytes(data))
    wave, _ = load_audio(f"cat {tmp_path / 'z.wav'} |", "u1")
    assert wave.shape == (1, 5000)


def test_bad_audio(tmp_path):
    with pytest.raises(UserError, match=r"utterance u7: audio file .*nope\.wav not found"):
        load_audio(str(tmp_path / "nope.wav"), "u7")
    with pytest.raises(UserError, match=r"utterance u8: command 'exit 3' failed with exit status 3"):
        load_audio("exit 3 |", "u8")
    (tmp_path / "junk.wav").write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(UserError, match=r"utterance u9: cannot read audio file"):
        load_audio(str(tmp_path / "junk.wav"), "u9")
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, dtype=np.int16), 16000, subtype="PCM_16")
    with pytest.raises(UserError, match=r"utterance u10: .* holds no audio"):
        load_audio(str(tmp_path / "empty.wav"), "u10")


def test_too_short(tmp_path):
    write_wav(tmp_path / "a.wav", 300)
    wave, sr = load_audio(str(tmp_path / "a.wav"), "u1")
    with pytest.raises(UserError, match=r"utterance u1: audio too short for one frame"):
        compute_fbank(wave, sr, read_fbank_conf(CONF), "u1")


def test_compute_fbank_cli(tmp_path):
    """The job entry point: outputs named by the job's signature, resampling said once, absolute ark path."""
    for i, sr in enumerate([8000, 16000, 8000]):
        write_wav(tmp_path / f"w{i}.wav", sr, sr=sr, seed=i)
    (tmp_path / "wav.scp").write_text("".join(f"u{i} {tmp_path}/w{i}.wav\n" for i in range(3)))
    # relative output names: the scp must still name the ark absolutely
    r = subprocess.run([sys.executable, "-m", "capsv.bin.compute_fbank", "--fbank-config", CONF,
                        "wav.scp", "out/f", "record"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("resampled 2 utterances from 8000 Hz to 16000 Hz") == 1 and "resampl" not in r.stdout
    prefix = (tmp_path / "record").read_text().strip()
    assert prefix.startswith(f"{tmp_path}/out/f.") and len(prefix.rsplit(".", 1)[1]) == 16
    import kaldiio
    scp = open(f"{prefix}.scp").read().split("\n")[0]
    assert scp.startswith(f"u0 {prefix}.ark:")
    feats = dict(kaldiio.load_scp(f"{prefix}.scp"))
    assert [feats[f"u{i}"].shape for i in range(3)] == [(98, 40)] * 3
    assert open(f"{prefix}.utt2num_frames").read() == "u0 98\nu1 98\nu2 98\n"
    name = os.path.basename(prefix)
    assert sorted(os.listdir(tmp_path / "out")) == [f"{name}.{x}" for x in ("ark", "bad", "done", "scp", "utt2num_frames")]


# ---------------------------------------------------------------- against kaldi-native-fbank

def speech_like(sr, seconds=3.0, seed=0):
    """A voiced, formant-filtered pulse train with syllable-rate envelope, pauses and a noise floor."""
    import scipy.signal
    rng = np.random.default_rng(seed)
    n = int(sr * seconds)
    t = np.arange(n) / sr
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t) + 10 * rng.standard_normal()
    pulses = (np.sin(2 * np.pi * np.cumsum(f0) / sr) > 0.95).astype(float) - 0.05
    voiced = np.zeros(n)
    for fc, bw in [(700, 80), (1200, 90), (2600, 120)]:   # two-pole formant resonators
        r, th = np.exp(-np.pi * bw / sr), 2 * np.pi * fc / sr
        voiced += scipy.signal.lfilter([1 - r], [1, -2 * r * np.cos(th), r * r], pulses)
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) * (np.sin(2 * np.pi * 0.5 * t) > -0.6)
    x = voiced * envelope + 0.003 * rng.standard_normal(n)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def knf_fbank(x, sr):
    """Kaldi fbank by kaldi-native-fbank (an independent C++ port of Kaldi) with conf/fbank.conf's options."""
    knf = pytest.importorskip("kaldi_native_fbank")
    o = knf.FbankOptions()
    o.frame_opts.samp_freq = sr
    o.frame_opts.frame_length_ms, o.frame_opts.frame_shift_ms = 25, 10
    o.frame_opts.dither = 0.0
    o.frame_opts.window_type = "hamming"
    o.mel_opts.num_bins = 40
    f = knf.OnlineFbank(o)
    f.accept_waveform(sr, (x * 32768.0).tolist())
    f.input_finished()
    return np.stack([f.get_frame(i) for i in range(f.num_frames_ready)])


def test_fbank_matches_kaldi_native_fbank_16k():
    """Stage 1's features (torchaudio) equal an independent Kaldi implementation to 1e-3 in log energy."""
    x = speech_like(16000)
    ours = compute_fbank(torch.from_numpy(x)[None], 16000, read_fbank_conf(CONF))
    ref = knf_fbank(x, 16000)
    assert ours.shape == ref.shape == (298, 40)
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)


def test_fbank_of_22k_audio_matches_kaldi_native_fbank_after_independent_resampling():
    """22.05 kHz audio: stage 1 resamples with torchaudio; the reference resamples with scipy's
    polyphase filter and runs kaldi-native-fbank at 16 kHz. The two anti-aliasing filters differ
    in their transition band near 8 kHz and in how they pass the noise floor of the pauses, so every
    cell of the mel bins wholly below 6.5 kHz that stands above the noise floor (log energy > 8,
    over 90 % of them) must agree to 0.05 (a 5 % difference in power); the rest loosely."""
    import scipy.signal
    x = speech_like(22050, seed=1)
    ours = compute_fbank(torch.from_numpy(x)[None], 22050, read_fbank_conf(CONF))
    ref = knf_fbank(scipy.signal.resample_poly(x.astype(np.float64), 320, 441).astype(np.float32), 16000)
    assert ours.shape == ref.shape
    mel = lambda f: 1127.0 * np.log1p(np.asarray(f) / 700.0)   # Kaldi's mel scale
    edges = 700.0 * np.expm1(np.linspace(mel(20), mel(8000), 42) / 1127.0)
    low = edges[2:] <= 6500.0                                   # bin i spans edges[i]..edges[i+2]
    assert low.sum() >= 32
    loud = ref[:, low] > 8.0
    assert loud.mean() > 0.9
    np.testing.assert_allclose(ours[:, low][loud], ref[:, low][loud], atol=0.05, rtol=0)
    assert np.abs(ours - ref).max() < 1.0
