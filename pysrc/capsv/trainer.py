"""Stage 2's training logic: the training step and epoch, the GPU switches, resume, validation, and the log.

capsv.bin.train wires these together; local/gpu_check.sh times `build_training` and `train_epoch`, the very
functions a training run uses.

One epoch: the episodic batches through `train_epoch` (trunk under the precision's autocast, loss in fp32,
fp16 through a gradient scaler) and the scheduler's step; then rank 0 alone runs the validation every
`train.validate_every` epochs (capsv.scoring on a copy of the weights, so training is untouched), writes the
checkpoint (the commit point: it holds the epoch's log row), train_log.csv, train_curves.png and the epoch's log
line, while the other ranks wait for it.
"""
import datetime
import logging
import math
import os
import shutil
import time

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from capsv import checkpoint, distributed
from capsv.config import dump_config, flatten, load_config
from capsv.data import ArkReader, EpisodeLoader, EpisodicBatches, read_data_dir
from capsv.device import Precision, resolve_precision, resolve_switch
from capsv.distributed import SINGLE, RankError
from capsv.losses import NPSoftmaxLoss
from capsv.metrics import compute_eer, compute_min_dcf
from capsv.models.speaker_net import SpeakerNet
from capsv.trials import read_trials
from capsv.utils import UserError, atomic_open, atomic_path, progress

# What may change between a run and its resumption: how the same objective is computed (precision, TF32,
# memory format, compile, workers, timeouts), how long and how often it is checkpointed or validated, and
# scoring settings. Anything else (model.*, seed, batch, crops, lr schedule, loss weights, sync_bn) means a
# different experiment and is refused. The number of ranks is not a key: a run resumes on any number of GPUs.
RESUMABLE_KEYS = {"device", "train.epochs", "train.amp", "train.tf32", "train.channels_last", "train.compile",
                  "train.num_workers", "train.prefetch_factor", "train.dist_timeout_s", "train.keep_checkpoints",
                  "train.validate_every", "train.validate_trials",
                  "eval.num_crops", "eval.crop_frames", "eval.trial_batch", "eval.precision",
                  "eval.cohort_size", "eval.asnorm_top_k"}   # older configs lack some: a missing key is no change
DATA_WAIT_WARN = 0.10   # share of step time spent waiting for the loader above which the log warns
# Between epochs rank 0 alone validates and writes the checkpoint, the log and the curves; the other ranks wait
# for it at a barrier of a CPU (gloo) group of their own, so no collective of training is pending meanwhile and
# train.dist_timeout_s (after which a stuck collective, or NCCL's watchdog, ends the job) does not run. There
# they allow dist_timeout_s plus this: Vox1-O's 4,715 utterances take minutes on a GPU, and a rank 0 that dies
# ends the job through torchrun at once whatever this is. Rank 0 comes last and allows dist_timeout_s, as for any
# collective, so a rank hung between epochs is noticed as soon as one hung in an epoch.
BETWEEN_EPOCHS_WAIT_S = 6 * 3600
log = logging.getLogger("capsv.train")


def setup_logging(rank=0):
    """Log lines on stderr: steps/train.sh runs training through a job launcher, whose log
    (<exp>/log/train.log) holds them, here or on a cluster node. Only rank 0 logs."""
    h = logging.StreamHandler()
    h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.handlers[:] = [h]
    log.setLevel(logging.INFO if rank == 0 else logging.ERROR)


def check_same_experiment(exp, cfg, say=True):
    """Refuse a config that changes the model or the objective of the run in `exp`; log (with `say`) what else
    changed. Returns {key: (old, new)} of the resumable keys that changed."""
    path = os.path.join(exp, "config.yaml")
    if not os.path.exists(path):
        return {}
    old = flatten(load_config(path))
    new = flatten(cfg)
    refused = sorted(k for k in new if k not in RESUMABLE_KEYS and old.get(k) != new[k])
    if refused:
        raise UserError(f"{path} was trained with different {', '.join(refused)}; "
                        f"use another --exp, or delete {exp} to start over")
    changed = {k: (old[k], new[k]) for k in sorted(new) if k in old and old[k] != new[k]}
    if changed and say:
        log.info("changed since the last run of this experiment (the objective is the same): " +
                 ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changed.items()))
    return changed


