#!/usr/bin/env python3
"""The parts of local/gpu_check.sh, one per call, each appending its measurements to <work>/rows/<part>.jsonl
as it goes (a part stopped by its time bound keeps what it had measured); `table` turns them into one
Markdown file.

    python local/gpu_check.py PART --work DIR [--dry-run]      PART: env recipe step compile loader bench ddp
    python local/gpu_check.py table --work DIR --out FILE [--command 'CMD']   (with the projection of 500 epochs)

--dry-run: the same code on the CPU at toy sizes (a check of this script, not of a GPU).
"""
import argparse
import copy
import glob
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 5994                   # VoxCeleb2 dev speakers: the softmax layer of the paper's run
VOX2_UTTS, VOX2_SPEAKERS, EPOCHS = 1_092_009, 5_994, 500
PARTS = ["env", "recipe", "step", "compile", "loader", "bench", "ddp"]


class Rows:
    """Rows of one part: {part, what, value, note, data}; written at once, so a killed part keeps them."""

    def __init__(self, work, part):
        os.makedirs(os.path.join(work, "rows"), exist_ok=True)
        self.path, self.part = os.path.join(work, "rows", f"{part}.jsonl"), part
        open(self.path, "w").close()

    def add(self, what, value, note="", **data):
        with open(self.path, "a") as f:
            f.write(json.dumps({"part": self.part, "what": what, "value": value, "note": note, "data": data}) + "\n")
        print(f"{self.part}: {what}: {value}  {note}", flush=True)


def read_rows(work, part=None):
    rows = []
    for path in sorted(glob.glob(os.path.join(work, "rows", f"{part or '*'}.jsonl"))):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def the_device(dry):
    import torch
    if dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no GPU visible to torch (torch.cuda.is_available() is False); on a machine without "
                 "one, --dry-run true checks this script on the CPU")
    return torch.device("cuda")


def run(cmd, log_name, work, env=None):
    """A command of the recipe, its output in <work>/logs/<log_name>.txt; that output, or an error naming it."""
    path = os.path.join(work, "logs", f"{log_name}.txt")
    with open(path, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           env={**os.environ, **(env or {})})
    text = open(path).read()
    if r.returncode != 0:
        tail = "\n".join(text.strip().splitlines()[-15:])
        raise SystemExit(f"gpu_check: {' '.join(cmd[:4])} ... failed (exit {r.returncode}); {path} ends:\n{tail}")
    return text


def expect(text, pattern, what):
    m = re.search(pattern, text, re.M)
    if not m:
        raise SystemExit(f"gpu_check: {what}: no line matching '{pattern}'")
    return m


# env ------------------------------------------------------------------------------------------------------

def part_env(a, rows):
    import torch
    import torchaudio
    import kaldiio
    import soundfile
    from capsv.device import resolve_precision
    device = the_device(a.dry_run)
    if device.type == "cuda":
        n = torch.cuda.device_count()
        p = torch.cuda.get_device_properties(0)
        rows.add("GPU", p.name, f"{n} visible; compute capability {p.major}.{p.minor}, "
                 f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs", name=p.name)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.split()
            rows.add("NVIDIA driver", smi[0] if smi else "?")
        except (OSError, subprocess.SubprocessError):
            rows.add("NVIDIA driver", "? (no nvidia-smi)")
        rows.add("CUDA (torch's build)", torch.version.cuda)
        rows.add("cuDNN", str(torch.backends.cudnn.version()))
        nccl = torch.cuda.nccl.version()
        rows.add("NCCL", ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl))
        rows.add("native bf16", str(torch.cuda.is_bf16_supported()))
    else:
        rows.add("GPU", "none: dry run on the CPU", "toy sizes; no figure in this table is a GPU's", name="")
    rows.add("torch", torch.__version__, f"torchaudio {torchaudio.__version__}")
    rows.add("Python", sys.version.split()[0], sys.executable)
    where = {m.__name__: os.path.dirname(os.path.abspath(m.__file__)) for m in (kaldiio, soundfile)}
    rows.add("kaldiio, soundfile", f"{kaldiio.__version__}, {soundfile.__version__}",
             f"from {where['kaldiio']}; libsndfile {soundfile.__libsndfile_version__}", where=where)
    rows.add("train.amp / eval.precision auto", str(resolve_precision("auto", device)))
    rows.add("CPUs", str(os.cpu_count()), f"torch threads {torch.get_num_threads()}")


