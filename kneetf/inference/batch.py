"""`kneetf predict` as a library: X-ray files, folders and manifests -> reconstructed volumes
in one output folder.

Every X-ray goes through what the cache applied to the training X-rays
(`kneetf.preprocess.xray.prepare_xray`: ROI from `roi_source`, crop, mirroring of left knees
when the model's preprocessing mirrors, resize + robust normalisation), then the model
(`Predictor`: `.keras`, run folder, SavedModel or `.tflite`), then `to_output_volume` and the
writers of `kneetf.inference.outputs`. A file that fails is reported and the rest are written.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kneetf.config import PreprocessConfig
from kneetf.errors import ConfigError, InputError, KneetfError
from kneetf.inference.outputs import parse_formats, write_prediction
from kneetf.inference.predictor import load_predictor
from kneetf.io.atomic import CsvLog, remove_debris
from kneetf.preprocess.xray import PreparedXray, normalize_side, prepare_xray, roi_source, to_output_volume

XRAY_SUFFIXES = {".dcm", ".dicom", ".ima", ".png", ".tif", ".tiff", ".jpg", ".jpeg", ".npy"}
#: Patient module keywords copied from an input DICOM X-ray with `keep_patient`.
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                    "IssuerOfPatientID", "OtherPatientIDs", "PatientComments")


@dataclass
class XrayInput:
    """One X-ray to reconstruct: `path` (a file), its output `id` and the knee `side`."""

    id: str
    path: Path
    side: str = ""
    options: dict[str, Any] = field(default_factory=dict)


PREDICTIONS_CSV = "predictions.csv"
PREDICTION_FIELDS = ("id", "source", "side", "mirrored", "x0", "y0", "x1", "y1")
ERRORS_CSV = "errors.csv"
ERROR_FIELDS = ("id", "file", "reason")
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


def safe_id(text: str) -> str:
    """An id usable as a file name (other characters become '_')."""
    out = _SAFE_ID.sub("_", str(text)).strip("._")
    return out or "xray"


def file_id(path: Path) -> str:
    """The id of an input file: its name without the suffix (`.nii.gz` as one)."""
    name = path.name
    for suffix in (".nii.gz",):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix else name


def _folder_files(folder: Path) -> list[Path]:
    from kneetf.io.dicom import looks_like_dicom

    out = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix.lower() in XRAY_SUFFIXES or (not p.suffix and looks_like_dicom(p)):
            out.append(p)
    return out


def collect_inputs(paths: Sequence[str | Path], *, allow_outside: bool = False
                   ) -> tuple[list[XrayInput], list[dict[str, str]]]:
    """X-ray files, folders of them (not recursive) and manifest CSVs -> (inputs, errors).

    Ids are file stems, or the manifest's ids; ids that are not file-name safe are made so,
    and a repeated id is reported as an error (the first one wins).
    """
    items: list[XrayInput] = []
    errors: list[dict[str, str]] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            errors.append({"id": safe_id(file_id(p)), "file": str(p), "reason": "does not exist"})
        elif p.is_dir():
            files = _folder_files(p)
            if not files:
                errors.append({"id": "", "file": str(p), "reason": "folder holds no X-ray files "
                               f"({', '.join(sorted(XRAY_SUFFIXES))} or DICOM)"})
            items += [XrayInput(safe_id(file_id(f)), f) for f in files]
        elif p.suffix.lower() == ".csv":
            from kneetf.io.manifest import read_manifest

            result = read_manifest(p, require_mri=False, allow_outside=allow_outside)
            for e in getattr(result, "errors", []):
                errors.append({"id": "", "file": str(getattr(e, "path", p) or p),
                               "reason": getattr(e, "reason", str(e))})
            for case in result.cases:
                half = getattr(case, "xray_half", None)
                items.append(XrayInput(safe_id(case.id), Path(case.xray), normalize_side(case.side),
                                       {"half": half} if half else {}))
        else:
            items.append(XrayInput(safe_id(file_id(p)), p))
    seen: dict[str, Path] = {}
    unique = []
    for it in items:
        if it.id in seen:
            errors.append({"id": it.id, "file": str(it.path),
                           "reason": f"duplicate id {it.id!r} (also {seen[it.id]}); rename one of the files"})
            continue
        seen[it.id] = it.path
        unique.append(it)
    return unique, errors


def read_input(item: XrayInput, config: PreprocessConfig, roi: Any) -> PreparedXray:
    """Read and prepare one input file (InputError naming the file on failure)."""
    from kneetf.io.readers import read_xray

    image, meta = read_xray(item.path, **item.options)
    side = item.side or getattr(meta, "laterality", None)
    info = meta.to_dict() if hasattr(meta, "to_dict") else dict(meta or {})
    return prepare_xray(image, config, roi, case_id=item.id, side=side, source=str(item.path), meta=info)


def patient_module(path: Path) -> dict[str, Any]:
    """The patient module of a DICOM X-ray (for `keep_patient`); {} for other files."""
    from kneetf.io.dicom import looks_like_dicom, read_header

    if not looks_like_dicom(path):
        return {}
    ds = read_header(path)
    return {k: ds.get(k) for k in PATIENT_KEYWORDS if ds.get(k, None) not in (None, "")}


@dataclass
class PredictReport:
    """What `predict_files` did: `written` maps id -> paths; `errors` lists id/file/reason."""

    out_dir: Path
    written: dict[str, list[Path]] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.written)


def _reason(e: BaseException) -> str:
    if isinstance(e, InputError):
        return e.reason
    if isinstance(e, KneetfError):
        return str(e)
    return f"{type(e).__name__}: {e}"


def predict_files(model: Any, inputs: Sequence[str | Path], out_dir: str | Path, *,
                  formats: Sequence[str] = ("nifti",), roi: Any = None, keep_patient: bool = False,
                  batch_size: int = 8, preprocess: PreprocessConfig | str | Path | None = None,
                  allow_outside: bool = False, progress: bool = True) -> PredictReport:
    """Reconstruct every X-ray of `inputs` (files, folders, manifest CSVs) into `out_dir`.

    A file that fails (unreadable, no ROI, ...) is reported in the returned report and in
    `out_dir/errors.csv`; the others are written. `out_dir/predictions.csv` lists what was
    written (id, source, side, mirrored, ROI box), one row appended as each reconstruction's
    files are all in place (each file, and a DICOM series as a folder, is renamed into place
    whole): a killed run leaves the finished ones listed and nothing half-written, and the
    same call again writes them all. Only `out_dir` is written to.
    """
    from tqdm.auto import tqdm

    formats = parse_formats(formats)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1. Received: batch_size={batch_size}")
    predictor = load_predictor(model, preprocess)
    roi = roi_source(roi)
    items, errors = collect_inputs(inputs, allow_outside=allow_outside)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_debris(out)  # what a killed run left half-written
    report = PredictReport(out, errors=list(errors))
    # a row is appended once the files of its reconstruction are all in place: a killed run
    # leaves a predictions.csv that lists exactly the finished ones
    rows = CsvLog(out / PREDICTIONS_CSV, PREDICTION_FIELDS, fault="predict.row")
    failures = CsvLog(out / ERRORS_CSV, ERROR_FIELDS, report.errors)

    def fail(item: XrayInput, reason: str) -> None:
        report.errors.append({"id": item.id, "file": str(item.path), "reason": reason})
        failures.append(report.errors[-1])

    bar = tqdm(total=len(items), desc="predict", unit="xray", disable=not progress)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prepared: list[tuple[XrayInput, PreparedXray]] = []
        for item in chunk:
            try:
                prepared.append((item, read_input(item, predictor.preprocess, roi)))
            except Exception as e:  # report, keep going with the others
                fail(item, _reason(e))
                bar.update(1)
        if not prepared:
            continue
        try:
            mri = predictor(np.stack([p.xray for _, p in prepared]))
        except Exception as e:
            for item, _ in prepared:
                fail(item, f"model: {_reason(e)}")
            bar.update(len(prepared))
            continue
        for (item, prep), vol in zip(prepared, mri):
            try:
                patient = patient_module(item.path) if keep_patient else None
                paths = write_prediction(out, prep, to_output_volume(vol, prep.mirrored), formats, patient=patient)
            except Exception as e:
                fail(item, f"writing: {_reason(e)}")
            else:
                report.written[item.id] = paths
                rows.append({"id": item.id, "source": str(item.path), "side": prep.side,
                             "mirrored": int(prep.mirrored),
                             **dict(zip(("x0", "y0", "x1", "y1"), (round(v, 2) for v in prep.box.as_tuple())))})
            bar.update(1)
    bar.close()
    return report


__all__ = ["XRAY_SUFFIXES", "XrayInput", "safe_id", "file_id", "collect_inputs", "read_input", "patient_module",
           "PredictReport", "predict_files"]
