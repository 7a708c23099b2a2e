"""Atomic file and folder writes: write to a temporary sibling, then rename into place.

A reader (or a TF Serving process watching a folder) never sees a half-written result, and
an interrupted run leaves only `.tmp-*` debris that the next run ignores.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# read once: os.umask can only be read by setting it, which races with other threads' writes
_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(final: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it to `final`.

    With `directory=True` the temporary path is an (empty, existing) folder. On error the
    temporary file or folder is removed and `final` is left untouched. An existing `final`
    is replaced (a folder is replaced only when it is empty or `directory` is True).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".tmp-{final.name}-", suffix=final.suffix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        # mkstemp / mkdtemp create private (0600 / 0700) entries; give the result the
        # permissions a plain open() / mkdir() would (a serving container must read exports)
        if tmp.exists():
            os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~_UMASK)
        if directory and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