# recipe ---------------------------------------------------------------------------------------------------

def recipe_opts(device, dry):
    """Config overrides of the tiny runs: the config's precision and switches (auto: AMP on a GPU); a dry run
    with short crops (the CPU's bf16 path is the step part's)."""
    opts = f"train.speakers_per_batch=4 train.num_workers=2 device={device.type}"
    return opts + (" train.crop_frames=100 eval.num_crops=3 eval.crop_frames=100" if dry else "")


def part_recipe(a, rows):
    """run.sh on the tiny corpus with AMP: stages 0-2 (2 epochs), then stages 2-4 (a resumed 3rd epoch, scoring)."""
    device = the_device(a.dry_run)
    w = a.work
    opts = recipe_opts(device, a.dry_run)

    def recipe(epochs, *args):
        return ["bash", "run.sh", "--synth-size", "tiny", "--nj", "1" if a.dry_run else "2", "--data", f"{w}/data",
                "--fbankdir", f"{w}/fbank", "--corpusdir", f"{w}/corpus", "--exp", f"{w}/exp",
                "--train-opts", f"{opts} train.epochs={epochs}", *args]
    log = f"{w}/exp/mini_cap/log/train.log"
    t0 = time.time()
    run(recipe(2, "--stop-stage", "2"), "recipe_0-2", w)
    text = open(log).read()
    expect(text, rf"device {device.type}", "stage 2's log")
    prec = expect(text, r"precision (.*?);", "stage 2's log").group(1)
    loss2 = expect(text, r"epoch 2: loss ([\d.]+)", "stage 2's log").group(1)
    rows.add("stages 0-2, 2 epochs", f"{time.time() - t0:.0f} s", f"precision {prec}; epoch 2 loss {loss2}")
    t0 = time.time()
    run(recipe(3, "--stage", "2", "--stop-stage", "4"), "recipe_2-4", w)
    text = open(log).read()
    expect(text, r"resuming from .* epoch 2", "the resumed run's log")
    m = expect(text, r"epoch 3: loss ([\d.]+).* ([\d.]+) s, data wait", "the resumed run's log")
    rows.add("stage 2 resumed: 3rd epoch", f"{float(m.group(2)):.0f} s",
             f"resumed from epoch 2; epoch 3 loss {m.group(1)}")
    res = [line.split() for line in open(f"{w}/exp/mini_cap/results.txt") if not line.startswith("#")]
    eer, dcf = res[0][1], res[0][2]
    meta = json.load(open(glob.glob(f"{w}/exp/mini_cap/scores/*.score.json")[0]))
    rows.add("stages 3-4: EER, minDCF(0.05)", f"{eer} %, {dcf}",
             f"stages 2-4 {time.time() - t0:.0f} s; scored at {meta.get('precision')} on {meta.get('device_type')} "
             f"(tiny corpus, 3 epochs: a smoke test, not a result)", eer=float(eer))


# step, compile ---------------------------------------------------------------------------------------------

