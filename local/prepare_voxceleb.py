#!/usr/bin/env python3
"""Kaldi data dirs for VoxCeleb1 and VoxCeleb2 from local copies (stage 0).

    python local/prepare_voxceleb.py [--voxceleb1-root DIR] [--voxceleb2-root DIR] \\
        [--train-sets "vox2_dev vox1_dev"] [--trial-lists "a.txt b.txt"] <data-dir>

Layouts (as the unzipped distributions and the Kaldi / WeSpeaker recipes have them):
  <voxceleb2-root>/dev/aac/idXXXXX/<video>/<nnnnn>.m4a      -> <data-dir>/vox2_dev
  <voxceleb1-root>/dev/wav/idXXXXX/<video>/<nnnnn>.wav      -> <data-dir>/vox1_dev (optional)
  <voxceleb1-root>/test/wav/idXXXXX/<video>/<nnnnn>.wav     -> <data-dir>/vox1_test
The test dir holds exactly the utterances its trial lists use, looked up in test/wav and then
dev/wav (Vox1-E and Vox1-H draw from VoxCeleb1 dev). Each list becomes a Kaldi trials file:
  veri_test.txt -> trials (Vox1-O, the paper's)    veri_test2.txt -> trials_o_clean
  list_test_all2.txt -> trials_e_clean             list_test_hard2.txt -> trials_h_clean
  list_test_all.txt -> trials_e                    list_test_hard.txt -> trials_h
  any other name x.txt -> trials_x
Lists are taken from --trial-lists, else from <voxceleb1-root> or <voxceleb1-root>/meta under
their distributed names. Utterance ids are idXXXXX-<video>-<nnnnn>, sorted as LC_ALL=C sorts.

m4a files become `ffmpeg ... - |` entries of wav.scp, decoded by stage 1 (doc/voxceleb.md:
measured with local/measure_m4a_decoding.py, this costs no disk and less CPU than converting
first). Every problem with the roots and lists is found before anything is written and
reported as one line naming what is missing and where it was looked for.
"""
import argparse
import os
import shlex
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pysrc"))
from capsv.trials import read_voxceleb_list, voxceleb_utt_id, write_trials  # noqa: E402
from capsv.utils import UserError, atomic_open, run_main  # noqa: E402

TRAIN_SETS = {  # name: (root option, sub-folder, extension)
    "vox2_dev": ("voxceleb2", "dev/aac", ".m4a"),
    "vox1_dev": ("voxceleb1", "dev/wav", ".wav"),
}
LIST_NAMES = {
    "veri_test.txt": "trials",
    "veri_test2.txt": "trials_o_clean",
    "list_test_all2.txt": "trials_e_clean",
    "list_test_hard2.txt": "trials_h_clean",
    "list_test_all.txt": "trials_e",
    "list_test_hard.txt": "trials_h",
}
TEST_SET = "vox1_test"


def ffmpeg_pipe(path):
    """The wav.scp entry that decodes one m4a to 16-bit WAV on stdout."""
    return f"ffmpeg -nostdin -v error -i {shlex.quote(path)} -f wav -acodec pcm_s16le - |"


def list_name(path):
    base = os.path.basename(path)
    return LIST_NAMES.get(base, "trials_" + os.path.splitext(base)[0])


def log(msg):
    print(f"prepare_voxceleb: {msg}", file=sys.stderr, flush=True)


def layout_dir(root, sub, option, ext):
    """<root>/<sub>, or a UserError saying what is missing and where else it was seen."""
    if not root:
        raise UserError(f"--{option}-root is not set; give the folder that holds {sub}/ "
                        f"(<root>/{sub}/idXXXXX/<video>/<nnnnn>{ext})")
    if not os.path.isdir(root):
        raise UserError(f"--{option}-root {root}: no such directory")
    want = os.path.join(root, sub)
    if os.path.isdir(want):
        return want
    # Common mistakes: the leaf folder (wav/, aac/) directly in the root or one level further down.
    leaf = os.path.basename(sub)
    seen = []
    for dirpath, dirnames, _ in os.walk(root):
        depth = os.path.relpath(dirpath, root).count(os.sep) + (dirpath != root)
        if leaf in dirnames:
            seen.append(os.path.join(dirpath, leaf))
        if depth >= 2:
            dirnames[:] = []
    hint = f"; found {seen[0]}: move it to {want}" if seen else ""
    raise UserError(f"--{option}-root {root}: no {sub}/ folder (expected {want}/idXXXXX/<video>/<nnnnn>{ext})"
                    f"{hint}")


def scan(top, ext):
    """utt -> absolute path for every <top>/<spk>/<video>/<n><ext>."""
    found = {}
    for spk in os.scandir(top):
        if not spk.is_dir():
            continue
        for video in os.scandir(spk.path):
            if not video.is_dir():
                continue
            for f in os.scandir(video.path):
                if f.name.endswith(ext):
                    found[f"{spk.name}-{video.name}-{f.name[:-len(ext)]}"] = os.path.abspath(f.path)
    if not found:
        raise UserError(f"{top}: no idXXXXX/<video>/<nnnnn>{ext} files found; check the folder")
    return found


