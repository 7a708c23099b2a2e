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


def laden_knee(seed: int = 0, *, monochrome1: bool = False) -> tuple[np.ndarray, Box, float]:
    """A built-in synthetic knee as a hospital stores it: 600 x 500 px at 0.3 mm, the knee off
    centre, collimated (the outside left bright, as unexposed film is), an unexposed black band
    along one border, a lead 'R' in a corner, a burned-in text line. Returns the display-ready
    image (MONOCHROME2 polarity, as the readers give it; `monochrome1` stores it inverted, as
    such a file holds it), the true 96 mm joint box and the pixel spacing."""
    from kneetf.data.synthetic import SynthConfig, render_xray, sample_params

    rng = np.random.default_rng(seed)
    px = 0.3
    cfg = SynthConfig(xray_size=700, xray_pixel_mm=px, roi_mm=96.0, detector_shift_mm=0.0, placement_mm=(0.0, 0.0))
    raw, box = render_xray(sample_params(np.random.default_rng([seed, 7]), cfg), cfg, np.random.default_rng(seed))
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    x0 = int(np.clip(cx - rng.uniform(240, 330), 0, 100))  # the joint off centre
    y0 = int(np.clip(cy - rng.uniform(170, 300), 0, 200))
    image = raw[y0:y0 + 500, x0:x0 + 600].astype(np.float32)
    cx, cy = cx - x0, cy - y0
    top = float(np.percentile(image, 99.9))
    # collimation: beyond a tilted left edge and a bottom edge the film is unexposed (brightest)
    yy, xx = np.mgrid[0:500, 0:600].astype(np.float32)
    outside = (xx < 60 + 0.05 * yy) | (yy > cy + 150)
    image[outside] = 1.15 * top + rng.normal(0, 0.01 * top, int(outside.sum()))
    image[:, 585:] = 0.0  # an unexposed band blanked black
    lead = np.zeros_like(image, np.uint8)
    cv2.putText(lead, "R", (500, 70), cv2.FONT_HERSHEY_DUPLEX, 2.0, 1, 6, cv2.LINE_AA)  # a lead letter
    cv2.putText(lead, "ST MARY 2019-03-02 PA", (120, 30), cv2.FONT_HERSHEY_PLAIN, 1.3, 1, 1)  # burned-in text
    image[lead > 0] = 1.25 * top
    image = np.clip(image, 0, None)
    if monochrome1:
        image = image.max() - image
    return image.astype(np.float32), square_box_around(cx, cy, 96.0 / px), px
