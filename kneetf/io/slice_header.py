"""The few header values a series scan needs, read straight from the bytes of a plain slice file.

A series folder holds one file per slice (an OAI DESS series: 160), and sorting it needs
every header. pydicom builds an object per element of each file; for the common plain file
-- a preamble and file meta, an Explicit or Implicit VR Little Endian dataset, native pixel
data that ends the file, one frame, no functional groups -- this reads the top-level
geometry, size, rescale and series values from the bytes instead, with the conversions
pydicom applies (DS: `float` of each backslash-separated value; US: little-endian unsigned
16 bits; UI: trailing NULs and spaces removed).

Anything else gives None and the caller parses the file with pydicom: other transfer syntaxes,
encapsulated or float pixel data, bytes after the pixel data, multi-frame or enhanced files,
an element whose VR is not the standard one, an empty, non-finite or wrongly numbered value,
a header that does not fit the file, a size over `max_pixels`. So every file this refuses or
reports on is still judged, and named, by pydicom's path.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Explicit VRs with a 2-byte reserved field and a 4-byte length; the others have a 2-byte length.
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
#: Pixel data of another kind (float, double): pydicom's path.
_OTHER_PIXELS = frozenset((0x7FE00008, 0x7FE00009))
#: Enhanced (functional group) files: pydicom's path.
_FUNCTIONAL_GROUPS = frozenset((0x52009229, 0x52009230))
#: The values read, by tag: (keyword, VR).
_WANTED = {
    0x00180050: ("SliceThickness", b"DS"),
    0x0020000E: ("SeriesInstanceUID", b"UI"),
    0x00200032: ("ImagePositionPatient", b"DS"),
    0x00200037: ("ImageOrientationPatient", b"DS"),
    0x00280002: ("SamplesPerPixel", b"US"),
    0x00280004: ("PhotometricInterpretation", b"CS"),
    0x00280008: ("NumberOfFrames", b"IS"),
    0x00280010: ("Rows", b"US"),
    0x00280011: ("Columns", b"US"),
    0x00280030: ("PixelSpacing", b"DS"),
    0x00280100: ("BitsAllocated", b"US"),
    0x00280101: ("BitsStored", b"US"),
    0x00280103: ("PixelRepresentation", b"US"),
    0x00281052: ("RescaleIntercept", b"DS"),
    0x00281053: ("RescaleSlope", b"DS"),
}
#: Bytes read first; a header that does not fit them is read whole.
_HEAD = 16384
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class _Unusual(Exception):
    """Not a plain slice file: pydicom reads it."""


class _Short(Exception):
    """The header runs past the bytes read so far."""


@dataclass(frozen=True)
class SliceHeader:
    """The values of one plain single-frame slice file that a series scan uses."""

    series_uid: str
    rows: int
    cols: int
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    slope: float
    intercept: float
    #: (where the pixel data starts, BitsStored) when it is plain unsigned 16-bit MONOCHROME2:
    #: rows x cols little-endian values, of which pydicom's `pixel_array` keeps the low
    #: BitsStored bits; else None
    plain_pixels: tuple[int, int] | None = None


def read_slice_header(path: str | Path, max_pixels: int) -> SliceHeader | None:
    """The header values of a plain slice file (see the module docstring), or None when
    pydicom should read it. Never raises for a file's content; OSError only when the file
    cannot be opened or read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = f.read(_HEAD)
        for attempt in (0, 1):
            try:
                return _header(_values(buf, size), max_pixels)
            except _Short:
                if attempt or len(buf) >= size:
                    return None
                buf += f.read()
            except (_Unusual, struct.error, ValueError, UnicodeDecodeError, OverflowError):
                return None
    return None


