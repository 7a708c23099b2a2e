"""TFLite variants of KneeNet (fp32, fp16, int8), run with `ai_edge_litert`.

The TFLite models take the ALREADY NORMALISED input: `xray` (1, 128, 128, 1) float32 in
[0, 1] (int8 models quantise it inside `TFLiteModel`, the runner of
`kneetf.inference.litert`), the output of
`kneetf.preprocess.ops.preprocess_xray`. Resize and normalisation stay out of the TFLite
graph: the percentile (a sort) has no fast TFLite kernel, and an on-device app usually has
its own image pipeline. Outputs are `xray_recon` and `mri`, as in the SavedModel.

- fp32: plain conversion; matches Keras to float rounding.
- fp16: weights stored as float16 (half the size), computed in float32 on CPU.
- int8: full-integer quantisation (int8 input and output, scales in the model) calibrated
  on a representative set: samples of a kneetf cache when given, else structured test
  images. TFLite has no int8 kernel for CONV_3D_TRANSPOSE, so the 3-D generator's
  transposed convolutions run in float between QUANTIZE/DEQUANTIZE ops, and so do the kernel
  ridge prior and the template sum (`FLOAT_IN_INT8`), which int8 cannot carry.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from kneetf.errors import ConfigError, InputError
from kneetf.export.samples import structured_samples
from kneetf.inference.litert import TFLiteModel
from kneetf.io.atomic import atomic_path
from kneetf.protocol import INPUT_KEY, OUTPUT_KEYS, SIGNATURE_DEFAULT

log = logging.getLogger(__name__)

VARIANTS: tuple[str, ...] = ("fp32", "fp16", "int8")
REPORT_FILE = "report.json"


def tflite_filename(variant: str) -> str:
    return f"kneetf_{variant}.tflite"


# === Representative data ===

def samples_from_cache(cache_dir: str | Path, count: int, split: str = "train") -> np.ndarray:
    """Up to `count` normalised X-rays (n, S, S, 1) from a kneetf cache (`make_dataset`)."""
    from kneetf.data.pipeline import make_dataset

    xs: list[np.ndarray] = []
    for xray, _targets in make_dataset(cache_dir, split, batch_size=min(count, 32), shuffle=False, repeat=False):
        xs.extend(np.asarray(xray, np.float32))
        if len(xs) >= count:
            break
    if not xs:
        raise InputError(cache_dir, f"split {split!r} of the cache has no samples for calibration")
    return np.stack(xs[:count])


def representative_samples(count: int, image_size: int = 128, *, data: str | Path | None = None,
                           representative: Iterable[np.ndarray] | None = None, seed: int = 0) -> np.ndarray:
    """Calibration inputs (n, S, S, 1) float32 in [0, 1]: from `representative` (any
    iterable of (S, S), (S, S, 1) or (1, S, S, 1) arrays), else from the cache `data`, else
    structured test images."""
    if representative is not None:
        arrays = []
        for a in representative:
            a = np.asarray(a, np.float32).reshape(-1, image_size, image_size, 1)
            arrays.extend(a)
            if len(arrays) >= count:
                break
        if not arrays:
            raise InputError(None, "the representative dataset is empty")
        return np.stack(arrays[:count])
    if data is not None:
        return samples_from_cache(data, count)
    log.info("no calibration data given: int8 calibrated on %d structured test images (pass a cache for real "
             "ranges)", count)
    return structured_samples(count, image_size, seed)


# === Conversion ===

def _fixed_savedmodel(model: Any, directory: Path, image_size: int) -> None:
    """A SavedModel of the bare model with a fixed (1, S, S, 1) input, for the converter
    (Keras 3's recommended path: ExportArchive -> SavedModel -> from_saved_model)."""
    import keras
    import tensorflow as tf

    def serve(xray: tf.Tensor) -> dict[str, tf.Tensor]:
        outputs = model(xray, training=False)
        return {k: tf.cast(outputs[k], tf.float32) for k in OUTPUT_KEYS}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE_DEFAULT, serve,
                         input_signature=[tf.TensorSpec((1, image_size, image_size, 1), tf.float32, name=INPUT_KEY)])
    archive.write_out(str(directory), verbose=False)


#: parts of the names of the TFLite tensors an int8 model keeps in float32: the kernel ridge
#: prior and the template sum. Quantised, the template's logit (log of a template near 0) and
#: the prior's basis products lost the MRI: 20 dB against Keras for a trained tiny model of the
#: default recipe, 48 dB with these in float32 (input and outputs int8).
FLOAT_IN_INT8 = ("mri_prior", "generator_template")


