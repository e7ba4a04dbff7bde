#!/usr/bin/env bash
# What only a GPU can show, in a few minutes on one (bash local/gpu_check.sh on a GPU machine):
#   1. the recipe on the tiny embedded corpus with AMP on the GPU: stages 0-2 for 2 epochs, a
#      resumed 3rd epoch, scoring and metrics (stages 3-4);
#   2. the DDP path: with 2+ GPUs, run.sh --ngpu 2 for 2 epochs, a 1-GPU resume, and the
#      SyncBatchNorm equivalence test (2 GPUs in training mode = 1 GPU); with one GPU, torchrun
#      with a single rank (nccl, DDP) and a plain resume;
#   3. python -m capsv.bin.bench on cuda (its GPU parts, once each), when that module exists;
#   4. the loader: batches per second of the paper's batch (200 x 3 crops of 2 s) from ark files
#      with the paper config's workers;
#   5. a training step at the paper's batch (conf/cap.yaml, 5,994 classes) with each switch
#      (train.amp, tf32, channels_last, compile) on and off, in segments per second, and the
#      projected time of the paper's 500 epochs on VoxCeleb2.
# It stops at the first failure (exit 1, the failed step's log tail) and ends with a summary.
# --dry-run runs the same steps on the CPU at toy sizes: a check of this script, not of a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

work=""          # where corpora, features, experiments and logs go (default: a new /tmp/gpu_check.*)
dry_run=false    # the same steps on the CPU at toy sizes
help_message="usage: bash local/gpu_check.sh [--work DIR] [--dry-run true]"

. ./path.sh
. steps/parse_options.sh || exit 1

[ -n "$work" ] || work=$(mktemp -d /tmp/gpu_check.XXXXXX)
mkdir -p "$work/logs"
work=$(realpath "$work")
device=cuda
$dry_run && device=cpu
summary=()
t_all=$(date +%s)

print_summary() {
  echo
  echo "==== gpu_check summary ($device, work dir $work, $(( $(date +%s) - t_all )) s)"
  printf '  %s\n' "${summary[@]}"
  for f in gpus results bench.md throughput; do
    [[ $f == *.* ]] || f=$f.txt
    [ -s "$work/logs/$f" ] && sed 's/^/  /' "$work/logs/$f"
  done
  return 0
}

# step NAME command...: the command's output in $work/logs/NAME.log; the first failure ends the check.
step() {
  local name=$1 t0 rc=0
  shift
  t0=$(date +%s)
  echo "== $name (log $work/logs/$name.log)"
  # in the background, so that set -e holds inside the step (a function run in a `||` list would
  # carry on past a failed command)
  "$@" > "$work/logs/$name.log" 2>&1 < /dev/null &
  wait $! || rc=$?
  if [ "$rc" -ne 0 ]; then
    summary+=("FAIL $name ($(( $(date +%s) - t0 )) s)")
    echo "---- the last lines of $work/logs/$name.log:"
    tail -n 30 "$work/logs/$name.log"
    print_summary
    echo "gpu_check: FAILED at $name" >&2
    exit 1
  fi
  summary+=("ok   $name ($(( $(date +%s) - t0 )) s)")
}

skip() { summary+=("skip $1 ($2)"); echo "== $1: skipped ($2)"; }

recipe() {   # run.sh on the tiny corpus in $work, with the training overrides of this check
  local train_opts=$1
  shift
  bash run.sh --synth-size tiny --data "$work/data" --fbankdir "$work/fbank" --corpusdir "$work/corpus" \
    --train-opts "train.speakers_per_batch=4 train.num_workers=2 device=$device train.amp=true $train_opts" "$@"
}

expect() {   # expect FILE PATTERN: fail, naming both, unless FILE has a line matching PATTERN
  grep -Eq "$2" "$1" || { echo "gpu_check: $1 has no line matching '$2'"; return 1; }
}

gpus() {
  python - "$device" <<'EOF' | tee "$work/logs/gpus.txt"
import sys, torch
if sys.argv[1] == "cpu":
    print(f"dry run on the CPU, torch {torch.__version__}")
    sys.exit(0)
if not torch.cuda.is_available():
    sys.exit("no GPU visible to torch (torch.cuda.is_available() is False); this check needs one")
names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(f"{len(names)} GPU(s): {', '.join(names)}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, bf16 {torch.cuda.is_bf16_supported()}")
EOF
}

train_2_epochs() {
  recipe "train.epochs=2" --exp "$work/exp" --stop-stage 2
  expect "$work/exp/mini_cap/log/train.log" "device $device"
  expect "$work/exp/mini_cap/log/train.log" "epoch 2: loss"
}

resume_3rd_epoch() {
  recipe "train.epochs=3" --exp "$work/exp" --stage 2 --stop-stage 2
  expect "$work/exp/mini_cap/log/train.log" "resuming from .* epoch 2"
  expect "$work/exp/mini_cap/log/train.log" "epoch 3: loss"
}