def _show(v):
    return str(v).lower() if isinstance(v, bool) else str(v)


def check_world(cfg, world):
    tc = cfg["train"]
    if world < 1 or tc["speakers_per_batch"] % world:
        raise UserError(f"train.speakers_per_batch={tc['speakers_per_batch']} cannot be split over {world} ranks "
                        f"(GPUs x nodes); each rank takes an equal block of a batch's speakers: make it a multiple "
                        f"of {world}")


class TrainingData:
    """A training data dir as training reads it: features, their lengths, and the episodic batches."""

    def __init__(self, data_dir, cfg):
        tc = cfg["train"]
        self.dir = data_dir
        self.utt2spk, self.nframes, self.scp = read_data_dir(data_dir)
        feat_dim = ArkReader(self.scp).read(next(iter(self.scp)), 0, 1).shape[1]
        if feat_dim != cfg["model"]["n_mels"]:
            raise UserError(f"{data_dir}/feats.scp has {feat_dim}-dim features but model.n_mels is "
                            f"{cfg['model']['n_mels']}; re-run stage 1 with the fbank conf the model expects "
                            f"(run.sh --fbank-conf), or fix the config")
        self.sampler = EpisodicBatches(self.utt2spk, tc["speakers_per_batch"], tc["utts_per_speaker"], cfg["seed"])
        if self.sampler.skipped:
            log.info(f"{len(self.sampler.skipped)} speakers with fewer than {tc['utts_per_speaker']} utterances are "
                     f"not used (train.utts_per_speaker), e.g. {self.sampler.skipped[0]}")


