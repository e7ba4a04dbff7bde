#!/usr/bin/env bash
# Checks a Kaldi-style data dir before a stage trusts it (data hygiene, as Kaldi's
# utils/validate_data_dir.sh): every file sorted with LC_ALL=C and unique in its keys,
# utt2spk <=> spk2utt, utterance ids prefixed by their speaker id, wav.scp / feats.scp /
# utt2num_frames covering exactly the utterances of utt2spk, and trial lists naming known
# utterances. The first problem found is reported as one line and the exit status is 1.
set -euo pipefail
export LC_ALL=C   # the sort order every Kaldi table is kept in

no_feats=false     # feats.scp not required (still checked if present)
ignore_feats=false # feats.scp / utt2num_frames not looked at even if present
no_wav=false       # wav.scp not required (still checked if present)
help_message="usage: $0 [--no-feats] [--ignore-feats] [--no-wav] <data-dir>
  --no-feats      feats.scp is not required (before stage 1); checked if present
  --ignore-feats  do not look at feats.scp/utt2num_frames (they are about to be replaced)
  --no-wav        wav.scp is not required; checked if present"

while [ $# -gt 0 ]; do
  case "$1" in
    --no-feats) no_feats=true; shift ;;
    --ignore-feats) ignore_feats=true; shift ;;
    --no-wav) no_wav=true; shift ;;
    --help|-h) echo "$help_message"; exit 0 ;;
    --*) echo "validate_data_dir.sh: ERROR: unknown option $1" >&2; echo "$help_message" >&2; exit 1 ;;
    *) break ;;
  esac
done
if [ $# -ne 1 ]; then
  echo "$help_message" >&2; exit 1
fi
data=${1%/}

# fail <file> <what> <fix>: the one line a user sees
fail() {
  echo "validate_data_dir.sh: ERROR: $1: $2 — $3" >&2
  exit 1
}

[ -d "$data" ] || fail "$data" "no such data directory" "run data preparation (stage 0) first"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# check_table <file> <min-fields> <exact|min> <fix>: non-empty, field count, sorted, unique keys
check_table() {
  local f=$data/$1 nf=$2 mode=$3 fix=$4 bad msg dup
  [ -s "$f" ] || fail "$f" "empty file" "$fix"
  bad=$(awk -v nf="$nf" -v mode="$mode" \
    '(mode == "exact" && NF != nf) || NF < nf { printf "line %d has %d fields, expected %s%d", NR, NF, (mode == "exact" ? "" : "at least "), nf; exit }' "$f")
  [ -z "$bad" ] || fail "$f" "$bad" "$fix"
  if ! msg=$(sort -c -s -k1,1 "$f" 2>&1); then  # -s: equal keys are for the duplicate check
    # sort reports "sort: <file>:<n>: disorder: <line>"
    msg=${msg#*"$f":}
    fail "$f" "not sorted (line ${msg%%: *}: ${msg#*disorder: })" "sort it with 'LC_ALL=C sort -k1,1 -o $f $f'"
  fi
  dup=$(cut -d' ' -f1 "$f" | uniq -d | awk 'NR == 1')
  [ -z "$dup" ] || fail "$f" "duplicate id $dup" "keep one line per id (or regenerate with stage 0)"
}

# same_keys <file-a> <file-b> <fix>: identical first columns (both already sorted and unique)
same_keys() {
  local a=$data/$1 b=$data/$2 fix=$3 diff
  cut -d' ' -f1 "$a" > "$tmp/ka"; cut -d' ' -f1 "$b" > "$tmp/kb"
  cmp -s "$tmp/ka" "$tmp/kb" && return 0
  diff=$(comm -3 "$tmp/ka" "$tmp/kb" | awk 'NR == 1 { if ($0 ~ /^\t/) { sub(/^\t/, ""); print "b " $0 } else print "a " $0 }')
  case "$diff" in
    "a "*) fail "$b" "utterance ${diff#a } of $1 is missing" "$fix" ;;
    *)     fail "$b" "utterance ${diff#b } is not in $1" "$fix" ;;
  esac
}

for f in utt2spk spk2utt; do
  [ -f "$data/$f" ] || fail "$data/$f" "missing" "run data preparation (stage 0) to create it"
done
check_table utt2spk 2 exact "regenerate the data dir (stage 0)"
check_table spk2utt 2 min "regenerate the data dir (stage 0)"

# utterance ids start with their speaker id (so sorting by utterance groups speakers)
bad=$(awk 'index($1, $2) != 1 { print $1 " (speaker " $2 ")"; exit }' "$data/utt2spk")
[ -z "$bad" ] || fail "$data/utt2spk" "utterance id $bad does not start with its speaker id" \
  "prefix utterance ids with the speaker id in data preparation"

