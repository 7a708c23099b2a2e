"""Models from disk, whatever `kneetf` wrote: a `.keras` file, a training run folder (holding
`model.keras` and `config.json`), a SavedModel folder (a TF Serving `<name>/` folder: its
highest version) or a `.tflite` file; and the preprocessing config recorded with each.

The file names are `kneetf.protocol`'s, the ones training and export write.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from kneetf.config import PreprocessConfig, from_dict
from kneetf.data.cache import DATASET_JSON
from kneetf.errors import ConfigError, InputError
from kneetf.protocol import EXPORT_INFO_FILE, RUN_CONFIG_FILE, RUN_MODEL_FILE, TFLITE_DIR

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


def read_roi_record(path: str | Path) -> str | None:
    """The ROI source recorded with a model (the "roi" entry of the JSON records
    `read_preprocess_config` reads), as `kneetf.preprocess.xray.roi_source(roi=...)` takes
    it: "classical", "builtin", or a detector `.keras` path (a relative path is taken from
    the record's folder). The entry is that value, or {"source": ..., "detector": PATH}.
    None when nothing usable is recorded: boxes from a CSV name training X-rays only, so a
    model trained on them gets the classical fallback for new ones."""
    for c, blob in _records(path):
        entry = blob.get("roi")
        if entry is None:
            continue
        if isinstance(entry, dict):
            entry = entry.get("detector") or entry.get("source")
        if not isinstance(entry, str) or not entry:
            raise InputError(c, f"unreadable \"roi\" entry {blob.get('roi')!r}")
        if entry.lower().endswith(".keras"):
            detector = Path(entry)
            return str(detector if detector.is_absolute() else c.parent / detector)
        if entry in ("classical", "builtin"):
            return entry
        return None
    return None


__all__ = ["MODEL_KINDS", "is_savedmodel", "serving_version", "resolve_model_path", "load_model",
           "preprocess_config", "read_preprocess_config", "read_roi_record"]