def write_data_dir(d, wav_scp):
    """wav.scp, utt2spk, spk2utt (sorted by utterance id, LC_ALL=C order) into data dir d."""
    utts = sorted(wav_scp)
    spk2utt = {}
    for u in utts:
        spk2utt.setdefault(u.split("-", 1)[0], []).append(u)
    with atomic_open(os.path.join(d, "wav.scp")) as f:
        f.writelines(f"{u} {wav_scp[u]}\n" for u in utts)
    with atomic_open(os.path.join(d, "utt2spk")) as f:
        f.writelines(f"{u} {u.split('-', 1)[0]}\n" for u in utts)
    with atomic_open(os.path.join(d, "spk2utt")) as f:
        f.writelines(f"{s} {' '.join(us)}\n" for s, us in sorted(spk2utt.items()))
    # stage 1's list of what it left out belongs to the wav.scp it saw; it makes it again for this one
    if os.path.exists(os.path.join(d, "bad_utts")):
        os.remove(os.path.join(d, "bad_utts"))
    return len(utts), len(spk2utt)


def find_lists(vox1_root, given):
    if given:
        for p in given:
            if not os.path.isfile(p):
                raise UserError(f"--trial-lists: {p}: no such file")
        paths = list(given)
    else:
        paths = [p for name in LIST_NAMES for p in (os.path.join(vox1_root, name),
                                                     os.path.join(vox1_root, "meta", name)) if os.path.isfile(p)]
        if not paths:
            raise UserError(f"no trial list in {vox1_root} or {vox1_root}/meta (looked for "
                            f"{', '.join(LIST_NAMES)}); put veri_test.txt there or pass --trial-lists FILE")
    names = [list_name(p) for p in paths]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UserError(f"--trial-lists: two lists would both become {sorted(dup)[0]}; give each list once")
    return dict(zip(names, paths))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voxceleb1-root", default="")
    ap.add_argument("--voxceleb2-root", default="")
    ap.add_argument("--train-sets", default="vox2_dev", help=f"space-separated, of {', '.join(TRAIN_SETS)}")
    ap.add_argument("--trial-lists", default="", help="space-separated VoxCeleb trial lists (`1|0 path path`)")
    ap.add_argument("data_dir")
    args = ap.parse_args()
    roots = {"voxceleb1": args.voxceleb1_root, "voxceleb2": args.voxceleb2_root}

    # Everything is checked before anything is written.
    train_sets = args.train_sets.split()
    for s in train_sets:
        if s not in TRAIN_SETS:
            raise UserError(f"--train-sets: unknown set {s!r}; choose from {', '.join(TRAIN_SETS)}")
    train_dirs = {s: (layout_dir(roots[o], sub, o, ext), ext) for s, (o, sub, ext) in TRAIN_SETS.items()
                  if s in train_sets}
    test_wav = layout_dir(args.voxceleb1_root, "test/wav", "voxceleb1", ".wav")
    dev_wav = os.path.join(args.voxceleb1_root, "dev", "wav")
    lists = find_lists(args.voxceleb1_root, args.trial_lists.split())
    if "vox2_dev" in train_dirs and shutil.which("ffmpeg") is None:
        raise UserError("ffmpeg is not on PATH and VoxCeleb2's m4a need it; install it "
                            "(apt-get install ffmpeg) or leave vox2_dev out of --train-sets")

    trials, test_paths = {}, {}
    for name, path in lists.items():
        trials[name] = read_voxceleb_list(path)
        for _, rels in trials[name]:
            for rel in rels:
                if rel not in test_paths:
                    test_paths[rel] = None
    missing = []
    for rel in test_paths:
        for top in (test_wav, dev_wav):
            p = os.path.join(top, rel)
            if os.path.isfile(p):
                test_paths[rel] = os.path.abspath(p)
                break
        else:
            missing.append(rel)
    if missing:
        raise UserError(f"{len(missing)} of the {len(test_paths)} utterances the trial lists name are not in "
                        f"{test_wav} or {dev_wav} (first: {missing[0]}); complete the VoxCeleb1 copy or "
                        f"drop the list that needs them")
    scanned = {s: scan(top, ext) for s, (top, ext) in train_dirs.items()}

    test_dir = os.path.join(args.data_dir, TEST_SET)
    n_utt, n_spk = write_data_dir(test_dir, {voxceleb_utt_id(rel): p for rel, p in test_paths.items()})
    for name, rows in trials.items():
        write_trials(os.path.join(test_dir, name),
                     [(voxceleb_utt_id(e), voxceleb_utt_id(t), label) for label, (e, t) in rows])
        n_tar = sum(label for label, _ in rows)
        log(f"{test_dir}/{name}: {len(rows)} trials ({n_tar} target) from {lists[name]}")
    log(f"{test_dir}: {n_utt} utterances, {n_spk} speakers")
    for s, found in scanned.items():
        wav_scp = {u: ffmpeg_pipe(p) if p.endswith(".m4a") else p for u, p in found.items()}
        n_utt, n_spk = write_data_dir(os.path.join(args.data_dir, s), wav_scp)
        log(f"{args.data_dir}/{s}: {n_utt} utterances, {n_spk} speakers from {train_dirs[s][0]}")
    if "vox1_dev" in scanned and any(n.startswith(("trials_e", "trials_h")) for n in trials):
        log("WARNING: Vox1-E/H trials use VoxCeleb1 dev speakers, which vox1_dev also trains on; "
            "their results are not a clean test")


if __name__ == "__main__":
    run_main(main)
