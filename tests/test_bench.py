"""The benchmark suite runs and reports every benchmark (its figures are not asserted: they are timings)."""
import os
import re
import subprocess
import sys

import numpy as np
import torch

from capsv.bin.bench import NAMES, GramCapPairs
from capsv.scoring import cache_from_frames, score_trials

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(*args):
    out = subprocess.run([sys.executable, "-m", "capsv.bin.bench", *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def rows(text):
    """{benchmark: [cells of each of its rows]} of the final Markdown table."""
    table = text[text.rindex("| benchmark |"):]
    got = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        got.setdefault(cells[0], []).append(cells[1:])
    return got


def test_quick_suite_reports_every_benchmark(tmp_path):
    out = tmp_path / "bench.md"
    text = bench("--quick", "--out", str(out))
    got = rows(text)
    assert list(got) == NAMES
    assert len(got["pooling"]) == 5 and len(got["train_step"]) == 2 and len(got["loader"]) == 2
    for name, cells in got.items():
        for what, value, *_ in cells:
            assert re.search(r"\d", value) and "failed" not in value, (name, what, value)
    assert "CPUs, torch" in text.splitlines()[0]          # the machine is described
    assert out.read_text() in text                         # --out holds the same table


def test_only_runs_the_named_benchmarks():
    got = rows(bench("--only", "metrics", "fbank", "--repeats", "1"))
    assert list(got) == ["metrics", "fbank"]


def test_gram_variant_scores_like_the_recipe():
    """The scoring benchmark's Gram-cached alternative must compute the same scores, or its timing means nothing."""
    from capsv.models.speaker_net import SpeakerNet
    torch.manual_seed(0)
    net = SpeakerNet(40, [4, 4, 8, 8], [1, 1, 1, 1], "cap", 12, 6, 0.05).eval()
    g = torch.Generator().manual_seed(1)
    frames = {u: torch.rand(3, 7, 8, generator=g) for u in "abcd"}
    trials = [("a", "b", True), ("c", "d", False), ("d", "a", True)]
    with torch.no_grad():
        cache = cache_from_frames(net, frames)
        want = score_trials(net, cache, trials, trial_batch=2)
        cache.data["g"] = cache.data["st"] @ cache.data["st"].transpose(-1, -2)
        ia = torch.tensor([cache.row[e] for e, *_ in trials])
        ib = torch.tensor([cache.row[t] for _, t, *_ in trials])
        got = GramCapPairs(net)(cache.data, ia, cache.data, ib).double().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
