"""Export KneeNet as a TF Serving SavedModel: `<out>/<version>/` with three signatures.

- `serving_default`: `xray` (batch, H, W, 1) float32 of any H, W (an ROI-cropped knee) ->
  `kneetf.preprocess.ops.preprocess_xray` (area resize + robust normalisation, the same ops
  the cache was built with) -> KneeNet -> `{"xray_recon", "mri"}`.
- `serving_uint16`: the same for raw uint16 pixels. TF Serving binds one dtype per
  signature; uint16 gets its own so that clients can send raw detector values at half the
  bytes of float32. The gRPC/REST clients send float32 to `serving_default` by default.
- `predict_normalized`: `xray` (batch, 128, 128, 1) float32 already in [0, 1] -> KneeNet.

The version folder is written under a temporary name beside it and renamed when complete
(TF Serving ignores non-numeric folders): it appears whole or not at all, and the same
command after a killed export removes the temporary folder and writes the version. Warm-up
requests are in
`assets.extra/tf_serving_warmup_requests` and a `kneetf_export.json` describing the export.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from kneetf.config import PreprocessConfig, to_dict
from kneetf.errors import ConfigError, InputError, KneetfError
from kneetf.export.samples import structured_samples
from kneetf.inference.loading import preprocess_config
from kneetf.io.atomic import atomic_path, remove_debris
from kneetf.io.keras_file import require_keras_archive
from kneetf.protocol import (DEFAULT_MODEL_NAME, EXPORT_INFO_FILE, EXPORT_ROI_DETECTOR, INPUT_KEY, OUTPUT_KEYS,
                             RUN_CONFIG_FILE, RUN_MODEL_FILE, SERVING_BATCH_SIZES, SIGNATURE_DEFAULT,
                             SIGNATURE_NORMALIZED, SIGNATURE_UINT16, TFLITE_DIR, WARMUP_FILE, predict_request,
                             signature_batch, warmup_record)
from kneetf.version import __version__

log = logging.getLogger(__name__)

#: largest difference tolerated between the exported graph and Keras in the self-check
VERIFY_TOLERANCE = 1e-4


@dataclass
class ExportSource:
    """A model ready to export, with the preprocessing it was trained with."""

    model: Any  # keras.Model
    preprocess: PreprocessConfig
    path: Path | None = None
    run_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportResult:
    """Where an export went and what it holds."""

    path: Path
    version: int
    info: dict[str, Any]
    tflite: dict[str, dict[str, Any]] = field(default_factory=dict)
    reused: bool = False  # the newest version already held this export; nothing was written


# === Loading ===

def _export_roi(source: "ExportSource", version_dir: Path) -> dict[str, Any] | None:
    """The ROI source the model's training crops came from (its run's record), with the ROI
    detector, if any, copied into `assets.extra/` so that it travels with the export."""
    data = source.run_config.get("data")
    roi = data.get("roi") if isinstance(data, dict) else None
    if not isinstance(roi, dict):
        return None
    if roi.get("file") and source.path is not None:
        import shutil

        run_dir = source.path if source.path.is_dir() else source.path.parent
        detector = run_dir / roi["file"]
        if not detector.is_file():
            raise InputError(detector, "the ROI detector the model was trained with is missing from its run folder")
        (version_dir / EXPORT_ROI_DETECTOR).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(detector, version_dir / EXPORT_ROI_DETECTOR)
        roi = {**roi, "file": EXPORT_ROI_DETECTOR}
    return roi


def _read_run_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(path, f"not valid JSON: {e}") from e


def load_for_export(model_or_run: Any, preprocess: PreprocessConfig | None = None) -> ExportSource:
    """Resolve a Keras model, a `.keras` file or a run folder (holding `model.keras` and
    `config.json`) to the model and its preprocessing config.

    The preprocessing config is, in order: `preprocess` if given, the "preprocess" key of the
    run's `config.json` (also looked up beside a `.keras` file; keys PreprocessConfig does not
    know are ignored), else the defaults.
    """
    import keras

    import kneetf.models.kneenet  # noqa: F401  (registers the custom objects)

    run_config: dict[str, Any] = {}
    path: Path | None = None
    if isinstance(model_or_run, keras.Model):
        model = model_or_run
    else:
        path = Path(model_or_run)
        model_file = path / RUN_MODEL_FILE if path.is_dir() else path
        if not model_file.exists():
            what = f"a run folder without {RUN_MODEL_FILE}" if path.is_dir() else "no such model file"
            raise InputError(path, what)
        if model_file.suffix != ".keras":
            raise InputError(model_file, "expected a .keras model file or a run folder")
        config_file = model_file.parent / RUN_CONFIG_FILE
        if config_file.exists():
            run_config = _read_run_config(config_file)
        require_keras_archive(model_file)
        from kneetf.models.kneenet import load_saved_model

        try:
            model = load_saved_model(model_file, compile=False)
        except (ValueError, OSError, TypeError) as e:
            raise InputError(model_file, f"cannot load the Keras model: {e}") from e
    prep = preprocess or preprocess_config(run_config.get("preprocess"))
    shape = tuple(model.inputs[0].shape[1:]) if getattr(model, "inputs", None) else None
    if shape is not None and shape[:2] != (prep.image_size, prep.image_size):
        raise ConfigError(f"the model takes {shape[0]}x{shape[1]} images but the preprocessing config says "
                          f"image_size={prep.image_size}")
    return ExportSource(model=model, preprocess=prep, path=path, run_config=run_config)


# === Versions ===

def existing_versions(base: str | Path) -> list[int]:
    """Numeric version folders under `base`, ascending (temporary `.tmp-*` folders ignored)."""
    base = Path(base)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and re.fullmatch(r"\d+", p.name))


def next_version(base: str | Path) -> int:
    """The next free integer version under `base` (1 for a new folder)."""
    versions = existing_versions(base)
    return versions[-1] + 1 if versions else 1


# === Export ===

def _serving_fns(model: Any, preprocess: PreprocessConfig) -> dict[str, tuple[Any, Any]]:
    """signature name -> (python function, input TensorSpec)."""
    import tensorflow as tf

    from kneetf.preprocess.ops import preprocess_xray

    size = preprocess.image_size

    # Traced once and called by every signature: one copy of the network in the graph.
    @tf.function(input_signature=[tf.TensorSpec((None, size, size, 1), tf.float32)])
    def run_model(x: tf.Tensor) -> dict[str, tf.Tensor]:
        outputs = model(x, training=False)
        return {k: tf.cast(outputs[k], tf.float32) for k in OUTPUT_KEYS}

    def serve(xray: tf.Tensor) -> dict[str, tf.Tensor]:
        return run_model(preprocess_xray(xray, size, preprocess.low_percentile, preprocess.high_percentile))

    def predict_normalized(xray: tf.Tensor) -> dict[str, tf.Tensor]:
        return run_model(tf.cast(xray, tf.float32))

    any_size = (None, None, None, 1)
    return {
        SIGNATURE_DEFAULT: (serve, tf.TensorSpec(any_size, tf.float32, name=INPUT_KEY)),
        SIGNATURE_UINT16: (serve, tf.TensorSpec(any_size, tf.uint16, name=INPUT_KEY)),
        SIGNATURE_NORMALIZED: (predict_normalized, tf.TensorSpec((None, size, size, 1), tf.float32, name=INPUT_KEY)),
    }


def write_savedmodel(model: Any, preprocess: PreprocessConfig, directory: str | Path) -> dict[str, Any]:
    """Write the SavedModel with its three signatures into `directory`; returns a
    description of the signatures (for `kneetf_export.json`)."""
    import keras

    archive = keras.export.ExportArchive()
    archive.track(model)
    described = {}
    for name, (fn, spec) in _serving_fns(model, preprocess).items():
        archive.add_endpoint(name, fn, input_signature=[spec])
        described[name] = {"inputs": {INPUT_KEY: {"dtype": spec.dtype.name, "shape": list(spec.shape)}},
                           "outputs": list(OUTPUT_KEYS)}
    archive.write_out(str(directory), verbose=False)
    return described


#: the largest batch `read_batching_config` accepts: its warm-up requests are written into the export
MAX_WARMUP_BATCH = 1024


def read_batching_config(path: str | Path) -> tuple[int, ...]:
    """The batch sizes TF Serving's batching may form with the `BatchingParameters` text
    file `path` (`--batching_parameters_file`): its `allowed_batch_sizes`, else the powers
    of two up to `max_batch_size` and that size."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(path, f"cannot read the batching config: {e.strerror or e}") from e
    except UnicodeDecodeError:
        raise InputError(path, "is not a text file; expected TF Serving's batching parameters "
                               "(allowed_batch_sizes or max_batch_size)") from None
    text = re.sub(r"#[^\n]*", "", text)
    sizes: list[int] = []
    for value in re.findall(r"\ballowed_batch_sizes\s*:\s*(\[[^\]]*\]|\d+)", text):
        sizes += [int(v) for v in re.findall(r"\d+", value)]
    if not sizes:
        found = re.search(r"\bmax_batch_size\s*\{\s*value\s*:\s*(\d+)\s*\}", text)
        if not found:
            raise InputError(path, "holds neither allowed_batch_sizes nor max_batch_size")
        top = int(found[1])
        sizes = [2 ** i for i in range(top.bit_length()) if 2 ** i < top] + [top]
    if min(sizes) < 1 or max(sizes) > MAX_WARMUP_BATCH:
        raise InputError(path, f"batch sizes must lie in [1, {MAX_WARMUP_BATCH}] to be warmed up; got {sizes}")
    return tuple(sorted(set(sizes)))


