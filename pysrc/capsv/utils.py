"""Small shared pieces: the user-error convention and atomic file output."""
import contextlib
import hashlib
import os
import sys
import tempfile


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 1, no traceback."""


def run_main(main):
    """Run an entry point; a UserError becomes one `ERROR: ...` line on stderr and exit 1."""
    try:
        main()
    except UserError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(1)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    An interrupted writer therefore never leaves a file that a later stage would trust.
    """
    path = os.fspath(path)
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600; outputs should get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """Open a temporary file for writing; it replaces `path` when the block completes."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f


def sha256(path):
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def progress(iterable, **kwargs):
    """A tqdm bar on a terminal; none in a log file, where the per-epoch / per-stage lines say enough."""
    from tqdm import tqdm   # here, so entry points that fail fast on bad input import nothing heavy first
    return tqdm(iterable, file=sys.stderr, disable=not sys.stderr.isatty(), dynamic_ncols=True, **kwargs)


def read_table(path, ncols=None):
    """Read a Kaldi text table (`<key> <value...>` per line) into a list of token lists."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            toks = line.split()
            if not toks:
                continue
            if ncols is not None and len(toks) != ncols:
                raise UserError(f"{path}:{n}: expected {ncols} fields, got {len(toks)}; fix or regenerate this file")
            rows.append(toks)
    return rows
