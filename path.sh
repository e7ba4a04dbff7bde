# Sourced by run.sh and tests/run.sh: the Python environment and the locale the recipe relies on.
# Creates .venv from requirements.txt on first use, and again whenever requirements.txt changes.
CAPSV_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export LC_ALL=C
_venv=$CAPSV_ROOT/.venv
_want=$(sha256sum "$CAPSV_ROOT/requirements.txt" | cut -d' ' -f1)
if [ ! -x "$_venv/bin/python" ] || [ "$(cat "$_venv/.requirements.sha256" 2>/dev/null)" != "$_want" ]; then
  echo "path.sh: installing $_venv from requirements.txt (first use: a few minutes; log in .venv/install.log)" >&2
  { python3 -m venv "$_venv" &&
    "$_venv/bin/pip" install --disable-pip-version-check -r "$CAPSV_ROOT/requirements.txt" > "$_venv/install.log" 2>&1 &&
    echo "$_want" > "$_venv/.requirements.sha256"; } ||
    { echo "path.sh: ERROR: installing requirements failed; see $_venv/install.log" >&2; tail -n 5 "$_venv/install.log" >&2; return 1; }
fi
. "$_venv/bin/activate"
export PYTHONPATH=$CAPSV_ROOT/pysrc${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
unset _venv _want
