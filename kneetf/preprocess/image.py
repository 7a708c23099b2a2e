"""The one check that an array is a 2-D image, shared by the ROI, X-ray and cache code
(numpy only)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kneetf.errors import InputError


def image_2d(image: Any, what: str = "an X-ray", *, min_side: int = 2, path: str | Path | None = None) -> np.ndarray:
    """`image` as an (H, W) array (a trailing channel of 1 dropped), or an InputError naming
    `path` when it is not a 2-D image of real numbers of at least `min_side` x `min_side` pixels."""
    try:
        image = np.asarray(image)
    except ValueError as e:  # a ragged nested list
        raise InputError(path, f"{what} is not an array: {e}") from None
    if image.dtype.kind not in "biuf":
        raise InputError(path, f"{what} must hold real numbers. Received dtype {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 2 or min(image.shape) < min_side:
        raise InputError(path, f"{what} must be a 2-D (H, W) image of at least {min_side}x{min_side} pixels. "
                               f"Received shape {image.shape}")
    return image


__all__ = ["image_2d"]
