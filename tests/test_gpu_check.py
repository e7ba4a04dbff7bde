"""local/gpu_check.sh as a GPU machine with no network runs it, on the CPU (--dry-run true, toy sizes).

That machine's Python holds torch but not kaldiio, soundfile, cffi or pycparser; here a venv of this Python
whose site-packages link to this environment's packages except those four stands for it. The check runs in
a copy of the tree without .venv, with CAPSV_PYTHON naming that venv's python, PIP_NO_INDEX=1 and no pip
configuration, installing the four from wheels that local/gpu_wheels.sh downloaded (for this Python).
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
LACKING = ("kaldiio", "soundfile", "cffi", "pycparser")
NOT_COPIED = {".git", ".venv", ".capsv_python", "wheels", "data", "exp", "fbank", "corpus", "__pycache__",
              ".pytest_cache"}


def offline_env(python):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(CAPSV_PYTHON=str(python), PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not re.search(r"\.venv|\.capsv_python", p))
    return env


@pytest.fixture(scope="module")
def gpu_like(tmp_path_factory):
    """(tree, python, wheels): a copy of the tree without .venv; a Python with this environment's packages
    but the four; their wheels for this Python from local/gpu_wheels.sh."""
    tmp = tmp_path_factory.mktemp("gpu_like")
    tree = tmp / "tree"
    shutil.copytree(ROOT, tree, ignore=lambda d, names: [n for n in names if n in NOT_COPIED], symlinks=True)
    venv = tmp / "python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    here = Path(sysconfig.get_paths()["purelib"])
    for entry in here.iterdir():
        if not entry.name.lstrip("_").lower().startswith(LACKING):
            (site / entry.name).symlink_to(entry)
    python = venv / "bin" / "python"
    r = subprocess.run([str(python), "-c", "import torch, numpy, pip; import kaldiio"], capture_output=True, text=True)
    assert "No module named 'kaldiio'" in r.stderr, r.stderr   # torch and pip are there, kaldiio is not
    wheels = tmp / "wheels"
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    r = subprocess.run(["bash", "local/gpu_wheels.sh", "--python-version", ver, "--dir", str(wheels),
                        "--pip", f"{sys.executable} -m pip"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    got = sorted(p.name.split("-")[0].lower() for p in wheels.glob("*.whl"))
    assert got == sorted(LACKING), got
    return tree, python, wheels


def table(path):
    """{(part, measurement): (value, note)} and {part: status} of gpu_check.md."""
    rows, status = {}, {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and cells[0] not in ("part", "---"):
            if re.fullmatch(r"\d+", cells[3]):
                status[cells[0]] = cells[1]
            else:
                rows[(cells[0], cells[1])] = (cells[2], cells[3])
    return rows, status


def num(pattern, text):
    m = re.search(pattern, text)
    assert m, f"no '{pattern}' in '{text}'"
    return float(m.group(1).replace(",", ""))


def test_dry_run_with_no_venv_no_network_and_the_carried_wheels(gpu_like, tmp_path):
    tree, python, wheels = gpu_like
    out, work = tmp_path / "out", tmp_path / "work"
    r = subprocess.run(["bash", "local/gpu_check.sh", "--dry-run", "true", "--out", str(out), "--work", str(work),
                        "--wheels", str(wheels)], cwd=tree, env=offline_env(python), capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "gpu_check: all parts passed" in r.stdout
    assert not (tree / ".venv").exists()          # path.sh used CAPSV_PYTHON and installed nothing
    rows, status = table(out / "gpu_check.md")
    assert set(status) == {"env", "recipe", "step", "loader", "bench", "ddp", "compile"}
    assert all(s == "ok" for s in status.values()), status
    assert "==== " in (out / "gpu_check.log").read_text()

    # env: the interpreter asked for, the packages it lacked from the wheels (pip --target), this torch
    assert rows[("env", "Python")][1] == str(python)
    assert rows[("env", "kaldiio, soundfile")][1].startswith(f"from {work}/site-packages/kaldiio")
    assert rows[("env", "torch")][0] == torch.__version__
    assert rows[("env", "train.amp / eval.precision auto")][0] == "auto -> fp32 on cpu"

    # recipe: trained, resumed, scored; the table's EER is the recipe's own results.txt
    assert "resumed from epoch 2" in rows[("recipe", "stage 2 resumed: 3rd epoch")][1]
    results = [l.split() for l in (work / "exp/mini_cap/results.txt").read_text().splitlines() if l[0] != "#"]
    assert rows[("recipe", "stages 3-4: EER, minDCF(0.05)")][0] == f"{results[0][1]} %, {results[0][2]}"

    # step: segments/s from ms/step (2 speakers x 3 crops), first-step losses against fp32 on the same weights
    steps = {w: v for (p, w), v in rows.items() if p == "step" and "segments/s" in v[0]}
    assert len(steps) == 10, list(steps)
    for what, (value, note) in steps.items():
        assert num(r"([\d.]+) segments/s", value) == pytest.approx(6000 / num(r"([\d.]+) ms/step", note), rel=0.05,
                                                                   abs=1)
    ref = num(r"first-step loss ([\d.]+)", next(n for w, (v, n) in steps.items() if "(reference)" in w))
    assert 6 < ref < 12                           # about ln 5994 = 8.7 for an untrained softmax over 5,994 classes

    def rel(what):
        note = next(n for w, (v, n) in steps.items() if w.startswith(what))
        diff = num(r"\(([-+][\d.]+e[-+]\d+) vs fp32", note)
        assert num(r"first-step loss ([\d.]+)", note) == pytest.approx(ref * (1 + diff), rel=2e-4)
        return abs(diff)
    assert rel("CAP fp32 + tf32") == 0            # TF32 is a CUDA switch: the CPU's fp32 step is unchanged
    assert rel("CAP fp32 + channels_last") < 1e-4  # NHWC: the same sums in another order
    assert 0 < rel("CAP bf16") < 2e-2             # bf16's 8-bit mantissa in the trunk, head and loss in fp32
    assert rel("CAP fp16 (+ GradScaler)") < 1e-2
    ratio = num(r"([\d.]+)", rows[("step", "CAP / TAP step time, config defaults")][0])
    assert 0.2 < ratio < 20
    (compiled, _), = [v for (p, w), v in rows.items() if p == "compile" and "segments/s" in v[0]]
    assert num(r"([\d.]+) segments/s", compiled) > 0

    share = num(r"([\d.]+) %", next(v for (p, w), (v, n) in rows.items() if p == "loader"))
    assert 0 <= share <= 100
    assert num(r"([\d.]+)", next(v for (p, w), (v, n) in rows.items() if w.startswith("CAP fast (cache)"))) > 0
    assert rows[("ddp", "torchrun, 1 rank (gloo, DDP), 1 epoch")][1] == "ok"
    assert rows[("ddp", "its checkpoint resumed in one process, epoch 2")][1] == "ok"

    # project: 500 epochs x batches x the config defaults' ms/step, / (1 - the data-wait share)
    batches = (1_092_009 - 5_994) // 3 // 200
    assert rows[("project", "VoxCeleb2 dev batches per epoch")][0] == f"{batches:,}"
    value, note = rows[("project", "500 epochs on one GPU, config defaults")]
    ms = num(r"([\d.]+) ms", note)
    assert ms == pytest.approx(num(r"([\d.]+) ms/step", next(n for w, (v, n) in steps.items() if "conf/cap.yaml" in w)),
                               abs=0.1)
    assert num(r"([\d.]+) h", value) == pytest.approx(500 * batches * ms / 1000 / 3600 / (1 - share / 100), rel=2e-3,
                                                      abs=0.1)


def test_python_lacking_packages_is_one_line_each(gpu_like, tmp_path):
    tree, python, wheels = gpu_like
    r = subprocess.run(["bash", "-c", ". ./path.sh"], cwd=tree, env=offline_env(python), capture_output=True,
                       text=True)
    assert r.returncode == 1
    errors = [l for l in r.stderr.splitlines() if "ERROR" in l]
    assert len(errors) == 2, r.stderr
    assert "cannot import kaldiio: requirements.txt asks for kaldiio==2.18.1" in errors[0]
    assert "cannot import soundfile: requirements.txt asks for soundfile>=0.12" in errors[1]
    assert "local/gpu_wheels.sh" in r.stderr and "Traceback" not in r.stderr
    assert not (tree / ".venv").exists()
    # no such interpreter; wheels for another Python (here: none): one line each, nothing installed
    r = subprocess.run(["bash", "-c", ". ./path.sh"], cwd=tree, env=offline_env(tmp_path / "no-python"),
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "is not an executable" in r.stderr
    (tmp_path / "empty").mkdir()
    r = subprocess.run(["bash", "local/gpu_check.sh", "--dry-run", "true", "--out", str(tmp_path / "out"),
                        "--work", str(tmp_path / "work"), "--wheels", str(tmp_path / "empty")], cwd=tree,
                       env=offline_env(python), capture_output=True, text=True)
    assert r.returncode == 1
    assert "gpu_check.sh: ERROR: cannot install kaldiio==2.18.1 soundfile>=0.12 cffi pycparser" in r.stderr
    assert f"bash local/gpu_wheels.sh --python-version {sys.version_info[0]}.{sys.version_info[1]}" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_no_gpu_is_one_line(tmp_path):
    r = subprocess.run(["bash", "local/gpu_check.sh", "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 1
    assert r.stderr.startswith("gpu_check.sh: ERROR: no GPU visible to torch") and r.stderr.count("\n") == 1, r.stderr
    assert "--dry-run true" in r.stderr
    assert not (tmp_path / "out").exists()
