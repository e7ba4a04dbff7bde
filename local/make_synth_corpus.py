#!/usr/bin/env python3
"""Generate the embedded synthetic speaker-verification corpus (stage 0).

Writes 16 kHz mono 16-bit WAV files under <corpus-dir>/wav/<set>/<spk>/<utt>.wav and the
Kaldi data dirs <data-dir>/synth_train/{wav.scp,utt2spk,spk2utt} and
<data-dir>/synth_test/{wav.scp,utt2spk,spk2utt,trials}.

Signal model (source-filter, built in the STFT domain, vectorised numpy):
  * speaker traits (fixed per speaker): F0 level (two clusters) and intonation range,
    vocal-tract length (scales all formants) plus small per-formant offsets, formant
    bandwidth, glottal spectral tilt, breathiness, jitter/shimmer, a nasal anti-resonance;
  * content (per utterance): random phone-like sequence (vowels with F1-F4 targets, nasals,
    fricative noise bands, stop closures + bursts, pauses), smooth formant/F0 transitions,
    speaking rate, F0 declination and accents;
  * nuisance (per utterance): channel EQ (tilt, peaking/notch bands, band limits), coloured
    additive noise at a random SNR, random gain, and for about a third of the utterances an
    irrelevant signal over part of the utterance (a distractor talker or tones).

Everything is seeded from (seed, set, speaker, utterance), so the output does not depend on
the number of parallel jobs. Each data dir gets a stage0.signature: what made it (this
generator's SHA-256, the settings, the corpus folder) and the SHA-256 of each of its files. A
re-run that asks for the same, over files that still match and audio that is all there, is
skipped; otherwise it says in one line what differs and generates again.
"""
import argparse
import functools
import os
import time
from multiprocessing import Pool

import numpy as np
import scipy.fft
import scipy.signal
import soundfile as sf

from capsv.utils import UserError, atomic_open, atomic_path, run_main, sha256

SR = 16000
NFFT = 512          # 32 ms analysis window: resolves the harmonics of F0 >= ~90 Hz
HOP = 128           # 8 ms frame step
FREQS = np.fft.rfftfreq(NFFT, 1.0 / SR)       # (257,)
LN_DB = np.log(10.0) / 20.0                    # dB -> natural-log amplitude

PRESETS = {
    # name: (train_speakers, train_utts, test_speakers, test_utts, min_dur, max_dur)
    "mini": (200, 10, 40, 8, 2.5, 5.0),
    "tiny": (8, 4, 4, 4, 2.2, 3.0),
    "small": (40, 6, 10, 6, 2.2, 3.0),   # the tests' trained runs: enough speakers for CAP to learn in a minute
}
SET_CODES = {"train": 1, "test": 2, "distractor": 3}
SET_PREFIX = {"train": "tr", "test": "te"}
N_DISTRACTORS = 64
KIND_SPK, KIND_UTT, KIND_TRIALS = 11, 12, 13
_W = np.hanning(NFFT + 1)[:NFFT]  # scipy's periodic 'hann'
NOISE_STFT_RMS = float(np.sqrt(np.sum(_W ** 2) / 2.0) / np.sum(_W))  # per real/imag part

# ---------------------------------------------------------------------------------------
# Difficulty knobs (doc/design.md, "The embedded corpus"): nuisance strengths per utterance.
NUISANCE = dict(
    eq_tilt_db_oct=6.0,        # channel tilt uniform in +-this (dB/octave re 1 kHz)
    eq_bands=(1, 3),           # number of peaking/notch bands
    eq_band_gain_db=12.0,      # band gain uniform in +-this
    lowpass_prob=0.25,         # probability of a band-limited (3.4-7 kHz) channel
    snr_db=(10.0, 30.0),       # additive noise SNR range
    interf_prob=1.0 / 3.0,     # probability of an irrelevant signal over part of the utt
    interf_frac=(0.3, 0.7),    # fraction of the utterance it covers
    sir_db=(5.0, 15.0),        # signal-to-interference ratio range
    level_dbfs=(-32.0, -18.0), # output RMS level
)

