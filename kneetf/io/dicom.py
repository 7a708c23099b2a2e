"""DICOM with pydicom: slice geometry, series ordering, rescale, MONOCHROME1, PHI-free meta.

Geometry conventions (shared with `kneetf.io.writers` and the NIfTI reader):

* Coordinates are DICOM patient coordinates, LPS: +x patient left, +y posterior,
  +z superior (head), in mm.
* `ImageOrientationPatient` holds the row direction (moving along a row, increasing column
  index) then the column direction (moving down a column, increasing row index).
* The slice normal is row x column. Slices are sorted ASCENDING by
  `ImagePositionPatient . normal`, never by file name or InstanceNumber.
* The default orientation is sagittal, `(0, 1, 0, 0, 0, -1)`: columns run anterior ->
  posterior (+y), rows run superior -> inferior (-z), so the image shows the knee with
  anterior on the left and superior at the top; the normal is (-1, 0, 0), so slice 0 is
  the patient's leftmost slice and slices step towards the patient's right. OAI's sagittal
  DESS series use this orientation.

Untrusted files (see `kneetf.io.limits`): the size a header declares is checked against
`max_pixels` before pixels are decoded; compressed pixel data must hold, frame by frame, the
image the DICOM header declares (JPEG / JPEG-LS frame header, JPEG 2000 SIZ marker); a
Deflated Explicit VR Little Endian file is inflated as a stream first and refused as soon as
it inflates past what its header declares, before pydicom inflates it.

Everything here is numpy + pydicom (no TensorFlow): it runs in cache-building workers.
Nothing that identifies a patient (names, ids, dates, UIDs) leaves this module in the
meta dicts; Series UIDs are used only to check that a folder holds one series.
"""
from __future__ import annotations

import io
import logging
import math
import os
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Sequence

import numpy as np

from kneetf.errors import InputError
from kneetf.io.headers import codestream_size
from kneetf.io.limits import DEFAULT_MAX_PIXELS, check_pixels, resolve_max_pixels

log = logging.getLogger(__name__)

#: Sagittal orientation used by the writers by default (see the module docstring).
DEFAULT_ORIENTATION: tuple[float, ...] = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
#: The default limit of declared pixel values (`kneetf.io.limits.DEFAULT_MAX_PIXELS`).
MAX_PIXELS: int = DEFAULT_MAX_PIXELS
#: Elements bigger than this (pixel data, private blobs) are read lazily from the file.
_DEFER_SIZE = 4096
#: Files a DICOM folder scan never opens.
_IGNORED_SUFFIXES = {".txt", ".csv", ".json", ".xml", ".md", ".html", ".pdf", ".jpg", ".jpeg", ".png",
                     ".nii", ".gz", ".npy", ".zip", ".tar", ".log", ".ini"}
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _has_pixels(ds: Any) -> bool:
    """True when a parsed dataset holds a pixel data element (of any of the three kinds)."""
    return any(k in ds for k in _PIXEL_KEYWORDS)


@contextmanager
def header_values(path: str | Path) -> Iterator[None]:
    """pydicom converts an element's value when it is first read; a garbled one (an unknown VR,
    a number that does not parse) raises ValueError, TypeError or NotImplementedError there,
    deep in the reading: within this block, that is `path`'s InputError."""
    try:
        yield
    except InputError:
        raise
    except (ValueError, TypeError, NotImplementedError, OverflowError) as e:
        raise InputError(path, f"malformed DICOM header: {type(e).__name__}: {e}") from e


# === Geometry ===
def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit slice normal (row direction x column direction) of 6 direction cosines."""
    o = np.asarray(orientation, dtype=np.float64)
    n = np.cross(o[:3], o[3:])
    norm = np.linalg.norm(n)
    if not norm > 1e-6:
        raise ValueError(f"orientation {tuple(o)} has parallel row and column directions")
    return n / norm


def voxel_to_lps(orientation: Sequence[float], spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """4x4 affine from voxel (column, row, slice, 1) to LPS mm.

    `spacing` is (slice_mm, row_mm, col_mm): row_mm is the distance between rows (DICOM
    PixelSpacing[0]), col_mm between columns (PixelSpacing[1]).
    """
    o = np.asarray(orientation, dtype=np.float64)
    slice_mm, row_mm, col_mm = (float(s) for s in spacing)
    aff = np.eye(4)
    aff[:3, 0] = o[:3] * col_mm
    aff[:3, 1] = o[3:] * row_mm
    aff[:3, 2] = slice_normal(o) * slice_mm
    aff[:3, 3] = np.asarray(origin, dtype=np.float64)
    return aff


#: LPS <-> RAS (NIfTI) flip; its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Axis codes (nibabel, RAS letters) of a (slice, row, column) volume in the default
#: sagittal DICOM orientation (0, 1, 0, 0, 0, -1): slices -> patient right, rows -> inferior,
#: columns -> posterior. The MRI readers return every volume in this layout.
SAGITTAL_AXCODES = ("R", "I", "P")


# === Headers ===
def looks_like_dicom(path: Path) -> bool:
    """True when `path` has the DICOM preamble magic (b'DICM' at byte 128) or a DICOM suffix."""
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


class TruncatedDicomError(InputError):
    """A DICOM file that ends before its data does."""


def read_header(path: str | Path, *, force: bool = False, max_pixels: int | None = None) -> Any:
    """Parse a DICOM file with its large elements (pixel data) deferred: read on first use.

    A deflated file is first inflated as a stream (keeping only its header) and refused when
    the header declares more than `max_pixels` values (None: the current `ReaderConfig`'s) or
    when the stream inflates past what the header declares; only then does pydicom read it.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        if _is_deflated(path):
            _check_deflated(Path(path), resolve_max_pixels(max_pixels))
        ds = pydicom.dcmread(path, defer_size=_DEFER_SIZE, force=force)
    except InputError:
        raise
    except InvalidDicomError as e:  # pydicom's advice to pass force=True is for its own callers
        reason = str(e).replace(" Use force=True to force reading.", "").strip()
        raise InputError(path, f"not a DICOM file ({reason})") from e
    except (OSError, EOFError) as e:
        raise InputError(path, f"cannot read DICOM file: {e}") from e
    except Exception as e:  # pydicom raises many types on corrupt headers
        raise InputError(path, f"corrupt DICOM header: {type(e).__name__}: {e}") from e
    # pydicom only warns when the file ends inside an element of undefined length (compressed
    # pixel data cut off, say), and drops that element with some or all of those before it
    if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) and not _has_pixels(ds):
        if _holds_encapsulated_pixels(path):
            raise TruncatedDicomError(path, "truncated: the file ends inside its compressed pixel data (pydicom "
                                            "read no pixel data)")
        if len(ds) == 0:
            raise TruncatedDicomError(path, "truncated: the file ends inside a data element (no element could be "
                                            "read after the file meta information)")
    return ds


