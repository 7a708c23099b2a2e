"""Writers: DICOM MR series, DICOM X-ray, NIfTI, PNG. Every write is atomic.

Geometry follows `kneetf.io.dicom` (LPS patient coordinates; default sagittal orientation
`(0, 1, 0, 0, 0, -1)`: columns anterior -> posterior, rows superior -> inferior, slices
from the patient's left to right). A volume is always (slices, rows, columns) and
`spacing` is (slice_mm, row_mm, col_mm). What `write_dicom_series` and `write_nifti`
write for the same volume reads back as the same array through `kneetf.io.readers`.

Example:
    >>> files = write_dicom_series(tmp / "mri", volume, spacing=(0.7, 0.36, 0.36))
    >>> write_nifti(tmp / "mri.nii.gz", volume, spacing=(0.7, 0.36, 0.36))
"""
from __future__ import annotations

import copy
import gzip
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from kneetf.errors import InputError
from kneetf.io.atomic import atomic_path
from kneetf.io.dicom import DEFAULT_ORIENTATION, LPS_TO_RAS, slice_normal, voxel_to_lps

log = logging.getLogger(__name__)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DERIVED_COMMENT = "kneetf reconstruction, not for diagnostic use"
ANONYMOUS_PATIENT: dict[str, str] = {"PatientName": "Anonymous", "PatientID": "ANON",
                                     "PatientBirthDate": "", "PatientSex": ""}


# === Helpers ===
def _ds_value(x: float) -> float:
    """`x` rounded to what a DICOM DS (16 characters) can hold, so quantisation uses it exactly."""
    from pydicom.valuerep import DSfloat

    return float(str(DSfloat(float(x), auto_format=True)))


