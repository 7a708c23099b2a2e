"""What a reconstruction becomes on disk: NIfTI, a derived DICOM MR series, a PNG montage.

Every writer here uses the one output geometry of `kneetf.inference.geometry`; volumes are
(slices, H, W) float32 in the normalised [0, 1] space (`to_output_volume`). `write_volume` is
the one NIfTI / PNG writer of `kneetf predict`, the Python API, `kneetf evaluate` and
`kneetf client`.

The DICOM series is a classic MR Image Storage series marked DERIVED\\SECONDARY and not for
diagnostic use (docs/contracts.md, "DICOM output"). By default it belongs to a new study of a
random pseudonymous patient (`new_pseudonym`; PatientIdentityRemoved YES, the de-identification
method named as PS3.15 asks). With a `SourceXray` (`--keep-patient`) it takes the source's
patient (name, ID, birth date, sex only) and study, so a PACS files it in the X-ray's study,
and references the X-ray in SourceImageSequence / ReferencedImageSequence.
"""
from __future__ import annotations

import datetime as _dt
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kneetf.errors import ConfigError, InputError
from kneetf.inference.geometry import GEOMETRY, NOMINAL_SPACING, VALUE_RANGE, XFORM_CODE
from kneetf.version import __version__

FORMATS = ("nifti", "dicom", "png")
#: Output names: "pseudonym" (`new_pseudonym`), "id" (file stem or manifest id), "auto"
#: (pseudonym unless the patient is kept).
NAMES = ("auto", "pseudonym", "id")
#: The private key of pseudonymous outputs (pseudonym -> source file), in the output folder by default.
PSEUDONYM_KEY = "PRIVATE_pseudonym_key.csv"
SERIES_DESCRIPTION = "kneetf reconstruction from X-ray (not for diagnostic use)"
DERIVATION_DESCRIPTION = ("3-D knee MRI reconstructed from one knee X-ray by a kneetf model; "
                          "values normalised to 0-1; not for diagnostic use")
MANUFACTURER = "kneetf"
MODEL_NAME = "kneetf X-ray to MRI reconstruction"
#: The only patient attributes `--keep-patient` copies from a DICOM X-ray.
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
#: The General Study module attributes `--keep-patient` copies, so the series joins the X-ray's study.
STUDY_KEYWORDS = ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                  "ReferringPhysicianName", "StudyDescription")
#: Derived series are numbered from SeriesNumber of the source + this, away from acquired series.
SERIES_NUMBER_OFFSET = 1000
#: a source SeriesNumber above this is ignored: the derived one must stay an IS (< 2**31)
MAX_SOURCE_SERIES_NUMBER = 2**31 - 1 - 2 * SERIES_NUMBER_OFFSET
#: What the DICOM de-identification attributes say of a pseudonymous series (LO, 64 chars each).
DEIDENTIFICATION_METHOD = ("kneetf: random pseudonymous patient, new study and UIDs",
                           "no attribute of the source image copied; dates are of creation")


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """"nifti,dicom" -> ("nifti", "dicom"); unknown names are a ConfigError."""
    names = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    names = ["nifti" if n in ("nii", "nii.gz") else n for n in names]
    bad = [n for n in names if n not in FORMATS]
    if bad or not names:
        raise ConfigError(f"--format takes a comma-separated list of {', '.join(FORMATS)}. "
                          f"Received: {text!r}")
    return tuple(dict.fromkeys(names))


def new_pseudonym() -> str:
    """A random pseudonym, `knee-` and 12 hex digits: an output name and its DICOM PatientID."""
    return f"knee-{secrets.token_hex(6)}"


def montage_image(volume: np.ndarray, xray: np.ndarray | None = None, cols: int = 7) -> np.ndarray:
    """8-bit grid of the slices of (slices, H, W) `volume`, the X-ray (H, W[, 1]) first."""
    from kneetf.viz import tile_slices

    tiles = np.asarray(volume, np.float32)
    if xray is not None:
        x = np.asarray(xray, np.float32).reshape(tiles.shape[1:])
        tiles = np.concatenate([x[None], tiles])
    grid = tile_slices(tiles, cols=cols)
    return np.round(np.clip(grid, 0, 1) * 255).astype(np.uint8)


def write_volume(path: str | Path, volume: np.ndarray, xray: np.ndarray | None = None) -> Path:
    """Write a (slices, H, W) reconstruction as NIfTI (`.nii` / `.nii.gz`, the output geometry
    of `kneetf.inference.geometry`) or as a PNG montage (`.png`, the model's X-ray `xray`
    first, as the knee looks), atomically. The one writer of every command and the API."""
    from kneetf.io import writers

    path = Path(path)
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise InputError(path, f"a reconstruction is a (slices, H, W) array. Received: shape {volume.shape}")
    name = path.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return writers.write_nifti(path, volume, GEOMETRY.spacing, orientation=GEOMETRY.orientation,
                                   origin=GEOMETRY.origin, slices_first=True, header=GEOMETRY.nifti_header(),
                                   xform_code=XFORM_CODE)
    if name.endswith(".png"):
        return writers.write_png(path, montage_image(volume, xray), bits=8)
    raise InputError(path, "writes .nii, .nii.gz or .png; use write_dicom for a DICOM series")