#: The start of encapsulated (compressed) pixel data: the tag (7FE0,0010), VR OB, undefined length.
_ENCAPSULATED_PIXELS = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"
#: The sequence delimitation item that ends encapsulated pixel data.
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _holds_encapsulated_pixels(path: str | Path) -> bool:
    """True when the bytes of the file hold the start of an encapsulated pixel data element that
    no delimiter ends (the last one; an icon's in a sequence before it is ended)."""
    started = ended = False
    tail = b""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            window = tail + chunk
            at = window.rfind(_ENCAPSULATED_PIXELS)
            if at >= 0:
                started, ended = True, _SEQUENCE_END in window[at + len(_ENCAPSULATED_PIXELS):]
            elif started and not ended:
                ended = _SEQUENCE_END in window
            tail = window[-len(_ENCAPSULATED_PIXELS):]
    return started and not ended


def pixel_data_cut(ds: Any, path: str | Path) -> int | None:
    """How many bytes of a deferred, defined-length (native) PixelData lie past the end of the
    file `read_header` parsed into `ds` (a truncated file), or None when it is whole, not
    deferred, or the file is deflated (its offsets are those of the inflated stream)."""
    from pydicom.dataelem import RawDataElement

    if str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")) == DEFLATED:
        return None
    raw = ds.get_item(0x7FE00010, keep_deferred=True)
    if not isinstance(raw, RawDataElement) or raw.value is not None or raw.length == 0xFFFFFFFF:
        return None
    missing = raw.value_tell + raw.length - os.path.getsize(path)
    return missing if missing > 0 else None


def missing_image(ds: Any) -> str | None:
    """Why a parsed DICOM header holds no image to decode, or None when it has pixel data."""
    if _has_pixels(ds):
        return None
    if not_an_image(ds) or "SOPClassUID" not in ds:
        return "DICOM file holds no image (no PixelData)"
    return ("DICOM image without its pixel data: the file ends before the pixel data does (truncated), "
            "or the element is missing")


def declared_sop_classes(ds: Any) -> list[str] | None:
    """The SOP class UIDs a header declares, in the dataset then in the file meta, each value of
    a repeated one (a report may say its class twice), without duplicates; None when pydicom
    cannot convert them (a broken header, for the reader to report)."""
    found: list[str] = []
    try:
        for value in (ds.get("SOPClassUID"), getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)):
            values = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
            found.extend(str(v).strip() for v in values if v is not None and str(v).strip())
    except Exception:
        return None
    return list(dict.fromkeys(found))


def sop_class_name(ds: Any) -> str:
    """The name of the first SOP class a header declares that pydicom knows ("Basic Text SR
    Storage"), or "a DICOM object"."""
    from pydicom.uid import UID

    for uid in declared_sop_classes(ds) or []:
        if UID(uid).name != uid:
            return UID(uid).name
    return "a DICOM object"


def not_an_image(ds: Any) -> bool:
    """True for a DICOM object that is not an image (a structured report, a presentation state,
    spectroscopy, an encapsulated document): no pixel data, and only SOP classes that are not
    image storage classes (a private one: no Rows either). False for anything else, an image
    whose pixel data is missing and a dataset without a SOP class included."""
    from pydicom.uid import UID

    if _has_pixels(ds):
        return False
    declared = declared_sop_classes(ds)
    if not declared:
        return False

    def image_class(uid: str) -> bool:
        name = UID(uid).name
        return "Rows" in ds if name == uid else "Image Storage" in name

    return not any(image_class(uid) for uid in declared)


#: Tags of the elements `_raw_numbers` reads, by keyword.
_TAGS: dict[str, int] = {}


def _raw_numbers(ds: Any, keyword: str) -> tuple[float, ...] | tuple[int, ...] | None:
    """The values of a DS (decimal string) or US (unsigned short) element of `ds` that pydicom
    has not converted yet, read from its bytes: the numbers pydicom's conversion gives, without
    the objects it builds per value (about 15 µs an element, and a series has 160 headers).
    None when pydicom should convert it: absent, converted already, implicit VR, another VR,
    a value that does not parse."""
    from pydicom.dataelem import RawDataElement

    tag = _TAGS.get(keyword)
    if tag is None:
        from pydicom.datadict import tag_for_keyword

        tag = _TAGS[keyword] = tag_for_keyword(keyword)
    raw = ds.get_item(tag, keep_deferred=True) if tag is not None else None
    if not isinstance(raw, RawDataElement) or not raw.value or raw.is_implicit_VR:
        return None
    try:
        if raw.VR == "DS":
            return tuple(float(v) for v in raw.value.split(b"\\"))
        if raw.VR == "US" and len(raw.value) % 2 == 0:
            return tuple(np.frombuffer(raw.value, "<u2" if raw.is_little_endian else ">u2").tolist())
    except ValueError:  # empty values, padding that is not a space: pydicom decides
        pass
    return None


def _number(ds: Any, keyword: str, default: Any = None) -> Any:
    """`ds.get(keyword, default)` for a single-valued DS or US element, read by `_raw_numbers`
    when it can."""
    values = _raw_numbers(ds, keyword)
    return values[0] if values is not None and len(values) == 1 else ds.get(keyword, default)


def _numbers(ds: Any, keyword: str, n: int, default: Any = None) -> Any:
    """`ds.get(keyword, default)` for an `n`-valued DS element, read by `_raw_numbers` when it can."""
    values = _raw_numbers(ds, keyword)
    return values if values is not None and len(values) == n else ds.get(keyword, default)


