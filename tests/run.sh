#!/usr/bin/env bash
# The project's test command: unit tests plus one end-to-end run of run.sh on a tiny corpus.
#   bash tests/run.sh [pytest options]     e.g. bash tests/run.sh -k cap
set -euo pipefail
cd "$(dirname "$0")/.."
. ./path.sh
exec python -m pytest -q tests "$@"
