"""Image sizes from file and codestream headers, without decoding a pixel.

Each parser reads a few bytes from a binary stream and returns (rows, columns, components)
or raises ValueError. They let the readers refuse a file that declares too many pixels, or
compressed DICOM pixel data whose codestream holds another image than the DICOM header says,
before a decoder allocates anything.
"""
from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import BinaryIO, Callable

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: JPEG start-of-frame markers (SOF0-SOF15 without DHT, JPG and DAC) and JPEG-LS SOF55.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}


def png_size(f: BinaryIO) -> tuple[int, int, int]:
    """(rows, columns, channels) of a PNG from its IHDR chunk."""
    head = f.read(29)
    if len(head) < 29 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise ValueError("no PNG signature / IHDR chunk")
    width, height, _depth, colour = struct.unpack(">IIBB", head[16:26])
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 4)
    return height, width, channels


def jpeg_size(f: BinaryIO) -> tuple[int, int, int]:
    """(rows, columns, components) of a JPEG or JPEG-LS stream from its start-of-frame header."""
    if f.read(2) != b"\xff\xd8":
        raise ValueError("no JPEG start-of-image marker")
    while True:
        byte = f.read(1)
        while byte and byte != b"\xff":
            byte = f.read(1)
        while byte == b"\xff":
            byte = f.read(1)
        if not byte:
            raise ValueError("no JPEG frame header (SOF) found")
        marker = byte[0]
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            continue
        if marker == 0xD9:
            raise ValueError("JPEG stream ends before a frame header (SOF)")
        raw = f.read(2)
        if len(raw) < 2:
            raise ValueError("truncated JPEG segment")
        length = struct.unpack(">H", raw)[0]
        if marker in _SOF_MARKERS:
            seg = f.read(6)
            if len(seg) < 6:
                raise ValueError("truncated JPEG frame header")
            _precision, height, width, comps = struct.unpack(">BHHB", seg)
            if height == 0:
                raise ValueError("JPEG frame header declares height 0 (DNL marker is not supported)")
            return height, width, comps
        if length < 2:
            raise ValueError(f"JPEG segment 0x{marker:02X} has an invalid length {length}")
        f.seek(length - 2, 1)


def j2k_size(f: BinaryIO) -> tuple[int, int, int]:
    """(rows, columns, components) of a JPEG 2000 / HTJ2K codestream (SIZ marker) or JP2 file
    (image header box)."""
    head = f.read(12)
    if head[:4] == b"\xff\x4f\xff\x51":  # SOC then SIZ
        siz = head[4:] + f.read(38 - 8)
        if len(siz) < 38:
            raise ValueError("truncated JPEG 2000 SIZ marker")
        _lsiz, _rsiz, xsiz, ysiz, xosiz, yosiz = struct.unpack(">HHIIII", siz[:20])
        comps = struct.unpack(">H", siz[36:38])[0]
        if xosiz >= xsiz or yosiz >= ysiz:
            raise ValueError(f"JPEG 2000 SIZ declares an empty image ({xsiz}x{ysiz}, offset {xosiz},{yosiz})")
        return ysiz - yosiz, xsiz - xosiz, comps
    if head[4:8] == b"jP  ":  # JP2: boxes, the image header inside the jp2h superbox
        f.seek(0)
        return _jp2_ihdr(f, limit=1 << 20)
    raise ValueError("no JPEG 2000 codestream (SOC + SIZ) or JP2 signature")


def _jp2_ihdr(f: BinaryIO, limit: int) -> tuple[int, int, int]:
    end = f.tell() + limit
    while f.tell() < end:
        box = f.read(8)
        if len(box) < 8:
            break
        length, kind = struct.unpack(">I4s", box)
        header = 8
        if length == 1:
            length = struct.unpack(">Q", f.read(8))[0]
            header = 16
        if kind == b"jp2h":
            continue  # descend into the superbox
        if kind == b"ihdr":
            data = f.read(10)
            if len(data) < 10:
                raise ValueError("truncated JP2 image header box")
            height, width, comps = struct.unpack(">IIH", data)
            return height, width, comps
        if kind == b"jp2c":
            return j2k_size(f)
        if length < header:
            break
        f.seek(length - header, 1)
    raise ValueError("no JP2 image header box (ihdr) found")


def tiff_size(f: BinaryIO) -> tuple[int, int, int]:
    """(rows, columns, samples per pixel) of the first image of a TIFF / BigTIFF file."""
    head = f.read(16)
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None:
        raise ValueError("no TIFF byte-order mark")
    version = struct.unpack(order + "H", head[2:4])[0]
    if version == 42:
        offset = struct.unpack(order + "I", head[4:8])[0]
        count_fmt, entry_size, value_fmt = "H", 12, "I"
    elif version == 43:  # BigTIFF
        offset = struct.unpack(order + "Q", head[8:16])[0]
        count_fmt, entry_size, value_fmt = "Q", 20, "Q"
    else:
        raise ValueError(f"TIFF version {version} is not 42 or 43")
    f.seek(offset)
    count_size = struct.calcsize(count_fmt)
    n = struct.unpack(order + count_fmt, f.read(count_size))[0]
    if n > 4096:
        raise ValueError(f"TIFF IFD claims {n} entries")
    tags: dict[int, int] = {}
    for _ in range(n):
        entry = f.read(entry_size)
        if len(entry) < entry_size:
            raise ValueError("truncated TIFF IFD")
        tag, typ = struct.unpack(order + "HH", entry[:4])
        value = entry[4 + struct.calcsize(value_fmt):]
        if typ == 3:
            tags[tag] = struct.unpack(order + "H", value[:2])[0]
        elif typ == 4:
            tags[tag] = struct.unpack(order + "I", value[:4])[0]
        elif typ == 16:
            tags[tag] = struct.unpack(order + "Q", value[:8])[0]
    if 256 not in tags or 257 not in tags:
        raise ValueError("TIFF IFD has no ImageWidth/ImageLength")
    return tags[257], tags[256], tags.get(277, 1)


#: Image file suffix -> header parser.
FILE_PARSERS: dict[str, Callable[[BinaryIO], tuple[int, int, int]]] = {
    ".png": png_size, ".jpg": jpeg_size, ".jpeg": jpeg_size, ".tif": tiff_size, ".tiff": tiff_size}


def file_image_size(path: str | Path) -> tuple[int, int, int]:
    """(rows, columns, channels) from a PNG/JPEG/TIFF file header (ValueError if not parsable)."""
    path = Path(path)
    parser = FILE_PARSERS.get(path.suffix.lower())
    if parser is None:
        raise ValueError(f"no header parser for suffix {path.suffix!r}")
    with open(path, "rb") as f:
        try:
            return parser(f)
        except struct.error as e:
            raise ValueError(f"truncated header ({e})") from e


def codestream_size(kind: str, data: bytes) -> tuple[int, int, int]:
    """(rows, columns, components) of the first bytes of one compressed frame; `kind` is
    "jpeg" (JPEG and JPEG-LS) or "j2k" (JPEG 2000, HTJ2K)."""
    parser = {"jpeg": jpeg_size, "j2k": j2k_size}[kind]
    try:
        return parser(io.BytesIO(data))
    except struct.error as e:
        raise ValueError(f"truncated header ({e})") from e


__all__ = ["png_size", "jpeg_size", "j2k_size", "tiff_size", "file_image_size", "codestream_size", "FILE_PARSERS"]
