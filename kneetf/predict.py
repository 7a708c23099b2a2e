"""X-ray files -> reconstructed MRI volumes on disk (`kneetf predict`), and the pieces the
Python API (`kneetf.api`) and `kneetf evaluate` share: model loading and preprocessing.

An X-ray goes through exactly what the cache applies to training X-rays: read
(`kneetf.io.readers.read_xray`), ROI box (`kneetf.preprocess.roi`: CSV, detector or the
classical fallback), `crop_box`, mirroring of left knees when the model's preprocessing
config says `mirror_left`, then `kneetf.preprocess.ops.preprocess_xray`. The model's
output (H, W, slices) becomes a slices-first volume (slices, H, W), float32 in the
normalised [0, 1] space, in the slice order and in-plane orientation of the preprocessed
MRI; a mirrored left knee gets its slice order reversed back before anything is written.

Geometry of the written files: `NOMINAL_SPACING` (slice, row, column) in mm, the default
sagittal orientation of `kneetf.io.writers` (slice 0 = the patient's leftmost slice).

Models: a `.keras` file, a training run folder (holding `model.keras` and `config.json`), a
SavedModel folder (its `predict_normalized` signature; a TF Serving `<name>/` folder uses
its highest version) or a `.tflite` file.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from kneetf.config import PreprocessConfig, from_dict
from kneetf.errors import ConfigError, InputError, KneetfError
from kneetf.io.atomic import write_text_atomic
from kneetf.preprocess.xray import PreparedXray, normalize_side, prepare_xray, roi_source, to_output_volume

log = logging.getLogger(__name__)

#: (slice, row, column) spacing in mm written with every prediction. The OAI sagittal 3-D
#: DESS the paper uses has 0.7 mm slices and a 140 mm field of view; 128 pixels over
#: 140 mm give 1.09375 mm. The real spacing of a knee is not known from an X-ray: this is
#: nominal, for viewers.
NOMINAL_SPACING: tuple[float, float, float] = (0.7, 140.0 / 128.0, 140.0 / 128.0)
MODEL_FILE = "model.keras"
RUN_CONFIG = "config.json"
FORMATS = ("nifti", "dicom", "png")
XRAY_SUFFIXES = {".dcm", ".dicom", ".ima", ".png", ".tif", ".tiff", ".jpg", ".jpeg", ".npy"}
SERIES_DESCRIPTION = "kneetf reconstruction from X-ray (not for diagnostic use)"
#: Patient module keywords copied from an input DICOM X-ray with `keep_patient`.
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                    "IssuerOfPatientID", "OtherPatientIDs", "PatientComments")


# === Models ===

def _is_savedmodel(path: Path) -> bool:
    return path.is_dir() and (path / "saved_model.pb").exists()


def _serving_version(path: Path) -> Path | None:
    """The highest numeric version folder of a TF Serving model folder, if any."""
    versions = [p for p in path.iterdir() if p.is_dir() and p.name.isdigit() and _is_savedmodel(p)] \
        if path.is_dir() else []
    return max(versions, key=lambda p: int(p.name)) if versions else None


def resolve_model_path(path: str | Path) -> tuple[str, Path]:
    """(kind, file) of a model path: kind is "keras", "savedmodel" or "tflite"."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "model not found")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".keras":
            return "keras", p
        if suffix == ".tflite":
            return "tflite", p
        raise InputError(p, "unknown model file type; expected .keras, .tflite, a run folder or a SavedModel folder")
    if (p / MODEL_FILE).is_file():
        return "keras", p / MODEL_FILE
    if _is_savedmodel(p):
        return "savedmodel", p
    version = _serving_version(p)
    if version is not None:
        return "savedmodel", version
    raise InputError(p, f"folder holds no {MODEL_FILE}, saved_model.pb or TF Serving version folder")


def load_model(path: str | Path) -> Any:
    """A KneeNet (keras.Model) from a `.keras` file or a training run folder; `predict(batch)`
    returns {"xray_recon", "mri"} for normalised X-rays (batch, 128, 128, 1)."""
    import keras

    import kneetf.models.kneenet  # noqa: F401  (registers the kneetf custom objects)

    kind, file = resolve_model_path(path)
    if kind != "keras":
        raise InputError(path, f"is a {kind} model; load_model needs a .keras file or a run folder "
                               "(use kneetf.api.Reconstructor for SavedModel and TFLite)")
    try:
        return keras.saving.load_model(file, safe_mode=True)
    except Exception as e:  # keras raises many types on a bad archive
        raise InputError(file, f"cannot load the Keras model: {type(e).__name__}: {e}") from e


