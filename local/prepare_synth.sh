#!/usr/bin/env bash
# Stage 0 (embedded corpus): generate the synthetic multi-speaker corpus and its Kaldi
# data dirs. No download and no system package: local/make_synth_corpus.py synthesises
# every utterance (source-filter voices with speaker traits, random phone content, and
# per-utterance channel, noise and partial interference), deterministically from --seed.
# Writes <corpus-dir>/wav/{train,test}/<spk>/<utt>.wav, <data-dir>/synth_train/{wav.scp,
# utt2spk,spk2utt} and <data-dir>/synth_test/{wav.scp,utt2spk,spk2utt,trials}; the log
# goes to <corpus-dir>/log/make_synth_corpus.log. Every file is written under a temporary
# name and renamed when complete, so a re-run after an interruption is safe.
# Expects path.sh to have been sourced (run.sh does this).
set -euo pipefail
export LC_ALL=C

# defaults (all can be set with --option value)
size=mini          # mini (200x10 train, 40x8 test, 2.5-5 s), small (40x6, 10x6, 2.2-3 s) or tiny (8x4, 4x4, 2.2-3 s)
nj=2               # parallel worker processes (the output does not depend on it)
seed=777
train_speakers=    # the options below override the --size preset when given
train_utts=
test_speakers=
test_utts=
min_dur=           # seconds
max_dur=

echo "$0 $*"

help_message="usage: $0 [options] <corpus-dir> <data-dir>
e.g.: $0 --nj 4 corpus data
options:
  --size <mini|small|tiny>  size preset (default $size)
  --nj <n>                  parallel jobs (default $nj)
  --seed <n>                random seed; the corpus is a function of it (default $seed)
  --train-speakers <n>      override the preset: number of training speakers
  --train-utts <n>          utterances per training speaker
  --test-speakers <n>       number of test speakers
  --test-utts <n>           utterances per test speaker
  --min-dur <s>             shortest utterance, seconds
  --max-dur <s>             longest utterance, seconds"

. "$(dirname "$0")/../steps/parse_options.sh" || exit 1

if [ $# -ne 2 ]; then
  echo "$help_message" >&2; exit 1
fi
corpus=${1%/}
data=${2%/}

case "$size" in mini|small|tiny) ;; *) echo "$0: ERROR: --size must be mini, small or tiny, got '$size'" >&2; exit 1 ;; esac
[[ $nj =~ ^[1-9][0-9]*$ ]] || { echo "$0: ERROR: --nj must be a positive integer, got '$nj'" >&2; exit 1; }
[[ $seed =~ ^[0-9]+$ ]] || { echo "$0: ERROR: --seed must be a non-negative integer, got '$seed'" >&2; exit 1; }

opts=(--size "$size" --nj "$nj" --seed "$seed")
for v in train_speakers train_utts test_speakers test_utts min_dur max_dur; do
  if [ -n "${!v}" ]; then opts+=("--${v//_/-}" "${!v}"); fi
done

mkdir -p "$corpus/log" "$data"
log=$corpus/log/make_synth_corpus.log
echo "$0: generating the synthetic corpus into $corpus (log: $log)"
if ! python "$(dirname "$0")/make_synth_corpus.py" "${opts[@]}" "$corpus" "$data" 2>&1 | tee "$log"; then
  echo "$0: ERROR: corpus generation failed; see $log" >&2
  exit 1
fi

for set in synth_train synth_test; do
  "$(dirname "$0")/../steps/validate_data_dir.sh" --ignore-feats "$data/$set"  # features: stage 1
done
echo "$0: done: $data/synth_train ($(wc -l < "$data/synth_train/utt2spk") utts)," \
  "$data/synth_test ($(wc -l < "$data/synth_test/utt2spk") utts, $(wc -l < "$data/synth_test/trials") trials)"
