"""Typed errors. Every error a user can cause names the file, argument or value at fault."""
from __future__ import annotations

from pathlib import Path


class KneetfError(Exception):
    """Base class of kneetf's own errors (the CLI maps them to exit status 1)."""


class ConfigError(KneetfError, ValueError):
    """A configuration value, preset name or command-line argument is not valid."""


def lookup(registry: dict, name: str, what: str):
    """`registry[name]`, or a ConfigError listing the names, with a did-you-mean hint."""
    try:
        return registry[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(str(name), list(registry), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown {what} {name!r}; available: {', '.join(registry)}.{hint}") from None


class InputError(KneetfError, ValueError):
    """An input file or array cannot be used; `path` says which one, `reason` why."""

    def __init__(self, path: str | Path | None, reason: str):
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class UnsafeModelError(InputError):
    """A model file would run operations kneetf models never use (file or other I/O); it is
    loaded only when the user says it is trusted."""


class RoiNotFoundError(InputError):
    """The knee joint could not be found in an X-ray (no joint found by the classical ROI, or
    an image with nothing to find); `reason` says why. A batch job lists the file as failed
    instead of cropping the wrong place."""


class ManifestError(InputError):
    """A line of a manifest CSV is not valid; `line` is its 1-based line number."""

    def __init__(self, path: str | Path | None, line: int | None, reason: str):
        self.line = line
        where = f"line {line}: " if line is not None else ""
        super().__init__(path, where + reason)


class OutputError(KneetfError, OSError):
    """An output could not be written for want of room or permission on its file system (full,
    over quota, read-only); `path` is the output, `reason` the condition. It
    is an OSError too, so code that handles failed writes handles it."""

    def __init__(self, path: str | Path | None, reason: str):
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"cannot write {self.path}: {reason}" if self.path else f"cannot write: {reason}")

    def __str__(self) -> str:
        return str(self.args[0])


#: errno -> what `storage_reason` says
_STORAGE_ERRNOS = {"ENOSPC": "no space left on device", "EDQUOT": "disk quota exceeded",
                   "EROFS": "read-only file system", "EFBIG": "file too large"}
#: the words of those errors that are looked for in other libraries' messages
_STORAGE_TEXTS = ("no space left on device", "disk quota exceeded", "read-only file system")


def storage_reason(e: BaseException | None) -> str | None:
    """What the file system refused, when `e` (or an exception it was raised from) is a failed
    write for want of room or permission (an OSError's errno, or the words TensorFlow's,
    h5py's and pydicom's own errors carry); None for any other error."""
    import errno

    codes = {getattr(errno, name): words for name, words in _STORAGE_ERRNOS.items() if hasattr(errno, name)}
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OutputError):
            return e.reason
        if isinstance(e, OSError) and e.errno in codes:
            return codes[e.errno]
        text = str(e).lower()
        for words in _STORAGE_TEXTS:
            if words in text:
                return words
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


class ServingError(KneetfError):
    """The model server answered with an error, or not at all."""


class ModelNotFoundError(ServingError):
    """The server does not serve this model name or version (gRPC NOT_FOUND, HTTP 404)."""


class ServerUnavailableError(ServingError):
    """The server cannot be reached (gRPC UNAVAILABLE, connection refused), after retries."""
