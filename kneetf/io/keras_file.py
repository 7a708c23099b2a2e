"""What a `.keras` model file must be before Keras reads it: a zip archive.

Keras 3 reports a truncated or foreign `.keras` file as "File not found", which sends the
user looking for a file that is there. Every loader checks it first (`require_keras_archive`).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

from kneetf.errors import InputError


def require_keras_archive(path: str | Path) -> None:
    """InputError naming `path` unless it is a zip archive, as Keras saves a `.keras` model."""
    if not zipfile.is_zipfile(path):
        raise InputError(path, "is not a Keras .keras archive (not a zip file: truncated, or saved in another "
                               "format)")


__all__ = ["require_keras_archive"]