# Within-speaker variability (smaller = speakers easier to tell apart).
SPEAKER = dict(
    utt_f0_sd=0.5,             # per-utterance F0 offset, semitones
    formant_offset_sd=0.10,    # per-speaker per-formant scale offsets (on top of vtl)
    idiolect=0.10,             # per-speaker per-vowel formant offsets
    token_formant_sd=0.03,     # per-token formant target jitter
)

# Phone inventory. Vowels: F1-F4 targets (Hz) of an average adult (vtl factor 1.0).
VOWELS = np.array([
    [280, 2250, 2950, 3600],   # i
    [400, 1950, 2550, 3550],   # I
    [520, 1850, 2500, 3550],   # e
    [680, 1700, 2450, 3500],   # ae
    [740, 1150, 2500, 3500],   # a
    [580, 880, 2450, 3450],    # o
    [450, 1050, 2300, 3400],   # U
    [310, 900, 2250, 3400],    # u
    [620, 1220, 2400, 3500],   # V
    [480, 1350, 1700, 3400],   # er
], dtype=float)
NASAL_FORMANTS = np.array([[260, 1000, 2300, 3400], [260, 1600, 2500, 3500]], dtype=float)
# fricatives: (centre Hz, width octaves, amplitude, voiced amplitude)
FRICATIVES = [
    (6200.0, 0.45, 1.0, 0.0),   # s
    (3300.0, 0.45, 1.0, 0.0),   # sh
    (5000.0, 1.40, 0.35, 0.0),  # f
    (6000.0, 1.60, 0.25, 0.0),  # th
    (6200.0, 0.45, 0.6, 0.35),  # z
    (5000.0, 1.40, 0.25, 0.35), # v
]
BURSTS = [(1200.0, 1.2), (4200.0, 0.8), (2400.0, 0.7)]  # p/b, t/d, k/g
BASE_BW = np.array([70.0, 90.0, 130.0, 190.0])


@functools.lru_cache(maxsize=None)
def speaker_traits(seed, set_name, spk_index):
    """The fixed voice of one speaker, drawn from the shared trait distributions."""
    rng = np.random.default_rng(np.random.SeedSequence(
        [seed, KIND_SPK, SET_CODES[set_name], spk_index, 0]))
    female = rng.random() < 0.5
    if female:
        f0 = rng.uniform(180.0, 260.0)
        vtl = rng.uniform(0.97, 1.18)
    else:
        f0 = rng.uniform(100.0, 150.0)
        vtl = rng.uniform(0.82, 1.03)
    return dict(
        f0=f0,
        f0_range=rng.uniform(1.0, 4.5),             # accent depth, semitones
        vtl=vtl,                                     # formant scale factor
        f_off=1.0 + rng.normal(0.0, SPEAKER["formant_offset_sd"], 4),       # per-formant individual offsets
        bw=rng.uniform(0.7, 1.6),                    # formant bandwidth factor
        tilt=rng.uniform(-10.0, -3.0),               # source spectral slope, dB/octave
        breath_db=rng.uniform(-32.0, -10.0),         # aspiration re voiced excitation
        jitter=rng.uniform(0.003, 0.02),
        shimmer=rng.uniform(0.02, 0.15),
        nasal_f=rng.uniform(700.0, 1800.0),          # anti-resonance centre
        nasal_depth=rng.uniform(0.0, 0.8),
        rate=rng.uniform(0.85, 1.2),                 # habitual phone-duration scale
        hf_db=rng.uniform(-6.0, 6.0),                # speaker "presence" above 3 kHz
        vowel_off=1.0 + rng.normal(0.0, SPEAKER["idiolect"], VOWELS.shape),  # own vowel space
    )


