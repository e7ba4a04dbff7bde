#!/usr/bin/env bash
# On a machine with network: download the wheels that a GPU machine's Python lacks, so that
# local/gpu_check.sh can install them there with no network (pip install --no-index --target).
#   bash local/gpu_wheels.sh                       # CPython 3.12, manylinux x86-64, into wheels/
#   bash local/gpu_wheels.sh --python-version 3.11 --dir /tmp/w
# A typical GPU machine's Python holds torch, torchaudio, numpy, scipy, pandas, PyYAML, tqdm and
# matplotlib but not kaldiio and soundfile (with cffi and pycparser, which soundfile loads
# libsndfile through). Versions: those requirements.txt asks for; cffi and pycparser the newest for
# that Python. Wheels only (--only-binary), for the target's Python and platform, not this one's.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=wheels                    # where the wheels go (git-ignored); copy it with the tree
python_version=3.12           # the GPU machine's Python (python3 -c 'import sys; print(sys.version[:4])')
platforms="manylinux_2_28_x86_64 manylinux2014_x86_64"   # soundfile's wheel with libsndfile inside is 2_28
packages="kaldiio soundfile cffi pycparser"
pip=""                        # the pip that downloads (default: .venv's, else python3 -m pip)
help_message="usage: bash local/gpu_wheels.sh [--dir DIR] [--python-version X.Y] [--platforms 'TAG ...'] [--packages 'NAME ...'] [--pip CMD]"

. steps/parse_options.sh || exit 1
if [ $# -ne 0 ]; then
  echo "gpu_wheels.sh: ERROR: unexpected argument '$1'; $help_message" >&2
  exit 1
fi
if [ -z "$pip" ]; then
  if [ -x .venv/bin/python ]; then pip=".venv/bin/python -m pip"; else pip="python3 -m pip"; fi
fi

specs=()
for p in $packages; do   # requirements.txt's specifier where it names the package, e.g. kaldiio==2.18.1
  line=$(grep -iE "^$p *([=<>!~]|$)" requirements.txt | sed 's/#.*//; s/ //g' || true)
  specs+=("${line:-$p}")
done
plat_opts=()
for p in $platforms; do plat_opts+=(--platform "$p"); done

mkdir -p "$dir"
echo "gpu_wheels.sh: ${specs[*]} for CPython $python_version ($platforms) into $dir"
# --no-deps: numpy and the rest are the GPU machine's own; only these are missing there
$pip download --disable-pip-version-check --only-binary=:all: --no-deps --python-version "$python_version" \
  --implementation cp "${plat_opts[@]}" --dest "$dir" "${specs[@]}"
echo "gpu_wheels.sh: in $dir:"
ls -1 "$dir" | sed 's/^/  /'
