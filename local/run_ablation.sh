#!/usr/bin/env bash
# The paper's Table 2 ablation from one command: TAP, SAP and CAP trained and scored on the same
# features for several seeds, then one Markdown table with mean ± standard deviation over seeds,
# training time, the paper's VoxCeleb numbers beside ours, and a paired bootstrap over test speakers
# of each pair's EER difference.
#
#   bash local/run_ablation.sh                          # embedded corpus, conf/mini/{tap,sap,cap}.yaml, seeds 1 2 3
#   bash local/run_ablation.sh --seeds "1 2" --poolings "sap cap"
#
# Each (seed, pooling) is `run.sh --stage 2` into <exp>/seed<S>/<config name> with --train-opts seed=S,
# so a run is an ordinary experiment dir (resumable, scored, results.txt). The features come from
# run.sh stages 0-1 first, which skip what was already made from the same settings and redo what
# was not (another --synth-size, say). Each run dir keeps an ablation.signature: the SHA-256 of its
# config, its overrides, the SHA-256 of the training and test feats.scp and trials it was made on,
# and, once finished, of the checkpoint its scores came from. A re-run skips a run whose record
# matches what is asked now; one made on other features or trials is refused in one line (move it
# away); one with another config or overrides, or a newer checkpoint, goes to run.sh again, which
# resumes it (or refuses a change of model). Writes <exp>/ablation.md (and prints it).
set -euo pipefail

seeds="1 2 3"
poolings="tap sap cap"
conf_dir=conf/mini          # holds <pooling>.yaml for each pooling
exp=exp/ablation
data=data
fbankdir=fbank
corpusdir=corpus
synth_size=mini
nj=2
cmd_conf=conf/cmd.sh
train_opts=""               # extra config overrides for every run, e.g. "train.epochs=4"
boot=1000                   # bootstrap replicates of the significance test
run_opts=""                 # further run.sh options for every call, e.g. "--corpus voxceleb --voxceleb1-root ..."
train_name=synth_train      # the data dirs run.sh makes (their names under --data)
test_name=synth_test

help_message="Usage: bash local/run_ablation.sh [options]
  --seeds 'S ...'         seeds, one run per seed and pooling (default '$seeds')
  --poolings 'P ...'      poolings to compare, each a <conf-dir>/<P>.yaml (default '$poolings')
  --conf-dir DIR          configs (default $conf_dir; conf for the paper's VoxCeleb settings)
  --exp DIR               where the runs go: DIR/seed<S>/<name> (default $exp)
  --data --fbankdir --corpusdir --synth-size --nj --cmd-conf   as in run.sh
  --train-opts 'k=v ...'  config overrides for every run (seed=S is added per run)
  --boot N                bootstrap replicates (default $boot)
  --run-opts '...'        further run.sh options for every call (another corpus: also --train-name/--test-name)
  --train-name/--test-name  names of the data dirs under --data (default $train_name, $test_name)"

cd "$(dirname "$0")/.."
. ./path.sh
. steps/parse_options.sh || exit 1
[ $# -eq 0 ] || { echo "$0: ERROR: unexpected argument '$1'; see --help" >&2; exit 1; }
log() { echo "$(date '+%F %T') (run_ablation.sh) $*"; }

for p in $poolings; do
  [ -f "$conf_dir/$p.yaml" ] || { echo "$0: ERROR: $conf_dir/$p.yaml not found; --poolings names configs in --conf-dir" >&2; exit 1; }
done
for s in $seeds; do
  [[ $s =~ ^[0-9]+$ ]] || { echo "$0: ERROR: --seeds takes non-negative integers, got '$s'" >&2; exit 1; }
done

common=(--data "$data" --fbankdir "$fbankdir" --corpusdir "$corpusdir" --synth-size "$synth_size"
        --nj "$nj" --cmd-conf "$cmd_conf" $run_opts)
bash run.sh "${common[@]}" --exp "$exp" --stop-stage 1   # skips what is already made from these settings

die() { echo "$0: ERROR: $*" >&2; exit 1; }
hash_of() { sha256sum < "$1" | cut -d' ' -f1; }
# what a run is made from, as its ablation.signature records it (the checkpoint line comes last)
asked() {
  echo "config $(hash_of "$1")"
  echo "train_opts seed=$2 $train_opts"
  for f in "$data/$train_name/feats.scp" "$data/$test_name/feats.scp" "$data/$test_name/trials"; do
    echo "${f#"$data/"} $(hash_of "$f")"
  done
}
newest_checkpoint() {   # SHA-256 of a run's newest checkpoint (its .sha256 sidecar, else the bytes)
  local pt
  pt=$(ls "$1"/models/epoch_*.pt 2> /dev/null | sort | tail -n 1)
  [ -n "$pt" ] || return 0
  if [ -f "$pt.sha256" ]; then awk '$1 == "sha256" { print $2 }' "$pt.sha256"; else hash_of "$pt"; fi
}

systems=()
for s in $seeds; do
  for p in $poolings; do
    dir=$exp/seed$s/$(steps/exp_name.sh "$conf_dir/$p.yaml")
    systems+=(--run "$p:$s:$dir")
    want=$(asked "$conf_dir/$p.yaml" "$s")
    record=$dir/ablation.signature
    if [ -f "$record" ]; then
      made=$(head -n 5 "$record")
      differ=$(diff <(echo "$made") <(echo "$want") | awk '/^> / { print $2; exit }' || true)
      case $differ in
        */feats.scp|*/trials)
          die "$dir was made on another $differ than $data/$differ is now (see $record); move it away or give another --exp" ;;
      esac
      if [ -z "$differ" ] && [ -f "$dir/results.txt" ] &&
         [ "$(sed -n 's/^checkpoint //p' "$record")" = "$(newest_checkpoint "$dir")" ]; then
        log "$dir: finished with these inputs (ablation.signature), skipped"
        continue
      fi
      [ -z "$differ" ] || log "$dir: its $differ differs from the record; run.sh resumes it or says why not"
    elif [ -e "$dir" ]; then
      die "$dir has no record of what it was made from ($record); move it away or give another --exp"
    fi
    mkdir -p "$dir"
    echo "$want" > "$record"
    log "training and scoring $conf_dir/$p.yaml with seed $s into $dir"
    bash run.sh "${common[@]}" --exp "$exp/seed$s" --stage 2 --config "$conf_dir/$p.yaml" \
      --train-opts "seed=$s $train_opts"
    ckpt=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["checkpoint_sha256"])' \
      "$dir/scores/$test_name.score.json")
    { echo "$want"; echo "checkpoint $ckpt"; } > "$record"
  done
done

python -m capsv.bin.ablation_table "${systems[@]}" --data "$data/$test_name" --boot "$boot" --out "$exp/ablation.md"
log "done: $exp/ablation.md"
