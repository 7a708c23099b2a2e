"""Readers: files -> (float32 array, meta), chosen by suffix from a registry.

Contract of every reader (`Reader.read`):

* X-ray readers return a 2-D float32 image (rows, columns) in presentation values: bright
  means dense (MONOCHROME1 inverted), rescale / modality LUT applied, colour made grey.
* MRI readers return a (slices, rows, columns) float32 volume of sagittal slices: DICOM
  series (sorted along the slice normal, see `kneetf.io.dicom`) and NIfTI files both turned
  to the layout of a DICOM series in the default sagittal orientation (`SAGITTAL_AXCODES`:
  slices from the patient's left to right, rows superior -> inferior, columns anterior ->
  posterior) whatever their stored orientation; .npy taken as slices-first.
* The meta dataclasses carry geometry and display facts only, never patient identifiers.
* Declared sizes (DICOM Rows x Columns x frames, the codestream inside compressed DICOM,
  PNG/JPEG/TIFF headers, NIfTI and .npy headers) are checked against `max_pixels`
  (`kneetf.io.limits`; None = the current `ReaderConfig`) BEFORE pixel data is read;
  empty arrays, NaN/Inf and wrong dimensions are refused. Every failure is an `InputError`
  naming the file, the problem and the readers tried.

    >>> image, meta = read_xray("knee.dcm")
    >>> volume, meta = read_mri_window("series_folder/", 20, 40)   # decodes 20 slices only
"""
from __future__ import annotations

import abc
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from kneetf.errors import InputError
from kneetf.io.dicom import (LPS_TO_RAS, SAGITTAL_AXCODES, check_slices, looks_like_dicom, read_dicom_image,
                              read_dicom_series, require_finite, to_grey)
from kneetf.io.headers import file_image_size
from kneetf.io.limits import check_pixels, resolve_max_pixels
from kneetf.io.lookup import lookup

log = logging.getLogger(__name__)

XRAY_HALVES = ("left", "right")


# === Meta ===
@dataclass(frozen=True)
class XrayMeta:
    """Facts about a decoded X-ray; no patient identifiers.

    `pixel_spacing` is (row_mm, col_mm); `laterality` "L", "R", "B" or None as the file
    says; `half` is the image half kept ("left"/"right" columns of the stored image) or None.
    """

    source: str
    reader: str
    shape: tuple[int, int]
    pixel_spacing: tuple[float, float] | None = None
    photometric: str | None = None
    laterality: str | None = None
    orientation: tuple[str, ...] | None = None
    view_position: str | None = None
    inverted: bool = False
    half: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class VolumeMeta:
    """Facts about a decoded MRI volume; no patient identifiers.

    `spacing` is (slice_mm, row_mm, col_mm); `orientation` the 6 LPS direction cosines (row
    direction, column direction); `position` the LPS mm of the first returned slice's first
    pixel; `window` the [start, stop) of the `total_slices` sorted slices returned.
    """

    source: str
    reader: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] | None = None
    orientation: tuple[float, ...] | None = None
    position: tuple[float, float, float] | None = None
    laterality: str | None = None
    photometric: str | None = None
    description: str | None = None
    total_slices: int = 0
    window: tuple[int, int] = (0, 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# === Header size checks ===
def declared_image_size(path: str | Path) -> tuple[int, int, int]:
    """(height, width, channels) from a PNG/JPEG/TIFF header, without decoding pixels."""
    path = Path(path)
    try:
        return file_image_size(path)
    except ValueError as e:
        raise InputError(path, f"not a valid {path.suffix.lstrip('.').upper()} file: {e}") from e
    except OSError as e:
        raise InputError(path, f"cannot read file: {e}") from e


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise InputError(path, f"cannot read .npy file: {e}") from e
    # else numpy takes the bytes for a pickle, and its error suggests loading them unsafely
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK\x03\x04"):
        raise InputError(path, "not a .npy file (it does not start with NumPy's header)")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except OSError as e:
        raise InputError(path, f"cannot read .npy file: {e}") from e
    except Exception as e:  # numpy parses the header as Python: a garbled one raises what tokenize or ast raise
        raise InputError(path, f"not a plain numeric .npy array ({type(e).__name__}: {e})") from e
    if not isinstance(arr, np.ndarray):
        raise InputError(path, "holds an .npz archive, not one array")
    dtype = arr.dtype
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype == np.bool_):
        raise InputError(path, f"holds dtype {dtype}; expected integers or floats")
    return tuple(arr.shape), dtype


