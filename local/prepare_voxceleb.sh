#!/usr/bin/env bash
# Stage 0 (VoxCeleb): Kaldi data dirs from local copies of VoxCeleb1 and VoxCeleb2.
#   <voxceleb2-root>/dev/aac/idXXXXX/<video>/<nnnnn>.m4a  -> <data-dir>/vox2_dev   (wav.scp: ffmpeg pipes)
#   <voxceleb1-root>/dev/wav/idXXXXX/<video>/<nnnnn>.wav  -> <data-dir>/vox1_dev   (if in --train-sets)
#   the utterances of the trial lists (test/wav, dev/wav) -> <data-dir>/vox1_test, one trials file per list
# The roots and lists are checked before anything is written (one line says what is missing);
# every file is written under a temporary name and renamed when complete. Logic and list names
# are in local/prepare_voxceleb.py. Expects path.sh to have been sourced (run.sh does this).
set -euo pipefail
export LC_ALL=C

# defaults (all can be set with --option value)
voxceleb1_root=
voxceleb2_root=
train_sets="vox2_dev"   # any of: vox2_dev vox1_dev
trial_lists=""          # VoxCeleb lists; default: the distributed names in <voxceleb1-root>[/meta]

echo "$0 $*"

help_message="usage: $0 [options] <data-dir>
e.g.: $0 --voxceleb1-root /data/voxceleb1 --voxceleb2-root /data/voxceleb2 data
options:
  --voxceleb1-root <dir>    holds test/wav/ (and dev/wav/ for vox1_dev or Vox1-E/H)
  --voxceleb2-root <dir>    holds dev/aac/ (needed for vox2_dev)
  --train-sets '<sets>'     training sets to prepare (default '$train_sets'; also vox1_dev)
  --trial-lists '<files>'   VoxCeleb trial lists (default: veri_test.txt, veri_test2.txt,
                            list_test_all2.txt, list_test_hard2.txt ... found in <voxceleb1-root>)"

. "$(dirname "$0")/../steps/parse_options.sh" || exit 1

if [ $# -ne 1 ]; then
  echo "$help_message" >&2; exit 1
fi
data=${1%/}

python "$(dirname "$0")/prepare_voxceleb.py" --voxceleb1-root "$voxceleb1_root" \
  --voxceleb2-root "$voxceleb2_root" --train-sets "$train_sets" --trial-lists "$trial_lists" "$data"

for set in $train_sets vox1_test; do
  "$(dirname "$0")/../steps/validate_data_dir.sh" --ignore-feats "$data/$set"   # features: stage 1
done