def warmup_batches(image_size: int, batch_sizes: Sequence[int] = SERVING_BATCH_SIZES, seed: int = 0
                   ) -> list[tuple[str, np.ndarray]]:
    """(signature, batch) pairs replayed by TF Serving at load time: every signature at
    every batch size, checked as the clients check theirs (`kneetf.protocol.signature_batch`)."""
    pairs = []
    for b in batch_sizes:
        images = structured_samples(int(b), image_size, seed)
        pairs.append((SIGNATURE_DEFAULT, signature_batch(images, SIGNATURE_DEFAULT, image_size=image_size)))
        pairs.append((SIGNATURE_UINT16, signature_batch(np.round(images * 4095), SIGNATURE_UINT16,
                                                        image_size=image_size)))
        pairs.append((SIGNATURE_NORMALIZED, signature_batch(images, SIGNATURE_NORMALIZED, image_size=image_size)))
    return pairs


def write_warmup(version_dir: str | Path, model_name: str, image_size: int,
                 batch_sizes: Sequence[int] = SERVING_BATCH_SIZES) -> Path:
    """Write `assets.extra/tf_serving_warmup_requests` (TFRecord of PredictionLog protos)
    with requests built by the one request builder, `kneetf.protocol`: every signature at
    every batch size (by default the allowed batch sizes of serving/batching.config), so
    that no first request after a load pays for building its graph."""
    import tensorflow as tf

    path = Path(version_dir) / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, batch in warmup_batches(image_size, batch_sizes):
            writer.write(warmup_record(predict_request(batch, model_name, signature=signature)))
    return path


