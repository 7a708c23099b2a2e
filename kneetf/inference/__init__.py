"""Inference as a library: load a model in any format kneetf writes and reconstruct volumes.

- `loading`: `.keras`, run folder, SavedModel, `.tflite` paths; `load_model`; the recorded
  preprocessing config;
- `predictor`: `Predictor` / `load_predictor`, normalised X-rays -> MRI, any format;
- `litert`: `TFLiteModel`, the `.tflite` runner;
- `outputs`: NIfTI / DICOM / PNG writing of reconstructions, `NOMINAL_SPACING`;
- `batch`: `predict_files`, what `kneetf predict` runs.

X-ray preparation (ROI, crop, mirroring, normalisation) is `kneetf.preprocess.xray`. None of
these modules imports TensorFlow at import time.
"""
from kneetf.inference.batch import PredictReport, predict_files
from kneetf.inference.litert import TFLiteModel
from kneetf.inference.loading import load_model, read_preprocess_config, resolve_model_path
from kneetf.inference.outputs import NOMINAL_SPACING
from kneetf.inference.predictor import Predictor, load_predictor

__all__ = ["resolve_model_path", "load_model", "read_preprocess_config", "Predictor", "load_predictor",
           "TFLiteModel", "NOMINAL_SPACING", "predict_files", "PredictReport"]
