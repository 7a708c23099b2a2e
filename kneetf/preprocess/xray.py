"""An X-ray prepared for the model exactly as the cache prepares training X-rays, and the
model's output turned back into a volume.

`prepare_xray`: `crop_xray` (the 2-D check, the knee ROI box from an `RoiSource` (`roi_source`
chooses it: the built-in detector by default, a boxes CSV, a trained detector, a fixed box or
the classical fallback), `crop_box`, mirroring of left knees when the preprocessing config
says `mirror_left`), then
`kneetf.preprocess.ops.preprocess_xray` (resize + robust normalisation). The TF Serving
client sends `crop_xray`'s crop to the export, whose graph runs the same resize and
normalisation.

`to_output_volume`: the model's output (H, W, slices) as a slices-first volume (slices, H, W),
float32 in the normalised [0, 1] space, in the slice order and in-plane orientation of the
preprocessed MRI: a mirrored left knee gets its slice order reversed back.

TensorFlow loads inside `prepare_xray` (the resize) and with an ROI detector (the default
ROI source); `crop_xray` with boxes or the classical fallback runs without it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from kneetf.config import PreprocessConfig
from kneetf.errors import ConfigError, InputError, RoiNotFoundError
from kneetf.preprocess.image import image_2d
from kneetf.preprocess.roi import Box, ClassicalRoi, CsvRoi, FixedRoi, RoiFinding, RoiSource, crop_box, find_roi

ROI_HELP = ("None (the built-in detector), 'classical', a boxes .csv, a detector .keras or 'builtin', a Box "
            "or an object with box_for(id, image)")


# === ROI source ===

def roi_source(roi: Any = None, *, boxes: str | Path | None = None, detector: str | Path | None = None
               ) -> RoiSource:
    """The ROI source, chosen in one place for the cache, `kneetf predict` and the Python API.

    `boxes` (a boxes CSV, `CsvRoi`) and `detector` (a trained detector `.keras`, "builtin"
    or "classical") are the `--rois` / `--roi-detector` options. `roi` is what the Python API
    takes: None (the default: the detector shipped with kneetf, `DetectorRoi("builtin")`),
    "classical" (the classical image-analysis fallback, `ClassicalRoi`), a path ending in
    .csv or .keras (as above), "builtin", a `Box` (the same box for every X-ray) or any
    object with `box_for(id, image)` (used as it is). At most one of the three is given. A
    detector file loads now, so that errors name it; the built-in one on first use.
    """
    from kneetf.preprocess.roi_detector_config import BUILTIN_NAME, CLASSICAL_NAME, resolved_detector

    if sum(x is not None and x != "" for x in (roi, boxes, detector)) > 1:
        raise ConfigError("give ROI boxes or an ROI detector, not both")
    if isinstance(roi, (str, Path)):
        suffix = Path(roi).suffix.lower()
        if str(roi) in (BUILTIN_NAME, CLASSICAL_NAME) or suffix == ".keras":
            detector = roi
        elif suffix == ".csv":
            boxes = roi
        else:
            raise ConfigError(f"roi must be {ROI_HELP}. Received: roi={roi!r}")
    elif isinstance(roi, Box):
        return FixedRoi(roi)
    elif roi is not None:
        if not hasattr(roi, "box_for"):
            raise ConfigError(f"roi must be {ROI_HELP}. Received: roi={roi!r}")
        return roi
    if boxes:
        return CsvRoi(boxes)
    chosen = resolved_detector(boxes, detector)
    if chosen is None:
        return ClassicalRoi()
    from kneetf.preprocess.roi_detector_source import DetectorRoi

    if chosen == BUILTIN_NAME:  # shipped, so it loads (with TensorFlow) when the first X-ray needs it
        return _builtin_source()
    return DetectorRoi.load(chosen)


@functools.lru_cache(maxsize=1)
def _builtin_source() -> RoiSource:
    """The built-in detector's source, one per process: its model loads once."""
    from kneetf.preprocess.roi_detector_config import BUILTIN_NAME
    from kneetf.preprocess.roi_detector_source import DetectorRoi

    return DetectorRoi(BUILTIN_NAME)


# === Sides and mirroring ===

def normalize_side(side: Any) -> str:
    """"left"/"right"/"" from manifest sides or DICOM laterality ("L", "R")."""
    s = str(side or "").strip().lower()
    if s in ("l", "left"):
        return "left"
    if s in ("r", "right"):
        return "right"
    return ""


def mirrors(config: PreprocessConfig, side: str) -> bool:
    """Whether a knee of `side` ("left"/"right"/"") is mirrored to look like a right one."""
    return bool(config.mirror_left and side == "left")