def _load_npy(path: Path, ndim: int, what: str, max_pixels: int) -> np.ndarray:
    shape, _ = _npy_header(path)
    if ndim == 2 and len(shape) == 3 and shape[-1] == 1:
        shape = shape[:2]
    if len(shape) != ndim:
        raise InputError(path, f"holds a {len(shape)}-D array of shape {shape}; {what} must be {ndim}-D")
    check_pixels(path, ".npy header", int(np.prod(shape)), max_pixels, "x".join(map(str, shape)))
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    return np.array(arr, dtype=np.float32).reshape(shape)


# === Reader registry ===
class Reader(abc.ABC):
    """Reads one kind of file. Subclasses set `name`, `kind` ("xray" or "mri") and
    `suffixes`, and implement `read(path, **options) -> (array, meta)` per the module
    contract. Options a reader does not use are ignored."""

    name: ClassVar[str]
    kind: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]

    def can_read(self, path: Path) -> bool:
        name = path.name.lower()
        return path.is_file() and any(name.endswith(s) for s in self.suffixes)

    def describe(self) -> str:
        return f"{self.name} ({', '.join(self.suffixes)})"

    @abc.abstractmethod
    def read(self, path: Path, **options: Any) -> tuple[np.ndarray, Any]:
        ...


class DicomXrayReader(Reader):
    name, kind, suffixes = "dicom", "xray", (".dcm", ".dicom", ".ima")

    def can_read(self, path: Path) -> bool:
        return path.is_file() and looks_like_dicom(path)

    def describe(self) -> str:
        return "dicom (.dcm, .dicom, .ima or a DICOM preamble)"

    def read(self, path: Path, *, max_pixels: int | None = None, **_: Any) -> tuple[np.ndarray, XrayMeta]:
        image, info = read_dicom_image(path, max_pixels=resolve_max_pixels(max_pixels))
        return image, XrayMeta(source=str(path), reader=self.name, shape=image.shape, **info)


class ImageXrayReader(Reader):
    name, kind, suffixes = "image", "xray", (".png", ".tif", ".tiff", ".jpg", ".jpeg")

    def read(self, path: Path, *, max_pixels: int | None = None, **_: Any) -> tuple[np.ndarray, XrayMeta]:
        import cv2

        height, width, channels = declared_image_size(path)
        check_pixels(path, f"{path.suffix.lstrip('.').upper()} header", height * width * channels,
                     resolve_max_pixels(max_pixels), f"{height}x{width}x{channels}")
        buf = np.fromfile(path, dtype=np.uint8)
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
        if image is None:
            raise InputError(path, "OpenCV could not decode the image (corrupt or unsupported)")
        if image.ndim == 3:  # OpenCV gives BGR(A)
            image = to_grey(image[..., [2, 1, 0]] if image.shape[-1] >= 3 else image[..., :1].repeat(3, -1))
        if image.ndim != 2:
            raise InputError(path, f"decoded to shape {image.shape}; expected a 2-D image")
        image = image.astype(np.float32, copy=False)
        return image, XrayMeta(source=str(path), reader=self.name, shape=image.shape,
                               photometric="MONOCHROME2" if channels == 1 else "RGB")


class NpyXrayReader(Reader):
    name, kind, suffixes = "npy", "xray", (".npy",)

    def read(self, path: Path, *, max_pixels: int | None = None, **_: Any) -> tuple[np.ndarray, XrayMeta]:
        image = _load_npy(path, 2, "an X-ray", resolve_max_pixels(max_pixels))
        return image, XrayMeta(source=str(path), reader=self.name, shape=image.shape)


class DicomSeriesReader(Reader):
    name, kind, suffixes = "dicom-series", "mri", (".dcm",)

    def can_read(self, path: Path) -> bool:
        return path.is_dir() or (path.is_file() and looks_like_dicom(path))

    def describe(self) -> str:
        return "dicom-series (a folder of DICOM slices, or one multi-frame DICOM file)"

    def read(self, path: Path, *, window: tuple[int, int] | None = None, min_slices: int = 1,
             series_uid: str | None = None, max_pixels: int | None = None,
             **_: Any) -> tuple[np.ndarray, VolumeMeta]:
        volume, info = read_dicom_series(path, window=window, min_slices=min_slices, series_uid=series_uid,
                                         max_pixels=resolve_max_pixels(max_pixels))
        return volume, VolumeMeta(source=str(path), reader=self.name, shape=volume.shape, **info)


