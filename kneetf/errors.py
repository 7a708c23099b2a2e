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


class ManifestError(InputError):
    """A line of a manifest CSV is not valid; `line` is its 1-based line number."""

    def __init__(self, path: str | Path | None, line: int | None, reason: str):
        self.line = line
        where = f"line {line}: " if line is not None else ""
        super().__init__(path, where + reason)


class ServingError(KneetfError):
    """The model server answered with an error, or not at all."""


class ModelNotFoundError(ServingError):
    """The server does not serve this model name or version (gRPC NOT_FOUND, HTTP 404)."""


class ServerUnavailableError(ServingError):
    """The server cannot be reached (gRPC UNAVAILABLE, connection refused), after retries."""
