"""An output folder that never holds an input (`kneetf predict`, `kneetf prepare`) and where
kneetf replaces only what it wrote itself (`kneetf predict`).

Every name kneetf writes into an output folder is listed in its marker file `MARKER`
(JSON, `{"files": [...]}`) before the file is written, so a crash never leaves an unlisted
kneetf file. A name that exists but is not listed was put there by someone else: kneetf
refuses to replace it. An input that a marker lists is a kneetf output (a montage PNG, a
slice of a derived series), not an X-ray, and is refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from kneetf.errors import ConfigError, InputError
from kneetf.io.atomic import remove_atomic, write_text_atomic
from kneetf.version import __version__

MARKER = ".kneetf-outputs.json"


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _listed(folder: Path) -> set[str]:
    marker = folder / MARKER
    if not marker.is_file():
        return set()
    try:
        files = json.loads(marker.read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {str(f) for f in files if isinstance(f, str)}


def written_by_kneetf(path: str | Path) -> Path | None:
    """The marker file that lists `path` (or a folder holding it) as a kneetf output, or None."""
    p = _resolved(path)
    for folder in p.parents:
        names = _listed(folder)
        if names and p.relative_to(folder).parts[0] in names:
            return folder / MARKER
    return None


#: The output folders this process holds the lock of (resolved path -> the folder's open fd).
_LOCKS: dict[Path, int] = {}


def _lock(folder: Path) -> bool:
    """Take the lock of an existing `folder` for this process (an exclusive `flock` on the
    folder itself: nothing is written, and the system drops it when the process ends, even
    killed). ConfigError when another process holds it; False where the file system has no
    locks (some network file systems), True otherwise."""
    import errno
    import fcntl
    import os

    key = _resolved(folder)
    if key in _LOCKS:
        return True
    fd = os.open(key, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConfigError(f"--out {folder} is being written by another kneetf process; wait until it "
                              "ends, or choose another --out") from None
        return False
    _LOCKS[key] = fd
    return True


def _unlock(folder: Path) -> None:
    import os

    fd = _LOCKS.pop(_resolved(folder), None)
    if fd is not None:
        os.close(fd)


class OutputFolder:
    """An output folder and the names kneetf wrote into it (`MARKER`), held by one process
    at a time: a second kneetf process that writes into it gets a ConfigError (the lock is
    taken when the folder exists, else when the first name is claimed, and given back by
    `release`, or when the process ends)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path} exists and is not a folder")
        self.locked = self.path.is_dir() and _lock(self.path)
        self.names = _listed(self.path)

    def release(self) -> None:
        """Give the folder's lock back (another process may write into it from now on)."""
        if self.locked:
            _unlock(self.path)
            self.locked = False

    def refuse_inputs(self, inputs: Iterable[str | Path]) -> None:
        """ConfigError when the folder is one of `inputs`, or holds one (at any depth)."""
        out = _resolved(self.path)
        for raw in inputs:
            p = _resolved(raw)
            if p == out or out in p.parents:
                what = "is" if p == out else "holds"
                raise ConfigError(f"--out {self.path} {what} the input {raw}: kneetf would write over or read "
                                  "its own outputs; choose an output folder outside the inputs")

    def owns(self, path: Path) -> bool:
        """True when `path` in this folder does not exist or was written by kneetf."""
        return path.name in self.names or not (path.exists() or path.is_symlink())

    def claim(self, paths: Iterable[Path]) -> None:
        """List `paths` (in this folder) in the marker before they are written. InputError
        naming the first one that exists and was not written by kneetf."""
        paths = list(paths)
        for p in paths:
            if not self.owns(p):
                raise InputError(p, "exists and was not written by kneetf; it is left as it is (move it, "
                                    "or choose another --out)")
        new = {p.name for p in paths} - self.names
        if new:
            self.path.mkdir(parents=True, exist_ok=True)
            if not self.locked:
                self.locked = _lock(self.path)
                self.names |= _listed(self.path)  # what another process listed before it ended
                new = {p.name for p in paths} - self.names
            self.names |= new
            write_text_atomic(self.path / MARKER, json.dumps(
                {"written_by": f"kneetf {__version__}", "files": sorted(self.names)}, indent=1))

    def discard(self, paths: Iterable[Path], removable: Callable[[Path], bool] = lambda p: True) -> list[Path]:
        """Remove those of `paths` (in this folder) that exist, that kneetf wrote and that
        `removable` allows (a folder a user added files to, say); returns the removed ones."""
        removed = [p for p in paths if p.name in self.names and (p.exists() or p.is_symlink()) and removable(p)]
        for p in removed:
            remove_atomic(p)
        return removed


def _file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` that is not a folder, else None."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output_file(path: str | Path, flag: str = "--out", *, inputs: Iterable[str | Path] = ()) -> None:
    """ConfigError, before any work, unless a file can be written at `path`: not a folder,
    no file where a folder above it should be, not one of `inputs` (the files the command reads)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name")
    above = _file_above(path)
    if above is not None:
        raise ConfigError(f"{flag} {path}: {above} is a file, not a folder")
    target = _resolved(path)
    for raw in inputs:
        if _resolved(raw) == target:
            raise ConfigError(f"{flag} {path} is an input of this command ({raw}); kneetf would write over it")


def check_output_folder(path: str | Path, flag: str = "--out") -> None:
    """ConfigError, before any work, unless `path` is or can become a folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} exists and is not a folder")
    above = _file_above(path)
    if above is not None:
        raise ConfigError(f"{flag} {path}: {above} is a file, not a folder")


__all__ = ["MARKER", "written_by_kneetf", "OutputFolder", "check_output_file", "check_output_folder"]
