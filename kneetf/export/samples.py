"""Deterministic knee-like test images: the warm-up requests of an export, and the fallback
calibration / check set of the TFLite conversion when no cache is given. Not data."""
from __future__ import annotations

import numpy as np


def structured_samples(count: int, size: int = 128, seed: int = 0) -> np.ndarray:
    """`count` deterministic knee-like test images (count, size, size, 1) float32 in [0, 1]:
    two bright rounded bones separated by a dark joint space, soft tissue, noise.

    Not data: used for warm-up requests and as a fallback calibration/check set when no
    cache is given.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((count, size, size, 1), np.float32)
    for i in range(count):
        gap = 0.5 + rng.uniform(-0.06, 0.06)
        width = rng.uniform(0.25, 0.4)
        cx = 0.5 + rng.uniform(-0.08, 0.08)
        tissue = np.exp(-((xx - cx) / (width * 1.6)) ** 2)
        femur = (np.abs(xx - cx) < width * (1.0 + 0.6 * (gap - yy).clip(0, 1))) & (yy < gap - 0.03)
        tibia = (np.abs(xx - cx) < width * 0.9) & (yy > gap + 0.03)
        image = 0.3 * tissue + 0.6 * (femur | tibia) + 0.05 * rng.standard_normal((size, size))
        image = (image - image.min()) / max(float(np.ptp(image)), 1e-6)
        out[i, ..., 0] = image
    return out


__all__ = ["structured_samples"]