# spk2utt expanded back to utt2spk must equal utt2spk
awk '{ for (i = 2; i <= NF; i++) print $i, $1 }' "$data/spk2utt" | sort -k1,1 > "$tmp/utt2spk"
if ! cmp -s "$tmp/utt2spk" "$data/utt2spk"; then
  bad=$(cut -d' ' -f1 "$tmp/utt2spk" | uniq -d | awk 'NR == 1')
  [ -z "$bad" ] || fail "$data/spk2utt" "utterance $bad listed more than once" \
    "regenerate spk2utt from utt2spk"
  bad=$({ diff "$data/utt2spk" "$tmp/utt2spk" || true; } | awk '/^[<>]/ { print ($1 == "<" ? "utt2spk has: " : "spk2utt gives: ") $2 " " $3; exit }')
  fail "$data/spk2utt" "does not describe the same mapping as utt2spk ($bad)" \
    "regenerate spk2utt from utt2spk (or regenerate the data dir with stage 0)"
fi

if [ -f "$data/wav.scp" ]; then
  check_table wav.scp 2 min "regenerate the data dir (stage 0)"
  same_keys utt2spk wav.scp "wav.scp and utt2spk must list the same utterances: regenerate the data dir (stage 0)"
elif ! $no_wav; then
  fail "$data/wav.scp" "missing" "run data preparation (stage 0), or pass --no-wav if this is by design"
fi

if ! $ignore_feats; then
  if [ -f "$data/feats.scp" ]; then
    check_table feats.scp 2 exact "re-run feature extraction (stage 1)"
    same_keys utt2spk feats.scp "re-run feature extraction (stage 1)"
    # the ark files it points into must exist (features moved or deleted?)
    bad=$(awk '{ sub(/:[0-9]+$/, "", $2); print $2 }' "$data/feats.scp" | sort -u |
      while read -r ark; do [ -f "$ark" ] || { echo "$ark"; break; }; done) || true  # break may SIGPIPE sort
    [ -z "$bad" ] || fail "$data/feats.scp" "points into missing ark file $bad" "re-run feature extraction (stage 1)"
    [ -f "$data/utt2num_frames" ] || fail "$data/utt2num_frames" "missing beside feats.scp" \
      "re-run feature extraction (stage 1)"
    check_table utt2num_frames 2 exact "re-run feature extraction (stage 1)"
    same_keys utt2spk utt2num_frames "re-run feature extraction (stage 1)"
    bad=$(awk '$2 !~ /^[1-9][0-9]*$/ { print $1 " has " $2; exit }' "$data/utt2num_frames")
    [ -z "$bad" ] || fail "$data/utt2num_frames" "frame count is not a positive integer ($bad)" \
      "re-run feature extraction (stage 1)"
  elif ! $no_feats; then
    fail "$data/feats.scp" "missing" "run feature extraction (stage 1), or pass --no-feats before it"
  fi
fi

# trial lists: `trials` and `trials_<name>`, in trial order (not sorted)
ntrials=0
for t in "$data"/trials "$data"/trials_*; do
  [ -f "$t" ] || continue
  [ -s "$t" ] || fail "$t" "empty trial list" "regenerate it in data preparation (stage 0)"
  bad=$(awk 'NR == FNR { known[$1] = 1; next }
    NF != 3 { printf "line %d has %d fields, expected <enroll> <test> target|nontarget", FNR, NF; exit }
    $3 != "target" && $3 != "nontarget" { printf "line %d: label %s is not target or nontarget", FNR, $3; exit }
    !($1 in known) { printf "line %d: unknown utterance %s", FNR, $1; exit }
    !($2 in known) { printf "line %d: unknown utterance %s", FNR, $2; exit }
    ($1 " " $2) in seen { printf "line %d repeats the trial of line %d", FNR, seen[$1 " " $2]; exit }
    { seen[$1 " " $2] = FNR }' "$data/utt2spk" "$t")
  [ -z "$bad" ] || fail "$t" "$bad" "every trial needs two utterances of utt2spk and a target/nontarget label, once: regenerate it (stage 0)"
  ntrials=$((ntrials + $(wc -l < "$t")))
done

nutt=$(wc -l < "$data/utt2spk"); nspk=$(wc -l < "$data/spk2utt")
msg="$nutt utterances, $nspk speakers"
[ "$ntrials" -eq 0 ] || msg+=", $ntrials trials"
[ -f "$data/feats.scp" ] && ! $ignore_feats && msg+=", features checked"
echo "validate_data_dir.sh: $data: OK ($msg)"