score() {
  recipe "train.epochs=3" --exp "$work/exp" --stage 3 --stop-stage 4
  { echo "tiny corpus, 3 epochs, AMP:"; cat "$work/exp/mini_cap/results.txt"; } > "$work/logs/results.txt"
}

ddp_two_gpus() {   # 2 ranks through run.sh (torchrun --standalone), a resume on 1, the SyncBN equivalence
  recipe "train.epochs=2" --exp "$work/exp_ddp" --stage 2 --stop-stage 2 --ngpu 2
  expect "$work/exp_ddp/mini_cap/log/train.log" "torchrun --standalone --nnodes 1 --nproc-per-node 2"
  expect "$work/exp_ddp/mini_cap/log/train.log" "x 2 ranks"
  expect "$work/exp_ddp/mini_cap/log/train.log" "epoch 2: loss"
  recipe "train.epochs=3" --exp "$work/exp_ddp" --stage 2 --stop-stage 2 --ngpu 1
  expect "$work/exp_ddp/mini_cap/log/train.log" "resuming from .* epoch 2"
  if [ "$device" = cuda ]; then
    python -m pytest -q tests/test_distributed.py -k "gpus or one_process"
  fi
}

ddp_one_gpu() {   # torchrun with one rank: nccl, DDP and the rank-0 writer on this GPU; then a plain resume
  local exp=$work/exp_ddp1 opts="model.pooling=cap train.speakers_per_batch=4 train.num_workers=2 device=$device"
  OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 1 -m capsv.bin.train --config conf/mini/cap.yaml \
    --data "$work/data/synth_train" --exp "$exp" $opts train.epochs=2
  python -m capsv.bin.train --config conf/mini/cap.yaml --data "$work/data/synth_train" --exp "$exp" $opts \
    train.epochs=3 2>&1 | tee "$work/logs/ddp1_resume.txt"
  expect "$work/logs/ddp1_resume.txt" "resuming from .* epoch 2"
}

bench() {   # the recipe's own benchmarks that a GPU runs, once per figure (--quick for the dry run)
  local args=(--device "$device" --repeats 1 --out "$work/logs/bench.md" --only pooling train_step scoring embedding)
  $dry_run && args+=(--quick)
  python -m capsv.bin.bench "${args[@]}"
}

loader() {   # the paper's batch from ark files: is the loader faster than a GPU step?
  python - "$work" "$device" <<'EOF'
import os, sys, time
import kaldiio, numpy as np, torch
from capsv.config import load_config
from capsv.data import ArkReader, EpisodeLoader, EpisodicBatches, read_data_dir

work, device = sys.argv[1], sys.argv[2]
tc = load_config("conf/cap.yaml")["train"]
n, m, utts, frames = (tc["speakers_per_batch"], 3, 15, 400) if device == "cuda" else (8, 3, 6, 250)
d = f"{work}/loader_data"
if not os.path.exists(f"{d}/utt2num_frames"):   # n speakers x utts utterances of 4 s, random features
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    keys = [f"s{s:04d}-u{u:02d}" for s in range(n) for u in range(utts)]
    with kaldiio.WriteHelper(f"ark,scp:{d}/feats.ark,{d}/feats.scp") as w:
        for k in keys:
            w(k, rng.standard_normal((frames, 40), dtype=np.float32))
    with open(f"{d}/utt2spk", "w") as f:
        f.writelines(f"{k} {k.split('-')[0]}\n" for k in keys)
    with open(f"{d}/utt2num_frames", "w") as f:
        f.writelines(f"{k} {frames}\n" for k in keys)
utt2spk, nframes, scp = read_data_dir(d)
sampler = EpisodicBatches(utt2spk, n, m, 1)
workers = tc["num_workers"] if device == "cuda" else 2
loader = EpisodeLoader(ArkReader(scp), nframes, tc["crop_frames"], 1, (0, 1), workers,
                       pin_memory=device == "cuda", prefetch_factor=tc["prefetch_factor"])
count, t0 = 0, None
for epoch in range(1, 5):          # epoch 1 starts the (persistent) workers and is not timed
    for x, s in loader.epoch(epoch, sampler.epoch(epoch)):
        x = x.to(device, non_blocking=True)
        count += t0 is not None
    if t0 is None:
        t0 = time.perf_counter()
rate = count / (time.perf_counter() - t0)
print(f"loader: {rate:.1f} batches/s ({rate * n * m:.0f} crops/s) of {n} x {m} crops of {tc['crop_frames']} "
      f"frames, {workers} workers, arks in the page cache")
with open(f"{work}/logs/loader_rate", "w") as f:
    f.write(f"{rate} {workers}\n")
EOF
}

