# Sourced by run.sh and tests/run.sh: the Python environment and the locale the recipe relies on.
# Creates .venv from requirements.txt on first use, and again whenever requirements.txt changes.
# CAPSV_PYTHON=<interpreter> (e.g. python3 on a GPU machine with no network) uses that interpreter
# instead: no .venv, no pip; it only checks that the interpreter imports what the recipe needs.
CAPSV_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export LC_ALL=C
if [ -n "${CAPSV_PYTHON:-}" ]; then
  _py=$(command -v "$CAPSV_PYTHON") ||
    { echo "path.sh: ERROR: CAPSV_PYTHON=$CAPSV_PYTHON is not an executable; name a Python interpreter (e.g. CAPSV_PYTHON=python3), or unset it to use .venv" >&2; return 1; }
  case $_py in /*) ;; *) _py=$(cd "$(dirname "$_py")" && pwd)/$(basename "$_py") ;; esac
  # Checked once: run.sh sourcing this again under the same interpreter and PYTHONPATH skips the imports
  [ "${_CAPSV_PYTHON_CHECKED:-}" = "$_py|${PYTHONPATH:-}" ] || {
  # One line per package the recipe cannot import, with the version requirements.txt asks for.
  # torch, torchaudio: any release from the oldest tested one (the pin is what .venv installs).
  "$_py" - "$CAPSV_ROOT/requirements.txt" "$_py" <<'EOF' || { unset _py; return 1; }
import importlib, re, sys
req_file, py = sys.argv[1], sys.argv[2]
OLDEST_TORCH = (2, 11)
# distribution -> module; the rest of requirements.txt serves the tests and ONNX export only
RECIPE = {"torch": "torch", "torchaudio": "torchaudio", "kaldiio": "kaldiio", "numpy": "numpy", "scipy": "scipy",
          "pandas": "pandas", "soundfile": "soundfile", "PyYAML": "yaml", "tqdm": "tqdm", "matplotlib": "matplotlib"}
asked = {}
for line in open(req_file):
    m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*([^#;]*)", line)
    if m and m.group(1):
        asked[m.group(1)] = (m.group(1) + m.group(2).strip())
bad = []
for dist, module in RECIPE.items():
    try:
        mod = importlib.import_module(module)
    except Exception as e:   # ImportError, or OSError from a library the module loads (libsndfile)
        why = str(e).strip().splitlines()[-1][:160] if str(e).strip() else type(e).__name__
        bad.append(f"path.sh: ERROR: {py} cannot import {module}: requirements.txt asks for {asked.get(dist, dist)} "
                   f"({why})")
        continue
    if dist == "torch":
        have = tuple(int(x) for x in re.findall(r"\d+", mod.__version__)[:2])
        if have < OLDEST_TORCH:
            bad.append(f"path.sh: ERROR: {py} has torch {mod.__version__}; the recipe needs torch >= "
                       f"{'.'.join(map(str, OLDEST_TORCH))} ({asked.get('torch', 'torch')} in .venv)")
if bad:
    print("\n".join(bad), file=sys.stderr)
    print("path.sh: install them into that Python, or put their wheels on PYTHONPATH (local/gpu_wheels.sh and "
          "local/gpu_check.sh do this for a machine with no network), or unset CAPSV_PYTHON to use .venv",
          file=sys.stderr)
    sys.exit(1)
EOF
  }
  # `python`, `python3` and `torchrun` in the scripts are this interpreter: wrappers, not symlinks
  # (a venv's python run through a symlink elsewhere would lose its venv)
  _bin=$CAPSV_ROOT/.capsv_python/bin
  mkdir -p "$_bin"
  for _cmd in python python3 torchrun; do
    _args='"$@"'
    [ $_cmd != torchrun ] || _args="-m torch.distributed.run $_args"
    _body="#!/bin/sh"$'\n'"exec \"$_py\" $_args"
    if [ "$(cat "$_bin/$_cmd" 2>/dev/null)" != "$_body" ]; then
      printf '%s\n' "$_body" > "$_bin/$_cmd.$$" && chmod +x "$_bin/$_cmd.$$" && mv -f "$_bin/$_cmd.$$" "$_bin/$_cmd"
    fi
  done
  case ":$PATH:" in *":$_bin:"*) ;; *) export PATH=$_bin:$PATH ;; esac
  export PYTHONPATH=$CAPSV_ROOT/pysrc${PYTHONPATH:+:$PYTHONPATH}
  export _CAPSV_PYTHON_CHECKED="$_py|$PYTHONPATH"
  unset _py _bin _cmd _body _args
else
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
  unset _venv _want
  export PYTHONPATH=$CAPSV_ROOT/pysrc${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
