"""Looking up a path a user gave (on the command line, in a manifest) without the operating
system's refusals escaping as exceptions: a name longer than the file system takes, a folder
that may not be searched, a symbolic-link loop."""
from __future__ import annotations

import errno
import os
from pathlib import Path

#: what a missing file or folder looks like; anything else the system says is a refusal
_ABSENT = (errno.ENOENT, errno.ENOTDIR)


def lookup_refused(path: str | Path) -> str | None:
    """Why the system refuses to look `path` up ("File name too long"), or None when it can
    say whether the path exists (present or not)."""
    try:
        os.stat(path)
    except OSError as e:
        return None if e.errno in _ABSENT else (e.strerror or str(e))
    except ValueError as e:  # a NUL byte in the name
        return str(e)
    return None