throughput() {   # the training step at the paper's batch with each switch, and the paper's schedule
  python - "$work" "$device" <<'EOF'
import copy, os, sys, time, traceback
import torch
from capsv.bin import train
from capsv.config import load_config

work, device = sys.argv[1], torch.device(sys.argv[2])
cuda = device.type == "cuda"
cfg0 = load_config("conf/cap.yaml")
cfg0["device"] = device.type
n, m, t = (200, 3, cfg0["train"]["crop_frames"]) if cuda else (8, 3, 200)
warm, timed = (3, 10) if cuda else (1, 2)
feats, speakers = torch.randn(n, m, t, 40, device=device), torch.arange(n, device=device)
off = dict(amp=False, tf32=False, channels_last=False, compile=False)
defaults = {k: cfg0["train"][k] for k in off}
combos = [("all off (fp32)", off), ("tf32", {**off, "tf32": True}), ("amp (bf16)", {**off, "amp": True}),
          ("amp + channels_last", {**off, "amp": True, "channels_last": True}),
          ("amp + tf32 + channels_last", {**off, "amp": True, "tf32": True, "channels_last": True}),
          ("amp + tf32 + channels_last + compile", {**off, "amp": True, "tf32": True, "channels_last": True,
                                                    "compile": True})]
rows, failed = [], []
for label, switches in combos:
    cfg = copy.deepcopy(cfg0)
    cfg["train"].update(switches)
    try:
        net, loss_fn, opt, sched, step = train.build_training(cfg, 5994, device)
        train.train_epoch(step, opt, [(feats, speakers)] * warm, device, "warm-up")   # compile, cuDNN autotune
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        train.train_epoch(step, opt, [(feats, speakers)] * timed, device, "timed")
        if cuda:
            torch.cuda.synchronize()
        sec = (time.perf_counter() - t0) / timed
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
        rows.append((label, switches, sec, peak))
    except Exception as e:   # a switch that does not work here is a finding: report it, fail at the end
        traceback.print_exc()
        failed.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    finally:
        net = loss_fn = opt = sched = step = None
        if cuda:
            torch.cuda.empty_cache()

# VoxCeleb2 dev, from the sampler's logic: each epoch cuts every speaker's utterances into groups of
# 3 (the remainder waits for the next epoch) and packs 200 groups of distinct speakers per step.
utts, spk = 1_092_009, 5_994
groups = utts // 3 - spk // 3   # n mod 3 is 1 on average over speakers: a third of a group lost per speaker
steps = groups // 200
src = "estimate from the dataset's totals"
if os.path.exists("data/vox2_dev/utt2spk"):   # the real per-speaker counts, when prepared here
    from capsv.data import EpisodicBatches
    with open("data/vox2_dev/utt2spk") as f:
        steps = len(EpisodicBatches(dict(l.split() for l in f), 200, 3, 1).epoch(1))
    src = "data/vox2_dev, exact"
out = [f"training step, batch {n} x {m} crops of {t} frames, CAP, {device}:",
       f"  {'switches':38s} {'ms/step':>8s} {'segments/s':>11s} {'peak GB':>8s}"]
for label, switches, sec, peak in rows:
    mark = "  <- config defaults" if switches == defaults else ""
    out.append(f"  {label:38s} {1000 * sec:8.1f} {n * m / sec:11.0f} {peak:8.2f}{mark}")
out += [f"  FAILED {f}" for f in failed]
if rows:
    best = min(rows, key=lambda r: r[2])
    total = 500 * steps * best[2]
    out.append(f"paper schedule: 500 epochs x {steps} steps of 200 speakers ({src}: {utts:,} utterances, {spk:,} "
               f"speakers, about {groups:,} groups of 3 per epoch)")
    out.append(f"  at {1000 * best[2]:.1f} ms/step ({best[0]}) on one GPU: {total / 3600:.0f} h = "
               f"{total / 86400:.1f} days of steps" + ("" if cuda else " (CPU toy batch: meaningless)"))
    out.append(f"  on G GPUs at the same global batch: at best {total / 86400:.1f}/G days (linear scaling, "
               f"unmeasured; run --ngpu G and read train_log.csv's seconds)")
    try:
        rate, workers = open(f"{work}/logs/loader_rate").read().split()
        need = 1 / best[2]
        verdict = "keeps up" if float(rate) >= need else "DOES NOT keep up"
        out.append(f"  loader: {float(rate):.1f} batches/s with {workers} workers vs {need:.1f} steps/s: {verdict}")
    except (OSError, ValueError):
        pass
print("\n".join(out))
with open(f"{work}/logs/throughput.txt", "w") as f:
    f.write("\n".join(out) + "\n")
sys.exit(1 if failed else 0)
EOF
}

step gpus gpus
step train_2_epochs train_2_epochs
step resume_3rd_epoch resume_3rd_epoch
step score score
ngpu=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -ge 2 ] || $dry_run; then
  step ddp_two_ranks ddp_two_gpus
else
  step ddp_one_gpu ddp_one_gpu
fi
if [ -f pysrc/capsv/bin/bench.py ]; then step bench bench; else skip bench "no capsv.bin.bench yet"; fi
step loader loader
step throughput throughput
print_summary
echo "gpu_check: all passed"
