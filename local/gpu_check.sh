#!/usr/bin/env bash
# What only a GPU can show, in one call of about 8 minutes on one GPU, answered in one table:
#   bash local/gpu_check.sh --out DIR                                        # a machine with .venv
#   CAPSV_PYTHON=python3 PIP_NO_INDEX=1 bash local/gpu_check.sh --out DIR    # no network (doc/gpu.md)
# Parts (local/gpu_check.py), each under its own time bound, in this order:
#   env      the GPU, driver, torch / CUDA / cuDNN / NCCL versions, what precision `auto` picks
#   recipe   run.sh on the tiny corpus with AMP: stages 0-2 (2 epochs), a resumed 3rd epoch, stages 3-4
#   step     a training step at the paper's batch (200 x 3 crops of 200 frames, 5,994 classes) through
#            capsv's own build_training / train_epoch, segments per second with each switch (tf32,
#            channels_last) on and off and train.amp off / bf16 / fp16, the first-step loss of each
#            against fp32; the config defaults; TAP beside CAP
#   loader   the data-wait share of training at that batch, crops from ark files, the paper's workers
#   bench    capsv.bin.bench's scoring (ms per trial) and embedding (trunk ms per utterance)
#   ddp      torchrun with one rank (nccl), DDP, then the checkpoint resumed in one process
#   compile  the step with train.compile (inductor builds its kernels: the slowest part, so last)
# and the table projects the paper's 500 epochs of VoxCeleb2 on this GPU from the step and loader rows.
# DIR/gpu_check.md: the table (rewritten after every part, so a run cut short keeps what it measured);
# DIR/gpu_check.log: the end of every part's log. Exit 1 if any part failed or ran out of time.
# With CAPSV_PYTHON, the packages that Python lacks (kaldiio, soundfile, cffi, pycparser) are installed
# from --wheels (local/gpu_wheels.sh fills it) with pip install --no-index --target, and put on PYTHONPATH.
# --dry-run true runs the same parts on the CPU at toy sizes: a check of this script, not of a GPU.
set -euo pipefail
caller=$PWD
cmdline="bash local/gpu_check.sh $*"
for v in CAPSV_PYTHON PIP_NO_INDEX; do [ -z "${!v:-}" ] || cmdline="$v=${!v} $cmdline"; done
cd "$(dirname "$0")/.."

out=""           # the folder for gpu_check.md (the table) and gpu_check.log (default: the work dir)
work=""          # corpus, features, experiments, each part's log (default: a new /tmp/gpu_check.*)
dry_run=false    # the same parts on the CPU at toy sizes
budget_s=""      # the whole check ends within this many seconds (default 540; 1800 with --dry-run)
wheels=wheels    # with CAPSV_PYTHON: wheels of what that Python lacks (bash local/gpu_wheels.sh)
help_message="usage: [CAPSV_PYTHON=python3] bash local/gpu_check.sh [--out DIR] [--work DIR] [--dry-run true]
       [--budget-s S] [--wheels DIR]"

