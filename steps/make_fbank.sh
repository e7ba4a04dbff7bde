#!/usr/bin/env bash
# Stage 1: log Mel filterbank features for a data dir, in --nj parallel jobs.
# Runs capsv.bin.compute_fbank through $cmd (one log per job); job J takes the utterances whose
# id hashes to J, so adding or removing a line of wav.scp changes one job's part only. The arks
# go to <fbank-dir>/<set>-<hash of the data dir's real path>/, a folder no other data dir shares
# (its owner is written in it), named raw_fbank.J.<signature of the job's inputs>.*: a re-run keeps
# every job whose inputs are unchanged and redoes the others into new names. The per-job lists
# are then merged into <data-dir>/feats.scp and utt2num_frames, replaced only when every job has
# succeeded (a failed or interrupted run leaves the data dir as it was, pointing at intact arks);
# then the arks no longer named are removed, from this data dir's folder only.
#
# An utterance whose audio cannot be used (not found, not decodable, empty, too short, NaN) is
# left out; up to --max-bad-frac of the utterances may be (Kaldi's convention for training sets;
# 0, the default, for test sets, whose trial lists name every utterance). They are listed in
# <data-dir>/bad_utts (`<utt> <reason>`, kept across runs) and the data dir is fixed with
# steps/fix_data_dir.sh (originals in <data-dir>/.backup/; trials naming them stop the stage).
# More than the fraction stops the stage naming them, the data dir untouched.
#
# One run at a time per feature folder (a lock in it); a run that finds the lock of one that was
# killed removes what that run left half-written (temporaries of arks and lists).
set -euo pipefail
export LC_ALL=C   # the sort order of every Kaldi table

# defaults (all can be set with --option value)
nj=2
cmd=$(dirname "$0")/launch_local.sh
fbank_config=conf/fbank.conf
max_bad_frac=0

echo "$0 $*"

help_message="usage: $0 [options] <data-dir> <fbank-dir> [<log-dir>]
e.g.: $0 --nj 4 --max-bad-frac 0.001 data/train fbank
options:
  --nj <n>                  number of parallel jobs (default $nj; capped at the number of utterances)
  --cmd <launcher>          job launcher, run.pl-style (default $cmd)
  --fbank-config <file>     Kaldi-syntax fbank options (default $fbank_config)
  --max-bad-frac <f>        fraction of utterances that may be left out as unusable (default $max_bad_frac)
<log-dir> defaults to <data-dir>/log"

. "$(dirname "$0")/parse_options.sh" || exit 1

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "$help_message" >&2; exit 1
fi
data=${1%/}
fbank_dir=${2%/}
logdir=${3:-$data/log}
name=$(basename "$data")
die() { echo "$0: ERROR: $*" >&2; exit 1; }

# input checks: fail before launching anything
[ -f "$data/wav.scp" ] || die "$data/wav.scp not found; run data preparation (stage 0) first"
[ -f "$fbank_config" ] || die "fbank config $fbank_config not found; pass --fbank-config"
[[ $nj =~ ^[1-9][0-9]*$ ]] || die "--nj must be a positive integer, got '$nj'"
awk -v f="$max_bad_frac" 'BEGIN { exit !(f ~ /^([0-9]+\.?[0-9]*|\.[0-9]+)$/ && f + 0 < 1) }' ||
  die "--max-bad-frac must be a fraction in [0, 1), got '$max_bad_frac'"
# the existing feats.scp/utt2num_frames are about to be replaced, so they are not checked now
"$(dirname "$0")/validate_data_dir.sh" --no-feats --ignore-feats "$data"

nutt=$(awk 'END { print NR }' "$data/wav.scp")   # wc -l would miss a last line without its newline
if [ "$nj" -gt "$nutt" ]; then
  echo "$0: only $nutt utterances: using nj=$nutt instead of $nj"
  nj=$nutt