class NiftiReader(Reader):
    name, kind, suffixes = "nifti", "mri", (".nii", ".nii.gz")

    def read(self, path: Path, *, window: tuple[int, int] | None = None, min_slices: int = 1,
             max_pixels: int | None = None, **_: Any) -> tuple[np.ndarray, VolumeMeta]:
        import nibabel as nib
        from nibabel import orientations as ornt

        try:
            img = nib.load(str(path))  # header only; data stays on disk
        except Exception as e:
            raise InputError(path, f"not a readable NIfTI file: {type(e).__name__}: {e}") from e
        shape = tuple(int(s) for s in img.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != 3:
            raise InputError(path, f"holds an array of shape {tuple(img.shape)}; an MRI volume must be 3-D")
        check_pixels(path, "NIfTI header", int(np.prod(shape)), resolve_max_pixels(max_pixels),
                     "x".join(map(str, shape)))
        affine = np.asarray(img.affine, dtype=np.float64)
        finite = bool(np.all(np.isfinite(affine)))
        try:
            if not finite:
                raise ValueError("it holds NaN or infinity")
            transform = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(SAGITTAL_AXCODES))
        except ValueError as e:  # a zero or repeated axis: nibabel cannot say which way the slices go
            singular = finite and np.linalg.matrix_rank(affine[:3, :3]) < 3
            why = "a voxel axis has zero length or runs along another" if singular else str(e)
            raise InputError(path, f"its affine (sform/qform) gives no orientation ({why}); fix the header's "
                                   f"voxel-to-world matrix {np.round(affine[:3], 4).tolist()}") from e
        slice_axis = int(np.nonzero(transform[:, 0] == 0)[0][0])
        n = shape[slice_axis]
        start, stop = check_slices(path, n, window, min_slices)
        index: list[Any] = [slice(None)] * len(img.shape)
        for extra in range(3, len(img.shape)):
            index[extra] = 0
        flipped = transform[slice_axis, 1] == -1
        index[slice_axis] = slice(n - stop, n - start) if flipped else slice(start, stop)
        try:
            data = np.asarray(img.dataobj[tuple(index)], dtype=np.float32)
        except Exception as e:
            raise InputError(path, f"cannot read NIfTI data: {type(e).__name__}: {e}") from e
        volume = np.ascontiguousarray(ornt.apply_orientation(data, transform), dtype=np.float32)
        require_finite(volume, path)
        new = affine @ ornt.inv_ornt_aff(transform, shape)  # voxel (slice, row, col) -> RAS
        lps = LPS_TO_RAS[:3, :3] @ new[:3, :3]
        zooms = np.linalg.norm(lps, axis=0)
        orientation = np.concatenate([lps[:, 2] / zooms[2], lps[:, 1] / zooms[1]])
        position = (LPS_TO_RAS @ new @ np.array([start, 0.0, 0.0, 1.0]))[:3]
        return volume, VolumeMeta(
            source=str(path), reader=self.name, shape=volume.shape,
            spacing=tuple(round(float(z), 6) for z in zooms),
            orientation=tuple(round(float(v), 8) + 0.0 for v in orientation),
            position=tuple(round(float(v), 6) + 0.0 for v in position),
            total_slices=n, window=(start, stop))


class NpyVolumeReader(Reader):
    name, kind, suffixes = "npy", "mri", (".npy",)

    def read(self, path: Path, *, window: tuple[int, int] | None = None, min_slices: int = 1,
             max_pixels: int | None = None, **_: Any) -> tuple[np.ndarray, VolumeMeta]:
        shape, _ = _npy_header(path)
        if len(shape) != 3:
            raise InputError(path, f"holds a {len(shape)}-D array of shape {shape}; an MRI volume must be "
                                   "3-D (slices, rows, columns)")
        n = shape[0]
        start, stop = check_slices(path, n, window, min_slices)
        check_pixels(path, ".npy header", (stop - start) * shape[1] * shape[2], resolve_max_pixels(max_pixels),
                     f"{stop - start} of {n} slices x {shape[1]}x{shape[2]}")
        volume = np.array(np.load(path, mmap_mode="r", allow_pickle=False)[start:stop], dtype=np.float32)
        require_finite(volume, path)
        return volume, VolumeMeta(source=str(path), reader=self.name, shape=volume.shape, total_slices=n,
                                  window=(start, stop))


XRAY_READERS: list[Reader] = [DicomXrayReader(), ImageXrayReader(), NpyXrayReader()]
MRI_READERS: list[Reader] = [DicomSeriesReader(), NiftiReader(), NpyVolumeReader()]


def register_reader(reader: Reader, *, first: bool = False) -> None:
    """Add `reader` to the X-ray or MRI registry (by `reader.kind`)."""
    registry = {"xray": XRAY_READERS, "mri": MRI_READERS}.get(reader.kind)
    if registry is None:
        raise ValueError(f"reader.kind must be 'xray' or 'mri'. Received: {reader.kind!r}")
    registry.insert(0, reader) if first else registry.append(reader)


