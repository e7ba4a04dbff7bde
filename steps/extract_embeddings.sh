#!/usr/bin/env bash
# Stage 3, first half: every utterance of a data dir through the trunk of an experiment's newest checkpoint
# once, into Kaldi archives (capsv.bin.extract; the layout is capsv.embeddings' docstring and doc/embeddings.md):
# <out-dir>/embedding.scp (rows in the per-job arks embedding.JOB.ark; TAP/SAP also crop_embedding.scp) and,
# written last, <out-dir>/embedding.json (checkpoint SHA-256, eval settings, precision, features signature).
# The utterances, not the trials, are split over --nj jobs through --cmd, so each goes through the trunk once
# whatever --nj; steps/score.sh then scores any trial list from the archives. A job whose part was made from
# the same inputs keeps it; otherwise one line says why it is remade.
# --cohort true: only the AS-norm cohort of a training data dir (one utterance per speaker, eval.cohort_size),
# into <exp-dir>/embeddings/<set>_cohort. A data dir with a wav.scp but no feats.scp (your own recordings) is
# read and featurised as stage 1 does, with --fbank-config.
# What a killed run left in <out-dir> (partial arks) is removed by the next run (lock: <out-dir>/.extract.lock).
set -euo pipefail
export LC_ALL=C

# defaults (all can be set with --option value)
nj=1
cmd=$(dirname "$0")/launch_local.sh
cohort=false
fbank_config=conf/fbank.conf

echo "$0 $*"

help_message="usage: $0 [options] <exp-dir> <data-dir> [<out-dir>] [eval.key=value ...]
e.g.: $0 --nj 4 exp/mini_cap data/synth_test
      $0 --cohort true exp/mini_cap data/synth_train      # the AS-norm cohort
options:
  --nj <n>                parallel jobs, each a contiguous part of the sorted utterances (default $nj)
  --cmd <launcher>        job launcher, run.pl-style (default $cmd)
  --cohort true|false     only the AS-norm cohort of <data-dir>, the training set (default $cohort)
  --fbank-config <file>   fbank options for a data dir without feats.scp (default $fbank_config)
<out-dir> defaults to <exp-dir>/embeddings/<set> (<set>_cohort with --cohort true)"

. "$(dirname "$0")/parse_options.sh" || exit 1
. "$(dirname "$0")/dir_lock.sh"

if [ $# -lt 2 ]; then
  echo "$help_message" >&2; exit 1
fi
die() { echo "$0: ERROR: $*" >&2; exit 1; }
dir=${1%/}; data=${2%/}; shift 2
set=$(basename "$data")
[ "$cohort" = true ] && set=${set}_cohort
out=$dir/embeddings/$set
if [ $# -gt 0 ] && [[ $1 != *=* ]]; then out=${1%/}; shift; fi
[[ $nj =~ ^[1-9][0-9]*$ ]] || die "--nj must be a positive integer, got '$nj'"
[ -f "$dir/config.yaml" ] || die "$dir/config.yaml not found; run stage 2 (training) first"
if [ -f "$data/feats.scp" ]; then
  input=(--data "$data"); list=$data/feats.scp
elif [ "$cohort" = true ]; then
  die "--cohort true: $data has no feats.scp; give the training data dir after stage 1"
elif [ -f "$data/wav.scp" ]; then
  input=(--wav-scp "$data/wav.scp" --fbank-config "$fbank_config"); list=$data/wav.scp
else
  die "$data has neither feats.scp nor wav.scp; give a data dir after stage 1, or one with a wav.scp of your recordings"
fi
cohort_opt=()
[ "$cohort" = true ] && cohort_opt=(--cohort)
nutt=$(awk 'END { print NR }' "$list")
[ "$nutt" -gt 0 ] || die "$list is empty"
if [ "$nj" -gt "$nutt" ]; then
  echo "$0: only $nutt utterances: using nj=$nutt instead of $nj"; nj=$nutt
fi

take_dir_lock "$out" .extract.lock '.*.tmp' 'capsv-cache.*.bin'
name=extract_$(basename "$out")
mkdir -p "$dir/log"
$cmd JOB=1:"$nj" "$dir/log/$name.JOB.log" \
  python -m capsv.bin.extract --exp "$dir" "${input[@]}" --out "$out" --job JOB --njobs "$nj" \
    ${cohort_opt[@]+"${cohort_opt[@]}"} "$@" ||
  die "extraction failed (logs: $dir/log/$name.*.log)"
python -m capsv.bin.extract --merge --njobs "$nj" --out "$out" > /dev/null

grep -h '^WARNING' "$dir/log/$name.1.log" || true   # the same in every job
# why rows were remade: the same reason in every job that remade its part, so one line
for j in $(seq "$nj"); do grep -h '^extract: re-extracting\|^extract: resampled' "$dir/log/$name.$j.log" || true; done |
  sed "s| (job [0-9]* of [0-9]*)||; s|^extract: |$0: |" | sort -u
for j in $(seq "$nj"); do cat "$dir/log/$name.$j.log"; done |
  awk -v p="$0" -v out="$out" -v nj="$nj" -v n="$nutt" '$1 == "extract:" && $2 == "trunk" { crops += $5; utts += $8 }
    $1 == "extract:" && / are up to date / { kept++ }
    END { printf "%s: %s: trunk ran on %d crops of %d utterances in %d jobs%s\n", p, out, crops, utts, nj,
          kept ? sprintf(" (%d job(s) kept rows made from the same inputs)", kept) : "" }'