def step_combos(device, compile_only):
    """(label, pooling, train overrides, extra) rows; every switch on and off, each amp."""
    off = {"amp": "off", "tf32": False, "channels_last": False, "compile": False}
    if compile_only:
        return [("CAP bf16 + tf32 + channels_last + compile", "cap",
                 {**off, "amp": "bf16", "tf32": True, "channels_last": True, "compile": True}, {})]
    fast = {**off, "tf32": True, "channels_last": True}
    return [
        ("CAP fp32, all switches off (reference)", "cap", off, {}),
        ("CAP fp32 + tf32", "cap", {**off, "tf32": True}, {}),
        ("CAP fp32 + channels_last", "cap", {**off, "channels_last": True}, {}),
        ("CAP bf16", "cap", {**off, "amp": "bf16"}, {}),
        ("CAP fp16 (+ GradScaler)", "cap", {**off, "amp": "fp16"}, {}),
        ("CAP fp32 + tf32 + channels_last", "cap", fast, {}),
        ("CAP bf16 + tf32 + channels_last", "cap", {**fast, "amp": "bf16"}, {}),
        ("CAP fp16 + tf32 + channels_last", "cap", {**fast, "amp": "fp16"}, {}),
        ("CAP config defaults + cudnn.benchmark", "cap", {}, {"cudnn_benchmark": True}),
        ("TAP config defaults", "tap", {}, {}),
    ]


def resolved(tc, device):
    """What a train config's switches come to on `device`, for naming the config defaults' row."""
    from capsv.device import resolve_precision, resolve_switch
    return (resolve_precision(tc["amp"], device).name,) + tuple(
        resolve_switch(tc[k], device) for k in ("tf32", "channels_last", "compile"))


def timed_steps(cfg, device, batch, warm, timed, label):
    """(first-step loss, loss after the timed steps, seconds a step, set-up + warm-up seconds, peak memory) of
    training as capsv.bin.train builds and runs it, on one batch over and over."""
    import torch
    from capsv.trainer import build_training, train_epoch
    t_build = time.perf_counter()
    net, loss_fn, opt, sched, step = build_training(cfg, CLASSES, device)
    # the first step: the same weights (build_training seeds them) and batch in every row
    first = train_epoch(step, opt, [batch], device, label)["loss"]
    train_epoch(step, opt, [batch] * (warm - 1), device, label)   # compile, autotune
    sync(device)
    t_build = time.perf_counter() - t_build
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    last = train_epoch(step, opt, [batch] * timed, device, label)["loss"]
    sync(device)
    sec = (time.perf_counter() - t0) / timed
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else "n/a (CPU)"
    return first, last, sec, t_build, peak


def part_step(a, rows, compile_only=False):
    """A training step at the paper's batch (capsv's own build_training / train_epoch) with each switch."""
    import torch
    from capsv.config import load_config
    device = the_device(a.dry_run)
    cfg0 = load_config(os.path.join(ROOT, "conf", "cap.yaml"))
    cfg0["device"] = device.type
    tc0 = cfg0["train"]
    n, m, t = (tc0["speakers_per_batch"], tc0["utts_per_speaker"], tc0["crop_frames"]) if not a.dry_run else (2, 3, 40)
    if compile_only and a.dry_run:
        # inductor builds C++ for minutes on a small CPU: a dry run traces with dynamo and runs its graphs eagerly
        module_compile = torch.nn.Module.compile
        torch.nn.Module.compile = lambda self, *args, **kw: module_compile(self, *args, **{"backend": "eager", **kw})
    warm, timed = (3, 10) if not a.dry_run else (1, 1)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(n, m, t, cfg0["model"]["n_mels"], generator=g).to(device)
    speakers = torch.arange(n, device=device)
    defaults = resolved(tc0, device)
    reference = next((r["data"] for r in read_rows(a.work, "step") if r["data"].get("reference")), None)
    failed = []
    for label, pooling, overrides, extra in step_combos(device, compile_only):
        if compile_only and a.dry_run:
            label += " (dry run: dynamo, eager backend)"
        cfg = copy.deepcopy(cfg0)
        cfg["model"]["pooling"] = pooling
        cfg["train"].update(overrides)
        torch.backends.cudnn.benchmark = bool(extra.get("cudnn_benchmark"))
        try:
            first, last, sec, t_build, peak = timed_steps(cfg, device, (feats, speakers), warm, timed, label)
        except Exception as e:   # a switch that fails here is a finding: the other rows still run
            import traceback
            traceback.print_exc()
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            rows.add(label, "FAILED", f"{type(e).__name__}: {msg}")
            failed.append(label)
            continue
        finally:
            torch.backends.cudnn.benchmark = False
            if device.type == "cuda":
                torch.cuda.empty_cache()
        is_ref = label.endswith("(reference)")
        if is_ref:
            reference = {"first": first}
        agree = f"first-step loss {first:.4f}"
        if reference and not is_ref and pooling == "cap":   # the same weights and batch: only precision differs
            agree += f" ({(first - reference['first']) / reference['first']:+.1e} vs fp32)"
        is_default = not extra and pooling == "cap" and resolved(cfg["train"], device) == defaults
        rows.add(f"{label}{' = conf/cap.yaml on this device' if is_default else ''}",
                 f"{n * m / sec:.0f} segments/s",
                 f"{1000 * sec:.1f} ms/step, peak {peak}; {agree}; loss {last:.4f} after {warm + timed} steps; "
                 f"set-up + {warm} steps {t_build:.1f} s",
                 ms=1000 * sec, pooling=pooling, first=first, last=last, reference=is_ref, default=is_default,
                 batch=[n, m, t])
    cap = [r["data"] for r in read_rows(a.work, "step") if r["data"].get("default") and r["data"]["pooling"] == "cap"]
    tap = [r["data"] for r in read_rows(a.work, "step") if r["data"].get("pooling") == "tap"]
    if cap and tap and not compile_only:
        rows.add("CAP / TAP step time, config defaults", f"{cap[0]['ms'] / tap[0]['ms']:.2f}",
                 f"CAP {cap[0]['ms']:.1f} ms, TAP {tap[0]['ms']:.1f} ms")
    if failed:
        sys.exit(f"gpu_check: failed: {', '.join(failed)}")