def resume(models, net, loss_fn, opt, sched, speakers, data_dir, part=SINGLE, scaler=None, device=None):
    """Restore model, loss, optimiser, scheduler, gradient scaler and RNGs from the newest checkpoint; that
    checkpoint's state, or None when there is none.

    Across ranks, rank 0 picks the checkpoint (and alone reports damaged ones) and every rank
    loads that same file: the un-wrapped model's state, whatever the number of ranks that wrote it.
    An fp16 run's scaler continues from the checkpoint's; after a run at another precision it starts afresh.
    """
    # Loaded on the CPU whatever the device: torch.set_rng_state needs CPU ByteTensors, and
    # load_state_dict copies model and optimiser tensors onto the parameters' device.
    state = checkpoint.load_latest(models) if part.rank == 0 else None
    epoch = part.broadcast_int(state["epoch"] if state is not None else 0)
    if epoch == 0:
        return None
    if part.rank != 0:
        try:
            state = checkpoint.read_checkpoint(checkpoint.checkpoint_path(models, epoch))
        except ValueError as e:
            raise RankError(f"{checkpoint.checkpoint_path(models, epoch)} read by rank 0 cannot be read here ({e}); "
                            f"is {models} on a filesystem every node sees?") from None
    if state["speakers"] != speakers:
        raise UserError(f"the checkpoints in {models} were trained on other speakers than {data_dir}; "
                        f"use another --exp")
    net.load_state_dict(state["model"])
    loss_fn.load_state_dict(state["loss"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if scaler is not None and scaler.is_enabled():
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        else:
            was = (state.get("precision") or {}).get("precision", "unrecorded")
            log.info(f"fp16 gradient scaler: starts afresh (epoch {epoch} was trained at {was} precision)")
    checkpoint.set_rng_state(state["rng"], device)
    return state


def worker_error_line(e):
    """A UserError raised in a DataLoader worker arrives with the worker's traceback: keep its own line."""
    text = str(e).strip()
    return text.splitlines()[-1].rsplit("UserError: ", 1)[-1] if "\n" in text else text


class TrainStep(nn.Module):
    """One training step's forward as one module, so DDP can wrap it: the trunk on this rank's
    crops (autocast at `precision`, a capsv.device.Precision), then the loss over the global batch
    (capsv.losses) in fp32."""

    def __init__(self, net, loss_fn, part=SINGLE, precision=Precision("fp32", "cpu", "off"), switches=None):
        super().__init__()
        self.net, self.loss_fn, self.part, self.precision = net, loss_fn, part, precision
        self.switches = switches or {}   # what gpu_switches resolved, for the log
        self.scaler = precision.grad_scaler()   # loss scaling for fp16; disabled, a pass-through

    def forward(self, feats, speakers):
        nspk, m, t, f = feats.shape
        with self.precision.autocast():
            frames = self.net.frames(feats.view(nspk * m, t, f))
        if frames.dtype in (torch.bfloat16, torch.float16):   # the head and loss run in full precision
            frames = frames.float()
        return self.loss_fn(self.net, frames.view(nspk, m, *frames.shape[1:]), speakers, self.part)


def unwrap(step):
    """The TrainStep itself (under DDP it is step.module)."""
    return getattr(step, "module", step)


def backward(step, opt, loss):
    """Gradients of `loss` in the parameters' .grad, as the optimiser step will use them: under fp16 the loss
    is scaled so small gradients survive, and the gradients are unscaled again here."""
    scaler = unwrap(step).scaler
    scaler.scale(loss).backward()
    scaler.unscale_(opt)   # a no-op when the scaler is disabled


def train_epoch(step, opt, loader, device, desc, part=SINGLE):
    """One epoch; the mean stats of its batches, and `data_wait`: the share of the epoch's step time
    spent blocked on the loader (across ranks, the largest: the slowest loader holds everyone up)."""
    step.train()
    scaler = unwrap(step).scaler
    totals, n = {}, 0
    bar = progress(loader, desc=desc, leave=False) if part.rank == 0 else None   # other ranks stay quiet
    batches = iter(bar if bar is not None else loader)
    wait = 0.0
    t_start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        try:
            feats, speakers = next(batches)
        except StopIteration:
            break
        except UserError as e:   # bad features met by a worker (or here): one line, naming the rank
            raise RankError(worker_error_line(e)) from None
        wait += time.perf_counter() - t0
        feats, speakers = feats.to(device, non_blocking=True), speakers.to(device)
        loss, stats = step(feats, speakers)
        if not math.isfinite(stats["loss"]):   # stop before the step, so no checkpoint holds NaN weights
            raise UserError(f"{desc}, batch {n + 1}: the loss is {stats['loss']} on finite features, so training "
                            f"diverged; lower train.lr (re-running resumes from the last checkpoint)")
        opt.zero_grad(set_to_none=True)
        backward(step, opt, loss)
        scaler.step(opt)   # fp16: skipped when a gradient overflowed (the scale is then lowered)
        scaler.update()
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v
        n += 1
        if bar is not None:
            bar.set_postfix(loss=f"{totals['loss'] / n:.3f}", acc=f"{totals['np_acc'] / n:.3f}")
    total = time.perf_counter() - t_start
    out = {k: v / max(n, 1) for k, v in totals.items()}
    out["data_wait"] = part.max(wait / total if total > 0 else 0.0)
    return out


def report_epoch(epoch, stats, lr, nbatches, seconds, num_workers, valid=None):
    """The epoch's log line (with its validation, when it had one); a warning when the loader held it up."""
    line = (f"epoch {epoch}: loss {stats['loss']:.4f} (np {stats['np_loss']:.4f}, ce {stats['ce_loss']:.4f}) "
            f"np_acc {stats['np_acc']:.3f} ce_acc {stats['ce_acc']:.3f} lr {lr:.6g} "
            f"{nbatches} batches {seconds:.1f} s, data wait {100 * stats['data_wait']:.1f} %")
    if valid:
        line += (f"; validation EER {valid['valid_eer_pct']:.2f} % minDCF(0.05) {valid['valid_min_dcf']:.4f} "
                 f"({valid['valid_trials']} trials, {valid['valid_seconds']:.1f} s)")
    log.info(line)
    if stats["data_wait"] > DATA_WAIT_WARN:
        log.warning(f"WARNING: epoch {epoch} spent {100 * stats['data_wait']:.0f} % of its step time waiting for "
                    f"data (over {100 * DATA_WAIT_WARN:.0f} %); raise train.num_workers (now {num_workers}) or put "
                    f"the feature arks on faster storage")


def gpu_switches(tc, device, world):
    """The precision (capsv.device) and throughput switches this run uses on `device`, TF32 applied.

    On the CPU autocast (bf16, fp16), channels_last and compile run when set explicitly (auto leaves them
    off there); TF32 is a format of NVIDIA GPUs and does nothing elsewhere."""
    use = {k: resolve_switch(tc[k], device) for k in ("tf32", "channels_last", "compile")}
    if use["tf32"] and device.type != "cuda":
        log.info(f"train.tf32: a format of NVIDIA GPUs, ignored on {device.type}")
        use["tf32"] = False
    if use["compile"] and device.type == "cpu" and not any(map(shutil.which, (os.environ.get("CXX", "g++"), "c++"))):
        raise UserError("train.compile=true on the CPU builds C++ kernels, but no C++ compiler (g++) is on the PATH; "
                        "install one (apt-get install g++) or set train.compile=false")
    use["precision"] = resolve_precision(tc["amp"], device)
    use["sync_bn"] = world > 1 and tc["sync_bn"] and device.type == "cuda"
    if world > 1 and tc["sync_bn"] and device.type != "cuda":
        log.info(f"train.sync_bn: CUDA only, ignored on {device.type} (BatchNorm statistics are per rank)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = use["tf32"]
        torch.backends.cudnn.allow_tf32 = use["tf32"]
    log.info(f"precision {use['precision']}; tf32 {_show(use['tf32'])}, channels_last {_show(use['channels_last'])}, "
             f"compile {_show(use['compile'])}")
    return use


def build_training(cfg, n_speakers, device, part=SINGLE):
    """Net, loss, optimiser, scheduler and the (DDP-wrapped) training step, as training runs them
    on `device`, the switches applied; local/gpu_check.sh times this very step."""
    tc = cfg["train"]
    use = gpu_switches(tc, device, part.world)
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    net = SpeakerNet.from_config(cfg)
    if use["sync_bn"]:   # BatchNorm over the global batch, as one GPU computes it
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = net.to(device)
    if use["channels_last"]:
        # Module.to converts only the 4-D tensors (the convolutions' weights). cuDNN and oneDNN run a
        # convolution NHWC when its input or its weight is NHWC, and give an NHWC output, which BatchNorm,
        # ReLU, SE and the residual sums keep: so every activation of the trunk is NHWC from the first
        # convolution on (its one-channel input is the same bytes in both layouts), and the [B, T, F] input
        # and the [B, T', C] output stay 3-D (tests/test_gpu_switches.py looks at each convolution).
        net.trunk.to(memory_format=torch.channels_last)
    if use["compile"]:   # in place: the state_dict keeps its keys, so checkpoints do not change
        net.trunk.compile()
    loss_fn = NPSoftmaxLoss(cfg["model"]["embed_dim"], n_speakers, tc["softmax_weight"]).to(device)
    opt = torch.optim.Adam(list(net.parameters()) + list(loss_fn.parameters()), lr=tc["lr"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=tc["lr_decay_every"], gamma=tc["lr_decay"])
    # DDP may wrap before a checkpoint is loaded: it holds the parameters themselves, which
    # load_state_dict fills in place, from the same file on every rank.
    step = distributed.wrap(TrainStep(net, loss_fn, part, use["precision"], use), device)
    return net, loss_fn, opt, sched, step


def compile_counts():
    """(graphs compiled, graph breaks) by torch.compile in this process so far."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


class Validation:
    """A trial list scored with the current weights every train.validate_every epochs: monitoring, not model
    selection (the recipe reports the last epoch).

    Scoring is stage 3's (capsv.scoring: utterance_cache, score_trials, at the eval settings and
    eval.precision) on a network of its own that receives a copy of the weights, in eval mode: the training
    network, its compiled trunk, its BatchNorm statistics and every RNG are left exactly as they were.
    """

    def __init__(self, data_dir, trials_path, cfg):
        self.cfg, self.data_dir, self.trials_path = cfg, data_dir, trials_path
        _, self.nframes, scp = read_data_dir(data_dir)
        trials = read_trials(trials_path)
        missing = sorted({u for e, t, _ in trials for u in (e, t) if u not in scp})
        if missing:
            raise UserError(f"{trials_path}: the validation trials name utterance {missing[0]!r}, which has no "
                            f"features in {data_dir}/feats.scp ({len(missing)} such utterance(s)); give "
                            f"--valid-data the data dir of these trials, or set train.validate_every=0")
        n = cfg["train"]["validate_trials"]
        if 0 < n < len(trials):
            trials = [trials[i] for i in subset(trials, n, cfg["seed"])]
        self.labels = np.array([lab for _, _, lab in trials])
        if self.labels.all() or not self.labels.any():
            raise UserError(f"{trials_path}: the {len(trials)} validation trials are all "
                            f"{'target' if self.labels.all() else 'nontarget'} trials; EER needs both (raise "
                            f"train.validate_trials, or set it to 0 for all)")
        self.trials = trials
        self.utts = sorted({u for e, t, _ in trials for u in (e, t)})
        self.reader = ArkReader(scp)
        self.every = cfg["train"]["validate_every"]
        self._net = None

    @classmethod
    def from_options(cls, cfg, data_dir, trials_path=None):
        """The run's Validation, or None: none when train.validate_every is 0 or no --valid-data was given."""
        if trials_path and not data_dir:
            raise UserError("--valid-trials needs --valid-data (the data dir with the features of its utterances)")
        if cfg["train"]["validate_every"] == 0:
            return None
        if not data_dir:
            log.info(f"no validation: train.validate_every is {cfg['train']['validate_every']} but no --valid-data "
                     f"was given (run.sh gives the test set)")
            return None
        trials_path = trials_path or os.path.join(data_dir, "trials")
        if not os.path.isfile(trials_path):
            raise UserError(f"{trials_path}: no validation trial list; give --valid-trials FILE, or set "
                            f"train.validate_every=0")
        return cls(data_dir, trials_path, cfg)

    def due(self, epoch):
        return epoch % self.every == 0

    def scores(self, net, device):
        """The trials' scores with `net`'s current weights, as stage 3 computes them."""
        from capsv.scoring import score_trials, utterance_cache
        if self._net is None:
            with torch.random.fork_rng(devices=[]):   # its initial weights must not draw from training's RNG
                self._net = SpeakerNet.from_config(self.cfg)
            self._net.to(device).eval()
        self._net.load_state_dict(net.state_dict())
        ecfg = self.cfg["eval"]
        cache = utterance_cache(self._net, self.reader, self.nframes, self.utts, ecfg, device)
        try:
            return score_trials(self._net, cache, self.trials, ecfg["trial_batch"])
        finally:
            cache.close()

    def run(self, net, device):
        """{valid_eer_pct, valid_min_dcf, valid_trials, valid_seconds} of `net`'s current weights."""
        t0 = time.time()
        scores = self.scores(net, device)
        eer, _ = compute_eer(scores, self.labels)
        dcf, _ = compute_min_dcf(scores, self.labels, 0.05)
        return {"valid_eer_pct": 100 * eer, "valid_min_dcf": dcf, "valid_trials": len(self.trials),
                "valid_seconds": round(time.time() - t0, 2)}


def subset(trials, n, seed):
    """Indices (in list order) of n trials, the same for the same seed, naming few utterances: the trunk's cost
    is per utterance. The utterances in a random order (by the seed), the n trials whose later utterance comes
    first in it: all trials among the first k utterances, so n trials cost about sqrt(n / all trials) of the
    utterances (mini corpus: 150 of 2,240 trials name 85 of 320 utterances; a uniform draw names 199). Every
    trial is as likely to be chosen as any other."""
    rng = np.random.default_rng(seed)
    utts = sorted({u for e, t, _ in trials for u in (e, t)})
    rank = dict(zip(utts, rng.permutation(len(utts))))
    later = np.array([max(rank[e], rank[t]) for e, t, _ in trials])
    order = np.lexsort((rng.random(len(trials)), later))   # by the later utterance's place, ties at random
    return np.sort(order[:n])


def between_epochs_group(part, tc):
    """A CPU (gloo) group in which the other ranks wait for rank 0's work between epochs (BETWEEN_EPOCHS_WAIT_S)."""
    if part.world == 1:
        return None
    timeout = tc["dist_timeout_s"] + (BETWEEN_EPOCHS_WAIT_S if part.rank != 0 else 0)
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))


class TrainLog:
    """exp/train_log.csv, one row per epoch, and exp/train_curves.png drawn from it.

    A checkpoint holds its epoch's row, so the row of an epoch whose checkpoint was written just before the run
    was interrupted is restored on resumption. The picture costs at most 1/DRAW_EVERY of the training time: it
    is redrawn after an epoch when DRAW_EVERY drawings' time has passed since the last drawing (every epoch of a
    real run: a drawing takes a fraction of a second), and after the last epoch of a run that trained that long;
    a run of a few seconds (the tests') draws nothing."""

    DRAW_EVERY = 20
    FIRST_DRAW_S = 0.5   # the cost assumed before the first drawing (measured: 0.3 s CPU, plus matplotlib's import)

    def __init__(self, exp, start, state=None):
        self.csv = os.path.join(exp, "train_log.csv")
        self.png = os.path.join(exp, "train_curves.png")
        history = pd.read_csv(self.csv) if os.path.exists(self.csv) else pd.DataFrame()
        if len(history):
            history = history[history["epoch"] < start]
        row = (state or {}).get("log")
        if row and (not len(history) or row["epoch"] not in set(history["epoch"])):
            history = pd.concat([history, pd.DataFrame([row])], ignore_index=True)
        self.history = history
        self.started = self.drawn_at = time.monotonic()
        self.draw_seconds = self.FIRST_DRAW_S

    def append(self, row, last=False):
        self.history = pd.concat([self.history, pd.DataFrame([row])], ignore_index=True)
        with atomic_open(self.csv) as f:
            self.history.to_csv(f, index=False, float_format="%.6g")
        now, enough = time.monotonic(), self.DRAW_EVERY * self.draw_seconds
        if now - self.drawn_at >= enough or (last and now - self.started >= enough):
            t0 = time.monotonic()
            plot_curves(self.history, self.png)
            self.drawn_at = time.monotonic()
            self.draw_seconds = self.drawn_at - t0


def plot_curves(history, path):
    """Training curves against epoch, from train_log.csv's rows (a DataFrame), written atomically to `path`."""
    from matplotlib.figure import Figure   # no pyplot: no global state, nothing shown
    from matplotlib.ticker import MaxNLocator
    h = history.sort_values("epoch")
    if "data_wait" in h:
        h = h.assign(data_wait_pct=100 * h["data_wait"])
    fig = Figure(figsize=(12, 6.6))
    fig.subplots_adjust(left=0.06, right=0.95, bottom=0.08, top=0.9, wspace=0.38, hspace=0.22)   # no layout engine:
    axes = fig.subplots(2, 3, sharex=True).ravel()                                                # half the cost

    def panel(ax, title, lines, ylabel=None):
        drawn = False
        for col, label, style, color in lines:
            if col in h and h[col].notna().any():
                ok = h[col].notna()
                ax.plot(h["epoch"][ok], h[col][ok], style, color=color, label=label, markersize=4)
                drawn = True
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel or "")
        ax.grid(alpha=0.3)
        if len(lines) > 1 and drawn:
            ax.legend(fontsize=8)
        return drawn

    panel(axes[0], "losses", [("np_loss", "NP (prototypical)", ".-", "tab:blue"),
                              ("ce_loss", "softmax", ".-", "tab:orange")])
    panel(axes[1], "accuracy in the batch", [("np_acc", "NP", ".-", "tab:blue"),
                                             ("ce_acc", "softmax", ".-", "tab:orange")])
    panel(axes[2], "learning rate", [("lr", "lr", ".-", "tab:green")])
    axes[2].set_yscale("log")
    if panel(axes[3], "validation (monitoring)", [("valid_eer_pct", "EER", "o-", "tab:purple")], "EER (%)"):
        twin = axes[3].twinx()
        ok = h["valid_min_dcf"].notna()
        twin.plot(h["epoch"][ok], h["valid_min_dcf"][ok], "s--", color="tab:red", markersize=5, markerfacecolor="none",
                  label="minDCF(0.05)")
        twin.set_ylabel("minDCF(0.05)")
        axes[3].legend(axes[3].get_lines() + twin.get_lines(), ["EER", "minDCF(0.05)"], fontsize=8)
    else:
        axes[3].text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=axes[3].transAxes)
    panel(axes[4], "data wait (% of step time)", [("data_wait_pct", "share", ".-", "tab:brown")])
    panel(axes[5], "seconds per epoch", [("seconds", "training", ".-", "tab:gray"),
                                         ("valid_seconds", "validation", "o", "tab:purple")])
    for ax in axes[4:]:
        ax.set_ylim(bottom=0)
    for ax in axes[3:]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    fig.suptitle(f"{name}: training curves to epoch {int(h['epoch'].iloc[-1])}", fontsize=11)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)


