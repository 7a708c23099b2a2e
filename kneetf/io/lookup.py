"""Looking up a path a user gave (on the command line, in a manifest) without the operating
system's refusals escaping as exceptions: a name longer than the file system takes, a folder
that may not be searched, a symbolic-link loop."""
from __future__ import annotations

import errno
import os
from pathlib import Path

#: what a missing file or folder looks like; anything else the system says is a refusal
_ABSENT = (errno.ENOENT, errno.ENOTDIR)


def lookup(path: str | Path) -> tuple[os.stat_result | None, str | None]:
    """One look at `path` (links followed): (its stat, None) when it exists, (None, None) when
    it does not, (None, why) when the system refuses to look it up ("File name too long")."""
    try:
        return os.stat(path), None
    except OSError as e:
        return None, None if e.errno in _ABSENT else (e.strerror or str(e))
    except ValueError as e:  # a NUL byte in the name
        return None, str(e)
