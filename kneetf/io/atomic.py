"""Atomic file and folder writes: write to a temporary sibling, then rename into place.

A reader (or a TF Serving process watching a folder) never sees a half-written result, and
an interrupted run leaves only `.tmp-*` debris, which the next run removes
(`remove_debris`; given the names it writes, only `atomic_path`'s own temporaries of those
names, `debris_pattern`, so that a user's `.tmp-*` files stay) and readers ignore. Tables
that grow one row per finished item (`predictions.csv`) are `CsvLog`s: each row is appended
with a single write, so a killed process leaves whole rows only.

Each publication is a fault-injection point (`kneetf.faults`): `<fault>.before` when the
temporary file is complete, `<fault>.after` once it is renamed into place.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from kneetf import faults
from kneetf.errors import OutputError, storage_reason

DEBRIS_PREFIX = ".tmp-"
_TOKEN = "[a-z0-9_]{8}"  # the random part of a tempfile.mkstemp / mkdtemp name


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# read once: os.umask can only be read by setting it, which races with other threads' writes
_UMASK = _read_umask()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(final: str | Path, *, directory: bool = False, fault: str = "write") -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it to `final`.

    With `directory=True` the temporary path is an (empty, existing) folder. The temporary
    name keeps every suffix of `final` (`.weights.h5`, `.nii.gz`), as some writers require.
    On error the temporary file or folder is removed and `final` is left untouched. An
    existing `final` is replaced (a folder is replaced only when it is empty or `directory`
    is True): an old folder is first renamed aside and removed once the new one is in
    place, so that `final` never shows a half-deleted folder. `fault` names the
    fault-injection points of the rename (`kneetf.faults`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{DEBRIS_PREFIX}{_tmp_stem(final.name)}-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix="".join(final.suffixes), dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        # mkstemp / mkdtemp create private (0600 / 0700) entries; give the result the
        # permissions a plain open() / mkdir() would (a serving container must read exports)
        if tmp.exists():
            os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~_UMASK)
        faults.point(f"{fault}.before", final)
        aside = None
        if directory and final.is_dir() and not final.is_symlink():
            aside = Path(tempfile.mkdtemp(prefix=f"{DEBRIS_PREFIX}old-{_tmp_stem(final.name)}-", dir=final.parent))
            try:
                os.replace(final, aside)  # an empty folder is replaced by rename
            except OSError:
                aside.rmdir()
                raise
        try:
            os.replace(tmp, final)
        except OSError:
            if aside is not None:  # the old folder goes back: a failed write replaces nothing
                os.replace(aside, final)
            raise
        faults.point(f"{fault}.after", final)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException as e:
        _remove(tmp)
        reason = storage_reason(e)
        if reason is None or isinstance(e, OutputError):
            raise
        raise OutputError(final, reason) from None


def remove_atomic(path: str | Path) -> None:
    """Remove a file or folder so that `path` is there whole or gone: it is first renamed into a
    `.tmp-old-<name>-<token>` folder (`debris_pattern`), which is then deleted; an interrupted
    removal leaves only that debris."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    aside = Path(tempfile.mkdtemp(prefix=f"{DEBRIS_PREFIX}old-{path.name}-", dir=path.parent))
    os.replace(path, aside / path.name)
    shutil.rmtree(aside, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str, *, fault: str = "write") -> Path:
    """Write `text` to `path` atomically; returns the path."""
    with atomic_path(path, fault=fault) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def debris_pattern(name: str) -> re.Pattern[str]:
    """The temporary names `atomic_path(folder / name)` gives: `.tmp-<name>-<token>` and the
    suffixes of `name` (a file or folder being written), `.tmp-old-<name>-<token>` (a replaced
    folder set aside); `<token>` is tempfile's random part."""
    suffixes = re.escape("".join(Path(name).suffixes))
    return re.compile(rf"{re.escape(DEBRIS_PREFIX)}(?:old-)?{re.escape(_tmp_stem(name))}-{_TOKEN}(?:{suffixes})?")


def written_name(text: str) -> str | None:
    """The file a temporary name of `atomic_path` in `text` (a path, an error message) stands
    for, as `<folder>/<name>`; None when `text` holds none."""
    found = re.search(rf"(?P<dir>[^\s'\"]*/)?{re.escape(DEBRIS_PREFIX)}(?:old-)?(?P<name>[^/\s'\"]+)-{_TOKEN}"
                      r"(?=[.'\"\s:;,)]|$)", text)
    return (found["dir"] or "") + found["name"] if found else None


def _tmp_stem(name: str) -> str:
    """`name` as it appears in its temporary names: cut (at a character) so that the longest,
    `.tmp-old-<stem>-<token><suffixes>`, stays within the 255 bytes a file name may have."""
    room = 255 - len(f"{DEBRIS_PREFIX}old--12345678".encode()) - len("".join(Path(name).suffixes).encode())
    encoded = name.encode()
    if len(encoded) <= room:
        return name
    return encoded[:max(room, 1)].decode(errors="ignore")


def remove_debris(folder: str | Path, prefix: str = "", names: Iterable[str] | None = None) -> int:
    """Remove the `.tmp-<prefix>*` files and folders an interrupted write left in `folder`
    (not recursive); returns how many. With `names` (the names kneetf writes there), only the
    temporaries `atomic_path` makes for those names (`debris_pattern`) are removed: another
    `.tmp-*` entry (a user's) stays. Run before writing into a folder that only one kneetf
    command writes at a time."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = [p for p in folder.iterdir() if p.name.startswith(DEBRIS_PREFIX + prefix)]
    if names is not None:
        patterns = [debris_pattern(n) for n in set(names)]
        found = [p for p in found if any(r.fullmatch(p.name) for r in patterns)]
    for p in found:
        _remove(p)
    return len(found)


def csv_text(fields: Sequence[str], rows: Iterable[Mapping[str, Any]], header: bool = True) -> str:
    """A CSV table as text (newline-terminated rows, keys not in `fields` ignored)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n", extrasaction="ignore")
    if header:
        w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def write_csv_atomic(path: str | Path, fields: Sequence[str], rows: Iterable[Mapping[str, Any]], *,
                     fault: str = "write") -> Path:
    """Write a whole CSV table (header + rows) atomically."""
    return write_text_atomic(path, csv_text(fields, rows, True), fault=fault)


class CsvLog:
    """A CSV table that grows one row at a time and only ever holds whole rows.

    Opening it replaces `path` atomically with the header (and `rows`, if given); `append`
    adds one row with a single `write` call on a file opened for appending, which a killed
    process either did or did not make. The row is the commit of the item it lists: write
    the item's files first, then append its row.
    """

    def __init__(self, path: str | Path, fields: Sequence[str], rows: Iterable[Mapping[str, Any]] = (), *,
                 fault: str = "write") -> None:
        self.path = Path(path)
        self.fields = list(fields)
        self.fault = fault
        write_csv_atomic(self.path, self.fields, rows)

    def append(self, row: Mapping[str, Any]) -> None:
        data = csv_text(self.fields, [row], False).encode("utf-8")
        faults.point(f"{self.fault}.before", self.path)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            while data:  # one call for a row; a short write (a full disk) continues
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
        faults.point(f"{self.fault}.after", self.path)


__all__ = ["DEBRIS_PREFIX", "atomic_path", "remove_atomic", "debris_pattern", "write_text_atomic", "csv_text",
           "write_csv_atomic", "remove_debris", "CsvLog"]