def read_preprocess_config(path: str | Path) -> PreprocessConfig | None:
    """The preprocessing config recorded with a model or data: a JSON file with a
    "preprocess" entry (a run's config.json, an export's kneetf_export.json, a cache's
    dataset.json) or a folder holding one. For a model file, the folder it sits in is
    searched (and, for `<version>/tflite/*.tflite`, the export's version folder). None when
    there is none. Keys PreprocessConfig does not know are ignored."""
    import dataclasses

    from kneetf.export import EXPORT_INFO_FILE, TFLITE_DIR

    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".json":
        candidates = [p]
    else:
        folder = p if p.is_dir() else p.parent
        names = (RUN_CONFIG, EXPORT_INFO_FILE, "dataset.json")
        candidates = [folder / n for n in names]
        if folder.name == TFLITE_DIR:
            candidates.append(folder.parent / EXPORT_INFO_FILE)
    known = {f.name for f in dataclasses.fields(PreprocessConfig)}
    for c in candidates:
        if not c.is_file():
            continue
        try:
            blob = json.loads(c.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(c, f"cannot read the JSON: {e}") from e
        prep = blob.get("preprocess") if isinstance(blob, dict) else None
        if isinstance(prep, dict):
            try:
                return from_dict(PreprocessConfig, {k: v for k, v in prep.items() if k in known})
            except ConfigError as e:
                raise InputError(c, f"bad preprocess config: {e}") from e
    return None


class Predictor:
    """Normalised X-rays (B, H, W, 1) -> MRI (B, H, W, slices), whatever the model format.

    Attributes: `kind` ("keras", "savedmodel", "tflite"), `path`, `preprocess` (the
    PreprocessConfig the model was trained with, or the defaults), `image_size`,
    `num_slices`, and `model` (the keras.Model, for kind "keras").
    """

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], kind: str, path: Path | None,
                 preprocess: PreprocessConfig, model: Any = None) -> None:
        self._fn = fn
        self.kind = kind
        self.path = path
        self.preprocess = preprocess
        self.model = model

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    @property
    def num_slices(self) -> int:
        return self.preprocess.num_slices

    def __call__(self, xray: np.ndarray) -> np.ndarray:
        x = np.asarray(xray, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, 1):
            raise InputError(self.path, f"expects X-rays (B, {self.image_size}, {self.image_size}, 1). "
                                        f"Received shape {x.shape}")
        out = np.asarray(self._fn(x), dtype=np.float32)
        if out.ndim != 4 or out.shape[0] != len(x):
            raise InputError(self.path, f"model returned MRI of shape {out.shape} for {len(x)} X-ray(s)")
        return out

    def __repr__(self) -> str:
        return f"Predictor({self.kind}, {self.path})"


def _keras_predictor(model: Any, path: Path | None, prep: PreprocessConfig | None) -> Predictor:
    shape = model.input_shape if not isinstance(model.input_shape, list) else model.input_shape[0]
    size = int(shape[1])
    out_shape = model.output_shape["mri"] if isinstance(model.output_shape, dict) else None
    slices = int(out_shape[-1]) if out_shape else (prep.num_slices if prep else 20)
    prep = prep or PreprocessConfig(image_size=size, num_slices=slices)
    if (prep.image_size, prep.num_slices) != (size, slices):
        raise InputError(path, f"model takes {size}x{size} X-rays and gives {slices} slices, but its "
                               f"preprocessing config says {prep.image_size} px and {prep.num_slices} slices")

    def fn(x: np.ndarray) -> np.ndarray:
        out = model.predict_on_batch(x)
        return out["mri"] if isinstance(out, dict) else out[1]

    return Predictor(fn, "keras", path, prep, model)


