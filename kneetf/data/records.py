"""The ONE TFRecord feature schema of the cache: `encode_example` and `parse_example` both
derive from `FEATURES`, so the two can never disagree.

Images are stored as uint16 in the normalised [0, 1] space (value * 65535): exact to 1.5e-5,
half the size of float32. Layouts: xray (H, W, 1), mri (H, W, slices) — slices as channels,
the model's layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

SCALE = 65535.0

#: name -> (kind, dtype); kind "image" = uint16 bytes, "str" = utf-8 bytes, "float"/"int" = lists.
FEATURES: dict[str, tuple[str, Any]] = {
    "id": ("str", tf.string),
    "side": ("str", tf.string),
    "xray": ("image", tf.string),
    "mri": ("image", tf.string),
    "box": ("float", tf.float32),  # x0, y0, x1, y1 in source X-ray pixels; -1s when unknown
    "mirrored": ("int", tf.int64),  # 1 when the pair was mirrored left -> right
}


@dataclass
class PreparedPair:
    """A preprocessed pair, as stored in the cache (arrays float32 in [0, 1])."""

    id: str
    xray: np.ndarray  # (H, W, 1)
    mri: np.ndarray  # (H, W, slices)
    side: str = ""
    box: tuple[float, float, float, float] = (-1.0, -1.0, -1.0, -1.0)
    mirrored: bool = False


def _to_u16(a: np.ndarray) -> bytes:
    return np.round(np.clip(a, 0.0, 1.0) * SCALE).astype("<u2").tobytes()


def encode_example(pair: PreparedPair) -> bytes:
    """Serialise one pair to a tf.train.Example."""
    values = {"id": pair.id, "side": pair.side, "xray": pair.xray, "mri": pair.mri,
              "box": pair.box, "mirrored": int(pair.mirrored)}
    feats = {}
    for name, (kind, _) in FEATURES.items():
        v = values[name]
        if kind == "str":
            feats[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode("utf-8")]))
        elif kind == "image":
            feats[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[_to_u16(v)]))
        elif kind == "float":
            feats[name] = tf.train.Feature(float_list=tf.train.FloatList(value=list(map(float, v))))
        else:
            feats[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))
    # deterministic: the same pair gives the same bytes in every process (a map field is
    # serialised in hash order otherwise), so a rebuilt shard equals the one it replaces
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString(deterministic=True)


def feature_spec() -> dict[str, Any]:
    spec = {}
    for name, (kind, dtype) in FEATURES.items():
        if kind == "float":
            spec[name] = tf.io.FixedLenFeature([4], dtype)
        else:
            spec[name] = tf.io.FixedLenFeature([], dtype)
    return spec


def parse_example(serialized: tf.Tensor, image_size: int, num_slices: int) -> dict[str, tf.Tensor]:
    """Parse one serialised example into float32 images and metadata tensors."""
    ex = tf.io.parse_single_example(serialized, feature_spec())
    shapes = {"xray": (image_size, image_size, 1), "mri": (image_size, image_size, num_slices)}
    for name, (kind, _) in FEATURES.items():
        if kind == "image":
            raw = tf.io.decode_raw(ex[name], tf.uint16, little_endian=True)
            ex[name] = tf.reshape(tf.cast(raw, tf.float32) / SCALE, shapes[name])
    return ex
