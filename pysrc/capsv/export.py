"""Export a trained model so it can be used without this package: TorchScript, and ONNX on request.

Two parts, each a file per format in the export dir (default exp/<name>/export):

- `trunk`: fbank crops [K, T, n_mels] float32 -> frames [K, T', C] (T' = ceil(T / 4)).
- `score`: the frames of both utterances of a trial, [Ka, Ta, C] and [Kb, Tb, C] ->
  (score, emb_a, emb_b). The score is stage 3's: the mean cosine over the Ka x Kb crop pairs.
  CAP: emb_a, emb_b [Kb, Ka, E] are the embeddings of every crop pair (a's crop i pooled against
  b's crop j at [j, i], and b's crop j pooled against a's crop i); TAP/SAP: [E], each utterance's
  mean unit-length crop embedding, whose dot product is the score.
- TAP/SAP also get `embed`: frames [K, T, C] -> that mean unit crop embedding [E], so an
  utterance is embedded once and a trial is one dot product.

export.json beside them says how to make the inputs (the fbank options for
torchaudio.compliance.kaldi.fbank, the crop rule, num_crops, crop_frames), what each file takes and
returns, the precision it computes at (fp32), and the SHA-256 of each file. It is written last: a complete export has it, and it names
only files of this export.

The wrappers call the model's own modules (net.trunk, net.pool, net.head) in eval mode, so the
exported graphs are those of stage 3's model; scoring in stage 3 takes a faster, algebraically equal
route (capsv.scoring), and the two agree to float32 rounding.
"""
import json
import logging
import os
import sys
import time
import warnings

import torch
from torch import nn

from capsv import checkpoint
from capsv.config import load_config
from capsv.device import Precision, same_precision
from capsv.features import read_fbank_conf
from capsv.models.speaker_net import SpeakerNet
from capsv.utils import UserError, atomic_open, atomic_path, sha256

_EPS = 1e-12     # the norm floor of stage 3's cosines (capsv.scoring)
CROP_RULE = ("starts = numpy.linspace(0, max(num_frames - crop_frames, 0), num_crops).round().astype(int); "
             "crop k = feats[numpy.arange(starts[k], starts[k] + crop_frames) % num_frames] (an utterance shorter "
             "than crop_frames is repeated to fill each crop); the crops stacked: [num_crops, crop_frames, n_mels]")
WAVEFORM_RULE = ("mono (channels averaged), resampled to sample_frequency, float samples in [-1, 1] times 32768 "
                 "(Kaldi reads 16-bit PCM), shape [1, n]: torchaudio.compliance.kaldi.fbank(wave * 32768, **kwargs)")
# Every file name an export may hold; files of an earlier export that this one does not write are removed.
KNOWN_FILES = [f"{part}.{ext}" for part in ("trunk", "score", "embed") for ext in ("pt", "onnx")]


class CapScore(nn.Module):
    """CAP trial score from the frames of both utterances' crops (see the module docstring)."""

    def __init__(self, net):
        super().__init__()
        self.pool = net.pool
        self.head = net.head
        self.eps = _EPS

    def forward(self, frames_a, frames_b):
        ga, gb = self.pool.grid(frames_a, frames_b)             # [Kb, Ka, C] each
        kb, ka, c = ga.shape[0], ga.shape[1], ga.shape[2]
        # one head call over both grids, as SpeakerNet.embed_pairs does
        e = self.head(torch.cat([ga.reshape(-1, c), gb.reshape(-1, c)]))
        n = kb * ka
        emb_a, emb_b = e[:n].reshape(kb, ka, -1), e[n:].reshape(kb, ka, -1)
        cos = (emb_a * emb_b).sum(-1) / (torch.linalg.vector_norm(emb_a, dim=-1).clamp_min(self.eps)
                                         * torch.linalg.vector_norm(emb_b, dim=-1).clamp_min(self.eps))
        return cos.mean(), emb_a, emb_b


class MeanEmbed(nn.Module):
    """TAP/SAP: frames [K, T, C] -> the mean of the K unit-length crop embeddings [E]."""

    def __init__(self, net):
        super().__init__()
        self.pool = net.pool
        self.head = net.head
        self.eps = _EPS

    def forward(self, frames):
        e = self.head(self.pool.single(frames))                  # [K, E]
        e = e / torch.linalg.vector_norm(e, dim=-1, keepdim=True).clamp_min(self.eps)
        return e.mean(0)