def _savedmodel_predictor(path: Path, prep: PreprocessConfig | None) -> Predictor:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as e:
        raise InputError(path, f"cannot load the SavedModel: {type(e).__name__}: {e}") from e
    if "predict_normalized" not in loaded.signatures:
        raise InputError(path, f"SavedModel has no 'predict_normalized' signature "
                               f"(has: {', '.join(loaded.signatures) or 'none'})")
    sig = loaded.signatures["predict_normalized"]
    _, kwargs = sig.structured_input_signature
    if len(kwargs) != 1:
        raise InputError(path, f"'predict_normalized' takes {sorted(kwargs)}; expected one X-ray input")
    (name, spec), = kwargs.items()
    size = int(spec.shape[1]) if spec.shape.rank == 4 and spec.shape[1] is not None else None
    slices = sig.structured_outputs["mri"].shape[-1]
    prep = prep or PreprocessConfig(image_size=size or 128, num_slices=int(slices or 20))

    def fn(x: np.ndarray) -> np.ndarray:
        return sig(**{name: tf.constant(x)})["mri"].numpy()

    p = Predictor(fn, "savedmodel", path, prep)
    p._loaded = loaded  # keep the trackable alive
    return p


def _tflite_predictor(path: Path, prep: PreprocessConfig | None) -> Predictor:
    from kneetf.export.tflite import TFLiteModel

    model = TFLiteModel(path)
    prep = prep or PreprocessConfig()

    def fn(x: np.ndarray) -> np.ndarray:
        return model.predict(x)["mri"]

    return Predictor(fn, "tflite", path, prep, model)


def load_predictor(model: Any, preprocess: PreprocessConfig | str | Path | None = None) -> Predictor:
    """A `Predictor` for a model path (any format above) or an in-memory keras.Model.

    `preprocess`: a PreprocessConfig, or a JSON/folder to read it from; by default the one
    recorded beside the model (a run's config.json), else the defaults.
    """
    if isinstance(preprocess, (str, Path)):
        source = preprocess
        preprocess = read_preprocess_config(source)
        if preprocess is None:
            raise InputError(source, "holds no preprocessing config (a 'preprocess' entry)")
    if isinstance(model, Predictor):
        return model
    if not isinstance(model, (str, Path)):
        return _keras_predictor(model, None, preprocess)
    kind, file = resolve_model_path(model)
    prep = preprocess or read_preprocess_config(file)
    if kind == "keras":
        return _keras_predictor(load_model(file), file, prep)
    if kind == "savedmodel":
        return _savedmodel_predictor(file, prep)
    return _tflite_predictor(file, prep)


# === Inputs ===

@dataclass
class XrayInput:
    """One X-ray to reconstruct: `path` (a file), its output `id` and the knee `side`."""

    id: str
    path: Path
    side: str = ""
    options: dict[str, Any] = field(default_factory=dict)


_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


def safe_id(text: str) -> str:
    """An id usable as a file name (other characters become '_')."""
    out = _SAFE_ID.sub("_", str(text)).strip("._")
    return out or "xray"


def _file_id(path: Path) -> str:
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
            errors.append({"id": safe_id(_file_id(p)), "file": str(p), "reason": "does not exist"})
        elif p.is_dir():
            files = _folder_files(p)
            if not files:
                errors.append({"id": "", "file": str(p), "reason": "folder holds no X-ray files "
                               f"({', '.join(sorted(XRAY_SUFFIXES))} or DICOM)"})
            items += [XrayInput(safe_id(_file_id(f)), f) for f in files]
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
            items.append(XrayInput(safe_id(_file_id(p)), p))
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
    side = item.side or normalize_side(getattr(meta, "laterality", None))
    info = meta.to_dict() if hasattr(meta, "to_dict") else dict(meta or {})
    return prepare_xray(image, config, roi, case_id=item.id, side=side, source=str(item.path), meta=info)


def patient_module(path: Path) -> dict[str, Any]:
    """The patient module of a DICOM X-ray (for `keep_patient`); {} for other files."""
    from kneetf.io.dicom import looks_like_dicom, read_header

    if not looks_like_dicom(path):
        return {}
    ds = read_header(path)
    return {k: ds.get(k) for k in PATIENT_KEYWORDS if ds.get(k, None) not in (None, "")}


# === Writing ===