# === DICOM ===

@dataclass(frozen=True)
class SourceXray:
    """What a derived series keeps of its DICOM X-ray with `--keep-patient`: the patient
    (`PATIENT_KEYWORDS` only), the study (`STUDY_KEYWORDS`) and the image's identity."""

    sop_class_uid: str
    sop_instance_uid: str
    patient: dict[str, Any] = field(default_factory=dict)
    study: dict[str, Any] = field(default_factory=dict)
    series_number: int | None = None

    @classmethod
    def read(cls, path: str | Path) -> "SourceXray | None":
        """The source of a DICOM X-ray file; None for other files (PNG, `.npy`, ...)."""
        from kneetf.io.dicom import looks_like_dicom, read_header

        path = Path(path)
        if not looks_like_dicom(path):
            return None
        from pydicom.uid import UID

        ds = read_header(path)
        keep = lambda keys: {k: ds.get(k) for k in keys if ds.get(k, None) not in (None, "")}  # noqa: E731
        try:
            number = int(ds.get("SeriesNumber")) if ds.get("SeriesNumber", None) not in (None, "") else None
        except (TypeError, ValueError):
            number = None
        if number is not None and not 0 <= number <= MAX_SOURCE_SERIES_NUMBER:
            number = None  # its derived series' number would leave the IS range
        uid = lambda keyword: str(ds.get(keyword, "") or "")  # noqa: E731
        study = keep(STUDY_KEYWORDS)
        if not UID(uid("StudyInstanceUID")).is_valid:  # a series cannot join a study it cannot name
            study = {}
        refer = UID(uid("SOPClassUID")).is_valid and UID(uid("SOPInstanceUID")).is_valid
        return cls(uid("SOPClassUID") if refer else "", uid("SOPInstanceUID") if refer else "",
                   keep(PATIENT_KEYWORDS), study, number)


class SeriesNumbers:
    """Series numbers of derived series that collide neither with their source X-ray's nor
    with each other's within one run: `SERIES_NUMBER_OFFSET` + the source's, then up."""

    def __init__(self) -> None:
        self._used: dict[str, set[int]] = {}

    def next(self, source: SourceXray | None) -> int:
        if source is None or not source.study.get("StudyInstanceUID"):
            return 1  # a new study of its own
        used = self._used.setdefault(str(source.study["StudyInstanceUID"]), set())
        n = SERIES_NUMBER_OFFSET + (source.series_number or 0)
        while n in used or n == source.series_number:
            n += 1
        used.add(n)
        return n