# loader ---------------------------------------------------------------------------------------------------

def part_loader(a, rows):
    """The data-wait share of training at the paper's batch, crops read from ark files by the paper's workers."""
    import kaldiio
    import numpy as np
    from capsv.trainer import build_training, train_epoch
    from capsv.config import load_config
    from capsv.data import ArkReader, EpisodeLoader, EpisodicBatches, read_data_dir
    device = the_device(a.dry_run)
    cfg = load_config(os.path.join(ROOT, "conf", "cap.yaml"))
    cfg["device"] = device.type
    tc = cfg["train"]
    if a.dry_run:
        n_spk, utts, frames, workers = 4, 6, 120, 2
        tc.update(speakers_per_batch=n_spk, crop_frames=60)
    else:
        n_spk, utts, frames, workers = 240, 24, 260, tc["num_workers"]   # 8 batches an epoch, 240 MB of arks
    d = os.path.join(a.work, "loader_data")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    keys = [f"s{s:04d}-u{u:02d}" for s in range(n_spk) for u in range(utts)]
    t0 = time.time()
    with kaldiio.WriteHelper(f"ark,scp:{d}/feats.ark,{d}/feats.scp") as wr:
        for k in keys:
            wr(k, rng.standard_normal((frames, cfg["model"]["n_mels"]), dtype=np.float32))
    with open(f"{d}/utt2spk", "w") as f:
        f.writelines(f"{k} {k.split('-')[0]}\n" for k in keys)
    with open(f"{d}/utt2num_frames", "w") as f:
        f.writelines(f"{k} {frames}\n" for k in keys)
    print(f"wrote {len(keys)} utterances in {time.time() - t0:.1f} s", flush=True)
    utt2spk, nframes, scp = read_data_dir(d)
    sampler = EpisodicBatches(utt2spk, tc["speakers_per_batch"], tc["utts_per_speaker"], cfg["seed"])
    loader = EpisodeLoader(ArkReader(scp), nframes, tc["crop_frames"], cfg["seed"], (0, 1), workers,
                           pin_memory=device.type == "cuda", prefetch_factor=tc["prefetch_factor"])
    # the loader alone: how many batches a second it can give (epoch 1 starts the persistent workers)
    for epoch in (1, 2):
        t0 = time.perf_counter()
        nb = 0
        for x, _ in loader.epoch(epoch, sampler.epoch(epoch)):
            x.to(device, non_blocking=True)
            nb += 1
        sync(device)
        alone = nb / (time.perf_counter() - t0)
    net, loss_fn, opt, sched, step = build_training(cfg, len(sampler.speakers), device)
    waits, secs, batches = [], 0.0, 0
    for epoch in (3, 4, 5):
        b = sampler.epoch(epoch)
        t0 = time.perf_counter()
        stats = train_epoch(step, opt, loader.epoch(epoch, b), device, f"loader epoch {epoch}")
        sync(device)
        secs += time.perf_counter() - t0
        batches += len(b)
        waits.append(stats["data_wait"])
    share = sum(waits) / len(waits)
    crop = tc["crop_frames"]
    rows.add(f"data-wait share of training, {tc['speakers_per_batch']} x {tc['utts_per_speaker']} crops of "
             f"{crop} frames, {workers} workers", f"{100 * share:.1f} %",
             f"3 epochs of {len(b)} batches: {1000 * secs / batches:.0f} ms/step with the config's switches; "
             f"the loader alone {alone:.1f} batches/s (arks in the page cache; a step needs "
             f"{batches / secs:.1f}/s)", share=share, workers=workers, alone=alone, step_per_s=batches / secs)