def _smooth(x, width):
    """Moving Hann-window average along axis 0 (edge-padded)."""
    if width <= 1:
        return x
    w = np.hanning(width + 2)[1:-1]
    w /= w.sum()
    pad = width // 2
    xp = np.pad(x, [(pad, width - 1 - pad)] + [(0, 0)] * (x.ndim - 1), mode="edge")
    if x.ndim == 1:
        return np.convolve(xp, w, mode="valid")
    return np.stack([np.convolve(xp[:, k], w, mode="valid") for k in range(x.shape[1])], 1)


def _phone_sequence(rng, tr, n_frames):
    """Frame-level tracks of one random utterance's content.

    Returns formant targets (T,4), voicing amplitude (T,), frication amplitude (T,),
    fricative centre/width (T,), and syllable-nucleus frames for F0 accents.
    """
    rate = tr["rate"] * rng.uniform(0.8, 1.25)
    fr = SR / HOP / 1000.0  # frames per ms

    def nfr(ms):
        return max(1, int(round(ms * rate * fr)))

    form = np.zeros((n_frames, 4))
    voi = np.zeros(n_frames)
    fri = np.zeros(n_frames)
    fc = np.full(n_frames, 4000.0)
    fw = np.ones(n_frames)
    nuclei = []
    segs = []  # (kind, n, params)

    segs.append(("sil", max(1, int(rng.uniform(60, 300) * fr)), None))
    total = segs[0][1]
    while total < n_frames:
        # one syllable: optional onset consonant, vowel, optional coda
        syl = []
        if rng.random() < 0.75:
            syl.append(_consonant(rng, nfr))
        k = rng.integers(len(VOWELS))
        v = VOWELS[k] * tr["vowel_off"][k] * (1.0 + rng.normal(0, SPEAKER["token_formant_sd"], 4))
        syl.append(("vow", nfr(rng.uniform(70, 200)), (v, rng.uniform(0.7, 1.3))))
        if rng.random() < 0.35:
            syl.append(_consonant(rng, nfr))
        if rng.random() < 0.15:
            syl.append(("sil", nfr(rng.uniform(80, 300)), None))
        for s in syl:
            segs.append(s)
            total += s[1]

    # formant targets for consonants/silences follow the nearest following vowel
    next_v = VOWELS[4]
    targets = [None] * len(segs)
    for i in range(len(segs) - 1, -1, -1):
        kind, n, p = segs[i]
        if kind == "vow":
            next_v = p[0]
        targets[i] = next_v
    t = 0
    for (kind, n, p), tv in zip(segs, targets):
        e = min(t + n, n_frames)
        if e <= t:
            break
        form[t:e] = tv
        if kind == "vow":
            voi[t:e] = p[1]
            nuclei.append((t + e) // 2)
        elif kind == "nas":
            form[t:e] = p[0]
            voi[t:e] = p[1]
        elif kind == "fri":
            c, w, a, va = p
            fri[t:e] = a
            voi[t:e] = va
            fc[t:e] = c
            fw[t:e] = w
        elif kind == "stop":
            c, w, ncl = p
            b = min(t + ncl, e)
            fri[b:e] = 0.8
            fc[b:e] = c
            fw[b:e] = w
        t = e

    # coarticulation: smooth formant tracks (log domain) and amplitude tracks
    form = np.exp(_smooth(np.log(form), 7))
    voi = _smooth(voi, 3)
    fri = _smooth(fri, 3)
    fc = np.exp(_smooth(np.log(fc), 3))
    fw = _smooth(fw, 3)
    return form, voi, fri, fc, fw, nuclei


def _consonant(rng, nfr):
    r = rng.random()
    if r < 0.4:
        c, w, a, va = FRICATIVES[rng.integers(len(FRICATIVES))]
        return ("fri", nfr(rng.uniform(60, 150)), (c * rng.uniform(0.9, 1.1), w, a, va))
    if r < 0.7:
        c, w = BURSTS[rng.integers(len(BURSTS))]
        ncl = nfr(rng.uniform(35, 80))
        return ("stop", ncl + nfr(rng.uniform(12, 25)), (c * rng.uniform(0.9, 1.1), w, ncl))
    f = NASAL_FORMANTS[rng.integers(len(NASAL_FORMANTS))] * (1.0 + rng.normal(0, 0.04, 4))
    return ("nas", nfr(rng.uniform(50, 100)), (f, rng.uniform(0.25, 0.4)))


def _log_resonances(form_hz, bw_hz):
    """Natural-log magnitude of a cascade of 2nd-order resonators, (T,K) -> (T,F); 0 at DC."""
    f = FREQS.astype(np.float32)[None, :]
    out = np.zeros((form_hz.shape[0], f.shape[1]), np.float32)
    for k in range(form_hz.shape[1]):
        F = form_hz[:, k:k + 1].astype(np.float32)
        B = np.float32((bw_hz[k] / 2.0) ** 2)
        out += np.log(F * F + B)
        out -= 0.5 * np.log(((f - F) ** 2 + B) * ((f + F) ** 2 + B))
    return out


def synth_speech(rng, tr, n_samples):
    """One clean utterance of speaker `tr`, float64, peak-free scale (RMS ~ 0.1)."""
    n_frames = n_samples // HOP + 1
    form, voi, fri, fc, fw, nuclei = _phone_sequence(rng, tr, n_frames)
    form = form * tr["vtl"] * tr["f_off"][None, :]
    form[:, 3] = np.maximum(form[:, 3], form[:, 2] + 300.0)
    form[:, 1] = np.maximum(form[:, 1], form[:, 0] + 150.0)

    # --- F0 contour (frame level, semitones re the speaker's mean) ---
    tt = np.arange(n_frames) / n_frames
    st = rng.normal(0.0, SPEAKER["utt_f0_sd"]) + rng.uniform(1.0, 4.0) * (0.5 - tt)          # declination
    drift = _smooth(rng.normal(0.0, 1.0, n_frames), 40)
    st = st + 0.6 * drift / (drift.std() + 1e-9)
    for c in nuclei:
        if rng.random() < 0.45:
            width = rng.uniform(6, 18)
            st = st + tr["f0_range"] * rng.uniform(0.4, 1.3) * np.exp(
                -0.5 * ((np.arange(n_frames) - c) / width) ** 2)
    f0_frames = tr["f0"] * 2.0 ** (st / 12.0)
    f0 = np.interp(np.arange(n_samples), np.arange(n_frames) * HOP, f0_frames)

    # --- glottal pulse train from a phase accumulator, with jitter and shimmer ---
    phase = np.cumsum(f0 / SR) + rng.random()
    idx = np.nonzero(np.diff(np.floor(phase)))[0] + 1
    idx = idx + np.round(rng.normal(0.0, 1.0, idx.size) * tr["jitter"] * SR / f0[idx]).astype(int)
    idx = idx[(idx >= 0) & (idx < n_samples)]
    pulses = np.zeros(n_samples)
    amp = np.sqrt(f0[idx] / 120.0) ** -1 * np.maximum(0.2, 1.0 + tr["shimmer"] * rng.normal(size=idx.size))
    np.add.at(pulses, idx, amp)

    kw = dict(fs=SR, window="hann", nperseg=NFFT, noverlap=NFFT - HOP)
    _, _, P = scipy.signal.stft(pulses.astype(np.float32), **kw)
    # white noise (std 0.05) drawn directly in the STFT domain, at the level scipy's stft gives
    N = (rng.standard_normal(P.shape, dtype=np.float32)
         + 1j * rng.standard_normal(P.shape, dtype=np.float32)) * np.float32(0.05 * NOISE_STFT_RMS)
    T = P.shape[1]
    if form.shape[0] < T:  # pad the tracks to the STFT frame count
        padn = T - form.shape[0]
        form = np.pad(form, [(0, padn), (0, 0)], mode="edge")
        voi, fri, fc, fw = (np.pad(a, (0, padn), mode="edge") for a in (voi, fri, fc, fw))
    form, voi, fri, fc, fw = form[:T], voi[:T], fri[:T], fc[:T], fw[:T]

    # --- spectral envelopes ---
    lf = np.log2(np.maximum(FREQS, 60.0) / 100.0)
    log_src = LN_DB * (tr["tilt"] * np.maximum(lf, 0.0)
                       + tr["hf_db"] * np.clip((FREQS - 2500.0) / 1500.0, 0.0, 1.0))
    nas = np.log(np.maximum(1e-3, 1.0 - tr["nasal_depth"] * np.exp(
        -0.5 * ((FREQS - tr["nasal_f"] * tr["vtl"]) / (120.0 * tr["bw"])) ** 2)))
    log_v = _log_resonances(form, BASE_BW * tr["bw"]) + (log_src + nas)[None, :]
    ev = np.exp(log_v.astype(np.float32))                                                     # (T,F)
    fcs = fc * np.sqrt(tr["vtl"])
    lfq = np.log2(np.maximum(FREQS, 50.0)).astype(np.float32)[None, :]
    bump = np.exp(-0.5 * ((lfq - np.log2(fcs).astype(np.float32)[:, None]) / fw.astype(np.float32)[:, None]) ** 2)
    ef = np.exp(np.float32(LN_DB * 34.0) * (bump - 1.0)) * np.float32(10.0 ** (6.0 / 20.0))                       # (T,F)
    breath = 10.0 ** (tr["breath_db"] / 20.0) * 20.0

    voi32, fri32 = voi.astype(np.float32)[:, None], fri.astype(np.float32)[:, None]
    S = P * (ev * voi32).T + N * (ev * (voi32 * np.float32(breath)) + ef * fri32).T
    _, x = scipy.signal.istft(S, **kw)
    x = x[:n_samples].astype(np.float64)
    if x.size < n_samples:
        x = np.pad(x, (0, n_samples - x.size))
    return x / (np.sqrt(np.mean(x * x)) + 1e-12) * 0.1


def _coloured_noise_spec(rng, m, alpha, rms):
    """rfft (length m) of noise with power spectrum ~ f^-alpha (0 white, 1 pink, 2 brown) and RMS `rms`."""
    f = np.fft.rfftfreq(m, 1.0 / SR)
    spec = (rng.normal(size=f.size) + 1j * rng.normal(size=f.size)) * np.maximum(f, 20.0) ** (-alpha / 2.0)
    w = np.full(f.size, 2.0)
    w[0] = 1.0
    if m % 2 == 0:
        w[-1] = 1.0
    power = np.sum(w * np.abs(spec) ** 2) / float(m) ** 2   # Parseval: mean square of irfft(spec, m)
    return spec * (rms / np.sqrt(power))


def _tones(rng, n):
    t = np.arange(n) / SR
    y = np.zeros(n)
    for _ in range(rng.integers(1, 4)):
        f1 = np.exp(rng.uniform(np.log(150.0), np.log(5000.0)))
        f2 = f1 if rng.random() < 0.5 else np.exp(rng.uniform(np.log(150.0), np.log(5000.0)))
        f = np.exp(np.linspace(np.log(f1), np.log(f2), n))
        y += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * np.cumsum(f) / SR + rng.uniform(0, 2 * np.pi)) * (
            1.0 + rng.uniform(0.0, 0.8) * np.sin(2 * np.pi * rng.uniform(0.5, 6.0) * t))
    return y