def _float_in_int8(saved_model_dir: Path) -> list[str]:
    """The tensors of the model at `saved_model_dir` that match `FLOAT_IN_INT8` (the names of
    its plain float conversion, which the int8 conversion keeps)."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=[SIGNATURE_DEFAULT])
    names = [d["name"] for d in Interpreter(model_content=converter.convert()).get_tensor_details()]
    return [n for n in names if any(part in n for part in FLOAT_IN_INT8)]


def _convert(saved_model_dir: Path, variant: str, calibration: np.ndarray | None) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=[SIGNATURE_DEFAULT])
    if variant == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "int8":
        if calibration is None or not len(calibration):
            raise ConfigError("int8 conversion needs calibration samples")

        def gen() -> Iterable[dict[str, np.ndarray]]:
            for sample in calibration:
                yield {INPUT_KEY: sample[None].astype(np.float32)}

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = gen
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        keep = _float_in_int8(saved_model_dir)
    elif variant != "fp32":
        raise ConfigError(f"unknown TFLite variant {variant!r}; choose from {', '.join(VARIANTS)}")
    with warnings.catch_warnings():
        # the converter's own calibration still uses tf.lite.Interpreter; ours is ai_edge_litert
        warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated")
        if variant == "int8" and keep:  # selective quantisation: these tensors stay float32
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=converter, debug_dataset=lambda: ([s[None].astype(np.float32)] for s in calibration),
                # fully_quantize: int8 input and outputs, as the converter alone gives them
                debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=keep, fully_quantize=True))
            return debugger.get_nondebug_quantized_model()
        return converter.convert()


def convert_tflite(model: Any, variants: Sequence[str] = VARIANTS, calibration: np.ndarray | None = None
                   ) -> dict[str, bytes]:
    """Convert a Keras KneeNet to TFLite flatbuffers, one per variant."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown TFLite variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    image_size = int(model.inputs[0].shape[1])
    with tempfile.TemporaryDirectory(prefix="kneetf-tflite-") as tmp:
        _fixed_savedmodel(model, Path(tmp), image_size)
        return {v: _convert(Path(tmp), v, calibration) for v in variants}


# === Checking ===

def compare_outputs(pred: dict[str, np.ndarray], ref: dict[str, np.ndarray], data_range: float = 1.0
                    ) -> dict[str, dict[str, float]]:
    """Per output: max and mean abs difference, and PSNR (dB, capped at 200 for identical)."""
    result = {}
    for k in OUTPUT_KEYS:
        diff = np.asarray(pred[k], np.float64) - np.asarray(ref[k], np.float64)
        mse = float(np.mean(diff ** 2))
        result[k] = {"max_abs_diff": float(np.max(np.abs(diff))), "mean_abs_diff": float(np.mean(np.abs(diff))),
                     "psnr": min(200.0, 10 * math.log10(data_range ** 2 / mse)) if mse > 0 else 200.0}
    return result


def export_tflite(model: Any, out_dir: str | Path, variants: Sequence[str] = VARIANTS, *,
                  representative: Iterable[np.ndarray] | None = None, data: str | Path | None = None,
                  calibration_samples: int = 32, check: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """Write `kneetf_<variant>.tflite` files into `out_dir` and check each against Keras.

    Args:
        model: a Keras KneeNet.
        out_dir: folder for the files and `report.json`.
        variants: any of "fp32", "fp16", "int8".
        representative: int8 calibration inputs (normalised arrays); else `data`.
        data: a kneetf cache folder: calibration (and check) samples drawn from its train split.
        calibration_samples: how many calibration samples to use.
        check: normalised inputs (n, S, S, 1) for the check against Keras; by default 4
            samples not used for calibration.

    Returns:
        variant -> {"path", "bytes", "outputs": {name: {"max_abs_diff", "mean_abs_diff", "psnr"}}}.
    """
    out_dir = Path(out_dir)
    image_size = int(model.inputs[0].shape[1])
    calibration = None
    if "int8" in variants:
        calibration = representative_samples(calibration_samples, image_size, data=data,
                                             representative=representative)
    if check is None:
        if data is not None:
            pool = samples_from_cache(data, calibration_samples + 4)
            check = pool[-4:] if len(pool) > 4 else pool
        else:
            check = structured_samples(4, image_size, seed=12345)
    reference = model.predict(check, verbose=0)
    blobs = convert_tflite(model, variants, calibration)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict[str, Any]] = {}
    for variant, blob in blobs.items():
        path = out_dir / tflite_filename(variant)
        with atomic_path(path) as tmp:
            tmp.write_bytes(blob)
        pred = TFLiteModel(path).predict(check)
        report[variant] = {"path": str(path), "bytes": len(blob), "outputs": compare_outputs(pred, reference)}
        log.info("TFLite %s: %d bytes, mri max abs diff %.3g", variant, len(blob),
                 report[variant]["outputs"]["mri"]["max_abs_diff"])
    meta = {"input": {"name": INPUT_KEY, "shape": [1, image_size, image_size, 1],
                      "note": "already normalised to [0, 1] (kneetf.preprocess.ops.preprocess_xray)"},
            "calibration": ("representative" if representative is not None else str(data) if data is not None
                            else "structured test images") if calibration is not None else None,
            "check_samples": int(len(check)),
            "variants": {k: {**v, "path": Path(v["path"]).name} for k, v in report.items()}}
    with atomic_path(out_dir / REPORT_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return report


__all__ = ["VARIANTS", "convert_tflite", "export_tflite", "compare_outputs", "representative_samples",
           "samples_from_cache", "tflite_filename"]
