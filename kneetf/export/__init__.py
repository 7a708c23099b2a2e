"""Export KneeNet for TF Serving (`savedmodel`: a SavedModel with three signatures and
warm-up requests) and for on-device use (`tflite`: fp32, fp16 and int8 variants).

The names of the serving contract (signatures, input and output keys, file names) are
`kneetf.protocol`'s, shared with the clients and with inference; they are re-exported here.
Functions load lazily, so `import kneetf.export` does not import TensorFlow.
"""
from __future__ import annotations

from typing import Any

from kneetf.protocol import (DEFAULT_MODEL_NAME, EXPORT_INFO_FILE, INPUT_KEY, OUTPUT_KEYS, SIGNATURE_DEFAULT,
                             SIGNATURE_DTYPES, SIGNATURE_NORMALIZED, SIGNATURE_UINT16, TFLITE_DIR, WARMUP_FILE)

_LAZY = {
    "export_savedmodel": "kneetf.export.savedmodel",
    "load_for_export": "kneetf.export.savedmodel",
    "export_tflite": "kneetf.export.tflite",
    "convert_tflite": "kneetf.export.tflite",
    "TFLiteModel": "kneetf.inference.litert",
}

__all__ = ["SIGNATURE_DEFAULT", "SIGNATURE_UINT16", "SIGNATURE_NORMALIZED", "SIGNATURE_DTYPES", "INPUT_KEY",
           "OUTPUT_KEYS", "WARMUP_FILE", "EXPORT_INFO_FILE", "TFLITE_DIR", "DEFAULT_MODEL_NAME", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kneetf.export' has no attribute {name!r}")