fi
max_bad=$(awk -v f="$max_bad_frac" -v n="$nutt" 'BEGIN { printf "%d", f * n + 1e-9 }')

# This data dir's own feature folder: its name and the hash of its real path, so that two data dirs
# of one name (two --data roots, test sets of one name) never share (and never clean) a folder.
data_real=$(cd "$data" && pwd -P)
mkdir -p "$fbank_dir" "$logdir"
fbank_dir=$(cd "$fbank_dir" && pwd)   # the scp files name the arks by absolute path
folder=$fbank_dir/$name-$(printf '%s' "$data_real" | sha256sum | cut -c1-8)
mkdir -p "$folder"
if [ -s "$folder/data_dir" ] && [ "$(cat "$folder/data_dir")" != "$data_real" ]; then
  die "$folder holds the features of $(cat "$folder/data_dir"), not of $data_real; give another --fbankdir"
fi
echo "$data_real" > "$folder/data_dir"

# One run per folder. The lock is free whenever no run holds it, so anything half-written found
# then (ark and list temporaries, a run's scratch dir, the data dir's merge temporaries) was left
# by a run that was killed: remove it.
exec {lock_fd}<>"$folder/.lock"
holder=$(cat "$folder/.lock")
flock -n "$lock_fd" ||
  die "$folder is in use by ${holder:-another run}; wait for it to end or stop it (lock: $folder/.lock)"
echo "make_fbank.sh pid $$ on host $(hostname) since $(date '+%F %T')" > "$folder/.lock"
leftovers=$(find "$folder" -maxdepth 1 \( -name '.raw_fbank.*.tmp' -o -name '.run.*' \) -print |
  { grep -c . || true; })
find "$folder" -maxdepth 1 \( -name '.raw_fbank.*.tmp' -o -name '.run.*' \) -exec rm -rf {} +
rm -f "$data/.feats.scp.tmp" "$data/.utt2num_frames.tmp" "$data/.bad_utts.tmp"
[ "$leftovers" -eq 0 ] ||
  echo "$0: removed $leftovers partial files left by a killed run${holder:+ ($holder)}"

run=$(mktemp -d "$folder/.run.XXXXXX")
trap 'rm -rf "$run" "$data/.feats.scp.tmp" "$data/.utt2num_frames.tmp" "$data/.bad_utts.tmp"; : > "$folder/.lock"' EXIT

$cmd JOB=1:"$nj" "$logdir/make_fbank_$name.JOB.log" \
  python -m capsv.bin.compute_fbank --fbank-config "$fbank_config" --job JOB --njobs "$nj" --max-bad "$max_bad" \
    "$data/wav.scp" "$folder/raw_fbank.JOB" "$run/record.JOB" ||
  die "feature extraction failed for $data (logs: $logdir/make_fbank_$name.*.log)"

outs=()
for n in $(seq "$nj"); do
  [ -s "$run/record.$n" ] || die "job $n left no record of its outputs; see $logdir/make_fbank_$name.$n.log"
  outs+=("$(cat "$run/record.$n")")
done

# Merge into temporaries; the bad utterances are those of this wav.scp (a job kept from before the
# data dir was fixed lists ones that are gone).
tmp_feats=$data/.feats.scp.tmp; tmp_frames=$data/.utt2num_frames.tmp; tmp_bad=$data/.bad_utts.tmp
for o in "${outs[@]}"; do cat "$o.scp"; done | sort -k1,1 > "$tmp_feats"
for o in "${outs[@]}"; do cat "$o.utt2num_frames"; done | sort -k1,1 > "$tmp_frames"
for o in "${outs[@]}"; do cat "$o.bad"; done | sort -k1,1 |
  awk 'NR == FNR { here[$1] = 1; next } $1 in here' "$data/wav.scp" - > "$run/bad"
nbad=$(awk 'END { print NR }' "$run/bad")