class DotScore(nn.Module):
    """TAP/SAP trial score: the mean of the Ka x Kb crop-pair cosines is the dot product of the means."""

    def __init__(self, net):
        super().__init__()
        self.embed = MeanEmbed(net)

    def forward(self, frames_a, frames_b):
        emb_a, emb_b = self.embed(frames_a), self.embed(frames_b)
        return (emb_a * emb_b).sum(), emb_a, emb_b


def load_net(exp):
    """(eval-mode SpeakerNet of the newest checkpoint, its state, the exp's config) or a UserError."""
    cfg_path = os.path.join(exp, "config.yaml")
    if not os.path.isdir(exp):
        raise UserError(f"--exp {exp}: no such directory; give an experiment dir made by stage 2 (exp/<name>)")
    if not os.path.exists(cfg_path):
        raise UserError(f"{cfg_path} is missing; run stage 2 (training) for this experiment first")
    cfg = load_config(cfg_path)
    state = checkpoint.load_for_inference(exp)
    return SpeakerNet.from_checkpoint(state), state, cfg


def parts(net):
    """{name: (module, example inputs, input names, output names, dynamic dims per input)}.

    The examples are one size; other crop counts and lengths must work too (export checks them).
    """
    n_mels, c = net.trunk.instance_norm.num_features, net.trunk.out_dim
    k, t = "crops", "time"
    out = {"trunk": (net.trunk, (torch.randn(2, 200, n_mels),), ["feats"], ["frames"],
                     [{0: k, 1: t}])}
    pair = ((torch.randn(3, 50, c), torch.randn(2, 40, c)), ["frames_a", "frames_b"], ["score", "emb_a", "emb_b"],
            [{0: k + "_a", 1: t + "_a"}, {0: k + "_b", 1: t + "_b"}])
    if net.pair_dependent:
        out["score"] = (CapScore(net), *pair)
    else:
        out["score"] = (DotScore(net), *pair)
        out["embed"] = (MeanEmbed(net), (torch.randn(3, 50, c),), ["frames"], ["embedding"], [{0: k, 1: t}])
    return out


def check_inputs(name, net):
    """Inputs of another size than the export examples (a graph specialised to one size fails on them);
    frames come from the trunk, so the pooling and head see values of the scale they were trained on."""
    n_mels = net.trunk.instance_norm.num_features
    if name == "trunk":
        return (torch.randn(3, 123, n_mels),)
    if name == "embed":
        return (net.trunk(torch.randn(5, 123, n_mels)),)
    return net.trunk(torch.randn(4, 123, n_mels)), net.trunk(torch.randn(6, 67, n_mels))


def _rel_diff(got, want):
    """max |got - want| over every output, relative to the largest |want| of that output (at least 1)."""
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    return max(float((torch.as_tensor(g) - w).abs().max() / w.abs().max().clamp_min(1)) for g, w in zip(got, want))


def _torchscript(module, path):
    with warnings.catch_warnings():    # torch 2.14 marks jit.script deprecated; it still is what loads anywhere
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(module)
    with atomic_path(path) as tmp:
        scripted.save(tmp)


def _onnx(module, example, in_names, out_names, dyn, path):
    try:
        import onnx  # noqa: F401  (the dynamo exporter needs onnx and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UserError(f"--onnx needs the packages onnx and onnxscript ({e}); pip install -r requirements.txt") \
            from None
    from torch.export import Dim
    # its registry says, at warning level, that torchvision's detection ops are absent: not ours to need
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    shapes = {name: {ax: Dim(label) for ax, label in d.items()} for name, d in zip(in_names, dyn)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, example, dynamo=True, external_data=False, verbose=False,
                                 input_names=in_names, output_names=out_names, dynamic_shapes=shapes)
    with atomic_path(path) as tmp:
        prog.save(tmp)