def _int(ds: Any, keyword: str, default: int) -> int:
    value = _number(ds, keyword, None)
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def check_declared_size(ds: Any, path: str | Path, max_pixels: int | None = None) -> tuple[int, int, int]:
    """Check the size the header declares BEFORE any pixel is decoded; returns (frames, rows, cols).

    Counted: rows x columns x frames x samples per pixel, against `max_pixels` (None: the
    current `ReaderConfig`'s).
    """
    max_pixels = resolve_max_pixels(max_pixels)
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    frames = max(_int(ds, "NumberOfFrames", 1), 1)
    samples = max(_int(ds, "SamplesPerPixel", 1), 1)
    bits = _int(ds, "BitsAllocated", 16)
    if rows <= 0 or cols <= 0:
        raise InputError(path, f"declares an empty image (Rows={rows}, Columns={cols})")
    check_pixels(path, "DICOM header", rows * cols * frames * samples, max_pixels,
                 f"{rows}x{cols} pixels x {frames} frame(s) x {samples} sample(s)")
    if bits not in (1, 8, 16, 32, 64):
        raise InputError(path, f"declares BitsAllocated={bits}; expected 8, 16, 32 or 64")
    return frames, rows, cols


def _pixel_bytes(ds: Any) -> int:
    """Bytes of native pixel data the header declares (all frames)."""
    values = (_int(ds, "Rows", 0) * _int(ds, "Columns", 0) * max(_int(ds, "NumberOfFrames", 1), 1)
              * max(_int(ds, "SamplesPerPixel", 1), 1))
    return (values * _int(ds, "BitsAllocated", 16) + 7) // 8


# === Deflated files: inflated as a stream, with a cap, before pydicom reads them ===
DEFLATED = "1.2.840.10008.1.2.1.99"
#: Most bytes a deflated file may inflate to before its pixel data element starts.
_DEFLATED_HEADER_CAP = 32 * 2**20
#: Bytes allowed after the pixel data (trailing elements, padding).
_DEFLATED_TRAILER = 2**20
_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")


def _is_deflated(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head[128:132] == b"DICM" and DEFLATED.encode() in head


def _inflate(f: BinaryIO, chunk: int = 2**18) -> Iterator[bytes]:
    """The raw deflate stream of `f` from its position -> inflated pieces of at most `chunk` bytes."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    while not d.eof:
        data = d.unconsumed_tail or f.read(chunk)
        if not data:
            tail = d.flush()
            if tail:
                yield tail
            return
        piece = d.decompress(data, chunk)
        if piece:
            yield piece


def _deflated_header(head: bytes) -> tuple[Any, int, int] | None:
    """(header dataset, offset and declared length of the top-level pixel data element)
    once `head` holds that element's header; None while it does not."""
    from pydicom.filereader import read_dataset

    found: list[int] = []

    def at_pixels(tag: Any, vr: Any, length: int) -> bool:
        if tag >> 16 == 0x7FE0:
            found.append(length)
            return True
        return False

    fp = io.BytesIO(head)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=at_pixels)
    except Exception:
        return None
    return (ds, fp.tell(), found[0]) if found else None


