"""A small single-object Keras detector of the knee-joint ROI (the paper uses YOLOv2).

The whole X-ray is letterboxed to a square (padded right and bottom with its minimum), shrunk
and robustly normalised by `detector_input` (`kneetf.preprocess.ops.preprocess_xray`, the one
implementation) to `image_size` x `image_size`. Two heads exist:

- `heatmap` (the default): a convolutional backbone with a top-down path to a grid of stride
  `head_stride`. Each cell predicts how likely the joint centre lies in it (a heatmap trained
  with a focal loss, as CenterNet does), the centre's offset inside the cell and the box side
  (log, as a fraction of the input). The box is read at the hottest cell; its heat is the
  detection's confidence. Being convolutional, the answer moves with the knee, wherever it
  is in the image.
- `regression`: the earlier detector, which regresses `(centre x, centre y, side)` from
  flattened features through a sigmoid. Models saved with it keep loading.

`RoiDetector.detect` returns `Detection`s: the box, a confidence in [0, 1] and whether it is
below the model's `min_confidence` (unsure: callers should flag it). By default the image and
its mirror image are both read and their heatmaps averaged (`flip=True`).

Its training (data, augmentation, `train_detector`) is `kneetf.training.roi`; this module is
what inference and the cache builder need: the model, the box encoding and loading (the
`DetectorRoi` source that runs it is `kneetf.preprocess.roi_detector_source`).
`load_detector("builtin")` loads the detector shipped with kneetf
(`BUILTIN_DETECTOR`, see `docs/roi_detector.md`).

Saved as `.keras` with its custom objects registered (package `kneetf`), loaded with
`keras.saving.load_model(path, safe_mode=True)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import cv2
import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from kneetf.config import from_dict, to_dict
from kneetf.errors import ConfigError, InputError
from kneetf.io.atomic import atomic_path
from kneetf.io.keras_file import require_keras_archive
from kneetf.preprocess.image import image_2d
from kneetf.preprocess.ops import traced
from kneetf.preprocess.roi import Box, square_box_around

from kneetf.preprocess.roi_detector_config import (  # noqa: F401  (re-exported)
    BUILTIN_DETECTOR, BUILTIN_NAME, DETECTOR_ARCHS, HEADS, TINY_DETECTOR, RoiDetectorConfig)


@dataclass(frozen=True)
class Detection:
    """One detector answer: the square `box` (pixels of the full X-ray), a `confidence` in
    [0, 1] (heatmap: the heat of the chosen cell; regression: the agreement of the image and
    its mirror image) and `flagged` (confidence below the model's `min_confidence`)."""

    box: Box
    confidence: float
    flagged: bool


# === Input and box encoding ===

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


def shrunk_square(image: np.ndarray, size: int) -> np.ndarray:
    """`letterbox(image)` area-shrunk so that its side is at most `size`, float32: the image is
    shrunk first (its longer side to `size`), then padded, which is the same to a pixel and
    much faster on a large X-ray."""
    image = image_2d(image, "the ROI detector's X-ray")
    h, w = image.shape
    if max(h, w) > size:
        f = size / max(h, w)
        image = cv2.resize(image.astype(np.float32, copy=False), (max(1, round(w * f)), max(1, round(h * f))),
                           interpolation=cv2.INTER_AREA)
    return letterbox(image).astype(np.float32)


def encode_box(box: Box, side: float) -> np.ndarray:
    """A box as the detector's target (cx, cy, side) / `side` of the letterboxed image."""
    return np.asarray([box.cx / side, box.cy / side, max(box.width, box.height) / side], np.float32)


def decode_box(target: Sequence[float], side: float) -> Box:
    """The detector's (cx, cy, side) output back to a square box in pixels."""
    cx, cy, s = (float(v) * side for v in target)
    return square_box_around(cx, cy, s)


def detector_input(image: np.ndarray, image_size: int = 128) -> np.ndarray:
    """A whole X-ray as the detector's input (image_size, image_size, 1) float32 in [0, 1]:
    letterboxed and area-shrunk (a large image first to 2 x `image_size` with OpenCV,
    `shrunk_square`, which changes nothing visible at the detector's size and saves most of
    the time), resized and normalised by `preprocess_xray`."""
    sq = shrunk_square(image, 2 * image_size)
    return traced("xray", image_size)(sq[None, :, :, None]).numpy()[0]


def equalized(image: np.ndarray) -> np.ndarray:
    """The X-ray's 0.5th-99.5th percentile window, histogram-equalised (8 bits, float32): the
    detector's second look at an image it was unsure of. It undoes much of what strong
    dynamic-range compression and edge enhancement do to the contrast of bone."""
    a = image_2d(image, "the ROI detector's X-ray").astype(np.float64)
    lo, hi = np.percentile(a, [0.5, 99.5])
    u = np.clip((a - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    return cv2.equalizeHist(np.round(u * 255).astype(np.uint8)).astype(np.float32)


def heatmap_targets(targets: Any, grid: int) -> Any:
    """(batch, 3) boxes (cx, cy, side as fractions of the input) -> (batch, grid, grid, 4)
    training targets of the heatmap head: a Gaussian of the centre (sd 5 % of the side, at
    least 0.7 cell; exactly 1 in the centre's cell), log(side), and the centre's offset from
    its cell's middle (x, y, in cells). TF ops (used inside tf.data)."""
    targets = tf.convert_to_tensor(targets, tf.float32)
    c = targets[:, :2] * grid                                           # centre in cells
    peak = tf.clip_by_value(tf.floor(c), 0.0, grid - 1.0)
    sigma = tf.maximum(0.05 * targets[:, 2] * grid, 0.7)[:, None, None]
    g = tf.range(grid, dtype=tf.float32) + 0.5
    dx = g[None, None, :] - c[:, 0, None, None]
    dy = g[None, :, None] - c[:, 1, None, None]
    heat = tf.exp(-(dx * dx + dy * dy) / (2.0 * sigma * sigma))
    is_peak = tf.logical_and(tf.equal(g[None, None, :] - 0.5, peak[:, 0, None, None]),
                             tf.equal(g[None, :, None] - 0.5, peak[:, 1, None, None]))
    heat = tf.where(is_peak, tf.ones_like(heat), heat * 0.999)
    ones = tf.ones_like(heat)
    size = tf.math.log(tf.maximum(targets[:, 2], 1e-3))[:, None, None] * ones
    off = c - peak - 0.5
    return tf.stack([heat, size, off[:, 0, None, None] * ones, off[:, 1, None, None] * ones], axis=-1)


def _square_iou(y_true: Any, y_pred: Any) -> Any:
    """Per-sample IoU of square boxes given as (cx, cy, side)."""
    t0, t1 = y_true[:, :2] - y_true[:, 2:3] / 2, y_true[:, :2] + y_true[:, 2:3] / 2
    p0, p1 = y_pred[:, :2] - y_pred[:, 2:3] / 2, y_pred[:, :2] + y_pred[:, 2:3] / 2
    wh = ops.maximum(ops.minimum(t1, p1) - ops.maximum(t0, p0), 0.0)
    inter = wh[:, 0] * wh[:, 1]
    union = ops.square(y_true[:, 2]) + ops.square(y_pred[:, 2]) - inter
    return inter / ops.maximum(union, 1e-9)


# === Losses ===

@keras.saving.register_keras_serializable(package="kneetf")
class BoxLoss(keras.losses.Loss):
    """Regression head: `coord_weight` x mean |error| of (cx, cy, side) + (1 - IoU) of the
    square boxes. The L1 term gives a gradient when the boxes do not overlap; the IoU term
    weighs errors as the evaluation does.
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
    """Regression head: mean IoU of the square boxes (cx, cy, side)."""

    def __init__(self, name: str = "iou", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        return super().update_state(_square_iou(ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")),
                                    sample_weight=sample_weight)


@keras.saving.register_keras_serializable(package="kneetf")
class HeatmapLoss(keras.losses.Loss):
    """Heatmap head (targets from `heatmap_targets`): CenterNet's penalty-reduced focal loss
    on the heat (normalised by the number of centres), plus `size_weight` x L1 of log(side)
    and `offset_weight` x L1 of the centre offset, both where the target heat is above 0.5.
    """

    def __init__(self, size_weight: float = 1.0, offset_weight: float = 1.0, name: str = "heatmap_loss",
                 **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.size_weight = float(size_weight)
        self.offset_weight = float(offset_weight)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        heat, logit = y_true[..., 0], y_pred[..., 0]
        p = ops.sigmoid(logit)
        pos = ops.cast(heat >= 1.0, "float32")
        log_p, log_q = -ops.softplus(-logit), -ops.softplus(logit)
        focal = pos * ops.square(1.0 - p) * log_p + (1.0 - pos) * ops.power(1.0 - heat, 4.0) * ops.square(p) * log_q
        n_pos = ops.maximum(ops.sum(pos, axis=(1, 2)), 1.0)
        loss = -ops.sum(focal, axis=(1, 2)) / n_pos
        near = ops.cast(heat > 0.5, "float32")
        n_near = ops.maximum(ops.sum(near, axis=(1, 2)), 1.0)
        size = ops.sum(near * ops.abs(y_true[..., 1] - y_pred[..., 1]), axis=(1, 2)) / n_near
        offset = ops.sum(near[..., None] * ops.abs(y_true[..., 2:] - y_pred[..., 2:]), axis=(1, 2, 3)) / n_near
        return loss + self.size_weight * size + self.offset_weight * offset

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "size_weight": self.size_weight, "offset_weight": self.offset_weight}


# === Model ===

def _conv_bn_relu(x: Any, filters: int, stride: int, name: str) -> Any:
    x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


@keras.saving.register_keras_serializable(package="kneetf")
class RoiDetector(keras.Model):
    """Whole X-ray (batch, S, S, 1) in [0, 1] -> the joint's box.

    Heatmap head: (batch, S / head_stride, S / head_stride, 4) = heat logit, log(side as a
    fraction of S), centre offset in cells (x, y). Regression head: (batch, 3) = (cx, cy,
    side) as fractions of S. `detect` and `predict_boxes` turn either into boxes in pixels.

    Args:
        config: a `RoiDetectorConfig` or its dict.

    Example:
        >>> det = RoiDetector(TINY_DETECTOR)
        >>> det.predict(np.zeros((1, 32, 32, 1), "float32"), verbose=0).shape
        (1, 8, 8, 4)
    """

    def __init__(self, config: RoiDetectorConfig | dict | None = None, **kwargs: Any) -> None:
        cfg = RoiDetectorConfig() if config is None else config
        cfg = from_dict(RoiDetectorConfig, cfg) if isinstance(cfg, dict) else cfg
        # === Functional graph ===
        xray = keras.Input((cfg.image_size, cfg.image_size, 1), name="xray")
        x = xray
        stages = []
        for i, f in enumerate(cfg.filters, 1):
            # layer names as in the first (regression-only) detector, so its saved weights load
            x = layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"stage{i}_conv1")(x)
            x = layers.BatchNormalization(momentum=0.9, name=f"stage{i}_bn1")(x)
            x = layers.ReLU(name=f"stage{i}_relu1")(x)
            x = layers.Conv2D(f, 3, strides=2, padding="same", use_bias=False, name=f"stage{i}_conv2")(x)
            x = layers.BatchNormalization(momentum=0.9, name=f"stage{i}_bn2")(x)
            x = layers.ReLU(name=f"stage{i}_relu2")(x)
            stages.append(x)
        if cfg.head == "heatmap":
            out = self._heatmap_head(stages, cfg)
        else:
            # flatten, not global pooling: the position of the features is the answer
            x = layers.Flatten(name="flatten")(x)
            if cfg.dropout:
                x = layers.Dropout(cfg.dropout, name="dropout")(x)
            x = layers.Dense(cfg.dense_units, activation="relu", name="dense")(x)
            out = layers.Dense(3, activation="sigmoid", dtype="float32", name="box")(x)
        kwargs.setdefault("name", "roi_detector")
        super().__init__(inputs=xray, outputs=out, **kwargs)
        self.detector_config = cfg

    @staticmethod
    def _heatmap_head(stages: list[Any], cfg: RoiDetectorConfig) -> Any:
        hf = cfg.head_filters
        deepest = stages[-1]
        # global context (what kind of image this is) added to every cell of the deepest stage
        cells = cfg.image_size // 2 ** len(cfg.filters)
        g = layers.GlobalAveragePooling2D(keepdims=True, name="context_pool")(deepest)
        g = layers.Conv2D(hf, 1, activation="relu", name="context_conv")(g)
        g = layers.UpSampling2D(cells, name="context_up")(g)
        y = layers.Conv2D(hf, 1, name="top_lateral")(deepest)
        y = layers.Add(name="top_context")([y, g])
        level = len(cfg.filters)
        while 2 ** level > cfg.head_stride:
            level -= 1
            y = layers.UpSampling2D(2, interpolation="bilinear", name=f"up{level}")(y)
            lateral = layers.Conv2D(hf, 1, name=f"lateral{level}")(stages[level - 1])
            y = layers.Add(name=f"merge{level}")([y, lateral])
            y = _conv_bn_relu(y, hf, 1, f"smooth{level}")
        heat = layers.Conv2D(1, 1, bias_initializer=keras.initializers.Constant(-4.0), dtype="float32",
                             name="heat")(y)
        size = layers.Conv2D(1, 1, bias_initializer=keras.initializers.Constant(math.log(0.4)), dtype="float32",
                             name="size")(y)
        offset = layers.Conv2D(2, 1, dtype="float32", name="offset")(y)
        return layers.Concatenate(dtype="float32", name="heads")([heat, size, offset])

    def get_config(self) -> dict[str, Any]:
        return {"config": to_dict(self.detector_config), "name": self.name, "trainable": self.trainable}

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> "RoiDetector":
        config = dict(config)
        inner = dict(config.get("config") or {})
        inner.setdefault("head", "regression")  # saved before the heatmap head existed
        config["config"] = inner
        return cls(**config)

    def compile_for_training(self, learning_rate: Any = 2e-3) -> None:
        """Adam + the head's loss (`HeatmapLoss`, or `BoxLoss` reporting `BoxIoU`)."""
        if self.detector_config.head == "heatmap":
            self.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=HeatmapLoss())
        else:
            self.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=BoxLoss(), metrics=[BoxIoU()])

    # --- inference ---
    def _forward(self, x: np.ndarray) -> np.ndarray:
        """Inference on a batch, through one traced graph (Keras' eager call costs more than
        this small network's arithmetic)."""
        fn = self.__dict__.get("_infer_fn")
        if fn is None:
            size = self.detector_config.image_size
            fn = tf.function(lambda t: self(t, training=False), reduce_retracing=True,
                             input_signature=[tf.TensorSpec((None, size, size, 1), tf.float32)])
            self.__dict__["_infer_fn"] = fn
        return np.asarray(fn(tf.constant(x, tf.float32)))

    def decode(self, output: np.ndarray) -> tuple[np.ndarray, float]:
        """One model output -> ((cx, cy, side) as fractions of the input, confidence). A
        heatmap output is read with its heat as probabilities (see `detect`)."""
        cfg = self.detector_config
        if cfg.head == "regression":
            return np.asarray(output, np.float64), float("nan")
        grid = cfg.grid
        k = int(np.argmax(output[..., 0]))
        gy, gx = divmod(k, grid)
        cx = (gx + 0.5 + float(output[gy, gx, 2])) / grid
        cy = (gy + 0.5 + float(output[gy, gx, 3])) / grid
        return np.asarray([cx, cy, math.exp(float(output[gy, gx, 1]))]), float(output[gy, gx, 0])

    def _read(self, out: np.ndarray, mirrored: np.ndarray | None) -> tuple[np.ndarray, float]:
        """Decode one output, averaged with the output of the mirror image when given."""
        cfg = self.detector_config
        if cfg.head == "regression":
            target, _ = self.decode(out)
            if mirrored is None:
                return target, float("nan")
            m = np.asarray(mirrored, np.float64).copy()
            m[0] = 1.0 - m[0]
            # agreement of the two readings: 1 when equal, 0 when the centres are 30 % of the side apart
            spread = math.hypot(*(target[:2] - m[:2])) / max(0.5 * (target[2] + m[2]), 1e-6)
            return 0.5 * (target + m), float(max(0.0, 1.0 - spread / 0.3))
        maps = np.array(out, np.float64)
        maps[..., 0] = _sigmoid(maps[..., 0])
        if mirrored is not None:
            # the mirror image's cell g is this image's cell grid - 1 - g; x offsets change sign
            m = np.array(mirrored[:, ::-1], np.float64)
            m[..., 0] = _sigmoid(m[..., 0])
            m[..., 2] = -m[..., 2]
            maps = 0.5 * (maps + m)
        return self.decode(maps)

    def detect(self, images: Sequence[np.ndarray], *, pixel_spacings: Sequence[Any] | None = None,
               flip: bool = True, batch_size: int = 32, second_look: bool = True) -> list[Detection]:
        """`Detection`s of whole X-rays (each (H, W), display-ready).

        With `flip`, the mirror image is read too and the two readings are averaged (heatmap:
        the maps, before the hottest cell is chosen; regression: the boxes, and their
        agreement is the confidence). Without `flip` a regression detection has no confidence
        (NaN) and is never flagged. `pixel_spacings` (mm per pixel, a number or (row, col) per
        image, None where unknown): the box side becomes the config's `box_mm` when it is set.
        With `second_look`, an image whose detection is flagged unsure is read again
        histogram-equalised (`equalized`), and that detection is kept when it is more confident.
        """
        found = self._detect(images, pixel_spacings, flip, batch_size)
        unsure = [i for i, d in enumerate(found) if d.flagged] if second_look else []
        if unsure:
            spacings = list(pixel_spacings) if pixel_spacings is not None else [None] * len(images)
            again = self._detect([equalized(images[i]) for i in unsure], [spacings[i] for i in unsure], flip,
                                 batch_size)
            for i, d in zip(unsure, again):
                if d.confidence > found[i].confidence:
                    found[i] = d
        return found

    def _detect(self, images: Sequence[np.ndarray], pixel_spacings: Sequence[Any] | None, flip: bool,
                batch_size: int) -> list[Detection]:
        cfg = self.detector_config
        spacings = list(pixel_spacings) if pixel_spacings is not None else [None] * len(images)
        if len(spacings) != len(images):
            raise ConfigError(f"need one pixel spacing per image. Received {len(spacings)} for {len(images)} images")
        out: list[Detection] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            x = np.stack([detector_input(im, cfg.image_size) for im in chunk])
            y = self._forward(np.concatenate([x, x[:, :, ::-1]]) if flip else x)
            for j, image in enumerate(chunk):
                target, confidence = self._read(y[j], y[len(chunk) + j] if flip else None)
                box = decode_box(target, max(np.shape(image)[:2]))
                mm = _spacing_mm(spacings[start + j])
                if cfg.box_mm and mm:
                    box = square_box_around(box.cx, box.cy, cfg.box_mm / mm)
                out.append(Detection(box=box, confidence=confidence, flagged=bool(confidence < cfg.min_confidence)))
        return out

    def predict_boxes(self, images: Sequence[np.ndarray], batch_size: int = 32, *, flip: bool = True,
                      pixel_spacings: Sequence[Any] | None = None) -> list[Box]:
        """Square ROI boxes, in pixels, of whole X-rays (each (H, W), display-ready); see `detect`."""
        return [d.box for d in self.detect(images, flip=flip, batch_size=batch_size, pixel_spacings=pixel_spacings)]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _spacing_mm(spacing: Any) -> float | None:
    """One pixel size (mm) from a number or (row, col) spacing; None when unknown or invalid."""
    if spacing is None:
        return None
    values = np.atleast_1d(np.asarray(spacing, np.float64))
    if values.size not in (1, 2) or not np.all(np.isfinite(values)) or not np.all(values > 0):
        return None
    return float(np.sqrt(np.prod(values))) if values.size == 2 else float(values[0])


def with_settings(model: RoiDetector, **changes: Any) -> RoiDetector:
    """A copy of `model` with inference settings of its config changed (`min_confidence`,
    `box_mm`); the weights are shared values, the architecture must not change."""
    allowed = {"min_confidence", "box_mm"}
    if set(changes) - allowed:
        raise ConfigError(f"only {sorted(allowed)} can change on a trained detector. Received: {sorted(changes)}")
    copy = RoiDetector(replace(model.detector_config, **changes), name=model.name)
    copy.set_weights(model.get_weights())
    return copy


def load_detector(path: str | Path) -> RoiDetector:
    """Load a saved detector (`.keras`, safe mode); "builtin" is the detector shipped with kneetf."""
    path = BUILTIN_DETECTOR if str(path) == BUILTIN_NAME else Path(path)
    if not path.is_file():
        raise InputError(path, "ROI detector file not found")
    require_keras_archive(path)
    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as e:  # keras raises several types for a broken or foreign archive
        text = str(e).split(" Full object config")[0].splitlines()[0][:300] if str(e) else type(e).__name__
        if "Could not locate class" in text:  # a model of another kind, e.g. a KneeNet reconstruction model
            text += " It is not an ROI detector: train one with `kneetf train-roi`, or give `builtin`."
        raise InputError(path, f"cannot load the ROI detector: {text}") from e
    if not isinstance(model, RoiDetector):
        raise InputError(path, f"not an ROI detector (a {type(model).__name__})")
    return model


def save_detector(model: RoiDetector, path: str | Path) -> Path:
    """Save as `.keras`, atomically: the architecture and weights, without the optimizer's
    state (a third of the size; fine-tuning starts a new optimizer anyway)."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ConfigError(f"the ROI detector is saved as a .keras file. Received: {path}")
    bare = RoiDetector(model.detector_config, name=model.name)
    bare.set_weights(model.get_weights())
    with atomic_path(path) as tmp:
        bare.save(tmp)
    return path


__all__ = ["equalized", "RoiDetectorConfig", "TINY_DETECTOR", "DETECTOR_ARCHS", "HEADS", "Detection", "RoiDetector", "BoxLoss",
           "BoxIoU", "HeatmapLoss", "letterbox", "shrunk_square", "encode_box", "decode_box",
           "detector_input", "heatmap_targets", "load_detector", "save_detector", "with_settings", "BUILTIN_DETECTOR", "BUILTIN_NAME"]
