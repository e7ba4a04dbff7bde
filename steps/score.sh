#!/usr/bin/env bash
# Stage 3, second half: score every trial list of a test data dir (trials, trials_*; or --trials FILE) from the
# archives of steps/extract_embeddings.sh (<exp-dir>/embeddings/<set>), in --nj jobs through --cmd; the trunk
# never runs. Archives made by another checkpoint than the experiment's newest, of other crops, or lacking an
# utterance of a list are refused in one line before any job starts. Each job scores a contiguous part of every
# list (capsv.bin.score --job J --njobs N, one log per job); the parts are then joined in trial order (--merge),
# which checks that they cover each list once from the same archives. Writes <exp-dir>/scores/<set>.score for
# `trials` and <exp-dir>/scores/<set>_<x>.score for `trials_<x>` (--trials FILE: <set>_<name of FILE>.score),
# each with a .json beside it (checkpoint, SHA-256 of the trials, crops, precision, the archives' signature).
# A list whose score file was made from the same archives and the same list is kept, said in one line.
# With --cohort-data DIR (the training data dir) each list is also AS-norm normalised (capsv.asnorm) into
# <exp-dir>/scores/<set>[_<x>].asnorm.score (+ .json naming the cohort), the cohort's rows read from
# <exp-dir>/embeddings/<DIR's name>_cohort (steps/extract_embeddings.sh --cohort true); without it, AS-norm files
# left by an earlier run for these lists are removed once the new raw scores are in place.
# What a killed run left in <exp-dir>/scores (partial score files, parts, scratch files) is removed by the next
# run (lock: <exp-dir>/scores/.score.lock).
set -euo pipefail

# defaults (all can be set with --option value)
nj=1
cmd=$(dirname "$0")/launch_local.sh
cohort_data=
trials=

echo "$0 $*"

help_message="usage: $0 [options] <exp-dir> <test-data-dir> [eval.key=value ...]
e.g.: $0 --nj 4 exp/mini_cap data/synth_test
options:
  --nj <n>            parallel scoring jobs (default $nj)
  --cmd <launcher>    job launcher, run.pl-style (default $cmd)
  --trials <file>     score this trial list only (default: every trials, trials_* of <test-data-dir>)
  --cohort-data <dir> also write AS-norm scores, the cohort that of this data dir (the training set; extract it
                      first with steps/extract_embeddings.sh --cohort true); default: none, raw scores only"

. "$(dirname "$0")/parse_options.sh" || exit 1
. "$(dirname "$0")/dir_lock.sh"

if [ $# -lt 2 ]; then
  echo "$help_message" >&2; exit 1
fi
die() { echo "$0: ERROR: $*" >&2; exit 1; }
dir=${1%/}; data=${2%/}; shift 2
set=$(basename "$data")
emb=$dir/embeddings/$set
[[ $nj =~ ^[1-9][0-9]*$ ]] || die "--nj must be a positive integer, got '$nj'"
[ -f "$dir/config.yaml" ] || die "$dir/config.yaml not found; run stage 2 (training) first"
cohort_opts=()
if [ -n "$cohort_data" ]; then
  cohort_data=${cohort_data%/}
  cohort_emb=$dir/embeddings/$(basename "$cohort_data")_cohort
  [ -f "$cohort_emb/embedding.json" ] ||
    die "no AS-norm cohort embeddings in $cohort_emb; extract them first: steps/extract_embeddings.sh --cohort true $dir $cohort_data"
  cohort_opts=(--cohort-embeddings "$cohort_emb")
fi
[ -f "$emb/embedding.json" ] ||
  die "no embeddings of $set in $emb; extract them first: steps/extract_embeddings.sh $dir $data (run.sh stage 3 does)"

if [ -n "$trials" ]; then
  [ -f "$trials" ] || die "--trials $trials: no such file"
  b=$(basename "$trials"); b=${b%.txt}
  case $b in trials*) names=("$set${b#trials}") ;; *) names=("${set}_$b") ;; esac
  files=("$trials")
else
  files=(); names=()
  for t in "$data"/trials "$data"/trials_*; do
    [ -f "$t" ] || continue
    files+=("$t"); names+=("$set${t##*/trials}")
  done
  [ ${#files[@]} -gt 0 ] || die "no trials or trials_* file in $data; stage 0 makes them"
fi

take_dir_lock "$dir/scores" .score.lock '.*.tmp' 'capsv-cache.*.bin' '*.score.[0-9]*'
share_dir_lock "$emb" .extract.lock
[ -z "$cohort_data" ] || share_dir_lock "$cohort_emb" .extract.lock
lists=()
for i in "${!files[@]}"; do lists+=(--trials "${files[$i]}" --out "$dir/scores/${names[$i]}.score"); done
# the checks (checkpoint, crops, utterances) in one process before any job; which lists are already scored
plan=$(python -m capsv.bin.score --check --exp "$dir" --embeddings "$emb" ${cohort_opts[@]+"${cohort_opts[@]}"} \
  "${lists[@]}" "$@") || exit 1
todo=(); norm_todo=()
for i in "${!files[@]}"; do
  o=$dir/scores/${names[$i]}.score
  if grep -qxF "keep $o" <<< "$plan"; then
    echo "$0: $o${cohort_data:+ and its AS-norm scores} up to date (scored from these embeddings, the list unchanged); kept"
  else
    todo+=(--trials "${files[$i]}" --out "$o")
    norm_todo+=(--trials "${files[$i]}" --out "$dir/scores/${names[$i]}.asnorm.score")
  fi
done

mkdir -p "$dir/log"
if [ ${#todo[@]} -gt 0 ]; then
  $cmd JOB=1:"$nj" "$dir/log/score_$set.JOB.log" \
    python -m capsv.bin.score --exp "$dir" --embeddings "$emb" --job JOB --njobs "$nj" \
      ${cohort_opts[@]+"${cohort_opts[@]}"} "${todo[@]}" "$@" ||
    die "scoring failed (logs: $dir/log/score_$set.*.log)"
  if [ "$nj" -gt 1 ]; then
    python -m capsv.bin.score --merge --njobs "$nj" "${todo[@]}"
    [ -z "$cohort_data" ] || python -m capsv.bin.score --merge --njobs "$nj" "${norm_todo[@]}"
  fi
fi
if [ -z "$cohort_data" ]; then
  for n in "${names[@]}"; do
    f=$dir/scores/$n.asnorm.score
    if [ -e "$f" ]; then echo "$0: removing $f (of an earlier run; --cohort-data makes it again)"; rm -f "$f" "$f.json"; fi
  done
fi
if [ ${#todo[@]} -gt 0 ]; then
  grep -h '^WARNING' "$dir/log/score_$set.1.log" || true   # the same in every job
  for j in $(seq "$nj"); do grep -h '^scored\|^[A-Z]*: rows\|^AS-norm' "$dir/log/score_$set.$j.log" || true; done
fi