def montage_image(volume: np.ndarray, xray: np.ndarray | None = None, cols: int = 7) -> np.ndarray:
    """8-bit grid of the slices of (slices, H, W) `volume`, the X-ray (H, W[, 1]) first."""
    from kneetf.viz import tile_slices

    tiles = np.asarray(volume, np.float32)
    if xray is not None:
        x = np.asarray(xray, np.float32).reshape(tiles.shape[1:])
        tiles = np.concatenate([x[None], tiles])
    grid = tile_slices(tiles, cols=cols)
    return np.round(np.clip(grid, 0, 1) * 255).astype(np.uint8)


def write_prediction(out_dir: Path, prep: PreparedXray, volume: np.ndarray, formats: Sequence[str], *,
                     spacing: Sequence[float] = NOMINAL_SPACING, patient: dict[str, Any] | None = None
                     ) -> list[Path]:
    """Write one (slices, H, W) volume in each of `formats`; returns the paths written."""
    from kneetf.io import writers

    written: list[Path] = []
    if "nifti" in formats:
        written.append(writers.write_nifti(out_dir / f"{prep.id}.nii.gz", volume, spacing, slices_first=True))
    if "dicom" in formats:
        lat = {"left": "L", "right": "R"}.get(prep.side)
        writers.write_dicom_series(out_dir / f"{prep.id}_dicom", volume, spacing,
                                   series_description=SERIES_DESCRIPTION, derived=True,
                                   patient=patient or None, laterality=lat)
        written.append(out_dir / f"{prep.id}_dicom")
    if "png" in formats:
        xray = prep.xray[:, ::-1] if prep.mirrored else prep.xray  # as the knee looks, like the volume
        written.append(writers.write_png(out_dir / f"{prep.id}.png", montage_image(volume, xray), bits=8))
    return written


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """"nifti,dicom" -> ("nifti", "dicom"); unknown names are a ConfigError."""
    names = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    names = ["nifti" if n in ("nii", "nii.gz") else n for n in names]
    bad = [n for n in names if n not in FORMATS]
    if bad or not names:
        raise ConfigError(f"--format takes a comma-separated list of {', '.join(FORMATS)}. "
                          f"Received: {text!r}")
    return tuple(dict.fromkeys(names))


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
    written (id, source, side, mirrored, ROI box). Only `out_dir` is written to.
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
    report = PredictReport(out, errors=list(errors))
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(items), desc="predict", unit="xray", disable=not progress)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prepared: list[tuple[XrayInput, PreparedXray]] = []
        for item in chunk:
            try:
                prepared.append((item, read_input(item, predictor.preprocess, roi)))
            except Exception as e:  # report, keep going with the others
                report.errors.append({"id": item.id, "file": str(item.path), "reason": _reason(e)})
                bar.update(1)
        if not prepared:
            continue
        try:
            mri = predictor(np.stack([p.xray for _, p in prepared]))
        except Exception as e:
            for item, _ in prepared:
                report.errors.append({"id": item.id, "file": str(item.path), "reason": f"model: {_reason(e)}"})
            bar.update(len(prepared))
            continue
        for (item, prep), vol in zip(prepared, mri):
            try:
                patient = patient_module(item.path) if keep_patient else None
                paths = write_prediction(out, prep, to_output_volume(vol, prep.mirrored), formats, patient=patient)
                report.written[item.id] = paths
                rows.append({"id": item.id, "source": str(item.path), "side": prep.side,
                             "mirrored": int(prep.mirrored),
                             **dict(zip(("x0", "y0", "x1", "y1"), (round(v, 2) for v in prep.box.as_tuple())))})
            except Exception as e:
                report.errors.append({"id": item.id, "file": str(item.path), "reason": f"writing: {_reason(e)}"})
            bar.update(1)
    bar.close()
    _write_csv(out / "predictions.csv", ["id", "source", "side", "mirrored", "x0", "y0", "x1", "y1"], rows)
    _write_csv(out / "errors.csv", ["id", "file", "reason"], report.errors)
    return report


def _write_csv(path: Path, fields: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    write_text_atomic(path, buf.getvalue())


__all__ = ["NOMINAL_SPACING", "FORMATS", "SERIES_DESCRIPTION", "resolve_model_path", "load_model",
           "read_preprocess_config", "Predictor", "load_predictor", "roi_source", "PreparedXray", "prepare_xray",
           "to_output_volume", "XrayInput", "collect_inputs", "read_input", "write_prediction", "predict_files",
           "PredictReport", "parse_formats", "safe_id", "montage_image", "patient_module"]
