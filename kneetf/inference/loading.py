"""Models from disk, whatever `kneetf` wrote: a `.keras` file, a training run folder (holding
`model.keras` and `config.json`), a SavedModel folder (a TF Serving `<name>/` folder: its
highest version) or a `.tflite` file; and what was recorded with each: the preprocessing
config and the ROI source its training crops came from (`model_roi_source` crops new X-rays
the same way).

The file names are `kneetf.protocol`'s, the ones training and export write.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Mapping

from kneetf.config import PreprocessConfig, from_dict
from kneetf.data.cache import DATASET_JSON
from kneetf.errors import ConfigError, InputError
from kneetf.io.keras_file import require_keras_archive
from kneetf.protocol import EXPORT_INFO_FILE, RUN_CONFIG_FILE, RUN_MODEL_FILE, TFLITE_DIR

log = logging.getLogger(__name__)

MODEL_KINDS = ("keras", "savedmodel", "tflite")


def is_savedmodel(path: Path) -> bool:
    """Whether `path` is a SavedModel folder."""
    return path.is_dir() and (path / "saved_model.pb").exists()


def serving_version(path: Path) -> Path | None:
    """The highest numeric version folder of a TF Serving model folder, if any."""
    versions = [p for p in path.iterdir() if p.is_dir() and p.name.isdigit() and is_savedmodel(p)] \
        if path.is_dir() else []
    return max(versions, key=lambda p: int(p.name)) if versions else None


def resolve_model_path(path: str | Path) -> tuple[str, Path]:
    """(kind, file) of a model path: kind is one of `MODEL_KINDS`."""
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
    if (p / RUN_MODEL_FILE).is_file():
        return "keras", p / RUN_MODEL_FILE
    if is_savedmodel(p):
        return "savedmodel", p
    version = serving_version(p)
    if version is not None:
        return "savedmodel", version
    raise InputError(p, f"folder holds no {RUN_MODEL_FILE}, saved_model.pb or TF Serving version folder")


def load_model(path: str | Path, *, compile: bool = True) -> Any:
    """A KneeNet (keras.Model) from a `.keras` file or a training run folder; `predict(batch)`
    returns {"xray_recon", "mri"} for normalised X-rays (batch, 128, 128, 1).

    `compile=False` skips the loss and the optimizer's state (enough for inference, and
    without Keras' warning about optimizer variables it did not load)."""
    from kneetf.models.kneenet import load_saved_model  # (also registers the kneetf custom objects)

    kind, file = resolve_model_path(path)
    if kind != "keras":
        raise InputError(path, f"is a {kind} model; load_model needs a .keras file or a run folder "
                               "(use kneetf.api.Reconstructor for SavedModel and TFLite)")
    require_keras_archive(file)
    try:
        return load_saved_model(file, compile=compile)
    except Exception as e:  # keras raises many types on a bad archive
        raise InputError(file, f"cannot load the Keras model: {type(e).__name__}: {e}") from e


def preprocess_config(blob: Mapping[str, Any] | None) -> PreprocessConfig:
    """The PreprocessConfig of a recorded "preprocess" entry (the defaults for None); keys
    PreprocessConfig does not know (cache bookkeeping) are ignored."""
    known = {f.name for f in dataclasses.fields(PreprocessConfig)}
    return from_dict(PreprocessConfig, {k: v for k, v in (blob or {}).items() if k in known})