def _element(buf: bytes, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None when implicit, value offset, value length) of the element at `pos`."""
    if pos + 8 > len(buf):
        raise _Short
    group, elem = _TAG.unpack_from(buf, pos)
    tag = group << 16 | elem
    if implicit or group == 0xFFFE:  # item and delimiter tags have no VR in either encoding
        return tag, None, pos + 8, _U32.unpack_from(buf, pos + 4)[0]
    vr = buf[pos + 4:pos + 6]
    if vr in _SHORT_VRS:
        return tag, vr, pos + 8, _U16.unpack_from(buf, pos + 6)[0]
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise _Short
        return tag, vr, pos + 12, _U32.unpack_from(buf, pos + 8)[0]
    raise _Unusual


def _skip_sequence(buf: bytes, pos: int, implicit: bool, depth: int = 0) -> int:
    """The offset after an undefined-length sequence whose first item starts at `pos`."""
    if depth > 16:
        raise _Unusual
    while True:
        tag, _, at, length = _element(buf, pos, True)
        if tag == _SEQUENCE_END:
            return at
        if tag != _ITEM:
            raise _Unusual
        if length != _UNDEFINED:
            pos = at + length
            continue
        pos = at
        while True:  # an undefined-length item: its elements up to the item delimiter
            tag, vr, at, length = _element(buf, pos, implicit)
            if tag == _ITEM_END:
                pos = at
                break
            if length == _UNDEFINED:
                if vr not in (None, b"SQ"):
                    raise _Unusual
                pos = _skip_sequence(buf, at, implicit, depth + 1)
            else:
                pos = at + length


def _values(buf: bytes, size: int) -> dict[int, tuple[bytes | None, bytes]]:
    """The raw (VR, value) of each wanted top-level element of a plain slice file, and the
    pixel data's offset and length under the key `_PIXEL_DATA`."""
    if len(buf) < 132:
        raise _Short
    if buf[128:132] != b"DICM":
        raise _Unusual
    pos, syntax, sop = 132, None, None
    while True:  # the file meta group: always Explicit VR Little Endian
        if pos + 2 > len(buf):
            raise _Short
        if _U16.unpack_from(buf, pos)[0] != 0x0002:
            break
        tag, _, at, length = _element(buf, pos, False)
        if length == _UNDEFINED:
            raise _Unusual
        if at + length > len(buf):
            raise _Short
        if tag == 0x00020010:
            syntax = buf[at:at + length].decode("ascii").rstrip("\0 ")
        elif tag == 0x00020002:
            sop = buf[at:at + length].decode("ascii").rstrip("\0 ")
        pos = at + length
    if syntax not in (EXPLICIT_VR_LE, IMPLICIT_VR_LE) or sop == _DICOMDIR_SOP_CLASS:
        raise _Unusual
    implicit = syntax == IMPLICIT_VR_LE
    found: dict[int, tuple[bytes | None, bytes]] = {}
    while True:
        tag, vr, at, length = _element(buf, pos, implicit)
        if tag == _PIXEL_DATA:  # native pixel data that ends the file
            if length == _UNDEFINED or at + length != size or vr not in (None, b"OB", b"OW"):
                raise _Unusual
            found[_PIXEL_DATA] = (None, _U32.pack(at) + _U32.pack(length))
            return found
        if tag in _OTHER_PIXELS or tag in _FUNCTIONAL_GROUPS or tag >> 16 == 0xFFFE:
            raise _Unusual
        if length == _UNDEFINED:
            if vr not in (None, b"SQ") or tag in _WANTED:
                raise _Unusual
            pos = _skip_sequence(buf, at, implicit)
            continue
        if at + length > size:
            raise _Unusual
        if tag in _WANTED:
            if at + length > len(buf):
                raise _Short
            if vr is not None and vr != _WANTED[tag][1]:
                raise _Unusual
            found[tag] = (vr, buf[at:at + length])
        pos = at + length


def _decimals(found: dict[int, tuple[bytes | None, bytes]], tag: int, n: int | None) -> tuple[float, ...] | None:
    """The finite values of a DS element (None when absent); `n` of them, or any number."""
    if tag not in found:
        return None
    values = tuple(float(v) for v in found[tag][1].split(b"\\"))  # ValueError: empty or odd value
    if (n is not None and len(values) != n) or not all(math.isfinite(v) for v in values):
        raise _Unusual
    return values


def _short(found: dict[int, tuple[bytes | None, bytes]], tag: int, default: int | None) -> int | None:
    """The value of a single-valued US element, or `default` when absent."""
    if tag not in found:
        return default
    value = found[tag][1]
    if len(value) != 2:
        raise _Unusual
    return _U16.unpack(value)[0]


def _header(found: dict[int, tuple[bytes | None, bytes]], max_pixels: int) -> SliceHeader:
    if 0x00280008 in found and int(found[0x00280008][1].decode("ascii").strip("\0 ")) != 1:
        raise _Unusual  # multi-frame
    rows, cols = _short(found, 0x00280010, None), _short(found, 0x00280011, None)
    samples, bits = _short(found, 0x00280002, 1), _short(found, 0x00280100, 16)
    if not rows or not cols or bits not in (1, 8, 16, 32, 64) or rows * cols * max(samples, 1) > max_pixels:
        raise _Unusual  # pydicom's path says what is wrong
    position = _decimals(found, 0x00200032, 3)
    orientation = _decimals(found, 0x00200037, 6)
    if position is None or orientation is None:
        raise _Unusual
    spacing = _decimals(found, 0x00280030, 2)
    thickness = _decimals(found, 0x00180050, 1)
    slope = _decimals(found, 0x00281053, 1)
    intercept = _decimals(found, 0x00281052, 1)
    uid = found[0x0020000E][1].decode("iso8859").rstrip("\0 ") if 0x0020000E in found else ""
    if "\\" in uid:
        raise _Unusual
    if spacing is not None and not all(v > 0 for v in spacing):
        raise _Unusual  # pydicom's path treats it as missing
    offset, length = _U32.unpack(found[_PIXEL_DATA][1][:4])[0], _U32.unpack(found[_PIXEL_DATA][1][4:])[0]
    photometric = found[0x00280004][1].decode("ascii").strip("\0 ").upper() if 0x00280004 in found else ""
    described = all(t in found for t in (0x00280002, 0x00280100, 0x00280101, 0x00280103))  # as pydicom requires
    stored = _short(found, 0x00280101, 0)
    plain = (described and photometric == "MONOCHROME2" and samples == 1 and bits == 16 and 1 <= stored <= 16
             and _short(found, 0x00280103, 0) == 0 and length == rows * cols * 2)
    return SliceHeader(series_uid=uid, rows=rows, cols=cols, position=position, orientation=orientation,
                       pixel_spacing=spacing, thickness=thickness[0] if thickness else None,
                       slope=(slope[0] if slope else 1.0) or 1.0,
                       intercept=(intercept[0] if intercept else 0.0) or 0.0,
                       plain_pixels=(offset, stored) if plain else None)