def _channel(rng, x, noise_rms):
    """Add coloured noise, then a fixed random EQ over the whole signal (frequency domain, zero phase)."""
    m = scipy.fft.next_fast_len(x.size + 1024)
    spec = np.fft.rfft(x, m) + _coloured_noise_spec(rng, m, rng.uniform(0.0, 2.0), noise_rms)
    f = np.fft.rfftfreq(m, 1.0 / SR)
    lf = np.log2(np.maximum(f, 30.0) / 1000.0)
    g = rng.uniform(-1, 1) * NUISANCE["eq_tilt_db_oct"] * lf
    for _ in range(rng.integers(NUISANCE["eq_bands"][0], NUISANCE["eq_bands"][1] + 1)):
        c = rng.uniform(np.log2(150.0 / 1000.0), np.log2(6500.0 / 1000.0))
        g += rng.uniform(-1, 1) * NUISANCE["eq_band_gain_db"] * np.exp(-0.5 * ((lf - c) / rng.uniform(0.15, 0.8)) ** 2)
    hp = rng.uniform(40.0, 250.0)
    g += -40.0 * np.log10(1.0 + (hp / np.maximum(f, 1.0)) ** 2) / 2.0     # 2nd-order-ish high-pass
    if rng.random() < NUISANCE["lowpass_prob"]:
        lp = rng.uniform(3400.0, 7000.0)
        g += -60.0 * np.log10(1.0 + (f / lp) ** 6) / 6.0 * 3.0
    y = np.fft.irfft(spec * 10.0 ** (g / 20.0), m)
    return y[:x.size]