def _records(path: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """The JSON records kept with a model or data, (file, content), most specific first: a
    JSON file itself, or a run's config.json, an export's kneetf_export.json, a cache's
    dataset.json in the folder (for a model file, the folder it sits in; for
    `<version>/tflite/*.tflite`, also the export's version folder)."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".json":
        candidates = [p]
    else:
        folder = p if p.is_dir() else p.parent
        if p.is_dir() and not (folder / EXPORT_INFO_FILE).exists() and serving_version(folder) is not None:
            folder = serving_version(folder)
        candidates = [folder / n for n in (RUN_CONFIG_FILE, EXPORT_INFO_FILE, DATASET_JSON)]
        if folder.name == TFLITE_DIR:
            candidates.append(folder.parent / EXPORT_INFO_FILE)
    out = []
    for c in candidates:
        if not c.is_file():
            continue
        try:
            blob = json.loads(c.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(c, f"cannot read the JSON: {e}") from e
        if isinstance(blob, dict):
            out.append((c, blob))
    return out


def read_preprocess_config(path: str | Path) -> PreprocessConfig | None:
    """The preprocessing config recorded with a model or data: a JSON file with a
    "preprocess" entry (a run's config.json, an export's kneetf_export.json, a cache's
    dataset.json) or a folder holding one. For a model file, the folder it sits in is
    searched (and, for `<version>/tflite/*.tflite`, the export's version folder). None when
    there is none. Keys PreprocessConfig does not know are ignored."""
    for c, blob in _records(path):
        prep = blob.get("preprocess")
        if isinstance(prep, dict):
            try:
                return preprocess_config(prep)
            except ConfigError as e:
                raise InputError(c, f"bad preprocess config: {e}") from e
    return None


def _roi_entry(entry: Any) -> dict[str, Any] | None:
    """A recorded "roi" entry as a record: a dict with "source" as it is; the short forms
    "classical", "builtin" (the shipped detector) and a detector `.keras` path (relative to
    the record's folder) as the matching record."""
    if isinstance(entry, dict):
        if entry.get("source"):
            return entry
        if isinstance(entry.get("detector"), str):
            entry = entry["detector"]
    if not isinstance(entry, str) or not entry:
        return None
    if entry == "classical":
        return {"source": "classical"}
    if entry == "builtin" or entry.lower().endswith(".keras"):
        return {"source": "detector", "name": Path(entry).name, "file": entry}
    return None


def read_roi_record(path: str | Path) -> tuple[dict[str, Any], Path] | None:
    """The ROI source a model's training crops came from, and the folder its files are
    relative to: the "roi" record of a run's config.json (also under "data"), of an export's
    kneetf_export.json, or of a cache's dataset.json (under "source"). `{"source": ...}` is
    "classical" (with its box convention), "detector" (name, SHA-256, "file": its copy),
    "csv" (user boxes) or "truth" (the built-in synthetic knees' true boxes). None when
    nothing is recorded (a model or cache written before this was)."""
    for c, blob in _records(path):
        for holder in (blob, blob.get("data"), blob.get("source")):
            raw = holder.get("roi") if isinstance(holder, dict) else None
            if raw is None:
                continue
            record = _roi_entry(raw)
            if record is None:
                raise InputError(c, f"unreadable \"roi\" entry {raw!r}")
            return record, c.parent
    return None


def _describe(record: Mapping[str, Any]) -> str:
    kind = record.get("source")
    if kind == "detector":
        return f"the ROI detector {record.get('name', '')}".rstrip()
    return {"classical": "the classical ROI", "csv": f"boxes from {record.get('boxes', 'a CSV')}",
            "truth": "the synthetic knees' true boxes"}.get(kind, str(kind))


def _chosen_record(source: Any) -> dict[str, Any]:
    """An ROI source chosen by the user, described like a recorded one."""
    from kneetf.preprocess.roi import ClassicalRoi, CsvRoi, FixedRoi

    if isinstance(source, ClassicalRoi):
        return {"source": "classical", "box_mm": source.box_mm}
    if isinstance(source, CsvRoi):
        return {"source": "csv", "boxes": source.path.name if source.path else "a dict"}
    if isinstance(source, FixedRoi):
        return {"source": "fixed"}
    path = getattr(source, "path", None)
    if hasattr(source, "detection_for") or path is not None and Path(path).suffix == ".keras":
        from kneetf.data.sources import detector_file, file_sha256

        record = {"source": "detector", "name": Path(path).name if path else type(source).__name__}
        if path is not None and detector_file(path).is_file():
            record["sha256"] = file_sha256(detector_file(path))
        return record
    return {"source": type(source).__name__}


def model_roi_source(path: str | Path | None, roi: Any = None, *, boxes: str | Path | None = None,
                     detector: str | Path | None = None) -> Any:
    """The ROI source to crop new X-rays for the model at `path` with.

    An explicit choice (`roi` as `kneetf.preprocess.xray.roi_source` takes it, or `boxes` /
    `detector`, the `--rois` / `--roi-detector` options) wins; when it differs from what the
    model's training crops came from, a warning says so. Otherwise the recorded source is
    used: the classical ROI with the recorded box convention, or the detector copied beside
    the model (checked against its recorded SHA-256). A model trained on the built-in
    synthetic knees (true boxes) or on user boxes from a CSV gets the built-in detector, which
    was trained on boxes of the synthetic true boxes' convention (a square of about 100 mm
    centred on the joint space); for a CSV a warning suggests giving boxes. A model without
    a record gets the built-in detector too. "classical" chosen for a model trained on
    classical crops keeps their recorded box convention.
    """
    from kneetf.preprocess.roi import ClassicalRoi
    from kneetf.preprocess.roi_detector_config import BUILTIN_NAME, CLASSICAL_NAME
    from kneetf.preprocess.xray import roi_source

    def recorded_classical(record: Mapping[str, Any]) -> ClassicalRoi:
        return ClassicalRoi(**{k: float(record[k]) for k in ("side_scale", "box_mm") if k in record})

    found = read_roi_record(path) if path is not None and Path(path).exists() else None
    record, folder = found if found else (None, None)
    if any(x is not None and x != "" for x in (roi, boxes, detector)):
        source = roi_source(roi, boxes=boxes, detector=detector)
        named = next((str(x) for x in (roi, detector) if isinstance(x, (str, Path))), "")
        if named == CLASSICAL_NAME and record is not None and record.get("source") == "classical":
            return recorded_classical(record)  # the box convention the model was trained with
        if record is not None and record.get("source") not in ("truth", None):
            chosen = _chosen_record(source)
            same = chosen.get("source") == record.get("source") and (
                chosen["source"] != "detector" or chosen.get("sha256") == record.get("sha256"))
            if not same:
                log.warning("%s was trained on crops from %s; cropping with %s instead may give other crops "
                            "than it learnt from", path, _describe(record), _describe(chosen))
        return source
    if record is not None and record.get("source") == "classical":
        return recorded_classical(record)
    if record is None or record.get("source") in ("truth", "csv"):
        if record is not None and record.get("source") == "csv":
            log.warning("%s was trained on crops from %s; new X-rays are cropped by the built-in ROI detector "
                        "unless you give their boxes (--rois / roi=)", path, _describe(record))
        return roi_source(detector=BUILTIN_NAME)
    if record.get("source") == "detector":
        from kneetf.data.sources import builtin_detector_sha256, detector_file, file_sha256

        file = None
        if record.get("file"):
            file = detector_file(record["file"]) if record["file"] == "builtin" else folder / record["file"]
        if file is None or not file.is_file():
            if record.get("sha256") != builtin_detector_sha256():  # quiet when the missing copy is kneetf's own
                log.warning("%s was trained on crops from %s, which is not beside it (%s); cropping with the "
                            "built-in ROI detector instead", path, _describe(record), file)
            return roi_source(detector=BUILTIN_NAME)
        if record.get("sha256") and file_sha256(file) != record["sha256"]:
            raise InputError(file, f"is not the ROI detector {path} was trained with (SHA-256 differs from the "
                                   "recorded one)")
        return roi_source(detector=file)
    raise InputError(path, f"unknown recorded ROI source {record.get('source')!r}")


__all__ = ["MODEL_KINDS", "is_savedmodel", "serving_version", "resolve_model_path", "load_model",
           "preprocess_config", "read_preprocess_config", "read_roi_record", "model_roi_source"]
