#!/usr/bin/env bash
# Combine Kaldi data dirs (wav.scp, utt2spk, spk2utt) into one, e.g. VoxCeleb2 dev + VoxCeleb1 dev
# for training. Utterance ids must not repeat across the sources (VoxCeleb's speaker prefixes
# keep them apart); trials and features are not combined (stage 1 computes features for the
# result). Files are written under temporary names and renamed when complete.
set -euo pipefail
export LC_ALL=C

echo "$0 $*"
help_message="usage: $0 <dest-data-dir> <src-data-dir> [<src-data-dir> ...]
e.g.: $0 data/vox2_dev_vox1_dev data/vox2_dev data/vox1_dev"
. "$(dirname "$0")/parse_options.sh" || exit 1
if [ $# -lt 2 ]; then
  echo "$help_message" >&2; exit 1
fi
dest=${1%/}; shift

mkdir -p "$dest"
rm -f "$dest/feats.scp" "$dest/utt2num_frames" "$dest/bad_utts"   # stage 1 makes them for the result
for f in wav.scp utt2spk spk2utt; do
  for src in "$@"; do
    [ -f "$src/$f" ] || { echo "$0: ERROR: $src/$f not found; prepare $src first" >&2; exit 1; }
    cat "$src/$f"
  done | sort -k1,1 > "$dest/.$f.tmp"
  dup=$(cut -d' ' -f1 "$dest/.$f.tmp" | uniq -d | head -n 1)
  if [ -n "$dup" ]; then
    rm -f "$dest/.$f.tmp"
    echo "$0: ERROR: id $dup is in more than one of $*; the sources must not share utterances or speakers" >&2
    exit 1
  fi
  mv "$dest/.$f.tmp" "$dest/$f"
done
"$(dirname "$0")/validate_data_dir.sh" --no-feats "$dest"