def synth_utterance(seed, set_name, spk_index, utt_index, min_dur, max_dur):
    """The int16 samples of one utterance; a pure function of its arguments."""
    rng = np.random.default_rng(np.random.SeedSequence(
        [seed, KIND_UTT, SET_CODES[set_name], spk_index, utt_index]))
    n = int(round(rng.uniform(min_dur, max_dur) * SR))
    tr = speaker_traits(seed, set_name, spk_index)
    x = synth_speech(rng, tr, n)
    p_speech = np.mean(x * x)

    if rng.random() < NUISANCE["interf_prob"]:
        L = int(n * rng.uniform(*NUISANCE["interf_frac"]))
        start = int(rng.integers(0, n - L + 1))
        if rng.random() < 0.6:
            d = speaker_traits(seed, "distractor", int(rng.integers(N_DISTRACTORS)))
            y = synth_speech(rng, d, L)
        else:
            y = _tones(rng, L)
        fade = min(L // 2, int(0.02 * SR))
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / max(fade, 1))
        y[:fade] *= ramp
        y[L - fade:] *= ramp[::-1]
        sir = rng.uniform(*NUISANCE["sir_db"])
        y *= np.sqrt(p_speech / (np.mean(y * y) + 1e-12) / 10.0 ** (sir / 10.0))
        x[start:start + L] += y

    snr = rng.uniform(*NUISANCE["snr_db"])
    x = _channel(rng, x, np.sqrt(p_speech / 10.0 ** (snr / 10.0)))
    level = 10.0 ** (rng.uniform(*NUISANCE["level_dbfs"]) / 20.0)
    x *= level / (np.sqrt(np.mean(x * x)) + 1e-12)
    peak = np.max(np.abs(x))
    if peak > 0.98:
        x *= 0.98 / peak
    return np.round(x * 32767.0).astype(np.int16)


