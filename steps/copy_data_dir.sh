#!/usr/bin/env bash
# Stage 0 for your own data: copy a Kaldi data dir (wav.scp, utt2spk, [spk2utt], [trials, trials_*])
# into the recipe's data/ so that stage 1 writes feats.scp there and never into your dir.
# wav.scp and utt2spk are sorted with LC_ALL=C on the way (lossless; a missing final newline is
# mended), spk2utt is made from utt2spk when absent, trial lists keep their order. The copy is
# then checked with validate_data_dir.sh. Features of the source dir are not copied: stage 1
# computes them. Files are written under temporary names and renamed when complete.
set -euo pipefail
export LC_ALL=C

echo "$0 $*"
help_message="usage: $0 <src-data-dir> <dest-data-dir>
e.g.: $0 /corpora/mine/train data/train"
. "$(dirname "$0")/parse_options.sh" || exit 1
if [ $# -ne 2 ]; then
  echo "$help_message" >&2; exit 1
fi
src=${1%/}; dest=${2%/}

[ -d "$src" ] || { echo "$0: ERROR: $src: no such data dir" >&2; exit 1; }
for f in wav.scp utt2spk; do
  [ -s "$src/$f" ] || { echo "$0: ERROR: $src/$f is missing or empty; a data dir needs wav.scp and utt2spk" >&2; exit 1; }
done
if [ -f "$src/segments" ]; then
  echo "$0: ERROR: $src/segments: segmented recordings are not supported; give one wav.scp entry per utterance" >&2
  exit 1
fi

mkdir -p "$dest"
if [ "$(realpath "$src")" != "$(realpath "$dest")" ]; then
  put() { cat > "$dest/.$1.tmp" && mv "$dest/.$1.tmp" "$dest/$1"; }
  sort -k1,1 "$src/wav.scp" | put wav.scp
  sort -k1,1 "$src/utt2spk" | put utt2spk
  [ -f "$src/spk2utt" ] && sort -k1,1 "$src/spk2utt" | put spk2utt
  rm -f "$dest"/trials "$dest"/trials_* "$dest/feats.scp" "$dest/utt2num_frames" "$dest/bad_utts"   # stage 1's
  for t in "$src"/trials "$src"/trials_*; do
    [ -f "$t" ] && put "$(basename "$t")" < "$t"
  done
fi
if [ ! -f "$dest/spk2utt" ]; then
  awk '{ if ($2 != last) { if (NR > 1) printf "\n"; printf "%s", $2; last = $2 } printf " %s", $1 }
       END { if (NR) printf "\n" }' <(sort -k2,2 -s "$dest/utt2spk") | sort -k1,1 > "$dest/.spk2utt.tmp"
  mv "$dest/.spk2utt.tmp" "$dest/spk2utt"
fi
"$(dirname "$0")/validate_data_dir.sh" --no-feats "$dest"
