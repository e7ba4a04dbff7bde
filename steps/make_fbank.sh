#!/usr/bin/env bash
# Stage 1: log Mel filterbank features for a data dir, in --nj parallel jobs.
# Splits wav.scp into nj contiguous parts, runs capsv.bin.compute_fbank on each through
# $cmd (one log per job), writing <fbank-dir>/<set>/raw_fbank.<tag>.JOB.{ark,scp,utt2num_frames},
# then merges the per-job lists into <data-dir>/feats.scp and <data-dir>/utt2num_frames. Those
# two are replaced only when every job has succeeded, so a failed or interrupted run leaves the
# data dir as it was, pointing at arks that are still there.
set -euo pipefail
export LC_ALL=C   # the sort order of every Kaldi table

# defaults (all can be set with --option value)
nj=2
cmd=$(dirname "$0")/launch_local.sh
fbank_config=conf/fbank.conf

echo "$0 $*"

help_message="usage: $0 [options] <data-dir> <fbank-dir> [<log-dir>]
e.g.: $0 --nj 4 data/train fbank
options:
  --nj <n>                  number of parallel jobs (default $nj; capped at the number of utterances)
  --cmd <launcher>          job launcher, run.pl-style (default $cmd)
  --fbank-config <file>     Kaldi-syntax fbank options (default $fbank_config)
<log-dir> defaults to <data-dir>/log"

. "$(dirname "$0")/parse_options.sh" || exit 1

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "$help_message" >&2; exit 1
fi
data=${1%/}
fbank_dir=${2%/}
logdir=${3:-$data/log}
name=$(basename "$data")

# input checks: fail before launching anything
[ -f "$data/wav.scp" ] || { echo "$0: ERROR: $data/wav.scp not found; run data preparation (stage 0) first" >&2; exit 1; }
[ -f "$fbank_config" ] || { echo "$0: ERROR: fbank config $fbank_config not found; pass --fbank-config" >&2; exit 1; }
[[ $nj =~ ^[1-9][0-9]*$ ]] || { echo "$0: ERROR: --nj must be a positive integer, got '$nj'" >&2; exit 1; }
# the existing feats.scp/utt2num_frames are about to be replaced, so they are not checked now
"$(dirname "$0")/validate_data_dir.sh" --no-feats --ignore-feats "$data"

nutt=$(awk 'END { print NR }' "$data/wav.scp")   # wc -l would miss a last line without its newline
if [ "$nj" -gt "$nutt" ]; then
  echo "$0: only $nutt utterances: using nj=$nutt instead of $nj"
  nj=$nutt
fi

mkdir -p "$fbank_dir/$name" "$logdir"
fbank_dir=$(cd "$fbank_dir" && pwd)   # the scp files name the arks by absolute path
# The arks are named by a tag of everything they depend on. A re-run with the same inputs keeps
# the jobs that finished (a killed stage 1 redoes only the others); changed inputs (wav.scp, --nj,
# fbank options) write new arks, so the feats.scp in place points at intact arks until the new
# one replaces it; then the old arks are removed.
tag=$({ cat "$data/wav.scp"; echo "nj=$nj"; cat "$fbank_config"; } | sha256sum | cut -c1-12)
out=$fbank_dir/$name/raw_fbank.$tag

# nj contiguous, nearly equal parts of wav.scp (sorted, so each part is sorted too)
split_dir=$fbank_dir/$name/split$nj.$tag
rm -rf "$split_dir"; mkdir -p "$split_dir"
awk -v nj="$nj" -v n="$nutt" -v dir="$split_dir" \
  '{ print > (dir "/wav." (int((NR - 1) * nj / n) + 1) ".scp") }' "$data/wav.scp"

$cmd JOB=1:"$nj" "$logdir/make_fbank_$name.JOB.log" \
  python -m capsv.bin.compute_fbank --fbank-config "$fbank_config" \
    "$split_dir/wav.JOB.scp" "$out.JOB.ark" "$out.JOB.scp" "$out.JOB.utt2num_frames" ||
  { echo "$0: ERROR: feature extraction failed for $data (logs: $logdir/make_fbank_$name.*.log)" >&2; exit 1; }

# Merge into temporaries, check them, then rename both into the data dir.
tmp_feats=$data/.feats.scp.tmp; tmp_frames=$data/.utt2num_frames.tmp
trap 'rm -f "$tmp_feats" "$tmp_frames"' EXIT
for n in $(seq "$nj"); do cat "$out.$n.scp"; done | sort -k1,1 > "$tmp_feats"
for n in $(seq "$nj"); do cat "$out.$n.utt2num_frames"; done | sort -k1,1 > "$tmp_frames"
nfeats=$(wc -l < "$tmp_feats")
if [ "$nfeats" -ne "$nutt" ]; then
  echo "$0: ERROR: features for $nfeats of $nutt utterances; see $logdir/make_fbank_$name.*.log" >&2
  exit 1
fi
mv "$tmp_feats" "$data/feats.scp"
mv "$tmp_frames" "$data/utt2num_frames"
rm -rf "$split_dir"
find "$fbank_dir/$name" -maxdepth 1 -name 'raw_fbank.*' ! -name "raw_fbank.$tag.*" -delete   # earlier inputs'

"$(dirname "$0")/validate_data_dir.sh" "$data"
# one line per data dir for audio at other sample rates (each job counts its own)
for n in $(seq "$nj"); do cat "$logdir/make_fbank_$name.$n.log"; done |
  awk -v d="$data" '$1 == "compute_fbank:" && $2 == "resampled" { n[$6] += $3; to = $9; total += $3 }
    END { if (total) { msg = ""; for (r in n) msg = msg sprintf("%s%d from %s Hz", msg ? ", " : "", n[r], r)
          printf "make_fbank.sh: %s: resampled %d utterances to %s Hz (%s)\n", d, total, to, msg } }'
echo "$0: fbank features for $nutt utterances of $data in $fbank_dir"
