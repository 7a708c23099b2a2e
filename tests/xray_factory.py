"""A small knee-like X-ray for the prediction tests."""
from __future__ import annotations

import numpy as np

H, W = 150, 170


def knee_xray(seed: int) -> np.ndarray:
    """A (H, W) float32 X-ray: two bright bones around a dark joint line, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype("float32")
    bones = np.where(np.abs(yy - 70 - seed) > 6, 1.0, 0.2) * np.exp(-((xx - 80) / 45.0) ** 2)
    return (1000 + 3000 * bones + 50 * rng.standard_normal((H, W))).astype("float32")
