#!/usr/bin/env bash
# Stage 3: score every trial list of a test data dir (trials, trials_*) with an experiment's newest
# checkpoint, in --nj jobs through --cmd. Each job scores a contiguous part of every list
# (capsv.bin.score --job J --njobs N, one log per job); the parts are then joined in trial order
# (--merge), which checks that they cover each list once with one checkpoint. Writes
# <exp-dir>/scores/<set>.score for `trials` and <exp-dir>/scores/<set>_<x>.score for `trials_<x>`,
# each with a .json beside it (checkpoint epoch, SHA-256 of the trials).
# With --cohort-data DIR (the training data dir) each list is also AS-norm normalised (capsv.asnorm) into
# <exp-dir>/scores/<set>[_<x>].asnorm.score (+ .json naming the cohort); without it, AS-norm files left by an
# earlier run for these lists are removed once the new raw scores are in place (they would be of another model).
set -euo pipefail

# defaults (all can be set with --option value)
nj=1
cmd=$(dirname "$0")/launch_local.sh
cohort_data=

echo "$0 $*"

help_message="usage: $0 [options] <exp-dir> <test-data-dir> [eval.key=value ...]
e.g.: $0 --nj 4 exp/mini_cap data/synth_test
options:
  --nj <n>            parallel scoring jobs (default $nj)
  --cmd <launcher>    job launcher, run.pl-style (default $cmd)
  --cohort-data <dir> also write AS-norm scores, the cohort drawn from this data dir (the training set;
                      eval.cohort_size, eval.asnorm_top_k); default: none, raw scores only"

. "$(dirname "$0")/parse_options.sh" || exit 1

if [ $# -lt 2 ]; then
  echo "$help_message" >&2; exit 1
fi
dir=${1%/}; data=${2%/}; shift 2
set=$(basename "$data")
[[ $nj =~ ^[1-9][0-9]*$ ]] || { echo "$0: ERROR: --nj must be a positive integer, got '$nj'" >&2; exit 1; }
[ -f "$dir/config.yaml" ] || { echo "$0: ERROR: $dir/config.yaml not found; run stage 2 (training) first" >&2; exit 1; }
cohort_opts=()
if [ -n "$cohort_data" ]; then
  cohort_data=${cohort_data%/}
  [ -f "$cohort_data/feats.scp" ] ||
    { echo "$0: ERROR: --cohort-data $cohort_data has no feats.scp; give the training data dir after stage 1" >&2; exit 1; }
  cohort_opts=(--cohort-data "$cohort_data")
fi

lists=(); norm_lists=()
for t in "$data"/trials "$data"/trials_*; do
  [ -f "$t" ] || continue
  lists+=(--trials "$t" --out "$dir/scores/$set${t##*/trials}.score")
  norm_lists+=(--trials "$t" --out "$dir/scores/$set${t##*/trials}.asnorm.score")
done
[ ${#lists[@]} -gt 0 ] || { echo "$0: ERROR: no trials or trials_* file in $data; stage 0 makes them" >&2; exit 1; }

mkdir -p "$dir/scores" "$dir/log"
$cmd JOB=1:"$nj" "$dir/log/score_$set.JOB.log" \
  python -m capsv.bin.score --exp "$dir" --data "$data" --job JOB --njobs "$nj" ${cohort_opts[@]+"${cohort_opts[@]}"} \
    "${lists[@]}" "$@" ||
  { echo "$0: ERROR: scoring failed (logs: $dir/log/score_$set.*.log)" >&2; exit 1; }
if [ "$nj" -gt 1 ]; then
  python -m capsv.bin.score --merge --njobs "$nj" "${lists[@]}"
  [ -z "$cohort_data" ] || python -m capsv.bin.score --merge --njobs "$nj" "${norm_lists[@]}"
fi
if [ -z "$cohort_data" ]; then
  for ((i = 3; i < ${#norm_lists[@]}; i += 4)); do
    f=${norm_lists[$i]}
    if [ -e "$f" ]; then echo "$0: removing $f (of an earlier run; --cohort-data makes it again)"; rm -f "$f" "$f.json"; fi
  done
fi
grep -h '^WARNING' "$dir/log/score_$set.1.log" || true   # the same in every job
for j in $(seq "$nj"); do grep -h '^scored\|^[A-Z]*: trunk\|^AS-norm' "$dir/log/score_$set.$j.log" || true; done