def mirror_xray(image: np.ndarray) -> np.ndarray:
    """An (H, W[, C]) X-ray flipped left-right: a left knee as a right one, and back."""
    return image[:, ::-1]


def mirror_volume(volume: np.ndarray) -> np.ndarray:
    """A slices-first (slices, H, W) sagittal volume with its slice order reversed: the MRI of
    a left knee as a right one's (the X-ray is flipped), and back."""
    return volume[::-1]


# === X-rays ===

@dataclass
class PreparedXray:
    """A model-ready X-ray: `xray` (H, W, 1) in [0, 1] (`prepare_xray`; the ROI crop in the
    image's own values for `crop_xray`) and how it was made."""

    id: str
    xray: np.ndarray
    box: Box
    side: str = ""
    mirrored: bool = False
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    #: where the box came from and how sure its source was (None: a box given by the caller)
    roi: RoiFinding | None = None

    def as_seen(self) -> np.ndarray:
        """The model input as the knee looks (mirroring undone), like the output volume."""
        return mirror_xray(self.xray) if self.mirrored else self.xray


def _at(error: InputError, path: str | Path | None) -> InputError:
    """`error` re-addressed to `path` (the input being prepared), keeping the file it named
    (a boxes CSV, a detector) in the reason, and its class when it is a `RoiNotFoundError`."""
    reason = error.reason
    if error.path and path is not None and str(error.path) != str(path):
        reason = f"{reason} ({error.path})"
    return (RoiNotFoundError if isinstance(error, RoiNotFoundError) else InputError)(path, reason)


def crop_xray(image: np.ndarray, config: PreprocessConfig, roi: Any = None, *, case_id: str = "",
              side: str = "", box: Box | None = None, source: str = "", meta: dict[str, Any] | None = None
              ) -> PreparedXray:
    """Full X-ray (2-D, display polarity) -> ROI crop (`box`, else the box of `roi`, chosen by
    `roi_source`: the built-in detector by default) -> mirror (left knees, when the config
    mirrors): the first half of `prepare_xray`, without TensorFlow unless a detector runs. `xray` is the (h, w, 1) float32 crop in the image's
    own values: what the export's `serving_default` signature takes. Errors name `source`
    (or the id)."""
    where = source or case_id or None
    image = image_2d(image, "an X-ray", path=where)
    if not np.all(np.isfinite(image)):
        raise InputError(where, "X-ray holds NaN or infinite values")
    found = None
    try:
        if box is None:
            found = find_roi(roi_source(roi), case_id, image, (meta or {}).get("pixel_spacing"), where=where)
            box = found.box
        crop = crop_box(image, box)
    except InputError as e:
        raise _at(e, where) from None
    side = normalize_side(side)
    mirrored = mirrors(config, side)
    if mirrored:
        crop = mirror_xray(crop)
    crop = np.ascontiguousarray(crop, dtype=np.float32)[:, :, None]
    return PreparedXray(id=case_id, xray=crop, box=box, side=side, mirrored=mirrored, source=source,
                        meta=dict(meta or {}), roi=found)


def prepare_xray(image: np.ndarray, config: PreprocessConfig, roi: Any = None, *, case_id: str = "",
                 side: str = "", box: Box | None = None, source: str = "", meta: dict[str, Any] | None = None
                 ) -> PreparedXray:
    """Full X-ray (2-D, display polarity) -> `crop_xray` (ROI crop, mirroring) -> resize +
    robust normalisation: as the cache prepares training X-rays. Errors name `source` (or
    the id)."""
    prep = crop_xray(image, config, roi, case_id=case_id, side=side, box=box, source=source, meta=meta)
    from kneetf.preprocess import ops  # TensorFlow: only once the X-ray is cropped

    x = ops.traced("xray", config.image_size, config.low_percentile, config.high_percentile)(
        np.asarray(prep.xray[None], np.float32))
    return replace(prep, xray=x.numpy()[0])


def to_output_volume(mri: np.ndarray, mirrored: bool) -> np.ndarray:
    """Model output (H, W, slices) -> (slices, H, W) float32 in [0, 1] (a linear head, as the
    paper preset's, or a server's answer can leave it), with a mirrored knee's slice order
    restored."""
    v = np.clip(np.transpose(np.asarray(mri, dtype=np.float32), (2, 0, 1)), 0.0, 1.0)
    if mirrored:
        v = mirror_volume(v)
    return np.ascontiguousarray(v)


__all__ = ["roi_source", "normalize_side", "mirrors", "mirror_xray", "mirror_volume", "PreparedXray",
           "crop_xray", "prepare_xray", "to_output_volume"]
