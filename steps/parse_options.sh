#!/usr/bin/env bash
# Kaldi-style option parsing, sourced by a script after its defaults block:
#   . steps/parse_options.sh || exit 1
# `--foo-bar value` or `--foo-bar=value` sets the caller's existing variable foo_bar;
# an option with no matching variable is an error, so a typo never passes silently.
# `--help`/`-h` prints the caller's $help_message. `--config file` sources a file of
# var=value lines, unless the caller defines its own variable `config` (run.sh does:
# there `--config x.yaml` just sets config=x.yaml). Parsing stops at the first
# non-option argument (or after `--`); the positional arguments stay in "$@".
#
# This file is sourced, so it does not `set -euo pipefail` itself (that would change the
# caller's shell options); it is written to work with them on. All its own variables
# start with _po_ and are unset at the end.

_po_prog=$(basename "$0")

# Kaldi reads every --config file first, so options on the command line override the
# file wherever they appear. Only when the caller has no variable of its own called config.
if [ -z "${config+x}" ]; then
  _po_config_files=()
  _po_i=1
  while [ "$_po_i" -le $# ]; do
    _po_arg=${!_po_i}
    case "$_po_arg" in
      --config=*) _po_config_files+=("${_po_arg#--config=}") ;;
      --config)
        _po_i=$((_po_i + 1))
        if [ "$_po_i" -gt $# ]; then
          echo "$_po_prog: ERROR: option --config needs a value" >&2; exit 1
        fi
        _po_config_files+=("${!_po_i}") ;;
      --) break ;;
      --*=*) ;;
      --*) _po_i=$((_po_i + 1)) ;;   # skip this option's value
      -h) ;;
      *) break ;;                     # first positional argument: options end here
    esac
    _po_i=$((_po_i + 1))
  done
  for _po_f in ${_po_config_files[@]+"${_po_config_files[@]}"}; do
    if [ ! -r "$_po_f" ]; then
      echo "$_po_prog: ERROR: --config $_po_f: no such readable file" >&2; exit 1
    fi
    . "$_po_f"
  done
  _po_own_config=false
else
  _po_own_config=true
fi

while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h)
      if [ -n "${help_message:-}" ]; then
        printf '%s\n' "$help_message"
      else
        echo "$_po_prog: no help message; see the top of the script for its options"
      fi
      exit 0 ;;
    --) shift; break ;;
    --*=*)
      _po_name=${1%%=*}; _po_value=${1#*=}; shift ;;
    --*)
      _po_name=$1
      if [ $# -lt 2 ]; then
        echo "$_po_prog: ERROR: option $_po_name needs a value" >&2; exit 1
      fi
      _po_value=$2; shift 2 ;;
    *) break ;;
  esac
  # --config files were already sourced above (only when the caller has no `config`).
  if [ "$_po_name" = --config ] && ! $_po_own_config; then continue; fi
  _po_var=${_po_name#--}; _po_var=${_po_var//-/_}
  if ! [[ $_po_var =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || [ -z "${!_po_var+x}" ]; then
    echo "$_po_prog: ERROR: unknown option $_po_name (run with --help for the options)" >&2
    exit 1
  fi
  # A variable that defaults to true/false takes only true/false (as Kaldi does).
  case "${!_po_var}" in
    true|false)
      case "$_po_value" in
        true|false) ;;
        *) echo "$_po_prog: ERROR: option $_po_name expects true or false, got '$_po_value'" >&2
           exit 1 ;;
      esac ;;
  esac
  printf -v "$_po_var" '%s' "$_po_value"
done

unset _po_prog _po_config_files _po_i _po_arg _po_f _po_own_config _po_name _po_value _po_var
true  # the caller checks this file's status (`|| exit 1`)