if [ "$nbad" -gt "$max_bad" ]; then
  cp "$run/bad" "$logdir/bad_utts.$name"
  die "$data: $nbad of $nutt utterances could not be used, more than --max-bad-frac $max_bad_frac allows ($max_bad):" \
    "$(awk 'NR <= 3 { printf "%s%s (%s)", (NR > 1 ? "; " : ""), $1, substr($0, length($1) + 2) }
            END { if (NR > 3) printf "; and %d more", NR - 3 }' "$run/bad");" \
    "all in $logdir/bad_utts.$name; fix or remove them (or raise --max-bad-frac), then re-run stage 1"
fi
nfeats=$(awk 'END { print NR }' "$tmp_feats")
[ "$nfeats" -eq $((nutt - nbad)) ] ||
  die "features for $nfeats of $((nutt - nbad)) utterances; see $logdir/make_fbank_$name.*.log"
if [ "$nbad" -gt 0 ]; then
  # trials are never dropped: a list naming a bad utterance stops the stage before anything changes
  for t in "$data"/trials "$data"/trials_*; do
    [ -f "$t" ] || continue
    named=$(awk 'NR == FNR { bad[$1] = 1; next } ($1 in bad) || ($2 in bad) { n++; if (!u) u = ($1 in bad) ? $1 : $2 }
      END { if (n) printf "%d trials name utterances that could not be used (e.g. %s)", n, u }' "$run/bad" "$t")
    [ -z "$named" ] || die "$t: $named; fix their audio or remove those trials from the list" \
      "(trials are never dropped); the data dir is unchanged"
  done
fi

# bad_utts: this run's, plus those of earlier runs that a fix removed from wav.scp
{ cat "$run/bad"
  if [ -f "$data/bad_utts" ]; then awk 'NR == FNR { here[$1] = 1; next } !($1 in here)' "$data/wav.scp" "$data/bad_utts"; fi
} | sort -k1,1 > "$tmp_bad"
# Replace what changed (an unchanged re-run leaves the data dir as it is)
for f in feats.scp utt2num_frames bad_utts; do
  tmp=$data/.$f.tmp
  if [ "$f" = bad_utts ] && [ ! -s "$tmp" ]; then rm -f "$tmp" "$data/bad_utts"; continue; fi
  if cmp -s "$tmp" "$data/$f"; then rm -f "$tmp"; else mv "$tmp" "$data/$f"; fi
done
if [ "$nbad" -gt 0 ]; then
  "$(dirname "$0")/fix_data_dir.sh" "$data"
  echo "$0: $data: left out $nbad of $nutt utterances that could not be used (--max-bad-frac $max_bad_frac allows $max_bad), listed with their reasons in $data/bad_utts"
fi

# The arks of earlier runs that feats.scp no longer names: this folder holds this data dir's only.
keep=$run/keep
for o in "${outs[@]}"; do basename "$o"; done > "$keep"
find "$folder" -maxdepth 1 -name 'raw_fbank.*' -print | while read -r f; do
  b=$(basename "$f")
  case $b in
    *.done) target=$(cat "$f" 2>/dev/null || true) ;;
    *) target=${b%.*} ;;
  esac
  grep -qxF "$target" "$keep" || rm -f "$f"
done

"$(dirname "$0")/validate_data_dir.sh" "$data"
# one line per data dir for audio at other sample rates (each job counts its own)
for n in $(seq "$nj"); do cat "$logdir/make_fbank_$name.$n.log"; done |
  awk -v d="$data" '$1 == "compute_fbank:" && $2 == "resampled" { n[$6] += $3; to = $9; total += $3 }
    END { if (total) { msg = ""; for (r in n) msg = msg sprintf("%s%d from %s Hz", msg ? ", " : "", n[r], r)
          printf "make_fbank.sh: %s: resampled %d utterances to %s Hz (%s)\n", d, total, to, msg } }'
echo "$0: fbank features for $((nutt - nbad)) utterances of $data in $folder"
