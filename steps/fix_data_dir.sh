#!/usr/bin/env bash
# Make a data dir's files agree again, as Kaldi's utils/fix_data_dir.sh does: keep the utterances
# that every utterance-keyed file present lists (wav.scp, utt2spk, feats.scp, utt2num_frames,
# utt2dur, text), drop the others from each, and rebuild spk2utt from utt2spk. The files as they
# were go to <data-dir>/.backup/ first. Trial lists are never edited: one naming an utterance that
# would be dropped stops the fix with one line, nothing changed. Then validate_data_dir.sh.
set -euo pipefail
export LC_ALL=C

echo "$0 $*"
help_message="usage: $0 <data-dir>
e.g.: $0 data/train"
. "$(dirname "$0")/parse_options.sh" || exit 1
if [ $# -ne 1 ]; then
  echo "$help_message" >&2; exit 1
fi
data=${1%/}
die() { echo "$0: ERROR: $*" >&2; exit 1; }
[ -f "$data/utt2spk" ] || die "$data/utt2spk not found; prepare the data dir (stage 0) first"

files=()
for f in utt2spk wav.scp feats.scp utt2num_frames utt2dur text; do
  [ -f "$data/$f" ] && files+=("$f")
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# the utterances every file lists
cut -d' ' -f1 "$data/utt2spk" | sort -u > "$tmp/keep"
for f in "${files[@]}"; do
  cut -d' ' -f1 "$data/$f" | sort -u | comm -12 "$tmp/keep" - > "$tmp/k" && mv "$tmp/k" "$tmp/keep"
done
for f in "${files[@]}"; do
  awk 'NR == FNR { keep[$1] = 1; next } $1 in keep' "$tmp/keep" "$data/$f" | sort -k1,1 > "$tmp/$f"
done
awk '{ if ($2 != last) { if (NR > 1) printf "\n"; printf "%s", $2; last = $2 } printf " %s", $1 }
     END { if (NR) printf "\n" }' <(sort -k2,2 -s "$tmp/utt2spk") | sort -k1,1 > "$tmp/spk2utt"
files+=(spk2utt)

changed=false
for f in "${files[@]}"; do cmp -s "$tmp/$f" "$data/$f" || changed=true; done
if ! $changed; then
  echo "$0: $data: its files agree; nothing to fix"
  exit 0
fi
for t in "$data"/trials "$data"/trials_*; do
  [ -f "$t" ] || continue
  named=$(awk 'NR == FNR { keep[$1] = 1; next } !($1 in keep) || !($2 in keep) { n++; if (!u) u = ($1 in keep) ? $2 : $1 }
    END { if (n) printf "%d trials name utterances it would drop (e.g. %s)", n, u }' "$tmp/keep" "$t")
  [ -z "$named" ] || die "$t: $named; trials are never dropped: fix those utterances or remove the trials, then re-run"
done
[ -s "$tmp/keep" ] || die "$data: no utterance is in every one of ${files[*]}; nothing would be left"

mkdir -p "$data/.backup"
for f in "${files[@]}"; do
  [ -f "$data/$f" ] && cp "$data/$f" "$data/.backup/$f"
done
n_before=$(wc -l < "$data/utt2spk")
for f in "${files[@]}"; do
  cmp -s "$tmp/$f" "$data/$f" || { cp "$tmp/$f" "$data/.$f.tmp" && mv "$data/.$f.tmp" "$data/$f"; }
done
echo "$0: $data: kept $(wc -l < "$data/utt2spk") of $n_before utterances (files as they were in $data/.backup/)"
"$(dirname "$0")/validate_data_dir.sh" --no-feats "$data"
