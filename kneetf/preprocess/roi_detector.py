"""A small single-object Keras detector of the knee-joint ROI (the paper uses YOLOv2).

The whole X-ray is letterboxed to a square (padded right and bottom with its minimum), then
resized and robustly normalised by `kneetf.preprocess.ops.preprocess_xray` (the one
implementation) to `image_size` x `image_size`. The network regresses the square ROI as
`(centre x, centre y, side)`, each a fraction of the letterboxed side, through a sigmoid.

Its training (augmentation, dataset, `train_detector`) is `kneetf.training.roi`; this module
is what inference and the cache builder need: the model, the box encoding, loading and the
`DetectorRoi` source.

Saved as `.keras` with its custom objects registered (package `kneetf`), loaded with
`keras.saving.load_model(path, safe_mode=True)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from kneetf.config import from_dict, to_dict
from kneetf.errors import ConfigError, InputError
from kneetf.io.atomic import atomic_path
from kneetf.preprocess.image import image_2d
from kneetf.preprocess.ops import preprocess_xray
from kneetf.preprocess.roi import Box, square_box_around


@dataclass(frozen=True)
class RoiDetectorConfig:
    """Architecture of the ROI detector: `len(filters)` stride-2 stages, each two 3x3 convs
    (the second strided) -> BN -> ReLU, then dense layers to (cx, cy, side)."""

    image_size: int = 128
    filters: tuple[int, ...] = (8, 16, 32, 48, 64)
    dense_units: int = 128
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.image_size < 16 or self.image_size % (2 ** len(self.filters)):
            raise ConfigError(f"image_size must be >= 16 and divisible by 2**len(filters) = {2 ** len(self.filters)}. "
                              f"Received: image_size={self.image_size}")
        if not self.filters or min(self.filters) < 1 or self.dense_units < 1:
            raise ConfigError(f"filters and dense_units must be positive. Received: filters={self.filters}, "
                              f"dense_units={self.dense_units}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1). Received: dropout={self.dropout}")


#: For tests: seconds to build and train.
TINY_DETECTOR = RoiDetectorConfig(image_size=32, filters=(4, 8), dense_units=8, dropout=0.0)

#: Detector sizes by name (`kneetf train-roi --arch`).
DETECTOR_ARCHS: dict[str, RoiDetectorConfig] = {"default": RoiDetectorConfig(), "tiny": TINY_DETECTOR}


# === Box encoding ===

def letterbox(image: np.ndarray) -> np.ndarray:
    """Pad an (H, W) image right or bottom with its minimum to a square of side max(H, W).

    Box pixel coordinates are unchanged by it, so a box normalised by the square's side
    maps back by one multiplication.
    """
    image = image_2d(image, "the ROI detector's X-ray")
    h, w = image.shape
    side = max(h, w)
    if h == w:
        return image
    return np.pad(image, ((0, side - h), (0, side - w)), mode="constant", constant_values=image.min())


def encode_box(box: Box, side: float) -> np.ndarray:
    """A box as the detector's target (cx, cy, side) / `side` of the letterboxed image."""
    return np.asarray([box.cx / side, box.cy / side, max(box.width, box.height) / side], np.float32)


def decode_box(target: Sequence[float], side: float) -> Box:
    """The detector's (cx, cy, side) output back to a square box in pixels."""
    cx, cy, s = (float(v) * side for v in target)
    return square_box_around(cx, cy, s)


def detector_input(image: np.ndarray, image_size: int = 128) -> np.ndarray:
    """A whole X-ray as the detector's input (image_size, image_size, 1) float32 in [0, 1]."""
    sq = letterbox(image).astype(np.float32)
    return preprocess_xray(tf.constant(sq[None, :, :, None]), image_size).numpy()[0]


def _square_iou(y_true: Any, y_pred: Any) -> Any:
    """Per-sample IoU of square boxes given as (cx, cy, side)."""
    t0, t1 = y_true[:, :2] - y_true[:, 2:3] / 2, y_true[:, :2] + y_true[:, 2:3] / 2
    p0, p1 = y_pred[:, :2] - y_pred[:, 2:3] / 2, y_pred[:, :2] + y_pred[:, 2:3] / 2
    wh = ops.maximum(ops.minimum(t1, p1) - ops.maximum(t0, p0), 0.0)
    inter = wh[:, 0] * wh[:, 1]
    union = ops.square(y_true[:, 2]) + ops.square(y_pred[:, 2]) - inter
    return inter / ops.maximum(union, 1e-9)


@keras.saving.register_keras_serializable(package="kneetf")
class BoxLoss(keras.losses.Loss):
    """`coord_weight` x mean |error| of (cx, cy, side) + (1 - IoU) of the square boxes.

    The L1 term gives a gradient when the boxes do not overlap; the IoU term weighs errors
    as the evaluation does.
    """

    def __init__(self, coord_weight: float = 5.0, name: str = "box_loss", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.coord_weight = float(coord_weight)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        l1 = ops.mean(ops.abs(y_true - y_pred), axis=-1)
        return self.coord_weight * l1 + (1.0 - _square_iou(y_true, y_pred))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "coord_weight": self.coord_weight}


