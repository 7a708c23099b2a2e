"""Export KneeNet for TF Serving (SavedModel) and for on-device use (TFLite).

The names of the serving protocol live here, without TensorFlow, so that the exporter, the
clients and the test server share one definition:

- `serving_default`: input `xray` (batch, H, W, 1) float32, any H and W, already cropped to
  the knee ROI; resize and robust normalisation run inside the graph.
- `serving_uint16`: the same graph for raw uint16 pixels (half the bytes of float32 on the wire).
- `predict_normalized`: input `xray` (batch, 128, 128, 1) float32 already normalised to [0, 1].

Every signature returns `xray_recon` (batch, 128, 128, 1) and `mri` (batch, 128, 128, 20).
"""
from __future__ import annotations

from typing import Any

SIGNATURE_DEFAULT = "serving_default"
SIGNATURE_UINT16 = "serving_uint16"
SIGNATURE_NORMALIZED = "predict_normalized"
#: signature name -> dtype of its `xray` input
SIGNATURE_DTYPES: dict[str, str] = {
    SIGNATURE_DEFAULT: "float32",
    SIGNATURE_UINT16: "uint16",
    SIGNATURE_NORMALIZED: "float32",
}
INPUT_KEY = "xray"
OUTPUT_KEYS: tuple[str, ...] = ("xray_recon", "mri")
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
EXPORT_INFO_FILE = "kneetf_export.json"
TFLITE_DIR = "tflite"
DEFAULT_MODEL_NAME = "kneetf"

_LAZY = {
    "export_savedmodel": "kneetf.export.savedmodel",
    "load_for_export": "kneetf.export.savedmodel",
    "export_tflite": "kneetf.export.tflite",
    "convert_tflite": "kneetf.export.tflite",
    "TFLiteModel": "kneetf.export.tflite",
}

__all__ = ["SIGNATURE_DEFAULT", "SIGNATURE_UINT16", "SIGNATURE_NORMALIZED", "SIGNATURE_DTYPES", "INPUT_KEY",
           "OUTPUT_KEYS", "WARMUP_FILE", "EXPORT_INFO_FILE", "TFLITE_DIR", "DEFAULT_MODEL_NAME", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kneetf.export' has no attribute {name!r}")