def _read_with(registry: list[Reader], path: str | Path, what: str, **options: Any) -> tuple[np.ndarray, Any]:
    path = Path(path)
    found, refused = lookup(path)
    if refused:
        raise InputError(path, f"{what} path cannot be looked up: {refused}")
    if found is None:
        raise InputError(path, f"{what} not found")
    candidates = [r for r in registry if r.can_read(path)]
    tried = "; ".join(r.describe() for r in registry)
    if not candidates:
        kind = "folder" if path.is_dir() else f"suffix {''.join(path.suffixes) or '(none)'!r}"
        raise InputError(path, f"no {what} reader for this {kind}; readers tried: {tried}")
    failures = []
    for reader in candidates:
        try:
            return reader.read(path, **options)
        except InputError as e:
            inner = "" if e.path in (None, str(path)) else f"{Path(e.path).name}: "
            failures.append((reader.name, inner + e.reason))
        except MemoryError as e:
            failures.append((reader.name, f"out of memory ({e})"))
    if len(failures) == 1:
        reason = failures[0][1]
    else:
        reason = "; ".join(f"{name}: {msg}" for name, msg in failures)
    raise InputError(path, f"cannot read {what}: {reason} (readers tried: "
                           f"{', '.join(r.name for r in candidates)})")


def split_half(image: np.ndarray, half: str, path: str | Path = "") -> np.ndarray:
    """Keep the left or right half (columns) of a stored image; an odd middle column is dropped."""
    if half not in XRAY_HALVES:
        raise InputError(path or None, f"half must be 'left' or 'right'. Received: half={half!r}")
    width = image.shape[1]
    if width < 2:
        raise InputError(path or None, f"image is {width} column(s) wide; cannot split it in halves")
    return image[:, : width // 2] if half == "left" else image[:, width - width // 2:]


def read_xray(path: str | Path, *, half: str | None = None,
              max_pixels: int | None = None) -> tuple[np.ndarray, XrayMeta]:
    """Read an X-ray (DICOM, PNG/TIFF/JPEG, .npy) -> (2-D float32, XrayMeta).

    `max_pixels` limits the declared size (None: the current `ReaderConfig`'s). `half` ("left"/"right") keeps that half of the stored image's columns, for bilateral
    images (OAI: the patient's right knee is on the image's left half).
    """
    image, meta = _read_with(XRAY_READERS, path, "X-ray", max_pixels=resolve_max_pixels(max_pixels))
    if image.ndim != 2:
        raise InputError(path, f"X-ray decoded to shape {image.shape}; expected 2-D")
    require_finite(image, path)
    if half is not None:
        image = np.ascontiguousarray(split_half(image, half, path))
        meta = dataclasses.replace(meta, shape=image.shape, half=half)
    return image, meta


def read_mri(path: str | Path, *, window: tuple[int, int] | None = None, min_slices: int = 1,
             series_uid: str | None = None, max_pixels: int | None = None) -> tuple[np.ndarray, VolumeMeta]:
    """Read an MRI (DICOM series folder or multi-frame file, NIfTI, .npy) -> ((slices, H, W) float32, meta).

    With `window=(start, stop)` only those sorted slices are decoded (the whole series is
    still validated); the volume must then have at least `stop` slices.
    """
    if window is not None:
        start, stop = (int(w) for w in window)
        if not 0 <= start < stop:
            raise InputError(path, f"slice window must satisfy 0 <= start < stop. Received: {tuple(window)}")
        window = (start, stop)
    volume, meta = _read_with(MRI_READERS, path, "MRI", window=window, min_slices=min_slices,
                              series_uid=series_uid, max_pixels=resolve_max_pixels(max_pixels))
    if volume.ndim != 3:
        raise InputError(path, f"MRI decoded to shape {volume.shape}; expected (slices, rows, columns)")
    return volume, meta


def read_mri_window(path: str | Path, start: int = 20, stop: int = 40, **options: Any) -> tuple[np.ndarray, VolumeMeta]:
    """Only sorted slices [start, stop) of an MRI (default [20, 40), the paper's window)."""
    return read_mri(path, window=(start, stop), **options)


__all__ = ["XrayMeta", "VolumeMeta", "Reader", "XRAY_READERS", "MRI_READERS", "register_reader", "read_xray",
           "read_mri", "read_mri_window", "split_half", "declared_image_size", "SAGITTAL_AXCODES"]