# bench ----------------------------------------------------------------------------------------------------

def part_bench(a, rows):
    """capsv.bin.bench's scoring and embedding figures on this device."""
    from capsv.bin import bench
    device = the_device(a.dry_run)
    args = argparse.Namespace(quick=a.dry_run, repeats=1 if a.dry_run else 3)
    for name in ("scoring", "embedding"):
        for r in bench.BENCHES[name](args, device):
            rows.add(r["what"], r["value"], r["vs"])


# ddp ------------------------------------------------------------------------------------------------------

def part_ddp(a, rows):
    """torchrun with one rank (nccl on CUDA, gloo on the CPU) through DDP; then a resume in one process."""
    device = the_device(a.dry_run)
    w = a.work
    data = f"{w}/data/synth_train"
    if not os.path.exists(f"{data}/feats.scp"):
        raise SystemExit(f"gpu_check: {data}/feats.scp is missing: the recipe part makes it")
    exp = f"{w}/exp_ddp1"
    common = ["--config", "conf/mini/cap.yaml", "--data", data, "--exp", exp, *recipe_opts(device, a.dry_run).split()]
    t0 = time.time()
    text = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                "-m", "capsv.bin.train", *common, "train.epochs=1"], "ddp_torchrun", w,
               env={"OMP_NUM_THREADS": "1", "NCCL_DEBUG": "INFO"})
    expect(text, r"epoch 1: loss", "the torchrun run")
    backend = "gloo"
    if device.type == "cuda":
        expect(text, r"NCCL INFO", "the torchrun run (NCCL_DEBUG=INFO)")
        backend = "nccl"
    rows.add(f"torchrun, 1 rank ({backend}, DDP), 1 epoch", f"{time.time() - t0:.0f} s", "ok")
    t0 = time.time()
    text = run([sys.executable, "-m", "capsv.bin.train", *common, "train.epochs=2"], "ddp_resume", w)
    expect(text, r"resuming from .* epoch 1", "the 1-process resume")
    expect(text, r"epoch 2: loss", "the 1-process resume")
    rows.add("its checkpoint resumed in one process, epoch 2", f"{time.time() - t0:.0f} s", "ok")


# project --------------------------------------------------------------------------------------------------

def vox2_batches():
    """Batches per epoch of VoxCeleb2 dev at 200 x 3, and how that number was got."""
    utt2spk = os.path.join(ROOT, "data", "vox2_dev", "utt2spk")
    if os.path.exists(utt2spk):   # the real per-speaker counts, when VoxCeleb2 is prepared here
        from capsv.data import EpisodicBatches
        with open(utt2spk) as f:
            return len(EpisodicBatches(dict(line.split() for line in f), 200, 3, 1).epoch(1)), \
                "data/vox2_dev/utt2spk, exact"
    # The sampler cuts each speaker's utterances into groups of 3 (a remainder of 0-2 waits), and packs 200
    # groups of distinct speakers a batch: with a mean remainder of 1, (1,092,009 - 5,994) / 3 groups.
    groups = (VOX2_UTTS - VOX2_SPEAKERS) // 3
    return groups // 200, (f"({VOX2_UTTS:,} utterances - {VOX2_SPEAKERS:,} speakers x a mean remainder of 1) / 3 = "
                           f"{groups:,} groups of 3, / 200 a batch")