def quantize_uint16(values: np.ndarray, slope: float | None = None,
                    intercept: float | None = None, bits: int = 16) -> tuple[np.ndarray, float, float]:
    """Float values -> (uint16 stored values, slope, intercept) with value ~= stored * slope + intercept.

    Integer values within [0, 2**bits - 1] are stored exactly (slope 1, intercept 0);
    otherwise the finite range is spread over the `bits` bits (16 by default). Explicit
    slope/intercept are honoured and values they cannot hold are refused (ValueError).
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must lie in [1, 16]. Received: bits={bits}")
    top = float(2 ** bits - 1)
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError("values hold NaN or Inf")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if slope is None and intercept is None:
        if lo >= 0 and hi <= top and np.array_equal(values, np.round(values)):
            slope, intercept = 1.0, 0.0
        else:
            intercept = _ds_value(lo)
            slope = _ds_value((hi - intercept) / top) if hi > intercept else 1.0
            if slope <= 0:
                slope = 1.0
    else:
        slope = _ds_value(1.0 if slope is None else slope)
        intercept = _ds_value(0.0 if intercept is None else intercept)
        if slope == 0:
            raise ValueError("rescale slope must not be 0")
    stored = np.round((values - intercept) / slope)
    if values.size and (stored.min() < -0.5 or stored.max() > top + 0.5):
        raise ValueError(f"values in [{lo:g}, {hi:g}] do not fit {bits} bits with slope={slope:g}, "
                         f"intercept={intercept:g}")
    return np.clip(stored, 0, top).astype(np.uint16), slope, intercept


def _check_array(arr: Any, ndim: int, what: str, path: Path) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != ndim or arr.size == 0:
        raise InputError(path, f"{what} must be a non-empty {ndim}-D array. Received: shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InputError(path, f"{what} must be real numbers. Received: dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise InputError(path, f"{what} holds NaN or Inf")
    return arr


def _check_spacing(spacing: Sequence[float], n: int, path: Path) -> tuple[float, ...]:
    values = tuple(float(s) for s in spacing)
    if len(values) != n or not all(np.isfinite(v) and v > 0 for v in values):
        raise InputError(path, f"spacing must be {n} positive numbers (mm). Received: spacing={tuple(spacing)}")
    return values


def _base_dataset(sop_class: str, modality: str, patient: Mapping[str, Any] | None) -> Any:
    """A Dataset with file meta, patient and study modules filled (UIDs generated)."""
    import pydicom
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    ds = pydicom.Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "KNEETF"
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    for key, value in {**ANONYMOUS_PATIENT, **dict(patient or {})}.items():
        if tag_for_keyword(key) is None:
            raise ValueError(f"patient keys must be DICOM keywords (e.g. PatientName). Received: {key!r}")
        setattr(ds, key, value)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = ds.StudyTime = ds.AccessionNumber = ds.StudyID = ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.Manufacturer = "kneetf"
    ds.BurnedInAnnotation = "NO"
    return ds


def _update(ds: Any, attributes: Any) -> None:
    """Set `attributes` (a Dataset, or DICOM keyword -> value) on `ds`."""
    import pydicom
    from pydicom.datadict import tag_for_keyword

    if attributes is None:
        return
    if isinstance(attributes, pydicom.Dataset):
        ds.update(attributes)
        return
    for key, value in dict(attributes).items():
        if tag_for_keyword(key) is None:
            raise ValueError(f"attributes must be keyed by DICOM keywords. Received: {key!r}")
        setattr(ds, key, value)


def _set_pixels(ds: Any, stored: np.ndarray, slope: float, intercept: float, photometric: str,
                bits: int = 16) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    allocated = 8 if bits <= 8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, bits, bits - 1, 0
    from pydicom.valuerep import DSfloat

    ds.RescaleSlope = DSfloat(slope, auto_format=True)
    ds.RescaleIntercept = DSfloat(intercept, auto_format=True)
    ds.PixelData = np.ascontiguousarray(stored.astype("u1" if allocated == 8 else "<u2")).tobytes()


def _save(ds: Any, path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)


def _image_type(derived: bool) -> list[str]:
    return ["DERIVED", "SECONDARY"] if derived else ["ORIGINAL", "PRIMARY"]


# === DICOM ===
_SERIES_FILE = re.compile(r"IM\d{5}\.dcm")


def foreign_files(folder: Path) -> list[str]:
    """The names in `folder` that are not slice files of a series as `write_dicom_series`
    writes them (`IM#####.dcm`): [] for a folder kneetf may replace or remove."""
    return sorted(p.name for p in folder.iterdir() if not (_SERIES_FILE.fullmatch(p.name) and p.is_file()))


def _require_replaceable_series(folder: Path) -> None:
    """InputError unless `folder` is new, empty, or holds only a series of `IM#####.dcm`
    files (as `write_dicom_series` writes them)."""
    if not (folder.exists() or folder.is_symlink()):
        return
    if not folder.is_dir():
        raise InputError(folder, "exists and is not a folder; a DICOM series is written as a folder")
    if os.path.realpath(folder) == os.path.realpath(os.getcwd()):
        raise InputError(folder, "is the current folder; write the DICOM series into a new folder")
    others = foreign_files(folder)
    if others:
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        raise InputError(folder, "exists and holds files that are not a DICOM series kneetf wrote "
                                 f"({', '.join(others[:3])}{more}); it is left as it is: write the series into a "
                                 "new or empty folder")


def write_dicom_series(
    folder: str | Path,
    volume: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    orientation: Sequence[float] = DEFAULT_ORIENTATION,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    series_description: str = "kneetf",
    shuffle_names: bool = False,
    rng: np.random.Generator | None = None,
    seed: int | None = None,
    patient: Mapping[str, Any] | None = None,
    modality: str = "MR",
    derived: bool = False,
    laterality: str | None = None,
    attributes: Any = None,
) -> list[Path]:
    """Write (slices, rows, cols) `volume` as a DICOM MR series folder, one file per slice.

    Slice k sits at `origin + k * slice_mm * normal` (normal = row x column direction of
    `orientation`), so the readers return `volume` in the same order. Values are stored as
    uint16 with one RescaleSlope/Intercept covering the volume's range (exact for integers in
    [0, 65535]). `shuffle_names` gives files names unrelated to slice order (seeded by
    `rng`/`seed`) to exercise position-based sorting. `patient` maps DICOM keywords to values
    (anonymous by default). `derived` marks the series DERIVED\\SECONDARY with the comment
    "kneetf reconstruction, not for diagnostic use". `attributes` (a pydicom Dataset or a
    mapping of DICOM keywords to values) is set on every file last, so it can add or replace
    any attribute but the geometry, pixels and SOP instance UIDs (e.g. the study module of a
    source image). The folder is written in a temporary sibling and renamed into place; an
    existing folder is replaced only when it holds nothing but such a series (`IM#####.dcm`
    files, `foreign_files`): any other content, a file of that name or the current folder is
    an InputError.

    Returns the file paths, index k holding slice k.
    """
    from pydicom.uid import generate_uid

    folder = Path(folder)
    _require_replaceable_series(folder)
    volume = _check_array(volume, 3, "volume", folder)
    slice_mm, row_mm, col_mm = _check_spacing(spacing, 3, folder)
    orientation = tuple(float(v) for v in orientation)
    if len(orientation) != 6:
        raise InputError(folder, f"orientation must be 6 direction cosines. Received: {orientation}")
    normal = slice_normal(orientation)
    origin_v = np.asarray(origin, dtype=np.float64)
    try:
        stored, slope, intercept = quantize_uint16(volume)
    except ValueError as e:
        raise InputError(folder, str(e)) from e
    n = volume.shape[0]
    if shuffle_names:
        rng = rng if rng is not None else np.random.default_rng(seed)
        numbers = rng.permutation(n) + 1
    else:
        numbers = np.arange(n) + 1
    names = [f"IM{int(k):05d}.dcm" for k in numbers]

    base = _base_dataset(MR_IMAGE_STORAGE, modality, patient)
    base.FrameOfReferenceUID = generate_uid()
    base.PositionReferenceIndicator = ""
    base.SeriesDescription = series_description
    base.ImageType = _image_type(derived)
    if derived:
        base.ImageComments = DERIVED_COMMENT
        base.DerivationDescription = DERIVED_COMMENT
    if laterality:
        base.Laterality = laterality
    base.ScanningSequence, base.SequenceVariant, base.ScanOptions = "RM", "NONE", ""
    base.MRAcquisitionType = "3D"
    base.EchoTime = base.RepetitionTime = base.EchoTrainLength = ""
    base.ImageOrientationPatient = [round(v, 8) for v in orientation]
    base.PixelSpacing = [row_mm, col_mm]
    base.SliceThickness = slice_mm
    base.SpacingBetweenSlices = slice_mm
    _update(base, attributes)
    with atomic_path(folder, directory=True) as tmp:
        for k in range(n):
            ds = copy.deepcopy(base)
            uid = generate_uid()
            ds.SOPInstanceUID = uid
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.InstanceNumber = k + 1
            position = origin_v + k * slice_mm * normal
            ds.ImagePositionPatient = [round(float(v), 6) for v in position]
            ds.SliceLocation = round(float(position @ normal), 6)
            _set_pixels(ds, stored[k], slope, intercept, "MONOCHROME2")
            _save(ds, tmp / names[k])
    log.debug("wrote %d-slice DICOM series %s", n, folder)
    return [folder / name for name in names]


def write_dicom_xray(
    path: str | Path,
    image: np.ndarray,
    *,
    pixel_spacing: Sequence[float] | float | None = None,
    photometric: str = "MONOCHROME2",
    laterality: str | None = None,
    rescale_slope: float | None = None,
    rescale_intercept: float | None = None,
    patient: Mapping[str, Any] | None = None,
    modality: str = "DX",
    view_position: str | None = None,
    derived: bool = False,
    bits_stored: int = 16,
) -> Path:
    """Write 2-D `image` as a DICOM X-ray (DX For Presentation, or CR with modality="CR").

    `image` holds presentation values (bright = dense). With "MONOCHROME1" the stored values
    are inverted as that interpretation requires (within the `bits_stored` range), so the
    reader returns `image` either way. Stored with `bits_stored` bits (8: one byte per
    pixel, 9-16: two); integers that fit are stored as they are, otherwise
    RescaleSlope/Intercept cover the range unless given. `laterality`: "L", "R", "B" (both
    knees) or None. `pixel_spacing`: (row_mm, col_mm) or one number.
    """
    path = Path(path)
    image = _check_array(image, 2, "image", path)
    photometric = photometric.upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(path, f"photometric must be MONOCHROME1 or MONOCHROME2. Received: {photometric!r}")
    if laterality not in (None, "L", "R", "B", "U"):
        raise InputError(path, f"laterality must be 'L', 'R', 'B' or None. Received: {laterality!r}")
    if modality not in ("DX", "CR"):
        raise InputError(path, f"modality must be 'DX' or 'CR'. Received: {modality!r}")
    if not 8 <= bits_stored <= 16:
        raise InputError(path, f"bits_stored must lie in [8, 16]. Received: {bits_stored}")
    try:
        stored, slope, intercept = quantize_uint16(image, rescale_slope, rescale_intercept, bits=bits_stored)
    except ValueError as e:
        raise InputError(path, str(e)) from e
    if photometric == "MONOCHROME1":
        stored = (2 ** bits_stored - 1 - stored).astype(np.uint16)
    ds = _base_dataset(DX_IMAGE_STORAGE if modality == "DX" else CR_IMAGE_STORAGE, modality, patient)
    from pydicom.uid import generate_uid

    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.InstanceNumber = 1
    ds.ImageType = _image_type(derived)
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.SeriesDescription = "Bilateral PA Fixed Flexion Knee" if laterality == "B" else "Knee"
    ds.BodyPartExamined = "KNEE"
    ds.PatientOrientation = ""
    if view_position:
        ds.ViewPosition = view_position
    if laterality:
        ds.ImageLaterality = laterality
    if pixel_spacing is not None:
        ps = [float(pixel_spacing)] * 2 if np.isscalar(pixel_spacing) else [float(s) for s in pixel_spacing]
        ps = list(_check_spacing(ps, 2, path))
        ds.PixelSpacing = ps
        ds.ImagerPixelSpacing = ps
    if derived:
        ds.ImageComments = DERIVED_COMMENT
    _set_pixels(ds, stored, slope, intercept, photometric, bits_stored)
    with atomic_path(path) as tmp:
        _save(ds, tmp)
    return path


# === NIfTI ===
def nifti_affine(spacing: Sequence[float], orientation: Sequence[float] = DEFAULT_ORIENTATION,
                 origin: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """RAS affine of the NIfTI array `volume.transpose(2, 1, 0)` (voxel = column, row, slice)."""
    return LPS_TO_RAS @ voxel_to_lps(orientation, spacing, origin)


def write_nifti(
    path: str | Path,
    volume: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    orientation: Sequence[float] = DEFAULT_ORIENTATION,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    dtype: Any = np.float32,
    slices_first: bool = False,
    header: Mapping[str, Any] | None = None,
    xform_code: int = 1,
) -> Path:
    """Write (slices, rows, cols) `volume` as NIfTI-1 (.nii or .nii.gz), geometry as in DICOM.

    The file's array is (column, row, slice), like dcm2niix without its row flip, or with
    `slices_first` the volume's own (slice, row, column) layout (what predictions use, so that
    `nibabel.load(f).get_fdata()` has the documented shape (20, 128, 128)). Either way an
    sform/qform (scanner, mm) places voxels where `write_dicom_series` would, and the NIfTI
    reader reorients any NIfTI to the (slice, row, column) sagittal layout. `header` sets
    further NIfTI header fields (e.g. `descrip`, `cal_min`); `xform_code` is the sform and
    qform code (1: scanner). The gzip stream carries no time stamp, so equal inputs give
    equal files.
    """
    import nibabel as nib

    path = Path(path)
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise InputError(path, "a NIfTI file name must end with .nii or .nii.gz")
    volume = _check_array(volume, 3, "volume", path)
    spacing = _check_spacing(spacing, 3, path)
    affine = nifti_affine(spacing, orientation, origin)
    if slices_first:  # array axes (slice, row, column): the affine's voxel columns reversed
        affine = affine[:, [2, 1, 0, 3]]
        data = np.ascontiguousarray(np.asarray(volume, dtype=dtype))
    else:
        data = np.ascontiguousarray(np.asarray(volume, dtype=dtype).transpose(2, 1, 0))
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=xform_code)
    img.set_sform(affine, code=xform_code)
    img.header.set_xyzt_units("mm")
    for key, value in dict(header or {}).items():
        img.header[key] = value
    blob = img.to_bytes()
    if path.name.endswith(".gz"):
        blob = gzip.compress(blob, compresslevel=1, mtime=0)  # fast; level 6 is ~10x slower
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return path


# === PNG ===
def write_png(path: str | Path, image: np.ndarray, bits: int = 16) -> Path:
    """Write 2-D `image` as a grey PNG of 8 or 16 bits.

    uint8 (bits=8) and uint16 (bits=16) arrays, and integer arrays within that range, are
    written unchanged; anything else is scaled linearly from its min..max to the full range.
    """
    import cv2

    path = Path(path)
    image = _check_array(image, 2, "image", path)
    if bits not in (8, 16):
        raise InputError(path, f"bits must be 8 or 16. Received: bits={bits}")
    top = 2**bits - 1
    dtype = np.uint8 if bits == 8 else np.uint16
    if np.issubdtype(image.dtype, np.integer) and image.min() >= 0 and image.max() <= top:
        out = image.astype(dtype)
    else:
        lo, hi = float(image.min()), float(image.max())
        scaled = (image.astype(np.float64) - lo) / (hi - lo) * top if hi > lo else np.zeros(image.shape)
        out = np.round(scaled).astype(dtype)
    ok, buf = cv2.imencode(".png", out)
    if not ok:
        raise InputError(path, "OpenCV could not encode the PNG")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())
    return path


__all__ = ["write_dicom_series", "foreign_files", "write_dicom_xray", "write_nifti", "write_png", "quantize_uint16",
           "nifti_affine", "DERIVED_COMMENT", "ANONYMOUS_PATIENT"]