def _check_onnx(path, in_names, inputs, want):
    """_rel_diff of onnxruntime's outputs from the eager model's, or None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    sess = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return _rel_diff(sess.run(None, {n: x.numpy() for n, x in zip(in_names, inputs)}), want)


EXPORTED_PRECISION = Precision("fp32", "cpu", "off")    # the graphs are traced and checked in fp32


def precision_warning(exp):
    """One line when the scores that set <exp>/calibration.json's thresholds were computed at another precision
    than the exported model computes; None when they match or nothing says."""
    try:
        with open(os.path.join(exp, "calibration.json")) as f:
            cal = json.load(f)
    except (OSError, ValueError):
        return None
    rec = cal if isinstance(cal, dict) and cal.get("precision") else None
    if same_precision(rec, EXPORTED_PRECISION) is None:
        return None
    return (f"WARNING: the exported model computes in {EXPORTED_PRECISION.name}, but the scores that set the thresholds "
            f"in {exp}/calibration.json were computed at {rec['precision']} on {rec.get('device_type', '?')}: "
            f"its scores may differ slightly from theirs")


def export(exp, out=None, onnx=False, fbank_config="conf/fbank.conf", log=print):
    """Write the export of `exp` into `out` (default <exp>/export); returns the export.json record."""
    out = out or os.path.join(exp, "export")
    fbank = read_fbank_conf(fbank_config)       # first: a bad option is one line before any work
    net, state, cfg = load_net(exp)
    warning = precision_warning(exp)
    if warning:
        print(warning, file=sys.stderr)
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "export.json")):   # until this export is complete, the dir has none
        os.remove(os.path.join(out, "export.json"))
    files, checks = {}, {}
    torch.manual_seed(0)
    with torch.no_grad():
        for name, (module, example, in_names, out_names, dyn) in parts(net).items():
            module.eval()
            inputs = check_inputs(name, net)
            want = module(*inputs)
            formats = {"torchscript": f"{name}.pt"} | ({"onnx": f"{name}.onnx"} if onnx else {})
            for fmt, fname in formats.items():
                path, t0 = os.path.join(out, fname), time.time()
                if fmt == "torchscript":
                    _torchscript(module, path)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", FutureWarning)
                        diff = _rel_diff(torch.jit.load(path)(*inputs), want)
                else:
                    _onnx(module, example, in_names, out_names, dyn, path)
                    diff = _check_onnx(path, in_names, inputs, want)
                if diff is not None and diff > 1e-4:
                    raise RuntimeError(f"{path}: exported {name} differs from the model by {diff:.2e} (relative) "
                                       f"on inputs {[tuple(x.shape) for x in inputs]}")
                checks[fname] = diff
                log(f"{fname}: {os.path.getsize(path) / 1e6:.2f} MB in {time.time() - t0:.1f} s; on inputs "
                    f"{' '.join('x'.join(map(str, x.shape)) for x in inputs)} (not the export's example size) "
                    + (f"max |exported - model| / max |model| {diff:.1e}" if diff is not None else
                       "not checked (no onnxruntime)"))
            files[name] = {"files": formats, "inputs": in_names, "outputs": out_names,
                           "dynamic": {n: {str(a): lab for a, lab in d.items()} for n, d in zip(in_names, dyn)}}
    mcfg, ecfg = state["config"]["model"], cfg["eval"]
    record = {
        "format": "capsv-export 1",
        "exp": os.path.abspath(exp),
        "epoch": state["epoch"],
        "checkpoint": checkpoint.checkpoint_path(os.path.join(exp, "models"), state["epoch"]),
        "pooling": mcfg["pooling"],
        "n_mels": mcfg["n_mels"], "frame_dim": net.trunk.out_dim, "embed_dim": mcfg["embed_dim"],
        "eval": {"num_crops": ecfg["num_crops"], "crop_frames": ecfg["crop_frames"]},
        "crops": CROP_RULE,
        "fbank": {"torchaudio_kaldi_fbank_kwargs": fbank, "conf": os.path.abspath(fbank_config),
                  "waveform": WAVEFORM_RULE},
        "score": ("trial score = score(trunk(crops of a), trunk(crops of b))[0], the mean cosine over the "
                  "num_crops x num_crops crop pairs (stage 3's score)"
                  + ("" if net.pair_dependent else "; equally embed(trunk(crops of a)) . embed(trunk(crops of b))")),
        "parts": files,
        "checked_max_rel_diff": checks,
        "sha256": {f: sha256(os.path.join(out, f)) for p in files.values() for f in p["files"].values()},
        "torch": torch.__version__,
        "precision": EXPORTED_PRECISION.name,
    }
    with atomic_open(os.path.join(out, "export.json")) as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    for stale in set(KNOWN_FILES) - set(record["sha256"]):
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    return record