def _work(job):
    seed, set_name, spk_index, utt_index, path, min_dur, max_dur = job
    wav = synth_utterance(seed, set_name, spk_index, utt_index, min_dur, max_dur)
    with atomic_path(path) as tmp:
        sf.write(tmp, wav, SR, format="WAV", subtype="PCM_16")
    return wav.size


def make_trials(seed, utts_by_spk):
    """All same-speaker pairs (i<j) plus as many random different-speaker pairs, sorted."""
    target = []
    for spk in sorted(utts_by_spk):
        u = utts_by_spk[spk]
        target += [(u[i], u[j]) for i in range(len(u)) for j in range(i + 1, len(u))]
    utts = sorted(x for u in utts_by_spk.values() for x in u)
    spk_of = {x: s for s, u in utts_by_spk.items() for x in u}
    n_possible = len(utts) * (len(utts) - 1) // 2 - len(target)
    want = min(len(target), n_possible)
    rng = np.random.default_rng(np.random.SeedSequence([seed, KIND_TRIALS, SET_CODES["test"], 0, 0]))
    nontarget = set()
    while len(nontarget) < want:
        a, b = rng.integers(len(utts), size=2)
        a, b = utts[min(a, b)], utts[max(a, b)]
        if spk_of[a] != spk_of[b]:
            nontarget.add((a, b))
    lines = [f"{a} {b} target" for a, b in target] + [f"{a} {b} nontarget" for a, b in nontarget]
    return sorted(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 usage="%(prog)s [options] <corpus-dir> <data-dir>")
    ap.add_argument("corpus_dir", help="where the wav files go (<corpus-dir>/wav/...)")
    ap.add_argument("data_dir", help="where synth_train/ and synth_test/ go")
    ap.add_argument("--size", default="mini", choices=sorted(PRESETS), help="size preset (default mini)")
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--nj", type=int, default=2, help="parallel worker processes")
    ap.add_argument("--train-speakers", type=int)
    ap.add_argument("--train-utts", type=int)
    ap.add_argument("--test-speakers", type=int)
    ap.add_argument("--test-utts", type=int)
    ap.add_argument("--min-dur", type=float, help="seconds")
    ap.add_argument("--max-dur", type=float, help="seconds")
    a = ap.parse_args()

    p = dict(zip(["train_speakers", "train_utts", "test_speakers", "test_utts", "min_dur", "max_dur"],
                 PRESETS[a.size]))
    for k in p:
        if getattr(a, k) is not None:
            p[k] = getattr(a, k)
    if a.seed < 0:
        raise UserError(f"--seed must be >= 0, got {a.seed}")
    if a.nj < 1:
        raise UserError(f"--nj must be >= 1, got {a.nj}")
    if p["train_speakers"] < 1 or p["train_utts"] < 1:
        raise UserError("--train-speakers and --train-utts must be >= 1")
    if p["test_speakers"] < 2 or p["test_utts"] < 2:
        raise UserError("--test-speakers and --test-utts must be >= 2 (trials need target and nontarget pairs)")
    if not (0.5 <= p["min_dur"] <= p["max_dur"] <= 60.0):
        raise UserError(f"need 0.5 <= --min-dur <= --max-dur <= 60 s, got {p['min_dur']} and {p['max_dur']}")

    corpus = os.path.abspath(a.corpus_dir)
    asked = [("generator", sha256(os.path.abspath(__file__))), ("size", a.size), ("seed", a.seed),
             *((k, p[k]) for k in sorted(p)), ("corpus_dir", corpus)]
    asked = [f"{k} {v}" for k, v in asked]
    dirs = {set_name: os.path.join(a.data_dir, f"synth_{set_name}") for set_name in ("train", "test")}
    why = _why_not_current(dirs.values(), asked)
    if why is None:
        print(f"make_synth_corpus.py: {a.data_dir}/synth_{{train,test}} were made from these settings "
              f"(size {a.size}, seed {a.seed}; stage0.signature) and are intact: skipped", flush=True)
        return
    if why:
        print(f"make_synth_corpus.py: {why}: generating again", flush=True)
    for d in dirs.values():   # what is about to change no longer matches its record
        if os.path.exists(os.path.join(d, SIGNATURE)):
            os.remove(os.path.join(d, SIGNATURE))
    jobs, tables = [], {}
    for set_name in ("train", "test"):
        nspk, nutt = p[f"{set_name}_speakers"], p[f"{set_name}_utts"]
        sw, uw = max(4, len(str(nspk))), max(3, len(str(nutt)))
        utts_by_spk = {}
        for s in range(1, nspk + 1):
            spk = f"{SET_PREFIX[set_name]}{s:0{sw}d}"
            utts_by_spk[spk] = []
            for u in range(1, nutt + 1):
                utt = f"{spk}-u{u:0{uw}d}"
                path = os.path.join(corpus, "wav", set_name, spk, utt + ".wav")
                utts_by_spk[spk].append(utt)
                jobs.append((a.seed, set_name, s, u, path, p["min_dur"], p["max_dur"]))
        tables[set_name] = utts_by_spk

    for d in {os.path.dirname(j[4]) for j in jobs}:
        os.makedirs(d, exist_ok=True)
    print(f"make_synth_corpus.py: generating {len(jobs)} utterances "
          f"({p['train_speakers']}x{p['train_utts']} train, {p['test_speakers']}x{p['test_utts']} test, "
          f"{p['min_dur']}-{p['max_dur']} s, seed {a.seed}) with {a.nj} jobs into {corpus}/wav", flush=True)
    t0 = time.time()
    total = 0
    step = max(1, len(jobs) // 10)
    with Pool(a.nj) if a.nj > 1 else _Serial() as pool:
        for i, n in enumerate(pool.imap(_work, jobs, chunksize=4), 1):
            total += n
            if i % step == 0 or i == len(jobs):
                print(f"make_synth_corpus.py: {i}/{len(jobs)} utterances, {total / SR / 3600:.2f} h, "
                      f"{time.time() - t0:.1f} s", flush=True)

    for set_name, utts_by_spk in tables.items():
        d = os.path.join(a.data_dir, f"synth_{set_name}")
        utt2spk = sorted((u, s) for s, us in utts_by_spk.items() for u in us)
        with atomic_open(os.path.join(d, "wav.scp")) as f:
            for u, s in utt2spk:
                f.write(f"{u} {os.path.join(corpus, 'wav', set_name, s, u + '.wav')}\n")
        with atomic_open(os.path.join(d, "utt2spk")) as f:
            for u, s in utt2spk:
                f.write(f"{u} {s}\n")
        with atomic_open(os.path.join(d, "spk2utt")) as f:
            for s in sorted(utts_by_spk):
                f.write(f"{s} {' '.join(sorted(utts_by_spk[s]))}\n")
        if set_name == "test":
            lines = make_trials(a.seed, utts_by_spk)
            with atomic_open(os.path.join(d, "trials")) as f:
                f.write("".join(line + "\n" for line in lines))
            ntar = sum(line.endswith(" target") for line in lines)
            print(f"make_synth_corpus.py: {d}/trials: {ntar} target, {len(lines) - ntar} nontarget")
        with atomic_open(os.path.join(d, SIGNATURE)) as f:   # last: the record of a complete data dir
            f.write("".join(line + "\n" for line in asked + _file_hashes(d)))
    print(f"make_synth_corpus.py: done in {time.time() - t0:.1f} s; data dirs in {a.data_dir}/synth_{{train,test}}")


SIGNATURE = "stage0.signature"
DATA_FILES = ("wav.scp", "utt2spk", "spk2utt", "trials")


def _file_hashes(d):
    return [f"{name} {sha256(os.path.join(d, name))}" for name in DATA_FILES if os.path.exists(os.path.join(d, name))]


def _why_not_current(dirs, asked):
    """None if every data dir was made from `asked` and is intact; else why not ('' if never made)."""
    for d in dirs:
        try:
            with open(os.path.join(d, SIGNATURE)) as f:
                recorded = f.read().splitlines()
        except FileNotFoundError:
            return ""
        made = dict(line.split(" ", 1) for line in recorded[:len(asked)])
        for line in asked:
            key, value = line.split(" ", 1)
            if made.get(key) != value:
                if key == "generator":
                    return f"{d} was made by another version of {os.path.basename(__file__)}"
                return f"{d} was made with {key} {made.get(key, '(none)')}, not {value}"
        if recorded[len(asked):] != _file_hashes(d):
            return f"{d} was changed since it was made (its files differ from {SIGNATURE})"
        with open(os.path.join(d, "wav.scp")) as f:
            missing = [line.split()[1] for line in f if not os.path.isfile(line.split()[1])]
        if missing:
            return f"{d}: {len(missing)} audio files are missing (e.g. {missing[0]})"
    return None


class _Serial:
    """Pool stand-in for --nj 1 (no worker processes)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, it, chunksize=1):
        return map(fn, it)


if __name__ == "__main__":
    run_main(main)
