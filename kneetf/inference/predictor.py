"""`Predictor`: normalised X-rays in, MRI volumes out, whatever the model format (`.keras`,
run folder, SavedModel through its `predict_normalized` signature, `.tflite`), with the
preprocessing config the model was trained with."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from kneetf.config import PreprocessConfig
from kneetf.errors import InputError
from kneetf.inference.litert import TFLiteModel
from kneetf.inference.loading import load_model, read_preprocess_config, resolve_model_path
from kneetf.inference.trust import check_savedmodel, check_tflite
from kneetf.protocol import SIGNATURE_NORMALIZED


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


def _savedmodel_predictor(path: Path, prep: PreprocessConfig | None, trust_model: bool = False) -> Predictor:
    import tensorflow as tf

    if not trust_model:
        check_savedmodel(path)
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as e:
        raise InputError(path, f"cannot load the SavedModel: {type(e).__name__}: {e}") from e
    if SIGNATURE_NORMALIZED not in loaded.signatures:
        raise InputError(path, f"SavedModel has no {SIGNATURE_NORMALIZED!r} signature "
                               f"(has: {', '.join(loaded.signatures) or 'none'})")
    sig = loaded.signatures[SIGNATURE_NORMALIZED]
    _, kwargs = sig.structured_input_signature
    if len(kwargs) != 1:
        raise InputError(path, f"{SIGNATURE_NORMALIZED!r} takes {sorted(kwargs)}; expected one X-ray input")
    (name, spec), = kwargs.items()
    size = int(spec.shape[1]) if spec.shape.rank == 4 and spec.shape[1] is not None else None
    slices = sig.structured_outputs["mri"].shape[-1]
    prep = prep or PreprocessConfig(image_size=size or 128, num_slices=int(slices or 20))

    def fn(x: np.ndarray) -> np.ndarray:
        return sig(**{name: tf.constant(x)})["mri"].numpy()

    p = Predictor(fn, "savedmodel", path, prep)
    p._loaded = loaded  # keep the trackable alive
    return p


def _tflite_predictor(path: Path, prep: PreprocessConfig | None, trust_model: bool = False) -> Predictor:
    if not trust_model:
        check_tflite(path)
    model = TFLiteModel(path)
    prep = prep or PreprocessConfig()

    def fn(x: np.ndarray) -> np.ndarray:
        return model.predict(x)["mri"]

    return Predictor(fn, "tflite", path, prep, model)


def load_predictor(model: Any, preprocess: PreprocessConfig | str | Path | None = None, *,
                   trust_model: bool = False) -> Predictor:
    """A `Predictor` for a model path (any format above) or an in-memory keras.Model.

    `preprocess`: a PreprocessConfig, or a JSON/folder to read it from; by default the one
    recorded beside the model (a run's config.json), else the defaults. A model file is
    code: `.keras` files load with `safe_mode=True`; a SavedModel or `.tflite` file that
    would run operations kneetf models never use (file or other I/O, custom ops) is refused
    (`kneetf.inference.trust`) unless `trust_model`.
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
        return _keras_predictor(load_model(file, compile=False), file, prep)
    if kind == "savedmodel":
        return _savedmodel_predictor(file, prep, trust_model)
    return _tflite_predictor(file, prep, trust_model)


__all__ = ["Predictor", "load_predictor"]