def _check_deflated(path: Path, max_pixels: int) -> None:
    """Inflate a Deflated Explicit VR Little Endian file as a stream, keeping only its header:
    refuse it when the header declares more than `max_pixels` values, or when the stream
    inflates past the pixel data the header declares (a decompression bomb)."""
    from pydicom.filereader import read_dataset, read_preamble

    with open(path, "rb") as f:
        read_preamble(f, False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = read_dataset(f, is_implicit_VR=False, is_little_endian=True,
                                stop_when=lambda tag, vr, length: tag >> 16 != 2)
        if str(meta.get("TransferSyntaxUID", "")).strip() != DEFLATED:
            return
        head = bytearray()
        searched = 0
        hits: list[int] = []  # where a pixel data tag may start, not parsed yet
        header = None
        cap, total = _DEFLATED_HEADER_CAP, 0
        for piece in _inflate(f):
            total += len(piece)
            if total > cap:
                if header is None:
                    raise InputError(path, f"deflated data inflates past {cap} bytes before its pixel data "
                                           "element; refusing a decompression bomb")
                raise InputError(path, f"deflated data inflates past {cap} bytes, more than the "
                                       f"{_pixel_bytes(header[0])} bytes of pixel data its header declares; "
                                       "refusing a decompression bomb")
            if header is not None:
                continue
            head += piece
            for tag in _PIXEL_TAGS:
                at = head.find(tag, max(searched - 3, 0))
                while at >= 0:
                    hits.append(at)
                    at = head.find(tag, at + 1)
            searched = len(head)
            if not any(at + 12 <= len(head) for at in hits):
                continue  # no element header complete yet
            hits = [at for at in hits if at + 12 > len(head)]
            header = _deflated_header(bytes(head))
            if header is None:
                continue
            ds, offset, length = header
            check_declared_size(ds, path, max_pixels)
            expected = _pixel_bytes(ds)
            if length == 0xFFFFFFFF:
                raise InputError(path, "deflated file holds encapsulated (compressed) pixel data; its "
                                       "transfer syntax requires native pixels")
            if length > expected + 1:
                raise InputError(path, f"pixel data element declares {length} bytes but the header declares "
                                       f"{expected} ({_int(ds, 'Rows', 0)}x{_int(ds, 'Columns', 0)} pixels)")
            cap = offset + 12 + length + _DEFLATED_TRAILER
            del head[:]


def _stored_range(ds: Any) -> tuple[float, float]:
    bits = _int(ds, "BitsStored", _int(ds, "BitsAllocated", 16))
    if _int(ds, "PixelRepresentation", 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _photometric(ds: Any) -> str:
    return str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()


def to_grey(arr: np.ndarray) -> np.ndarray:
    """(..., 3|4) RGB(A) colour -> grey float32 with ITU-R 601 luma weights."""
    if arr.shape[-1] in (3, 4):
        rgb = arr[..., :3].astype(np.float32)
        return rgb @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    return arr.astype(np.float32, copy=False)


#: Transfer syntaxes whose frames are JPEG / JPEG-LS ("jpeg") or JPEG 2000 / HTJ2K ("j2k") codestreams.
_CODESTREAMS = {
    "1.2.840.10008.1.2.4.50": "jpeg", "1.2.840.10008.1.2.4.51": "jpeg", "1.2.840.10008.1.2.4.57": "jpeg",
    "1.2.840.10008.1.2.4.70": "jpeg", "1.2.840.10008.1.2.4.80": "jpeg", "1.2.840.10008.1.2.4.81": "jpeg",
    "1.2.840.10008.1.2.4.90": "j2k", "1.2.840.10008.1.2.4.91": "j2k", "1.2.840.10008.1.2.4.92": "j2k",
    "1.2.840.10008.1.2.4.93": "j2k", "1.2.840.10008.1.2.4.201": "j2k", "1.2.840.10008.1.2.4.202": "j2k",
    "1.2.840.10008.1.2.4.203": "j2k",
}
_KIND_NAMES = {"jpeg": "JPEG", "j2k": "JPEG 2000"}


def check_codestreams(ds: Any, path: str | Path, index: int | None = None) -> None:
    """Refuse compressed pixel data whose frame (`index`, or every frame) holds an image of
    another size or number of components than the DICOM header declares, before decoding."""
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    kind = _CODESTREAMS.get(ts)
    if kind is None or "PixelData" not in ds:
        return
    from pydicom.encaps import generate_fragmented_frames

    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    samples = max(_int(ds, "SamplesPerPixel", 1), 1)
    frames = max(_int(ds, "NumberOfFrames", 1), 1)
    name = _KIND_NAMES[kind]
    try:
        fragmented = generate_fragmented_frames(ds.PixelData, number_of_frames=frames)
        for i, fragments in enumerate(fragmented):
            if index is not None and i != index:
                continue
            head = b""
            for fragment in fragments:
                head += fragment
                if len(head) >= 2**16:
                    break
            try:
                size = codestream_size(kind, head)
            except ValueError as e:
                raise InputError(path, f"frame {i}: not a valid {name} codestream ({e})") from None
            if size != (rows, cols, samples):
                raise InputError(path, f"the {name} codestream of frame {i} holds a {size[0]}x{size[1]} image "
                                       f"with {size[2]} component(s) but the DICOM header declares {rows}x{cols} "
                                       f"with {samples} sample(s) per pixel; refusing to decode it")
            if index is not None:
                return
    except InputError:
        raise
    except Exception as e:  # pydicom: malformed encapsulation
        raise InputError(path, f"malformed encapsulated pixel data: {type(e).__name__}: {e}") from e


def _decode(ds: Any, path: str | Path, index: int | None = None) -> np.ndarray:
    """Decode all frames (index None) or one frame of `ds`; errors name the transfer syntax.
    Compressed frames are checked against the header first (`check_codestreams`)."""
    from pydicom.pixels import pixel_array

    check_codestreams(ds, path, index)
    try:
        if index is None:
            return ds.pixel_array
        return pixel_array(ds, index=index)
    except BaseException as e:
        if not isinstance(e, Exception) and not is_decoder_panic(e):
            raise
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", ts) or "unknown transfer syntax"
        raise InputError(path, f"cannot decode pixel data ({name}): {type(e).__name__}: {e}") from e


def is_decoder_panic(error: BaseException) -> bool:
    """True for a decoder written in Rust that panicked on corrupt data (pylibjpeg-rle): pyo3
    raises that as `PanicException`, a BaseException that `except Exception` lets through."""
    return type(error).__name__ == "PanicException"


def _meta_text(ds: Any, *keywords: str) -> str | None:
    for kw in keywords:
        value = ds.get(kw, None)
        if value not in (None, ""):
            return str(value).strip() or None
    return None


def _laterality(ds: Any) -> str | None:
    lat = _meta_text(ds, "ImageLaterality", "Laterality", "FrameLaterality")
    if lat:
        return lat.upper()[:1]
    desc = (_meta_text(ds, "SeriesDescription") or "").upper()
    if desc.endswith("LEFT"):
        return "L"
    if desc.endswith("RIGHT"):
        return "R"
    return None


#: The fewest slices an axial or coronal DICOM series may have: the rows of its sagittal slices.
MIN_RESLICED = 16


def check_slices(path: str | Path, n: int, window: tuple[int, int] | None, min_slices: int = 1, *,
                 one_file: bool = False) -> tuple[int, int]:
    """The slice window [start, stop) of a volume of `n` sagittal slices (all when None), or an
    InputError that says what to change: the kept slices (`PreprocessConfig.slice_start` /
    `num_slices`) or, for `one_file` (one DICOM slice given), its series folder."""
    start, stop = (0, n) if window is None else window
    if n >= min_slices and 0 <= start < stop <= n:
        return start, stop
    single = " (one file of a series? give the series folder)" if one_file else ""
    if n < min_slices:
        raise InputError(path, f"has {n} slice(s){single}; at least {min_slices} are needed (min_slices)")
    raise InputError(path, f"has {n} slice(s){single}; the kept slices [{start}, {stop}) are outside them "
                           f"(slice_start {start}, num_slices {stop - start}: `--slice-start` / `--num-slices`)")


def require_finite(arr: np.ndarray, path: str | Path) -> np.ndarray:
    """Refuse empty arrays and arrays holding NaN or Inf."""
    if arr.size == 0:
        raise InputError(path, f"holds an empty array of shape {arr.shape}")
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int(arr.size - np.count_nonzero(finite))
        raise InputError(path, f"holds {bad} NaN/Inf value(s) out of {arr.size}")
    return arr


# === Single images (X-rays) ===
def _identity_modality_lut(ds: Any) -> bool:
    """Whether `apply_modality_lut` would give the stored values unchanged: no modality LUT,
    and no rescale or slope 1 and intercept 0 (it would only round-trip them through float64)."""
    if ds.get("ModalityLUTSequence", None):
        return False
    if "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
        return True
    try:
        return float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == 0.0
    except (TypeError, ValueError):
        return False


def _check_rescale(ds: Any, path: Path) -> None:
    """InputError unless RescaleSlope / RescaleIntercept (when present) are finite numbers."""
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword not in ds:
            continue
        value = ds.get(keyword)
        try:
            ok = math.isfinite(float(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InputError(path, f"{keyword} is not a number. Received: {keyword}={str(value)[:40]!r}")


#: Modalities of images that are not projection radiographs (`read_dicom_image` refuses them,
#: but for a localizer: a CT scout is a projection).
CROSS_SECTIONAL_MODALITIES = {"MR": "an MR image", "CT": "a CT image", "PT": "a PET image",
                              "NM": "a nuclear medicine image", "US": "an ultrasound image"}


def read_dicom_image(path: str | Path, *, max_pixels: int | None = None,
                     any_modality: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """One DICOM image -> (2-D float32, meta fields): modality LUT / rescale applied,
    MONOCHROME1 inverted (bright = dense), PALETTE COLOR through its colour table, colour
    converted to grey. Files declaring more than `max_pixels` values are refused before
    decoding, and so are MR, CT, PET, nuclear medicine and ultrasound images (by their
    Modality; a localizer by ImageType passes) unless `any_modality`."""
    max_pixels = resolve_max_pixels(max_pixels)
    ds = read_header(path, max_pixels=max_pixels)
    with header_values(path):
        return _dicom_image(ds, path, max_pixels, any_modality)


def _dicom_image(ds: Any, path: str | Path, max_pixels: int, any_modality: bool) -> tuple[np.ndarray, dict[str, Any]]:
    from pydicom.pixels import apply_modality_lut

    missing = missing_image(ds)
    if missing:
        raise InputError(path, missing)
    frames, _, _ = check_declared_size(ds, path, max_pixels)
    if frames != 1:
        raise InputError(path, f"holds {frames} frames; an X-ray must be a single image")
    modality = (_meta_text(ds, "Modality") or "").upper()
    localizer = "LOCALIZER" in str(ds.get("ImageType", "")).upper()
    if modality in CROSS_SECTIONAL_MODALITIES and not (any_modality or localizer):
        raise InputError(path, f"is {CROSS_SECTIONAL_MODALITIES[modality]} (Modality {modality}), not a "
                               "radiograph; give the knee X-ray")
    raw = _decode(ds, path)
    photometric = _photometric(ds)
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            raw = apply_color_lut(raw, ds)
        except Exception as e:  # pydicom raises several types for a missing or bad table
            raise InputError(path, f"PALETTE COLOR image whose colour table cannot be applied: "
                                   f"{type(e).__name__}: {e}") from e
    if raw.ndim == 3:
        raw = to_grey(raw)
    if raw.ndim != 2:
        raise InputError(path, f"decoded to shape {raw.shape}; expected a 2-D image")
    if "PixelData" in ds and not _identity_modality_lut(ds) and photometric != "PALETTE COLOR":
        _check_rescale(ds, path)
        arr = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    else:  # float pixel data carries real values already; an identity rescale changes nothing
        arr = raw.astype(np.float32, copy=False)
    inverted = False
    if photometric == "MONOCHROME1":
        lo, hi = _stored_range(ds)
        ends = np.asarray(apply_modality_lut(np.asarray([lo, hi]), ds), dtype=np.float64)
        arr = (ends[0] + ends[1] - arr).astype(np.float32)
        inverted = True
    require_finite(arr, path)
    spacing = ds.get("PixelSpacing", None) or ds.get("ImagerPixelSpacing", None)
    orient = ds.get("PatientOrientation", None)
    meta = {
        "pixel_spacing": _spacing(spacing),
        "photometric": photometric,
        "laterality": _laterality(ds),
        "orientation": tuple(str(o) for o in orient) if orient else None,
        "view_position": _meta_text(ds, "ViewPosition"),
        "inverted": inverted,
    }
    return arr, meta


# === Series (MRI) ===
@dataclass
class SliceRef:
    """One 2-D slice of a series: a single-frame file or one frame of a multi-frame file."""

    path: Path
    ds: Any
    frame: int | None
    position: np.ndarray
    orientation: np.ndarray
    slope: float
    intercept: float
    series_uid: str
    rows: int
    cols: int
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    #: (where the pixel data starts, BitsStored) of a plain unsigned 16-bit MONOCHROME2 slice
    #: whose header the scan read from the bytes (`kneetf.io.slice_header`); None: pydicom decodes it
    plain_pixels: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return self.path.name if self.frame is None else f"{self.path.name}[frame {self.frame}]"

    def header(self) -> Any:
        """The slice's pydicom dataset (pixels deferred); parsed now when the scan read only
        the values it needed from the file's bytes (`kneetf.io.slice_header`)."""
        if self.ds is None:
            self.ds = read_header(self.path)
        return self.ds


def _floats(value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.isfinite(out).all() else None


def _spacing(value: Any) -> tuple[float, float] | None:
    """(row, column) spacing in mm from a PixelSpacing-like value: one value means the same both
    ways (some writers store one); anything else that is not two finite positive numbers is
    treated as missing."""
    if value is None:
        return None
    try:
        values = [float(v) for v in value] if not isinstance(value, (int, float)) else [float(value)]
    except (TypeError, ValueError):
        return None
    values = values * 2 if len(values) == 1 else values
    if len(values) != 2 or not all(np.isfinite(v) and v > 0 for v in values):
        return None
    return values[0], values[1]


def _group_item(ds: Any, frame: int, sequence: str) -> Any | None:
    """Item of functional group `sequence` for `frame`: per-frame first, then shared."""
    for groups, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups, None)
        if seq is not None and len(seq) > idx:
            inner = seq[idx].get(sequence, None)
            if inner is not None and len(inner):
                return inner[0]
    return None


def _slice_refs(path: Path, ds: Any) -> list[SliceRef]:
    """Every 2-D slice of one DICOM file, with its geometry and rescale."""
    frames = max(_int(ds, "NumberOfFrames", 1), 1)
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    top_slope = float(_number(ds, "RescaleSlope", 1.0) or 1.0)
    top_intercept = float(_number(ds, "RescaleIntercept", 0.0) or 0.0)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    refs = []
    for f in range(frames):
        if enhanced:
            pos_item = _group_item(ds, f, "PlanePositionSequence")
            ori_item = _group_item(ds, f, "PlaneOrientationSequence")
            pix_item = _group_item(ds, f, "PixelMeasuresSequence")
            val_item = _group_item(ds, f, "PixelValueTransformationSequence")
            position = _floats(getattr(pos_item, "ImagePositionPatient", None), 3)
            orientation = _floats(getattr(ori_item, "ImageOrientationPatient", None), 6)
            spacing = getattr(pix_item, "PixelSpacing", None)
            thickness = getattr(pix_item, "SliceThickness", None)
            slope = float(getattr(val_item, "RescaleSlope", top_slope) or top_slope)
            intercept = float(getattr(val_item, "RescaleIntercept", top_intercept) or top_intercept)
        else:
            position = _floats(_numbers(ds, "ImagePositionPatient", 3), 3)
            orientation = _floats(_numbers(ds, "ImageOrientationPatient", 6), 6)
            spacing = _numbers(ds, "PixelSpacing", 2)
            thickness = _number(ds, "SliceThickness")
            slope, intercept = top_slope, top_intercept
        where = path.name if frames == 1 else f"{path.name} frame {f}"
        if position is None or orientation is None:
            raise InputError(path, f"{where} has no valid ImagePositionPatient/ImageOrientationPatient; "
                                   "cannot order the slices of a series without them")
        refs.append(SliceRef(
            path=path, ds=ds, frame=None if frames == 1 else f, position=position, orientation=orientation,
            slope=slope, intercept=intercept, series_uid=uid, rows=rows, cols=cols,
            pixel_spacing=_spacing(spacing),
            thickness=float(thickness) if thickness not in (None, "") else None))
    return refs


def _headerless(path: Path) -> Any | None:
    """A DICOM file without preamble/file meta, or None: accepted only when forced parsing
    finds an image with its SOP class and geometry (anything else is not DICOM)."""
    try:
        ds = read_header(path, force=True)
        ok = ("SOPClassUID" in ds and "Rows" in ds and "ImagePositionPatient" in ds
              and _has_pixels(ds))
    except Exception:
        return None
    if not ok:
        return None
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:  # what the parser found: (implicit VR, little endian)
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    ds.file_meta = meta
    return ds


def _quick_ref(path: Path, max_pixels: int) -> SliceRef | None:
    """The slice of a plain single-frame file from the values read off its bytes
    (`kneetf.io.slice_header`), its dataset parsed only if it is decoded; None when pydicom
    should read the file."""
    from kneetf.io.slice_header import read_slice_header

    if path.name.upper() == "DICOMDIR":
        return None
    try:
        h = read_slice_header(path, max_pixels)
    except OSError:
        return None  # read_header says what is wrong
    if h is None:
        return None
    return SliceRef(path=path, ds=None, frame=None, position=np.asarray(h.position, dtype=np.float64),
                    orientation=np.asarray(h.orientation, dtype=np.float64), slope=h.slope, intercept=h.intercept,
                    series_uid=h.series_uid, rows=h.rows, cols=h.cols, pixel_spacing=h.pixel_spacing,
                    thickness=h.thickness, plain_pixels=h.plain_pixels)


def scan_dicom(path: str | Path, *, max_pixels: int | None = None) -> tuple[list[SliceRef], list[str]]:
    """Headers of every DICOM image in a folder (or one multi-frame file), pixels deferred.

    Returns (slices in file order, skipped entries with reasons). Hidden files, sub-folders,
    known non-image suffixes, non-DICOM files and DICOM files without an image (DICOMDIR,
    structured reports) are skipped. Each file must declare at most `max_pixels` values.
    """
    path = Path(path)
    max_pixels = resolve_max_pixels(max_pixels)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir())
    refs: list[SliceRef] = []
    skipped: list[str] = []
    for f in files:
        if f.name.startswith(".") or f.is_dir():
            continue
        if f.suffix.lower() in _IGNORED_SUFFIXES and f != path:
            skipped.append(f"{f.name} (not DICOM: suffix {f.suffix})")
            continue
        quick = _quick_ref(f, max_pixels)
        if quick is not None:
            refs.append(quick)
            continue
        try:
            ds = read_header(f, force=f.suffix.lower() in (".dcm", ".dicom", ".ima"), max_pixels=max_pixels)
        except TruncatedDicomError:
            raise  # a slice of the series, cut short: the series is incomplete
        except InputError as e:
            ds = _headerless(f)  # old files without the 128-byte preamble
            if ds is None:
                if f == path:
                    raise
                skipped.append(f"{f.name} ({e.reason})")
                continue
        with header_values(f):
            sop = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
            if f.name.upper() == "DICOMDIR" or sop == _DICOMDIR_SOP_CLASS:
                skipped.append(f"{f.name} (DICOMDIR)")
                continue
            if not _has_pixels(ds):
                if "Rows" in ds and not not_an_image(ds):  # an image whose pixel data is missing
                    raise InputError(f, str(missing_image(ds)))
                skipped.append(f"{f.name} (DICOM without an image)")
                continue
            check_declared_size(ds, f, max_pixels)
            refs.extend(_slice_refs(f, ds))
    if skipped:
        log.debug("%s: skipped %d file(s): %s", path, len(skipped), "; ".join(skipped[:20]))
    if not refs:
        extra = f" (skipped: {'; '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''})" if skipped else ""
        subs = sorted(p.name for p in files if p.is_dir() and not p.name.startswith("."))
        if subs:
            extra += (f"; sub-folders are not searched: give the series folder itself, e.g. "
                      f"{path / subs[0]}{f' (one of {len(subs)})' if len(subs) > 1 else ''}")
        raise InputError(path, f"no DICOM image found{extra}")
    return refs, skipped


def _examples(names: Iterable[str], n: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _cosines(orientation: Sequence[float]) -> str:
    """Direction cosines as DICOM writes them: `0\\1\\0\\0\\0\\-1`."""
    return "\\".join(f"{float(v):.4g}" for v in np.round(np.asarray(orientation, dtype=float), 4) + 0.0)


def order_slices(refs: list[SliceRef], where: str | Path, *, min_slices: int = 1,
                 series_uid: str | None = None) -> tuple[list[SliceRef], float | None]:
    """Validate one series and sort it by position along the slice normal.

    Refuses (InputError naming files and positions): several SeriesInstanceUIDs, mixed
    orientations or image sizes, duplicate positions, gaps or uneven steps, fewer than
    `min_slices` slices. Returns (sorted slices, nominal slice spacing or None for one slice).
    """
    if series_uid is not None:
        chosen = [r for r in refs if r.series_uid == series_uid]
        if not chosen:
            raise InputError(where, f"no slice of series {series_uid}; found series "
                                    f"{_examples(sorted({r.series_uid for r in refs}))}")
        refs = chosen
    by_uid: dict[str, list[str]] = {}
    for r in refs:
        by_uid.setdefault(r.series_uid, []).append(r.name)
    if len(by_uid) > 1:
        parts = [f"{uid or '<none>'} ({len(v)} slice(s), e.g. {v[0]})" for uid, v in by_uid.items()]
        raise InputError(where, f"mixes {len(by_uid)} series (SeriesInstanceUID): {'; '.join(parts)}; "
                                "put each series in its own folder (or pass series_uid= to kneetf.io.readers.read_mri)")
    ref = refs[0]
    odd = [r for r in refs if np.max(np.abs(r.orientation - ref.orientation)) > 1e-4]
    if odd:
        raise InputError(where, f"mixed orientations (ImageOrientationPatient): {ref.name} has "
                                f"{_cosines(ref.orientation)} but "
                                + _examples(f"{r.name} has {_cosines(r.orientation)}" for r in odd))
    sizes = [r for r in refs if (r.rows, r.cols) != (ref.rows, ref.cols)]
    if sizes:
        raise InputError(where, f"mixed image sizes: {ref.name} is {ref.rows}x{ref.cols} but "
                                + _examples(f"{r.name} is {r.rows}x{r.cols}" for r in sizes))
    try:
        normal = slice_normal(ref.orientation)
    except ValueError as e:
        raise InputError(where, f"{ref.name}: {e}") from e
    proj = np.asarray([r.position @ normal for r in refs])
    order = np.argsort(proj, kind="stable")
    refs = [refs[i] for i in order]
    proj = proj[order]
    if len(refs) < min_slices:
        raise InputError(where, f"has {len(refs)} slice(s); at least {min_slices} are needed (min_slices)")
    if len(refs) == 1:
        return refs, None
    steps = np.diff(proj)
    moving = steps[steps > 1e-3]
    nominal = float(np.median(moving)) if moving.size else 0.0
    dup = np.nonzero(steps <= 1e-3 + 0.05 * nominal)[0]
    if dup.size:
        raise InputError(where, "duplicate slice positions: " + _examples(
            f"{refs[i].name} and {refs[i + 1].name} at {proj[i]:.3f} mm" for i in dup))
    uneven = np.nonzero(np.abs(steps - nominal) > max(0.1 * nominal, 1e-3))[0]
    if uneven.size:
        def describe(i: int) -> str:
            kind = "gap" if steps[i] > nominal else "step"
            missing = f", about {round(steps[i] / nominal) - 1} slice(s) missing" if steps[i] > 1.5 * nominal else ""
            return (f"{kind} of {steps[i]:.3f} mm between {refs[i].name} ({proj[i]:.3f} mm) and "
                    f"{refs[i + 1].name} ({proj[i + 1]:.3f} mm){missing}")
        raise InputError(where, f"slice positions are not evenly spaced (usual step {nominal:.3f} mm): "
                                + _examples(describe(int(i)) for i in uneven))
    return refs, nominal


def decode_slices(refs: Sequence[SliceRef]) -> np.ndarray:
    """Decode the pixels of `refs` (in that order) -> (n, rows, cols) float32, rescaled per slice.

    Each file is decoded once; from a multi-frame file only the needed frames are decoded
    when they are fewer than half of its frames.
    """
    n = len(refs)
    out = np.empty((n, refs[0].rows, refs[0].cols), dtype=np.float32)
    slopes = np.empty(n, dtype=np.float64)
    intercepts = np.empty(n, dtype=np.float64)
    by_file: dict[Any, list[int]] = {}
    for i, r in enumerate(refs):
        by_file.setdefault(id(r.ds) if r.ds is not None else str(r.path), []).append(i)
    for indices in by_file.values():
        if refs[indices[0]].ds is None and refs[indices[0]].plain_pixels is not None:
            i = indices[0]  # a plain single-frame file: its values as pydicom's `pixel_array` gives them
            out[i] = _plain_pixels(refs[i])
            slopes[i], intercepts[i] = refs[i].slope, refs[i].intercept
            continue
        ds, path = refs[indices[0]].header(), refs[indices[0]].path
        frames = max(_int(ds, "NumberOfFrames", 1), 1)
        if frames == 1:
            stack = {None: _decode(ds, path)}
        elif 2 * len(indices) >= frames:
            full = _decode(ds, path)
            stack = {f: full[f] for f in range(frames)}
        else:
            stack = {refs[i].frame: _decode(ds, path, index=refs[i].frame) for i in indices}
        photometric = _photometric(ds)
        lo, hi = _stored_range(ds)
        for i in indices:
            img = stack[refs[i].frame]
            if img.ndim == 3:
                img = to_grey(img)
            if img.shape != out.shape[1:]:
                raise InputError(path, f"{refs[i].name} decoded to shape {img.shape}, header says "
                                       f"{out.shape[1:]}")
            out[i] = (lo + hi) - img if photometric == "MONOCHROME1" else img
            slopes[i], intercepts[i] = refs[i].slope, refs[i].intercept
    if not (np.all(slopes == 1.0) and np.all(intercepts == 0.0)):
        out *= slopes.astype(np.float32)[:, None, None]
        out += intercepts.astype(np.float32)[:, None, None]
    return out


def _plain_pixels(ref: SliceRef) -> np.ndarray:
    """The (rows, cols) uint16 pixel values of a plain slice file (`ref.plain_pixels`), as
    pydicom's `pixel_array` gives them: the bits above BitsStored cleared."""
    offset, stored = ref.plain_pixels or (0, 16)
    n = ref.rows * ref.cols * 2
    try:
        with open(ref.path, "rb") as f:
            f.seek(offset)
            data = f.read(n)
    except OSError as e:
        raise InputError(ref.path, f"cannot read DICOM file: {e}") from e
    if len(data) != n:
        raise InputError(ref.path, f"pixel data holds {len(data)} bytes, fewer than the {n} its header declares")
    values = np.frombuffer(data, "<u2").reshape(ref.rows, ref.cols)
    return values if stored == 16 else values & np.uint16((1 << stored) - 1)


_SAME_AXES = ((0.0, 1.0), (1.0, 1.0), (2.0, 1.0))  # the nibabel transform that changes nothing


def sagittal_transform(orientation: Sequence[float]) -> np.ndarray:
    """The nibabel orientation transform from a series' sorted (slice, row, column) voxels
    with these 6 direction cosines to the sagittal layout `SAGITTAL_AXCODES`; identity for
    `DEFAULT_ORIENTATION`. Raises ValueError for parallel row and column directions."""
    from nibabel import orientations as ornt

    o = np.asarray(orientation, dtype=np.float64)
    axes = np.eye(4)
    axes[:3, 0], axes[:3, 1], axes[:3, 2] = slice_normal(o), o[3:], o[:3]  # slice, row, column in LPS
    return ornt.ornt_transform(ornt.io_orientation(LPS_TO_RAS @ axes), ornt.axcodes2ornt(SAGITTAL_AXCODES))


def read_dicom_series(path: str | Path, *, window: tuple[int, int] | None = None, min_slices: int = 1,
                      series_uid: str | None = None,
                      max_pixels: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """A DICOM series folder (or one multi-frame file) -> ((slices, H, W) float32, meta fields).

    All headers are read (pixels deferred) to validate and sort the whole series. The volume
    comes back in the sagittal layout `SAGITTAL_AXCODES` (slices from the patient's left to
    right, rows superior -> inferior, columns anterior -> posterior), as NIfTI files are
    read, whatever the series' ImageOrientationPatient: a sagittal series stored the other
    way round is flipped; an axial or coronal one is resliced. `window` = [start, stop) and
    `min_slices` count those sagittal slices; of a sagittal series only the window's slices
    are decoded, of another one all of them. Each file, and the decoded slices together, must
    hold at most `max_pixels` values.
    """
    with header_values(path):
        return _dicom_series(path, window=window, min_slices=min_slices, series_uid=series_uid,
                             max_pixels=max_pixels)


def _dicom_series(path: str | Path, *, window: tuple[int, int] | None, min_slices: int, series_uid: str | None,
                  max_pixels: int | None) -> tuple[np.ndarray, dict[str, Any]]:
    from nibabel import orientations as ornt

    path = Path(path)
    max_pixels = resolve_max_pixels(max_pixels)
    refs, _skipped = scan_dicom(path, max_pixels=max_pixels)
    refs, step = order_slices(refs, path, series_uid=series_uid)  # validates the orientation
    first = refs[0]
    transform = sagittal_transform(first.orientation)
    identity = bool(np.array_equal(transform, _SAME_AXES))
    sagittal = transform[0, 0] == 0  # the series' slices stay the slices
    if not sagittal and len(refs) < MIN_RESLICED:
        raise InputError(path, f"is {'one' if len(refs) == 1 else len(refs)} axial or coronal image(s) "
                               f"(ImageOrientationPatient {_cosines(first.orientation)}): resliced, "
                               f"its sagittal slices would be {len(refs)} pixel(s) tall; give a sagittal series "
                               f"or a volume of at least {MIN_RESLICED} slices")
    stored = (len(refs), first.rows, first.cols)
    n = stored[int(np.nonzero(transform[:, 0] == 0)[0][0])]
    start, stop = check_slices(path, n, window, min_slices, one_file=len(refs) == 1 and path.is_file())
    if sagittal:
        chosen = refs[n - stop:n - start] if transform[0, 1] == -1 else refs[start:stop]
    else:
        chosen = refs
    check_pixels(path, "series", len(chosen) * first.rows * first.cols, max_pixels,
                 f"{len(chosen)} decoded slice(s) of {first.rows}x{first.cols}")
    volume = require_finite(decode_slices(chosen), path)
    ds = chosen[0].header()
    row_mm, col_mm = chosen[0].pixel_spacing if chosen[0].pixel_spacing else (None, None)
    slice_mm = step if step is not None else chosen[0].thickness
    spacing = (slice_mm, row_mm, col_mm) if None not in (slice_mm, row_mm, col_mm) else None
    orientation, position = tuple(float(v) for v in chosen[0].orientation), tuple(float(v) for v in chosen[0].position)
    if not identity:
        volume = np.ascontiguousarray(ornt.apply_orientation(volume, transform))
        if not sagittal:
            volume = volume[start:stop]
        o = first.orientation
        axes = np.eye(4)  # stored voxel (slice, row, column) -> LPS mm
        axes[:3, 0] = slice_normal(o) * float(slice_mm or 1.0)
        axes[:3, 1] = o[3:] * float(row_mm or 1.0)
        axes[:3, 2] = o[:3] * float(col_mm or 1.0)
        axes[:3, 3] = first.position
        new = axes @ ornt.inv_ornt_aff(transform, stored)  # sagittal voxel -> LPS
        lengths = np.linalg.norm(new[:3, :3], axis=0)
        orientation = tuple(float(v) for v in np.concatenate([new[:3, 2], new[:3, 1]] / lengths[[2, 1], None]))
        position = tuple(float(v) for v in (new @ np.array([start, 0.0, 0.0, 1.0]))[:3])
        if spacing is not None:
            spacing = tuple(float(v) for v in lengths)
        else:  # the first voxel's place needs the spacing of the axes that were reversed
            position = None
    meta = {
        "spacing": tuple(round(float(v), 6) for v in spacing) if spacing is not None else None,
        "orientation": tuple(round(v, 8) + 0.0 for v in orientation) if not identity else orientation,
        "position": tuple(round(v, 6) + 0.0 for v in position) if not identity and position else position,
        "laterality": _laterality(ds),
        "photometric": _photometric(ds),
        "description": _meta_text(ds, "SeriesDescription"),
        "total_slices": n,
        "window": (start, stop),
    }
    return volume, meta
