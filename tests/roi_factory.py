"""A stand-in knee X-ray with a known joint box, for the ROI tests."""
from __future__ import annotations

import cv2
import numpy as np

from kneetf.preprocess.roi import Box, square_box_around


def standin_knee(rng: np.random.Generator, shape: tuple[int, int] | None = None) -> tuple[np.ndarray, Box]:
    """A (H, W) uint16 knee-like image and its true box: a soft-tissue band, a femur that
    widens into condyles, a dark joint gap, a tibia narrowing downwards. The box is the
    square of side 1.45 x condyle width centred on the gap (the fallback's default ratio)."""
    h, w = shape if shape else (int(rng.integers(180, 300)), int(rng.integers(180, 300)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, jy = rng.uniform(0.35, 0.65) * w, rng.uniform(0.4, 0.6) * h
    cw = rng.uniform(0.3, 0.45) * min(h, w)
    gap = rng.uniform(0.015, 0.03) * h
    img = np.full((h, w), 300.0, np.float32)
    img[np.abs(xx - cx) < cw * rng.uniform(0.65, 0.8)] = 900.0
    femur_w = cw * (1.0 - 0.55 * np.clip((jy - gap / 2 - yy) / (0.25 * h), 0, 1))
    tibia_w = 0.95 * cw * (1.0 - 0.5 * np.clip((yy - jy - gap / 2) / (0.25 * h), 0, 1))
    img[(yy < jy - gap / 2) & (np.abs(xx - cx) < femur_w / 2)] = 2200.0
    img[(yy > jy + gap / 2) & (np.abs(xx - cx) < tibia_w / 2)] = 2200.0
    img = cv2.GaussianBlur(img, (0, 0), 1.5) + rng.normal(0, 40, (h, w))
    return np.clip(img, 0, 65535).astype(np.uint16), square_box_around(cx, jy, 1.45 * cw)


def standin_set(n: int, seed: int) -> tuple[list[np.ndarray], list[Box]]:
    rng = np.random.default_rng(seed)
    pairs = [standin_knee(rng) for _ in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]