def project_rows(work):
    """The paper's 500 epochs of VoxCeleb2 on one of these GPUs, from the step, compile and loader rows
    (arithmetic only: the table recomputes it whenever it is written)."""
    steps = [r["data"] for r in read_rows(work) if r["part"] in ("step", "compile") and "ms" in r["data"]
             and r["data"]["pooling"] == "cap"]
    if not steps:
        return []
    loader = [r["data"] for r in read_rows(work, "loader") if "share" in r["data"]]
    toy = any(r["what"] == "GPU" and not r["data"].get("name") for r in read_rows(work, "env"))
    nb, how = vox2_batches()
    out = [{"part": "project", "what": "VoxCeleb2 dev batches per epoch", "value": f"{nb:,}", "note": how}]
    share = loader[0]["share"] if loader else 0.0
    wait = f"data wait {100 * share:.1f} %" if loader else "data wait not measured, taken as 0"
    for name, s in [("config defaults", next((s for s in steps if s.get("default")), None)),
                    ("fastest row", min(steps, key=lambda s: s["ms"]))]:
        if s is None:
            continue
        hours = EPOCHS * nb * s["ms"] / 1000 / 3600 / (1 - min(share, 0.99))
        out.append({"part": "project", "what": f"{EPOCHS} epochs on one GPU, {name}",
                    "value": f"{hours:.1f} h = {hours / 24:.2f} days",
                    "note": f"{EPOCHS} x {nb:,} steps x {s['ms']:.1f} ms, / (1 - {wait})"
                            + (" (CPU toy batch: not a projection)" if toy else "")})
    return out


# table ----------------------------------------------------------------------------------------------------

def cell(x):
    return str(x).replace("|", "\\|").replace("\n", " ")


def write_table(a):
    rows = read_rows(a.work) + project_rows(a.work)
    status = []
    if os.path.exists(os.path.join(a.work, "status.tsv")):
        with open(os.path.join(a.work, "status.tsv")) as f:
            status = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    gpu = next((r["value"] for r in rows if r["what"] == "GPU"), "?")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or "unknown (no .git here)"
    except OSError:
        commit = "unknown (no git here)"
    lines = [f"# gpu_check: {gpu}", "",
             f"commit {commit}; command `{a.command}`; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", "",
             "| part | status | seconds | time bound (s) |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(cell(x) for x in s)} |" for s in status]
    lines += ["", "| part | measurement | value | note |", "|---|---|---|---|"]
    order = {p: i for i, p in enumerate(PARTS + ["project"])}
    for r in sorted(rows, key=lambda r: order.get(r["part"], 99)):   # stable: each part's rows in their order
        lines.append(f"| {r['part']} | {cell(r['what'])} | {cell(r['value'])} | {cell(r['note'])} |")
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, a.out)


PART_FNS = {"env": part_env, "recipe": part_recipe, "step": part_step,
            "compile": lambda a, rows: part_step(a, rows, compile_only=True),
            "loader": part_loader, "bench": part_bench, "ddp": part_ddp}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=PARTS + ["table"])
    p.add_argument("--work", required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out", help="table: the Markdown file to write")
    p.add_argument("--command", default="bash local/gpu_check.sh", help="table: the command, as run")
    a = p.parse_args()
    a.work = os.path.abspath(a.work)
    os.makedirs(os.path.join(a.work, "logs"), exist_ok=True)
    if a.part == "table":
        return write_table(a)
    PART_FNS[a.part](a, Rows(a.work, a.part))


if __name__ == "__main__":
    main()
