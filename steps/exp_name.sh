#!/usr/bin/env bash
# Prints the experiment name of a training config, as run.sh names exp/<name>: the path relative to the
# recipe with conf/ dropped and / as _ (conf/mini/cap.yaml -> mini_cap, conf/cap.yaml -> cap,
# my/cap.yaml -> my_cap); a config outside the recipe is named by its file (/x/y/cap.yaml -> cap).
#   usage: steps/exp_name.sh <config.yaml>     (run from the recipe's root)
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 <config.yaml>" >&2; exit 1; }
name=$(realpath -m --relative-to=. "$1")
case $name in conf/*) name=${name#conf/} ;; ../*|/*) name=$(basename "$name") ;; esac
name=${name%.yaml}
echo "${name//\//_}"
