"""Inference as a library: load a model in any format kneetf writes and reconstruct volumes.

- `loading`: `.keras`, run folder, SavedModel, `.tflite` paths; `load_model`; the recorded
  preprocessing config;
- `predictor`: `Predictor` / `load_predictor`, normalised X-rays -> MRI, any format;
- `trust`: the operations a SavedModel or TFLite file may run, checked before it loads;
- `litert`: `TFLiteModel`, the `.tflite` runner;
- `geometry`: the one output geometry (layout, affine, spacing, NIfTI header fields);
- `outputs`: NIfTI / DICOM / PNG writing of reconstructions (`write_volume`, `write_dicom`);
- `outdir`: the output folder's marker of what kneetf wrote;
- `batch`: `predict_files`, what `kneetf predict` runs.

X-ray preparation (ROI, crop, mirroring, normalisation) is `kneetf.preprocess.xray`. None of
these modules imports TensorFlow at import time.
"""
from kneetf.inference.batch import PredictReport, predict_files
from kneetf.inference.litert import TFLiteModel
from kneetf.inference.loading import load_model, read_preprocess_config, resolve_model_path
from kneetf.inference.geometry import GEOMETRY, NOMINAL_SPACING, OutputGeometry
from kneetf.inference.outputs import write_dicom, write_volume
from kneetf.inference.predictor import Predictor, load_predictor

__all__ = ["resolve_model_path", "load_model", "read_preprocess_config", "Predictor", "load_predictor",
           "TFLiteModel", "NOMINAL_SPACING", "GEOMETRY", "OutputGeometry", "write_volume", "write_dicom", "predict_files", "PredictReport"]
