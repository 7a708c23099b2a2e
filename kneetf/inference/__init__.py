"""Inference as a library: load a model in any format kneetf writes and reconstruct volumes.

- `loading`: `.keras`, run folder, SavedModel, `.tflite` paths; `load_model`; the recorded
  preprocessing config;
- `predictor`: `Predictor` / `load_predictor`, normalised X-rays -> MRI, any format;
- `litert`: `TFLiteModel`, the `.tflite` runner;
- `outputs`: NIfTI / DICOM / PNG writing of reconstructions, `NOMINAL_SPACING`;
- `batch`: `predict_files`, what `kneetf predict` runs.

X-ray preparation (ROI, crop, mirroring, normalisation) is `kneetf.preprocess.xray`. Names
load lazily, so `import kneetf.inference` does not import TensorFlow.
"""
from __future__ import annotations

from typing import Any

_LAZY = {
    "resolve_model_path": "kneetf.inference.loading",
    "load_model": "kneetf.inference.loading",
    "read_preprocess_config": "kneetf.inference.loading",
    "Predictor": "kneetf.inference.predictor",
    "load_predictor": "kneetf.inference.predictor",
    "TFLiteModel": "kneetf.inference.litert",
    "NOMINAL_SPACING": "kneetf.inference.outputs",
    "predict_files": "kneetf.inference.batch",
    "PredictReport": "kneetf.inference.batch",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kneetf.inference' has no attribute {name!r}")