def _code(code: Any) -> Any:
    """A code sequence item (CodeValue, CodingSchemeDesignator, CodeMeaning) of a pydicom Code."""
    import pydicom

    item = pydicom.Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def series_attributes(*, source: SourceXray | None = None, pseudonym: str | None = None,
                      patient: dict[str, Any] | None = None, series_number: int = 1, side: str = "",
                      now: _dt.datetime | None = None) -> Any:
    """The attributes (a pydicom Dataset) that make a volume a derived MR series.

    Patient: `source.patient` with a source, else `patient` (the API's explicit choice), else
    the pseudonym (`new_pseudonym()` when None) with PatientIdentityRemoved YES and the
    de-identification method (PS3.15: Basic Application Confidentiality Profile; dates kept,
    they are those of creation). Study: the source's (same StudyInstanceUID) or a new one.
    Always: creation, series and content date/time, manufacturer and software version,
    DERIVED\\SECONDARY with a derivation description, the [0, 1] window, laterality, series
    number; with a source, SourceImageSequence / ReferencedImageSequence to it.
    """
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    now = (now or _dt.datetime.now()).astimezone()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds = pydicom.Dataset()
    if source is not None:
        people = {k: v for k, v in source.patient.items() if k in PATIENT_KEYWORDS}
    elif patient:
        from pydicom.datadict import tag_for_keyword

        people = dict(patient)
        bad = [k for k in people if tag_for_keyword(k) is None]
        if bad:
            raise ConfigError(f"patient keys must be DICOM keywords (e.g. PatientName). Received: {bad}")
    else:
        people = None
    if people is not None:
        ds.PatientName, ds.PatientID = "", ""
        ds.PatientBirthDate, ds.PatientSex = "", ""
        for key, value in people.items():
            setattr(ds, key, value)
    else:
        pseudonym = pseudonym or new_pseudonym()
        ds.PatientName = pseudonym
        ds.PatientID = pseudonym
        ds.PatientBirthDate = ds.PatientSex = ""
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = list(DEIDENTIFICATION_METHOD)
        ds.DeidentificationMethodCodeSequence = [
            _code(codes.DCM.BasicApplicationConfidentialityProfile),
            _code(codes.DCM.RetainLongitudinalTemporalInformationFullDatesOption)]
    study = dict(source.study) if source is not None and source.study.get("StudyInstanceUID") else {}
    if study:
        for key in STUDY_KEYWORDS:
            setattr(ds, key, study.get(key, ""))
    else:
        ds.StudyInstanceUID = generate_uid()
        ds.StudyDate, ds.StudyTime = date, time
        ds.StudyID = ds.AccessionNumber = ds.ReferringPhysicianName = ""
        ds.StudyDescription = "kneetf reconstruction"
    ds.InstanceCreationDate = ds.SeriesDate = ds.ContentDate = date
    ds.InstanceCreationTime = ds.SeriesTime = ds.ContentTime = time
    ds.TimezoneOffsetFromUTC = now.strftime("%z")
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = __version__
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = DERIVATION_DESCRIPTION
    ds.BodyPartExamined = "KNEE"
    laterality = {"left": "L", "right": "R"}.get(side)
    if laterality:
        ds.Laterality = laterality
    low, high = VALUE_RANGE
    ds.WindowCenter = (low + high) / 2
    ds.WindowWidth = high - low
    ds.WindowCenterWidthExplanation = "normalised 0-1"
    ds.BurnedInAnnotation = ds.RecognizableVisualFeatures = "NO"
    if source is not None and source.sop_instance_uid:
        ref = pydicom.Dataset()
        ref.ReferencedSOPClassUID = source.sop_class_uid
        ref.ReferencedSOPInstanceUID = source.sop_instance_uid
        src = pydicom.Dataset()
        src.update(ref)
        src.PurposeOfReferenceCodeSequence = [_code(codes.DCM.SourceImageForImageProcessingOperation)]
        ds.SourceImageSequence = [src]
        ds.ReferencedImageSequence = [ref]
    return ds


def write_dicom(folder: str | Path, volume: np.ndarray, *, side: str = "", source: SourceXray | None = None,
                pseudonym: str | None = None, patient: dict[str, Any] | None = None, series_number: int = 1,
                ) -> list[Path]:
    """Write a (slices, H, W) volume as a derived DICOM MR series in the output geometry
    (`series_attributes` says what it holds: pseudonymous unless `source` or `patient`);
    `side` sets the laterality. Returns the files, index k holding slice k."""
    from kneetf.io import writers

    attributes = series_attributes(source=source, pseudonym=pseudonym, patient=patient,
                                   series_number=series_number, side=side)
    return writers.write_dicom_series(folder, volume, GEOMETRY.spacing, orientation=GEOMETRY.orientation,
                                      origin=GEOMETRY.origin, series_description=SERIES_DESCRIPTION,
                                      derived=True, attributes=attributes)


def output_paths(out_dir: Path, name: str, formats: Sequence[str]) -> list[Path]:
    """The paths `write_prediction` writes for output `name`: `<name>.nii.gz`, `<name>_dicom/`,
    `<name>.png`, in the order of `FORMATS`."""
    suffix = {"nifti": ".nii.gz", "dicom": "_dicom", "png": ".png"}
    return [out_dir / f"{name}{suffix[f]}" for f in FORMATS if f in formats]


def write_prediction(out_dir: Path, name: str, prep: Any, volume: np.ndarray, formats: Sequence[str], *,
                     source: SourceXray | None = None, pseudonym: str | None = None, series_number: int = 1
                     ) -> list[Path]:
    """Write the volume of one `PreparedXray` under output `name` in each of `formats`
    (`output_paths`); returns the paths written."""
    written: list[Path] = []
    for path, fmt in zip(output_paths(out_dir, name, formats), [f for f in FORMATS if f in formats]):
        if fmt == "nifti":
            write_volume(path, volume)
        elif fmt == "dicom":
            write_dicom(path, volume, side=prep.side, source=source, pseudonym=pseudonym,
                        series_number=series_number)
        else:
            write_volume(path, volume, xray=prep.as_seen())
        written.append(path)
    return written


__all__ = ["NOMINAL_SPACING", "FORMATS", "NAMES", "PSEUDONYM_KEY", "SERIES_DESCRIPTION", "PATIENT_KEYWORDS", "STUDY_KEYWORDS",
           "parse_formats", "new_pseudonym", "montage_image", "write_volume", "SourceXray", "SeriesNumbers",
           "series_attributes", "write_dicom", "output_paths", "write_prediction"]
