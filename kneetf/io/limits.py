"""The one size limit of the readers: how many pixel values a read may decode.

Input files are untrusted: a few hundred kilobytes of PNG, JPEG 2000 or deflated DICOM can
expand to gigabytes. Every reader compares the size a file declares (rows x columns x frames
x samples per pixel, from the file's own header, and for compressed DICOM pixel data also
from the codestream's header) with `ReaderConfig.max_pixels` BEFORE it decodes anything, and
deflated DICOM data is inflated as a stream that stops at what the header declares.

What counts against the limit is what one read decodes in one piece:

* an image file (PNG, TIFF, JPEG, a 2-D `.npy`): the image (rows x columns x channels);
* a DICOM file: rows x columns x frames x samples per pixel, all frames;
* an MRI series folder or 3-D `.npy` volume, in addition: the slices of the window that is
  decoded;
* a NIfTI volume: the whole volume.

The default, 2**25 = 33,554,432 values (a 5792x5792 grey image, 128 MiB as float32), passes
OAI radiographs (about 2000x2500), a 4300x3500 flat-panel detector and OAI MRI series; raise
it with `kneetf prepare --max-pixels N` / `kneetf predict --max-pixels N` for bigger images.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from kneetf.errors import ConfigError, InputError

#: The default of `ReaderConfig.max_pixels` (see the module docstring).
DEFAULT_MAX_PIXELS: int = 2**25


@dataclass(frozen=True)
class ReaderConfig:
    """Settings of the file readers (not part of the preprocessing: they decide which files
    are refused, never what an accepted file decodes to).

    max_pixels: most pixel values (rows x columns x frames x samples per pixel) one read may
        decode; files declaring more are refused before decoding.
    """

    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={
        "help": "refuse input images declaring more pixel values (rows x columns x frames x samples) than "
                "this, before decoding them", "metavar": "N"})

    def __post_init__(self) -> None:
        if not isinstance(self.max_pixels, int) or isinstance(self.max_pixels, bool) or self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be a positive integer. Received: max_pixels={self.max_pixels!r}")


_CURRENT: contextvars.ContextVar[ReaderConfig] = contextvars.ContextVar("kneetf_reader_config",
                                                                          default=ReaderConfig())


def current_reader_config() -> ReaderConfig:
    """The reader settings in effect (the defaults unless `use_reader_config` changed them)."""
    return _CURRENT.get()


@contextlib.contextmanager
def use_reader_config(config: ReaderConfig) -> Iterator[ReaderConfig]:
    """Make `config` the readers' settings inside the `with` block (this thread / context)."""
    token = _CURRENT.set(config)
    try:
        yield config
    finally:
        _CURRENT.reset(token)


def resolve_max_pixels(max_pixels: int | None) -> int:
    """`max_pixels`, or the current reader config's when None."""
    if max_pixels is None:
        return current_reader_config().max_pixels
    return ReaderConfig(max_pixels=max_pixels).max_pixels


def check_pixels(path: str | Path | None, what: str, values: int, max_pixels: int, detail: str = "") -> int:
    """Refuse `values` declared pixel values over `max_pixels` (or none at all) -> values."""
    if values <= 0:
        raise InputError(path, f"{what} declares an empty image{detail and f' ({detail})'}")
    if values > max_pixels:
        raise InputError(path, f"{what} declares {detail + ' = ' if detail else ''}{values} pixel values, more "
                               f"than the limit of {max_pixels} (max_pixels; raise it with --max-pixels if the "
                               "file is genuine); refusing to decode it")
    return values


__all__ = ["DEFAULT_MAX_PIXELS", "ReaderConfig", "current_reader_config", "use_reader_config",
           "resolve_max_pixels", "check_pixels"]