def verify_export(version_dir: str | Path, model: Any, preprocess: PreprocessConfig,
                  samples: np.ndarray | None = None) -> dict[str, float]:
    """Load the written SavedModel and compare its signatures with Keras on `samples`;
    raises KneetfError past `VERIFY_TOLERANCE`. Returns the max abs difference per check."""
    import tensorflow as tf

    from kneetf.preprocess.ops import preprocess_xray

    size = preprocess.image_size
    raw = samples if samples is not None else structured_samples(2, size + 37, seed=1) * 3000.0
    normalized = preprocess_xray(raw, size, preprocess.low_percentile, preprocess.high_percentile).numpy()
    reference = model.predict(normalized, verbose=0)
    loaded = tf.saved_model.load(str(version_dir))
    checks = {
        SIGNATURE_DEFAULT: loaded.signatures[SIGNATURE_DEFAULT](xray=tf.constant(raw, tf.float32)),
        SIGNATURE_NORMALIZED: loaded.signatures[SIGNATURE_NORMALIZED](xray=tf.constant(normalized)),
    }
    diffs = {}
    for name, outputs in checks.items():
        diffs[name] = max(float(np.max(np.abs(outputs[k].numpy() - reference[k]))) for k in OUTPUT_KEYS)
        if not diffs[name] <= VERIFY_TOLERANCE:
            raise KneetfError(f"{version_dir}: signature {name} differs from the Keras model by {diffs[name]:.3g} "
                              f"(> {VERIFY_TOLERANCE}); the export is not used")
    return diffs


def export_fingerprint(source: ExportSource, **options: Any) -> str:
    """A hash of what an export is made of: the model's config and weights, the
    preprocessing and the export `options`."""
    import hashlib

    h = hashlib.sha256()
    config = getattr(source.model, "model_config", None)
    h.update(json.dumps({"model": to_dict(config) if config is not None else source.model.name,
                         "preprocess": to_dict(source.preprocess),
                         "options": {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in options.items()}},
                        sort_keys=True).encode())
    for w in source.model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()[:32]