def checkpoint_state(epoch, cfg, speakers, net, loss_fn, opt, sched, step, device, row):
    """Everything a resumption needs, as plain data (capsv.checkpoint)."""
    ts = unwrap(step)
    return {"epoch": epoch, "config": cfg, "speakers": speakers,
            "model": net.state_dict(), "loss": loss_fn.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": checkpoint.rng_state(device),
            "precision": ts.precision.record(), "scaler": ts.scaler.state_dict() if ts.scaler.is_enabled() else None,
            "log": row}


def fit(cfg, data, exp, device, part=SINGLE, valid=None):
    """Train `cfg` on `data` (a TrainingData) into `exp`, resuming from its newest checkpoint."""
    tc = cfg["train"]
    speakers = data.sampler.speakers
    net, loss_fn, opt, sched, step = build_training(cfg, len(speakers), device, part)
    models = os.path.join(exp, "models")
    state = resume(models, net, loss_fn, opt, sched, speakers, data.dir, part, unwrap(step).scaler, device)
    start = (state["epoch"] if state else 0) + 1
    if start > 1:
        log.info(f"resuming from {models} epoch {start - 1}")
    if part.rank == 0:
        with atomic_open(os.path.join(exp, "config.yaml")) as f:
            f.write(dump_config(cfg))

    world = part.world
    nparam = sum(p.numel() for p in net.parameters())
    ranks = f" x {world} ranks ({tc['speakers_per_batch'] // world} speakers of each batch per rank)" if world > 1 else ""
    log.info(f"{cfg['model']['pooling'].upper()} model, {nparam / 1e6:.3f} M parameters "
             f"(trunk {sum(p.numel() for p in net.trunk.parameters()) / 1e6:.3f} M), device {device}{ranks}; "
             f"{len(data.utt2spk)} utterances, {len(speakers)} speakers; batch {tc['speakers_per_batch']} x "
             f"{tc['utts_per_speaker']} crops of {tc['crop_frames']} frames")
    if valid is not None:
        log.info(f"validation every {valid.every} epochs: {len(valid.trials)} trials of {valid.trials_path} "
                 f"({len(valid.utts)} utterances of {valid.data_dir})")
    if start > tc["epochs"]:
        log.info(f"already trained for {tc['epochs']} epochs; nothing to do")
        return

    loader = EpisodeLoader(ArkReader(data.scp), data.nframes, tc["crop_frames"], cfg["seed"], (part.rank, part.world),
                           tc["num_workers"], pin_memory=device.type == "cuda", prefetch_factor=tc["prefetch_factor"])
    train_log = TrainLog(exp, start, state) if part.rank == 0 else None
    wait = between_epochs_group(part, tc)
    compiled = unwrap(step).switches.get("compile", False)
    graphs = None
    for epoch in range(start, tc["epochs"] + 1):
        t0 = time.time()
        batches = data.sampler.epoch(epoch)
        lr = opt.param_groups[0]["lr"]
        stats = train_epoch(step, opt, loader.epoch(epoch, batches), device, f"epoch {epoch}/{tc['epochs']}", part)
        sched.step()
        seconds = round(time.time() - t0, 2)
        if part.rank == 0:
            result = valid.run(net, device) if valid is not None and valid.due(epoch) else None
            row = {"epoch": epoch, **stats, "lr": lr, "batches": len(batches), "seconds": seconds, **(result or {})}
            checkpoint.save_checkpoint(models, epoch, checkpoint_state(epoch, cfg, speakers, net, loss_fn, opt, sched,
                                                                       step, device, row), keep=tc["keep_checkpoints"])
            train_log.append(row, last=epoch == tc["epochs"])
            report_epoch(epoch, stats, lr, len(batches), seconds, tc["num_workers"], result)
            if compiled:
                graphs = report_compile(epoch, graphs)
        if wait is not None:
            dist.barrier(group=wait)


def report_compile(epoch, graphs):
    """Log torch.compile's graphs after the first epoch, and warn when a later epoch compiled again."""
    now, breaks = compile_counts()
    if graphs is None:
        log.info(f"torch.compile: the trunk is {now} graph(s), {breaks} graph break(s)")
    elif now > graphs:
        log.warning(f"WARNING: torch.compile compiled the trunk again in epoch {epoch} ({now} graphs so far): "
                    f"its input's shape or a guard changed between epochs, which costs a compile each time")
    return now