. steps/parse_options.sh || exit 1
[ $# -eq 0 ] || { echo "gpu_check.sh: ERROR: unexpected argument '$1'; $help_message" >&2; exit 1; }
abs() { case $1 in /*) echo "$1" ;; *) echo "$caller/$1" ;; esac; }
[ "$wheels" = wheels ] && wheels=$PWD/wheels || wheels=$(abs "$wheels")
made_work=false
if [ -z "$work" ]; then work=$(mktemp -d /tmp/gpu_check.XXXXXX); made_work=true; fi
work=$(abs "$work")
[ -n "$out" ] && out=$(abs "$out") || out=$work
mkdir -p "$work/logs"
rm -rf "$work/rows" "$work/status.tsv"   # a re-run in the same work dir starts its table afresh
t_start=$(date +%s)

if [ -n "${CAPSV_PYTHON:-}" ]; then
  # what the interpreter lacks, installed from the carried wheels only (--isolated: no pip.conf, no index)
  missing=$("$CAPSV_PYTHON" -c '
import importlib
for p in ("kaldiio", "soundfile", "cffi", "pycparser"):
    try:
        importlib.import_module(p)
    except Exception:
        print(p)') || { echo "gpu_check.sh: ERROR: CAPSV_PYTHON=$CAPSV_PYTHON does not run" >&2; exit 1; }
  if [ -n "$missing" ]; then
    specs=()
    for p in $missing; do
      line=$(grep -iE "^$p *([=<>!~]|$)" requirements.txt | sed 's/#.*//; s/ //g' || true)
      specs+=("${line:-$p}")
    done
    site=$work/site-packages
    rm -rf "$site"
    echo "gpu_check: installing ${specs[*]} from $wheels into $site (no network)"
    if ! "$CAPSV_PYTHON" -m pip install --isolated --no-index --no-deps --disable-pip-version-check \
        --find-links "$wheels" --target "$site" "${specs[@]}" > "$work/logs/wheels.log" 2>&1; then
      tail -n 3 "$work/logs/wheels.log" >&2
      pyver=$("$CAPSV_PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
      echo "gpu_check.sh: ERROR: cannot install ${specs[*]} from $wheels for $CAPSV_PYTHON (Python $pyver); on a" \
        "machine with network run 'bash local/gpu_wheels.sh --python-version $pyver' and copy wheels/ here" \
        "(log: $work/logs/wheels.log)" >&2
      exit 1
    fi
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
. ./path.sh

if ! $dry_run && ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh: ERROR: no GPU visible to torch (torch.cuda.is_available() is False; CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset});" \
    "on a machine without one, --dry-run true checks this script on the CPU" >&2
  ! $made_work || rm -rf "$work"
  exit 1
fi
mkdir -p "$out"
[ -n "$budget_s" ] || { $dry_run && budget_s=1800 || budget_s=540; }
deadline=$((t_start + budget_s))
scale=1
if $dry_run; then
  scale=4   # a loaded 2-core CPU is slower than a GPU machine at the same (toy) work
  # toy sizes: one thread a process, so that parts, ranks and loader workers do not spin against each other
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
dry_flag=()
$dry_run && dry_flag=(--dry-run)
failed=()

write_out() {   # the table and the parts' log tails into $out (atomically; after every part)
  python local/gpu_check.py table --work "$work" --out "$out/gpu_check.md" --command "$cmdline"
  { for f in $(ls -tr "$work/logs"); do   # in the order they were written
      f=$work/logs/$f
      echo "==== $f (last 200 lines)"
      tail -n 200 "$f"
    done; } > "$out/gpu_check.log.tmp" && mv -f "$out/gpu_check.log.tmp" "$out/gpu_check.log"
}

part() {   # part NAME BOUND_S: local/gpu_check.py NAME, stopped after BOUND_S or at the deadline
  local name=$1 bound=$(($2 * scale)) t0 left limit rc=0 st
  t0=$(date +%s)
  left=$((deadline - t0 - 15))   # 15 s: timeout's grace before KILL, and the table
  if [ "$left" -lt 10 ]; then
    printf '%s\t%s\t%s\t%s\n' "$name" "skipped: the check's $budget_s s were used" 0 "$bound" >> "$work/status.tsv"
    failed+=("$name")
    echo "== $name: skipped (no time left of --budget-s $budget_s)"
    write_out
    return 0
  fi
  limit=$((bound < left ? bound : left))
  echo "== $name (at most $limit s; log $work/logs/$name.log)"
  # timeout signals the part's whole process group (run.sh, loader workers, torchrun's rank)
  timeout -k 10 "$limit" python local/gpu_check.py "$name" --work "$work" ${dry_flag[@]+"${dry_flag[@]}"} \
    > "$work/logs/$name.log" 2>&1 < /dev/null &
  child=$!
  wait "$child" || rc=$?
  child=""
  case $rc in
    0) st=ok ;;
    124|137) st="TIMED OUT at $limit s" ;;
    *) st="FAILED (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$st" "$(($(date +%s) - t0))" "$limit" >> "$work/status.tsv"
  if [ "$rc" -ne 0 ]; then
    failed+=("$name")
    echo "---- $name: $st; the last lines of $work/logs/$name.log:"
    tail -n 15 "$work/logs/$name.log"
  fi
  write_out
}

child=""   # the running part's timeout: it is its own process group, so an interrupt must be passed on
trap '[ -z "$child" ] || { kill -TERM "$child" 2> /dev/null; wait "$child" || true; }; echo "gpu_check: interrupted" >&2; exit 130' INT TERM HUP

part env 60
part recipe 150
part step 150
part loader 90
part bench 90
part ddp 90
part compile 150

echo
cat "$out/gpu_check.md"
echo
echo "gpu_check: $(($(date +%s) - t_start)) s; table $out/gpu_check.md, logs $out/gpu_check.log (all of them in $work/logs)"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "gpu_check: all parts passed"