@keras.saving.register_keras_serializable(package="kneetf")
class BoxIoU(keras.metrics.Mean):
    """Mean IoU of the square boxes (cx, cy, side)."""

    def __init__(self, name: str = "iou", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        return super().update_state(_square_iou(ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")),
                                    sample_weight=sample_weight)


# === Model ===

@keras.saving.register_keras_serializable(package="kneetf")
class RoiDetector(keras.Model):
    """Whole X-ray (batch, S, S, 1) in [0, 1] -> (batch, 3): square ROI (cx, cy, side) as
    fractions of the letterboxed image side.

    Args:
        config: a `RoiDetectorConfig` or its dict.

    Example:
        >>> det = RoiDetector(TINY_DETECTOR)
        >>> det.predict(np.zeros((1, 32, 32, 1), "float32"), verbose=0).shape
        (1, 3)
    """

    def __init__(self, config: RoiDetectorConfig | dict | None = None, **kwargs: Any) -> None:
        cfg = RoiDetectorConfig() if config is None else config
        cfg = from_dict(RoiDetectorConfig, cfg) if isinstance(cfg, dict) else cfg
        # === Functional graph ===
        xray = keras.Input((cfg.image_size, cfg.image_size, 1), name="xray")
        x = xray
        for i, f in enumerate(cfg.filters, 1):
            for j, stride in enumerate((1, 2), 1):
                x = layers.Conv2D(f, 3, strides=stride, padding="same", use_bias=False, name=f"stage{i}_conv{j}")(x)
                x = layers.BatchNormalization(momentum=0.9, name=f"stage{i}_bn{j}")(x)
                x = layers.ReLU(name=f"stage{i}_relu{j}")(x)
        # flatten, not global pooling: the position of the features is the answer
        x = layers.Flatten(name="flatten")(x)
        if cfg.dropout:
            x = layers.Dropout(cfg.dropout, name="dropout")(x)
        x = layers.Dense(cfg.dense_units, activation="relu", name="dense")(x)
        box = layers.Dense(3, activation="sigmoid", dtype="float32", name="box")(x)
        kwargs.setdefault("name", "roi_detector")
        super().__init__(inputs=xray, outputs=box, **kwargs)
        self.detector_config = cfg

    def get_config(self) -> dict[str, Any]:
        return {"config": to_dict(self.detector_config), "name": self.name, "trainable": self.trainable}

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> "RoiDetector":
        return cls(**config)

    def compile_for_training(self, learning_rate: Any = 2e-3) -> None:
        """Adam + `BoxLoss`, reporting `BoxIoU`."""
        self.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=BoxLoss(), metrics=[BoxIoU()])

    def predict_boxes(self, images: Sequence[np.ndarray], batch_size: int = 32) -> list[Box]:
        """Square ROI boxes, in pixels, of whole X-rays (each (H, W), display-ready)."""
        size = self.detector_config.image_size
        sides = [max(np.shape(im)[:2]) for im in images]
        boxes: list[Box] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            x = np.stack([detector_input(im, size) for im in chunk])
            out = self.predict_on_batch(x)
            boxes += [decode_box(t, s) for t, s in zip(np.asarray(out), sides[start:start + len(chunk)])]
        return boxes


def load_detector(path: str | Path) -> RoiDetector:
    """Load a saved detector (`.keras`, safe mode)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "ROI detector file not found")
    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as e:  # keras raises several types for a broken or foreign archive
        raise InputError(path, f"cannot load the ROI detector: {e}") from e
    if not isinstance(model, RoiDetector):
        raise InputError(path, f"not an ROI detector (a {type(model).__name__})")
    return model


def save_detector(model: RoiDetector, path: str | Path) -> Path:
    """Save as `.keras`, atomically."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ConfigError(f"the ROI detector is saved as a .keras file. Received: {path}")
    with atomic_path(path) as tmp:
        model.save(tmp)
    return path


class DetectorRoi:
    """`RoiSource` backed by a trained `RoiDetector` (a model or the path of a `.keras` file).

    Given a path, the model loads on first use and pickles as the path, so the source can be
    sent to worker processes.
    """

    def __init__(self, model: RoiDetector | str | Path) -> None:
        if isinstance(model, (str, Path)):
            self.path: Path | None = Path(model)
            self._model: RoiDetector | None = None
        else:
            self.path, self._model = None, model

    @classmethod
    def load(cls, path: str | Path) -> "DetectorRoi":
        """Load the detector at `path` now (errors surface here, naming the file)."""
        source = cls(path)
        _ = source.model
        return source

    @property
    def model(self) -> RoiDetector:
        if self._model is None:
            self._model = load_detector(self.path)
        return self._model

    def box_for(self, case_id: str, image: np.ndarray) -> Box:
        return self.model.predict_boxes([image])[0]

    def boxes_for(self, images: Sequence[np.ndarray]) -> list[Box]:
        return self.model.predict_boxes(images)

    def __getstate__(self) -> dict[str, Any]:
        if self.path is None:
            raise TypeError("a DetectorRoi built from an in-memory model cannot be pickled; build it from a path")
        return {"path": self.path, "_model": None}

    def __repr__(self) -> str:
        return f"DetectorRoi({self.path or self.model.name})"


__all__ = ["RoiDetectorConfig", "TINY_DETECTOR", "DETECTOR_ARCHS", "RoiDetector", "BoxLoss", "BoxIoU", "DetectorRoi", "letterbox",
           "encode_box", "decode_box", "detector_input", "load_detector", "save_detector"]