def _exported_as(out: Path, fingerprint: str) -> ExportResult | None:
    """The newest version under `out`, when it is an export with this fingerprint."""
    versions = existing_versions(out)
    if not versions:
        return None
    path = out / str(versions[-1])
    try:
        info = json.loads((path / EXPORT_INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if info.get("fingerprint") != fingerprint:
        return None
    tflite = {k: {**v, "path": path / v["path"]} for k, v in (info.get("tflite") or {}).items() if "path" in v}
    return ExportResult(path=path, version=versions[-1], info=info, tflite=tflite, reused=True)


def export_savedmodel(model_or_run: Any, out: str | Path, *, version: int | None = None, overwrite: bool = False,
                      preprocess: PreprocessConfig | None = None, model_name: str | None = None,
                      warmup_batch_sizes: Sequence[int] = SERVING_BATCH_SIZES, verify: bool = True,
                      tflite_variants: Sequence[str] = (), representative: Iterable[np.ndarray] | None = None,
                      data: str | Path | None = None, calibration_samples: int = 32) -> ExportResult:
    """Export for TF Serving into `<out>/<version>/`, atomically.

    Args:
        model_or_run: a Keras model, a `.keras` file or a run folder.
        out: the model's base folder (TF Serving's `base_path`), e.g. `saved_models/kneetf`.
        version: the version number; by default the next free one, unless the newest version
            already holds this export (same model weights, preprocessing and options): then
            that version is returned and nothing is written. An existing version is refused
            unless `overwrite`.
        preprocess: overrides the run's preprocessing config.
        model_name: name written into the warm-up requests (default: the folder name).
        warmup_batch_sizes: batch sizes of the warm-up requests (empty: no warm-up file); by
            default `kneetf.protocol.SERVING_BATCH_SIZES`, the allowed batch sizes of
            serving/batching.config (`read_batching_config` reads another file's).
        verify: reload the SavedModel and compare it with Keras before publishing it.
        tflite_variants: also write these TFLite variants ("fp32", "fp16", "int8") into
            `<version>/tflite/`, checked against Keras (see `kneetf.export.tflite`).
        representative, data, calibration_samples: int8 calibration inputs, see
            `kneetf.export.tflite.export_tflite`.
    """
    import keras
    import tensorflow as tf

    source = load_for_export(model_or_run, preprocess)
    out = Path(out)
    name = model_name or out.name or DEFAULT_MODEL_NAME
    fingerprint = export_fingerprint(source, name=name, warmup_batch_sizes=warmup_batch_sizes,
                                     tflite_variants=tflite_variants, data=str(data) if data else None,
                                     calibration_samples=calibration_samples if tflite_variants else None)
    if version is None and representative is None:
        done = _exported_as(out, fingerprint)
        if done is not None:  # e.g. the same command again after the export was killed past its rename
            log.info("%s is already exported as version %d (same model and options); nothing to do", name, done.version)
            return done
        version = next_version(out)
    if int(version) < 1:
        raise ConfigError(f"version must be a positive integer. Received: version={version}")
    version = int(version)
    final = out / str(version)
    if final.exists() and not overwrite:
        raise ConfigError(f"{final} already exists; choose another --version, or --overwrite it")
    model_config = getattr(source.model, "model_config", None)

    remove_debris(out, f"{version}-")  # a killed export of this version
    remove_debris(out, f"old-{version}-")
    with atomic_path(final, directory=True, fault="export.version") as tmp:
        signatures = write_savedmodel(source.model, source.preprocess, tmp)
        if warmup_batch_sizes:
            write_warmup(tmp, name, source.preprocess.image_size, warmup_batch_sizes)
        diffs = verify_export(tmp, source.model, source.preprocess) if verify else {}
        tflite_report: dict[str, dict[str, Any]] = {}
        if tflite_variants:
            from kneetf.export.tflite import export_tflite

            tflite_report = export_tflite(source.model, tmp / TFLITE_DIR, tflite_variants,
                                          representative=representative, data=data,
                                          calibration_samples=calibration_samples)
        roi = _export_roi(source, tmp)
        info = {
            "kneetf_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model_name": name,
            "version": version,
            "source": str(source.path) if source.path else None,
            "preset": source.run_config.get("preset") or None,
            "model": to_dict(model_config) if model_config is not None else None,
            "preprocess": to_dict(source.preprocess),
            "roi": roi,
            "signatures": signatures,
            "warmup": {"file": WARMUP_FILE, "batch_sizes": list(warmup_batch_sizes)} if warmup_batch_sizes else None,
            "verify_max_abs_diff": diffs,
            "tflite": {k: {kk: (str(Path(vv).relative_to(tmp)) if kk == "path" else vv) for kk, vv in v.items()}
                       for k, v in tflite_report.items()},
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "fingerprint": fingerprint,
        }
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    log.info("exported %s version %d to %s", name, version, final)
    tflite_final = {k: {**v, "path": final / Path(v["path"]).relative_to(tmp)} for k, v in tflite_report.items()}
    return ExportResult(path=final, version=version, info=info, tflite=tflite_final)


__all__ = ["ExportSource", "ExportResult", "load_for_export", "existing_versions", "next_version",
           "write_savedmodel", "read_batching_config", "warmup_batches", "write_warmup",
           "verify_export", "export_savedmodel"]
