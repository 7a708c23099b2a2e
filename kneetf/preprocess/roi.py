"""The knee-joint ROI: a square box centred on the joint space, from a CSV, a detector or a
classical fallback.

The paper crops the joint with YOLOv2. Here a box comes from one of these `RoiSource`s:

- `CsvRoi`: user boxes, a CSV `id,x0,y0,x1,y1` (`read_boxes`);
- `DetectorRoi` (in `kneetf.preprocess.roi_detector_source`): the small Keras detector
  `kneetf train-roi` trains;
- `ClassicalRoi`: no learning, numpy/OpenCV only (`find_joint`): inside the exposed field,
  with lead markers, text and collimation masked, the joint space is a thin dark band
  between the femoral condyles and the tibial plateau across both compartments, with bone
  brighter than the soft tissue beside them; a knee small in the image is looked at again,
  finer, around the first box. The box side is `CLASSICAL_BOX_MM` when the pixel spacing is
  known, else proportional to the joint's width. Where it is unsure it raises
  `RoiNotFoundError` instead of guessing;
- `FixedRoi`: one box for every X-ray.

`find_roi` asks any of them for an `RoiFinding`: the box, its source and, where the source
has them, a confidence and a review flag (the cache records them with every pair).

`kneetf.preprocess.xray.roi_source` chooses among them, for the cache, `kneetf predict` and
the Python API alike.

Boxes are in pixel coordinates of the full X-ray, `x` = column, `y` = row, the box covers
`[x0, x1) x [y0, y1)` (continuous coordinates: pixel `i` spans `[i, i + 1)`). Images are
display-ready (MONOCHROME2: bone bright); invert MONOCHROME1 first.

This module must not import TensorFlow: the cache builder calls it in spawned worker
processes.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Protocol, Sequence, runtime_checkable

import cv2
import numpy as np

from kneetf.errors import InputError, ManifestError, RoiNotFoundError
from kneetf.io.atomic import atomic_path
from kneetf.io.limits import resolve_max_pixels
from kneetf.preprocess.image import image_2d

log = logging.getLogger(__name__)

BOX_COLUMNS = ("id", "x0", "y0", "x1", "y1")
PAD_MODES = ("constant", "edge")
#: `crop_box` refuses a box whose square crop is more than this many times the image part it holds
MAX_CROP_PADDING = 16

#: Box side / knee width (bone extent next to the joint space) of the classical fallback:
#: 1.44 +- 0.10 measured on 100 built-in synthetic knees (100 mm boxes); a joint box that
#: holds the condyles and the tibial plateau with a margin is of this order on real X-rays.
CLASSICAL_SIDE_SCALE = 1.45
#: Box side of the classical fallback when the X-ray's pixel spacing is known: the built-in
#: synthetic knees are cropped to 100 mm boxes (96-100 mm is the usual joint box).
CLASSICAL_BOX_MM = 100.0
#: The classical fallback flags (keeps, but marks for review) boxes found with a confidence
#: below this: 1.7 % of its right boxes and 28 % of its wrong ones on the tuning sets
#: of version 3; version 4 flags 20 % of its (fewer) wrong boxes on other seeds of the
#: held-out styles.
CLASSICAL_FLAG_BELOW = 0.4
#: Version of the classical algorithm: part of a cached pair's key, so that a cache built by
#: an older fallback is rebuilt rather than mixed with new boxes. 4: bone beside the joint
#: space, a finer second look at small knees, straight edges judged nearer the joint line.
#: 5: text strokes stand out of the image's noise, more candidates, a box mostly on clipped
#: bone or a knee too wide for its box flagged, only edges through the knee refuse it.
#: 6: a second search on a contrast-equalised copy when the first finds no joint or is unsure
#: (its boxes flagged). 7: a straight edge broken for a few pixels (where the leg crosses a
#: collimation edge) is one edge; the second search masks burned-in text at the darkest level.
CLASSICAL_VERSION = 7


# === Boxes ===

@dataclass(frozen=True)
class Box:
    """An axis-aligned box `[x0, x1) x [y0, y1)` in pixel coordinates (x = column)."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def cx(self) -> float:
        return (self.x0 + self.x1) / 2.0

    @property
    def cy(self) -> float:
        return (self.y0 + self.y1) / 2.0

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    def square(self) -> "Box":
        """The square box with the same centre and side = the longer side."""
        return square_box_around(self.cx, self.cy, max(self.width, self.height))

    def clip(self, w: float, h: float) -> "Box":
        """This box intersected with the image `[0, w) x [0, h)` (may become empty)."""
        x0, x1 = min(max(self.x0, 0.0), w), min(max(self.x1, 0.0), w)
        y0, y1 = min(max(self.y0, 0.0), h), min(max(self.y1, 0.0), h)
        return Box(float(x0), float(y0), float(x1), float(y1))

    def iou(self, other: "Box") -> float:
        """Intersection over union with `other` (0 when both are empty)."""
        return iou(self, other)

    def scale(self, factor: float) -> "Box":
        """Coordinates multiplied by `factor` (a box of a resized image)."""
        return Box(self.x0 * factor, self.y0 * factor, self.x1 * factor, self.y1 * factor)

    def shift(self, dx: float, dy: float) -> "Box":
        """The box moved by (dx, dy) pixels."""
        return Box(self.x0 + dx, self.y0 + dy, self.x1 + dx, self.y1 + dy)

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


def square_box_around(cx: float, cy: float, side: float) -> Box:
    """The square box of side `side` centred on (cx, cy)."""
    half = float(side) / 2.0
    return Box(float(cx) - half, float(cy) - half, float(cx) + half, float(cy) + half)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when the union is empty)."""
    iw = min(a.x1, b.x1) - max(a.x0, b.x0)
    ih = min(a.y1, b.y1) - max(a.y0, b.y0)
    inter = max(0.0, iw) * max(0.0, ih)
    union = a.area + b.area - inter
    return float(inter / union) if union > 0 else 0.0


def mean_iou(pred: Sequence[Box], true: Sequence[Box]) -> float:
    """Mean IoU of paired boxes."""
    if len(pred) != len(true):
        raise ValueError(f"mean_iou needs as many predicted as true boxes. Received: {len(pred)} and {len(true)}")
    if not pred:
        raise ValueError("mean_iou needs at least one pair of boxes")
    return float(np.mean([iou(p, t) for p, t in zip(pred, true)]))


# === Boxes from a CSV ===

@dataclass
class BoxesResult:
    """A boxes CSV read line by line: the valid boxes, each bad line's (id, error) (id "" when
    the line has none), and the ids with a bad line (a duplicate id drops every box of that
    id: which one is right is unknown)."""

    boxes: dict[str, Box]
    errors: list[tuple[str, ManifestError]]
    bad_ids: set[str]


def read_boxes(path: str | Path) -> BoxesResult:
    """Read a boxes CSV with header `id,x0,y0,x1,y1` (extra columns ignored), keeping the good
    lines: coordinates are finite numbers with x1 > x0 and y1 > y0, ids are unique. Every bad
    line becomes an error naming the file and the line; an unreadable file, a missing column
    or a file without any box raises."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read the boxes CSV: {e}") from e
    rows = csv.reader(text.splitlines())
    header = next(rows, None)
    if header is None:
        raise ManifestError(path, 1, "empty file; expected a header " + ",".join(BOX_COLUMNS))
    header = [h.strip() for h in header]
    missing = [c for c in BOX_COLUMNS if c not in header]
    if missing:
        raise ManifestError(path, 1, f"missing column(s) {', '.join(missing)}; expected a header "
                            + ",".join(BOX_COLUMNS) + f". Received: {','.join(header)}")
    col = {c: header.index(c) for c in BOX_COLUMNS}
    result = BoxesResult({}, [], set())
    first_line: dict[str, int] = {}
    for line, row in enumerate(rows, 2):
        if not row or all(not cell.strip() for cell in row):
            continue
        case_id = row[col["id"]].strip() if len(row) > col["id"] else ""
        try:
            box = _box_line(path, line, row, header, col, case_id, first_line)
        except ManifestError as e:
            result.errors.append((case_id, e))
            if case_id:
                result.bad_ids.add(case_id)
                result.boxes.pop(case_id, None)
            continue
        first_line[case_id] = line
        if case_id not in result.bad_ids:
            result.boxes[case_id] = box
    if not first_line and not result.errors:
        raise ManifestError(path, None, "no boxes (the CSV has a header only)")
    return result


def _box_line(path: Path, line: int, row: list[str], header: list[str], col: dict[str, int], case_id: str,
              first_line: dict[str, int]) -> Box:
    if len(row) < len(header):
        raise ManifestError(path, line, f"expected {len(header)} fields, got {len(row)}")
    if not case_id:
        raise ManifestError(path, line, "empty id")
    if case_id in first_line:
        raise ManifestError(path, line, f"duplicate id {case_id!r} (first on line {first_line[case_id]})")
    values = []
    for name in BOX_COLUMNS[1:]:
        cell = row[col[name]].strip()
        try:
            value = float(cell)
        except ValueError:
            raise ManifestError(path, line, f"{name} is not a number. Received: {name}={cell!r}") from None
        if not math.isfinite(value):
            raise ManifestError(path, line, f"{name} is not finite. Received: {name}={cell!r}")
        values.append(value)
    box = Box(*values)
    if box.width <= 0 or box.height <= 0:
        raise ManifestError(path, line, f"empty box: need x1 > x0 and y1 > y0. Received: {box.as_tuple()}")
    return box


def load_boxes(path: str | Path) -> dict[str, Box]:
    """Read a boxes CSV (`read_boxes`), strictly: the first bad line raises its error."""
    result = read_boxes(path)
    if result.errors:
        raise result.errors[0][1]
    return result.boxes


def write_boxes(path: str | Path, boxes: Mapping[str, Box]) -> Path:
    """Write boxes as a CSV `id,x0,y0,x1,y1` (atomically); `load_boxes` reads back the same values."""
    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(BOX_COLUMNS)
            # repr() of a float is the shortest text that reads back to the same value
            writer.writerows([case_id, *(repr(float(v)) for v in b.as_tuple())] for case_id, b in boxes.items())
    return Path(path)


# === Cropping ===

def _crop_square(shape: Sequence[int], box: Box, max_pixels: int | None = None) -> tuple[int, int, int, int]:
    """The whole-pixel square (x0, y0, x1, y1) `crop_box` cuts around `box` from an image of
    `shape` (rows, cols, ...); InputError (no path) when it is not a crop of that image."""
    h, w = int(shape[0]), int(shape[1])
    sq = box.square()
    side = max(1, int(round(sq.width)))
    x0 = int(math.floor(sq.cx - side / 2.0 + 0.5))
    y0 = int(math.floor(sq.cy - side / 2.0 + 0.5))
    x1, y1 = x0 + side, y0 + side
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if ix0 >= ix1 or iy0 >= iy1:
        raise InputError(None, f"the ROI box {tuple(round(v, 1) for v in box.as_tuple())} lies outside "
                         f"the {w}x{h} image")
    inside = (ix1 - ix0) * (iy1 - iy0)
    if inside * MAX_CROP_PADDING < side * side:
        raise InputError(None, f"the ROI box {tuple(round(v, 1) for v in box.as_tuple())} does not fit the "
                         f"{w}x{h} image: its {side}x{side} square crop would be {inside / (side * side):.2%} "
                         "image, the rest padding")
    limit = resolve_max_pixels(max_pixels)
    if side * side > limit:
        raise InputError(None, f"the ROI box {tuple(round(v, 1) for v in box.as_tuple())} gives a {side}x{side} "
                         f"crop, more than max_pixels={limit}")
    return x0, y0, x1, y1


def check_box_fits(shape: Sequence[int], box: Box, max_pixels: int | None = None) -> None:
    """InputError (no path) unless `crop_box` would crop `box` from an image of `shape`
    (rows, cols, ...): not outside it, at least 1 / `MAX_CROP_PADDING` of it image, not more
    pixels than `max_pixels`."""
    _crop_square(shape, box, max_pixels)


def crop_box(image: np.ndarray, box: Box, *, pad_mode: str = "constant", max_pixels: int | None = None) -> np.ndarray:
    """Crop the square around `box` (`box.square()`, rounded to whole pixels) from `image`
    (H, W) or (H, W, C).

    Parts of the square outside the image are filled with the image minimum
    (`pad_mode="constant"`) or the nearest edge pixel (`"edge"`), so a box partly outside
    the image still gives a full square crop. A box entirely outside is refused, and so is
    one whose square holds less than 1 / `MAX_CROP_PADDING` of image (or more pixels than
    `max_pixels`, by default the readers'): a wrong box, not a knee.
    """
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}. Received: pad_mode={pad_mode!r}")
    image = np.asarray(image)
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(None, f"crop_box needs an (H, W) or (H, W, C) image. Received shape {image.shape}")
    h, w = image.shape[:2]
    x0, y0, x1, y1 = _crop_square(image.shape, box, max_pixels)
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    inner = image[iy0:iy1, ix0:ix1]
    pad = [(iy0 - y0, y1 - iy1), (ix0 - x0, x1 - ix1)] + [(0, 0)] * (image.ndim - 2)
    if not any(p for pair in pad for p in pair):
        return inner.copy()
    if pad_mode == "edge":
        return np.pad(inner, pad, mode="edge")
    return np.pad(inner, pad, mode="constant", constant_values=image.min())


# === Classical fallback ===

@dataclass(frozen=True)
class JointFinding:
    """What `find_joint` found: the box and how sure it is.

    `confidence` in [0, 1]: 1 - (score of the best other place) / (score of this one),
    scaled down when the joint space is faint, the box lies mostly on clipped bone or the
    knee is too wide for its box; `knee_width` is the bone width next to the
    joint space in pixels of the full image; `angle` the tilt of the joint line in degrees;
    `contrast` the depth of the joint space over the image's noise.
    """

    box: Box
    confidence: float
    knee_width: float
    angle: float
    contrast: float


@dataclass(frozen=True)
class ClassicalConfig:
    """The settings of the classical fallback (lengths relative to the knee width `W`).

    The defaults were tuned on synthetic radiographs with markers, collimation and unexposed
    borders (not on the sets the found-rates in the docs are measured on).
    """

    #: long side of the working image, pixels
    work_size: int = 192
    #: joint-line tilts tried, degrees
    angles: tuple[float, ...] = (-24.0, -18.0, -12.0, -6.0, 0.0, 6.0, 12.0, 18.0, 24.0)
    #: knee widths tried, as fractions of the image's short side (spacing unknown)
    width_range: tuple[float, float] = (0.14, 0.85)
    #: knee widths tried in millimetres when the pixel spacing is known (also the accepted range)
    width_range_mm: tuple[float, float] = (35.0, 150.0)
    num_widths: int = 9
    #: joint-space window: height, and each compartment's columns (from, to) off the centre, x W
    gap_height: float = 0.05
    bone_height: float = 0.16
    compartment: tuple[float, float] = (0.13, 0.42)
    #: text and marker strokes: at most this fraction of the image's longer side wide, and
    #: this much brighter or darker than around them (a fraction of the 2nd-98th percentile span)
    stroke: float = 0.011
    stroke_contrast: float = 0.2
    #: collimation edges: straight lines at most this tilted, of the strongest this many,
    #: bounding a side with at most this fraction of edge pixels
    max_field_tilt: float = 15.0
    max_field_lines: int = 24
    field_edge_density: float = 0.01
    #: a joint space is refused as a collimation or plate edge when a straight edge within
    #: this many knee widths of its line runs on well past the knee
    edge_reach: float = 0.15
    #: breaks in a straight edge up to this fraction of the working image's shorter side are
    #: bridged: where the leg crosses a collimation edge, the edge fades for a few pixels
    edge_gap: float = 0.03
    #: a piece of exactly one level this large (fraction of the image) is blanked or unexposed
    min_blank: float = 0.02
    #: knee widths of at least twice this many working pixels are searched at half resolution
    coarse_width: float = 32.0
    #: the knee reaches this many widths above and below its joint space inside the exposed field
    knee_reach: float = 0.4
    #: least fraction of usable (not masked) pixels in every window
    min_coverage: float = 0.75
    #: refuse when the joint space is shallower than this many noise sigmas of its windows' means
    min_contrast: float = 8.0
    #: a joint space's level, from the image's 2nd percentile (0) to its bones' level (1), at least
    min_gap_level: float = 0.3
    #: a joint space's depth, as a fraction of its bones' level over the 2nd percentile, at least
    min_depth: float = 0.03
    #: the condyles and the tibial plateau brighter than the soft tissue just beyond the joint
    #: space's ends (on the side where more shows) by this fraction of the bones' level, at least
    min_flank: float = 0.1
    #: the second look (`find_joint` step 5): a crop of this many knee widths each way around
    #: the joint, searched when it is at least `refine_gain` times finer than the whole image;
    #: its joint must lie within `refine_agree` box sides of the first
    refine_reach: float = 1.5
    refine_gain: float = 1.5
    refine_agree: float = 0.2
    #: the brightest of the four bone windows over the darkest, at most
    max_bone_ratio: float = 2.0
    #: the confidence is multiplied by `unsure_factor` when more than `max_clipped` of the box is
    #: at the image's maximum, or when the knee (x the side scale) is wider than `max_knee_box`
    #: box sides
    max_clipped: float = 0.6
    max_knee_box: float = 1.5
    unsure_factor: float = 0.3
    #: best-scoring places checked
    max_candidates: int = 80
    #: the score of a knee width W is its depth x (W / smallest W) ** width_weight (a deeper
    #: joint space over a wider knee is the likelier)
    width_weight: float = 0.5
    #: refuse when another place off the joint space found scores this fraction of the best
    ambiguity: float = 0.8
    #: condylar / plateau width ratio accepted
    width_ratio: tuple[float, float] = (0.7, 1.45)
    #: joint-space width / knee width searched, when both ends of the joint space are hidden
    extent_ratio: float = 0.9
    #: least fraction of the box on usable pixels of the image
    min_inside: float = 0.35
    #: a second search on a contrast-equalised copy (CLAHE of this clip limit over
    #: `equalise_tiles` x `equalise_tiles` tiles, the exposed field only, markers and text not
    #: masked but for text at the darkest level) when the first finds no joint or one less
    #: sure than `equalise_below`, the more confident kept (its confidence x `unsure_factor`
    #: when it is the second's): sharpening, compression and display LUTs that flatten the
    #: bones leave the joint space a faint dip; 0 turns it off
    equalise_clip: float = 8.0
    equalise_tiles: int = 4
    equalise_below: float = 0.4
    #: least fraction of a box of the second search inside the image
    equalise_inside: float = 0.6
    #: this search is the second, on the equalised copy
    equalised: bool = False


DEFAULT_CLASSICAL = ClassicalConfig()


def _normalize01(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    lo, hi = np.percentile(image, [low, high])
    if hi - lo <= 1e-12:
        return np.zeros(image.shape, np.float32)
    return np.clip((image.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def _block_mad(v: np.ndarray, block: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Per 16x16 block of `v`: the noise sigma (1.4826 x the MAD of the difference to a 3x3
    median) and whether the block is flat (most differences exactly 0: clipped, blanked or
    shutter areas)."""
    d = v - cv2.medianBlur(v.astype(np.float32, copy=False), 3)
    h, w = (max(block, s_ // block * block) for s_ in d.shape)
    d = cv2.resize(d, (w, h), interpolation=cv2.INTER_NEAREST) if d.shape != (h, w) else d
    blocks = d.reshape(h // block, block, w // block, block).transpose(0, 2, 1, 3).reshape(h // block, w // block, -1)
    flat = (blocks == 0).mean(axis=2) >= 0.5
    mad = _median_last(np.abs(blocks - _median_last(blocks)[..., None]))
    return 1.4826 * mad.astype(np.float32), flat


def _median_last(a: np.ndarray) -> np.ndarray:
    """`np.median(a, axis=-1)`, the same values (a zero's sign aside): sorting short rows is
    much faster than `np.median`'s partition."""
    s = np.sort(a, axis=-1)
    n = s.shape[-1]
    if n % 2:
        return s[..., n // 2]
    return (s[..., n // 2 - 1] + s[..., n // 2]) / s.dtype.type(2)


def _noise_sigma(v: np.ndarray) -> float:
    """Robust noise sigma of an image: the median of the block sigmas of `_block_mad`,
    leaving out flat blocks."""
    sigma, flat = _block_mad(v)
    values = sigma[~flat] if (~flat).any() else sigma
    return max(float(np.median(values)), 1e-3)


def _extreme_pieces(v: np.ndarray, tol: float, bright: bool) -> np.ndarray:
    """Small connected pieces (under 2 % of the image) at the brightest (or darkest) level of
    `v` (in [0, 1]) that differ sharply from the 2-pixel ring around them: lead markers and
    letters, burned-in text. A bone clipped by the display processing is larger."""
    level_of = v if bright else 1.0 - v
    at = (level_of >= 1.0 - tol).astype(np.uint8)
    n, labels = cv2.connectedComponents(at, connectivity=8)
    size = np.bincount(labels.ravel(), minlength=n)
    small = (size >= 6) & (size < 0.02 * v.size)
    small[0] = False
    if not small.any():
        return np.zeros(v.shape, bool)
    # each pixel's largest label within 2 pixels (labels as uint16 when they fit: exact, and cheaper)
    if n <= 65535:
        grown = cv2.dilate(labels.astype(np.uint16), np.ones((5, 5), np.uint8))
    else:
        grown = cv2.dilate(labels.astype(np.float32), np.ones((5, 5), np.uint8)).astype(np.int32)
    ring = (at == 0) & (grown > 0)
    ring_labels = grown[ring]
    counts = np.bincount(ring_labels, minlength=n)
    level = np.bincount(ring_labels, weights=level_of[ring], minlength=n) / np.maximum(counts, 1)
    keep = (counts > 0) & (level < 1.0 - max(0.15, 3.0 * tol)) & small
    return np.take(keep, labels)


def _thin_strokes(v: np.ndarray, smooth: np.ndarray, sigma: np.ndarray, stroke: int, contrast: float,
                  floor: float = 0.0) -> np.ndarray:
    """Thin structures (narrower than `stroke` pixels) much brighter or darker than what
    surrounds them: text, marker frames, ruler ticks. A morphological top-hat and black-hat of
    `smooth` (`v` after a 3x3 median) above `contrast` and well above the local noise of `v`
    (`sigma`, per block of `_block_mad`, at least `floor`: a block half clipped by the display
    processing understates it, and its noisy pinholes are no strokes); specks of a few pixels
    are left."""
    noise = np.maximum(cv2.resize(sigma, (v.shape[1], v.shape[0]), interpolation=cv2.INTER_LINEAR), floor)
    # a 3x3 median leaves 0.42 of the noise, and a top-hat of it over a stroke-sized element
    # reaches several of those sigmas on noise alone (noisy, sharpened images)
    threshold = np.maximum(np.float32(contrast), 8.0 * 0.42 * noise)
    strokes = _hats_above(smooth, threshold, stroke, np.float32(contrast))
    out = np.zeros(v.shape, bool)
    rows, cols = np.flatnonzero(strokes.any(axis=1)), np.flatnonzero(strokes.any(axis=0))
    if not len(rows):
        return out
    # the pieces within the strokes' bounding box, sized by counting their labels: much faster
    # than connectedComponentsWithStats
    box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    n, labels = cv2.connectedComponents(np.ascontiguousarray(strokes[box]), connectivity=8)
    keep = np.bincount(labels.ravel(), minlength=n) >= 6
    keep[0] = False
    out[box] = np.take(keep, labels)
    return out


def _hats_above(v: np.ndarray, threshold: np.ndarray, stroke: int, floor: np.float32, tile: int = 64) -> np.ndarray:
    """Where the top-hat or the black-hat of float32 `v` with a `stroke`-pixel ellipse exceeds
    `threshold` (float32, everywhere at least `floor`): a uint8 0/1 mask, equal to computing both
    hats over the whole image. A hat is at most `v`'s distance to the min (max) of the square
    around it, so they are computed only on the `tile`-pixel tiles where that distance reaches
    `floor`, each with a margin that holds every pixel its value depends on."""
    element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (stroke, stroke))
    square = np.ones((stroke, stroke), np.uint8)
    near = ((v - cv2.erode(v, square)) >= floor) | ((cv2.dilate(v, square) - v) >= floor)
    h, w = v.shape
    rows, cols = -(-h // tile), -(-w // tile)
    padded = np.zeros((rows * tile, cols * tile), bool)
    padded[:h, :w] = near
    busy = padded.reshape(rows, tile, cols, tile).any(axis=(1, 3))
    out = np.zeros((h, w), np.uint8)
    margin = 2 * stroke  # an opening or closing reads up to twice the element's reach
    for r in range(rows):
        # runs of busy tiles in this row of tiles, each computed as one window
        cells = np.flatnonzero(busy[r])
        if not len(cells):
            continue
        breaks = np.flatnonzero(np.diff(cells) > 1)
        for first, last in zip(np.r_[cells[0], cells[breaks + 1]], np.r_[cells[breaks], cells[-1]]):
            y0, y1 = r * tile, min(h, (r + 1) * tile)
            x0, x1 = first * tile, min(w, (last + 1) * tile)
            wy0, wy1, wx0, wx1 = max(0, y0 - margin), min(h, y1 + margin), max(0, x0 - margin), min(w, x1 + margin)
            window = np.ascontiguousarray(v[wy0:wy1, wx0:wx1])
            inner = np.s_[y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0]
            limit = threshold[y0:y1, x0:x1]
            out[y0:y1, x0:x1] = ((cv2.morphologyEx(window, cv2.MORPH_TOPHAT, element)[inner] > limit)
                                 | (cv2.morphologyEx(window, cv2.MORPH_BLACKHAT, element)[inner] > limit))
    return out


def _shrunk(image: np.ndarray, f: float) -> np.ndarray:
    """A float32 copy of `image` shrunk by `f` (area averaging; at least 8 px a side), or the
    image itself as float32 when `f` >= 1. No float32 copy of the whole image is made first:
    cv2.resize reads a float32 image in place."""
    h, w = image.shape
    if f >= 1.0:
        return image.astype(np.float32)
    return cv2.resize(np.asarray(image, np.float32), (max(8, round(w * f)), max(8, round(h * f))),
                      interpolation=cv2.INTER_AREA)


class _Artefacts(NamedTuple):
    """The artefact masks of a working image (True: not to be read as anatomy)."""

    #: markers, letters, text and rulers at both extreme levels, and thin strokes
    all: np.ndarray
    #: of them, the small pieces at the darkest level (burned-in text): never bone
    dark: np.ndarray


def _artefact_mask(image: np.ndarray, work_shape: tuple[int, int], cfg: ClassicalConfig) -> _Artefacts:
    """Pixels of the working image to ignore: lead markers and letters, burned-in text and
    rulers (`_extreme_pieces` at both levels, and thin high-contrast strokes, `_thin_strokes`).
    Found at up to 1024 pixels a side, where thin strokes are still resolved; a working pixel
    is masked when any of its pixels is."""
    h, w = image.shape
    f = min(1.0, 1024.0 / max(h, w))
    img = _shrunk(image, f)
    lo, hi = (float(q) for q in np.percentile(img[::2, ::2], [0.05, 99.95]))
    if hi <= lo:
        return _Artefacts(np.zeros(work_shape, bool), np.zeros(work_shape, bool))
    if np.may_share_memory(img, image):
        img = img.copy()  # worked on in place below
    v = np.subtract(img, lo, out=img)
    v = np.clip(np.divide(v, hi - lo, out=v), 0.0, 1.0, out=v)
    blocks, flat = _block_mad(v)
    sigma = float(np.median(blocks[~flat] if (~flat).any() else blocks)) + 1e-6
    tol = max(0.04, 3.0 * sigma)
    p2, p98 = (float(q) for q in np.percentile(v[::2, ::2], [2, 98]))
    stroke = max(3, int(round(cfg.stroke * max(v.shape)))) | 1
    smooth = cv2.medianBlur(v, 3)
    dark = _extreme_pieces(smooth, tol, False)
    mask = (_extreme_pieces(smooth, tol, True) | dark
            | _thin_strokes(v, smooth, blocks, stroke, cfg.stroke_contrast * max(p98 - p2, 1e-6), sigma))
    size = (work_shape[1], work_shape[0])
    return _Artefacts(*(cv2.resize(m.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0 for m in (mask, dark)))


def _rotate(v: np.ndarray, valid: np.ndarray, field: np.ndarray, angle: float
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`v`, `valid` (float) and `field` (uint8: the exposed field) rotated by `angle` degrees
    about the centre on a canvas that holds the whole image (outside it: not valid, not in
    the field), and the 2x3 matrix mapping original to rotated coordinates."""
    h, w = v.shape
    if angle == 0.0:
        return v, valid, field, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(math.ceil(h * sin + w * cos)), int(math.ceil(h * cos + w * sin))
    m[0, 2] += nw / 2.0 - w / 2.0
    m[1, 2] += nh / 2.0 - h / 2.0
    rv = cv2.warpAffine(v, m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=0.0)
    rm = cv2.warpAffine(valid, m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=0.0)
    rf = cv2.warpAffine(field.astype(np.float32), m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=0.0)
    return rv, rm, (rf > 0.99).astype(np.uint8), m


def _joint_response(v: np.ndarray, valid: np.ndarray, inside: np.ndarray, width: float,
                    cfg: ClassicalConfig) -> np.ndarray:
    """The joint-space score of every pixel as the centre of a knee `width` pixels wide: in
    each compartment (medial and lateral windows), how much darker a thin horizontal band is
    than the bone above and the bone below it; the weaker compartment counts. -inf where a
    window has too few usable (`valid`) pixels or the knee around it (`knee_reach` x width
    above and below) leaves the exposed field (`inside`)."""
    h, w = v.shape
    g = max(2, int(round(cfg.gap_height * width)))
    hb = max(3, int(round(cfg.bone_height * width)))
    ci, co = (max(1, int(round(f * width))) for f in cfg.compartment)
    co = max(co, ci + 2)
    cw = co - ci
    top = -(g // 2)
    pad = max(hb + g, co) + 1
    vp = cv2.copyMakeBorder(v * valid, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0.0)
    mp = cv2.copyMakeBorder(valid, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0.0)

    def sums(array: np.ndarray, height: int) -> np.ndarray:
        # out[r, c] = sum of array[r:r + height, c:c + cw]
        return cv2.boxFilter(array, cv2.CV_32F, (cw, height), anchor=(0, 0), normalize=False,
                             borderType=cv2.BORDER_CONSTANT)

    bone_m, gap_m = sums(mp, hb), sums(mp, g)
    bone = sums(vp, hb) / np.maximum(bone_m, 1e-6)
    gap = sums(vp, g) / np.maximum(gap_m, 1e-6)
    bone_bad = bone_m < cfg.min_coverage * hb * cw
    gap_bad = gap_m < cfg.min_coverage * g * cw
    # one compartment's score at every column of the padded map, then both compartments' columns
    above, below = (slice(pad + r0, pad + r0 + h) for r0 in (top - hb, top + g))
    middle = slice(pad + top, pad + top + h)
    s = np.minimum(bone[above], bone[below]) - gap[middle]
    np.putmask(s, bone_bad[above] | bone_bad[below] | gap_bad[middle], -np.inf)
    score = np.minimum(s[:, pad - co:pad - co + w], s[:, pad + ci:pad + ci + w])
    # the knee around the joint space inside the image: erode with its rectangle
    reach = max(hb + g, int(round(cfg.knee_reach * width)))
    kernel = np.ones((2 * reach, 2 * co), np.uint8)
    whole = cv2.erode(inside, kernel, anchor=(co, reach), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    np.putmask(score, whole == 0, -np.inf)
    return score


def _window_levels(rv: np.ndarray, rm: np.ndarray, x: int, y: int, width: float,
                   cfg: ClassicalConfig) -> np.ndarray:
    """The mean levels (above, gap, below) x (one compartment, the other) of the joint
    windows centred on (x, y): a (3, 2) array, NaN for a window without usable pixels."""
    g = max(2, int(round(cfg.gap_height * width)))
    hb = max(3, int(round(cfg.bone_height * width)))
    ci, co = (max(1, int(round(f * width))) for f in cfg.compartment)
    co = max(co, ci + 2)
    top = y - g // 2
    out = np.full((3, 2), np.nan)
    for j, (c0, c1) in enumerate(((x - co, x - ci), (x + ci, x + co))):
        for i, (r0, r1) in enumerate(((top - hb, top), (top, top + g), (top + g, top + g + hb))):
            r0, r1, c0_, c1_ = max(0, r0), min(rv.shape[0], r1), max(0, c0), min(rv.shape[1], c1)
            wsum = rm[r0:r1, c0_:c1_].sum()
            if wsum > 0:
                out[i, j] = (rv[r0:r1, c0_:c1_] * rm[r0:r1, c0_:c1_]).sum() / wsum
    return out


def _outside_field(v: np.ndarray, valid: np.ndarray, sigma: float, cfg: ClassicalConfig) -> np.ndarray:
    """Pixels of the working image outside the collimated field (or in an unexposed border):
    large pieces of exactly one level (blanked by an electronic shutter, or clipped), and for
    each strong straight, nearly horizontal or vertical line, a side of it that is featureless
    (almost no edges, its markers and text left aside) while the other side is not. Returns a
    boolean mask."""
    h, w = v.shape
    # blanked (electronic shutter) and clipped unexposed areas: large pieces of exactly one level
    kernel = np.ones((3, 3), np.uint8)
    flat = ((cv2.dilate(v, kernel) - cv2.erode(v, kernel)) <= 1e-4).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(flat, connectivity=4)
    big = stats[:, cv2.CC_STAT_AREA] >= cfg.min_blank * h * w
    big[0] = False
    outside = cv2.dilate(big[labels].astype(np.uint8), kernel).astype(bool)
    # edges well above the noise: smoothed more when it is strong (a blur of sigma s leaves
    # about 0.28 / s of it; Sobel's gain is ~4)
    blur = float(np.clip(60.0 * sigma, 1.0, 3.0))
    smooth = cv2.GaussianBlur(v, (0, 0), blur)
    u8 = np.round(np.clip(smooth, 0.0, 1.0) * 255.0).astype(np.uint8)
    low = float(np.clip(255.0 * 4.0 * 0.28 / blur * sigma * 4.0, 8.0, 60.0))
    edges = cv2.Canny(u8, low, 2.5 * low, L2gradient=True)
    lines = cv2.HoughLines(edges, 1, np.pi / 180, threshold=max(10, int(0.2 * min(h, w))))
    if lines is None:
        return outside
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    counted = valid & ~cv2.dilate((~valid).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    margin = 2.0
    for rho, theta in lines.reshape(-1, 2)[:cfg.max_field_lines]:
        tilt = math.degrees(theta) % 90.0
        if min(tilt, 90.0 - tilt) > cfg.max_field_tilt:
            continue
        side = xx * math.cos(theta) + yy * math.sin(theta) - rho
        sides = (side > margin, side < -margin)
        density = []
        for region in sides:
            n = (region & counted).sum()
            density.append((edges.astype(bool) & region & counted).sum() / n if n else 1.0)
        for k in (0, 1):
            region = sides[k]
            if (density[k] <= cfg.field_edge_density and density[1 - k] > 3.0 * density[k]
                    and region.sum() >= 0.01 * h * w and (region & outside).sum() < 0.9 * region.sum()
                    and (region | outside).mean() < 0.9):
                outside |= region | (np.abs(side) <= margin)
    return outside


def _straight_edges(v: np.ndarray, gap: float = 0.0, max_tilt: float = 25.0) -> np.ndarray:
    """Long straight, roughly horizontal edges of the working image (collimation edges, plate
    and ruler edges): an (n, 4) array of segments x0, y0, x1, y1. Breaks of up to `gap` of the
    image's shorter side (at least 3 pixels) are bridged."""
    u8 = np.round(np.clip(v, 0.0, 1.0) * 255.0).astype(np.uint8)
    edges = cv2.Canny(u8, 30, 90, L2gradient=True)
    short = min(v.shape)
    lines = cv2.HoughLinesP(edges, 1, np.pi / 360, threshold=max(8, int(0.1 * short)),
                            minLineLength=max(8, int(0.2 * short)), maxLineGap=max(3, int(gap * short)))
    if lines is None:
        return np.zeros((0, 4), np.float64)
    seg = lines.reshape(-1, 4).astype(np.float64)
    tilt = np.degrees(np.arctan2(np.abs(seg[:, 3] - seg[:, 1]), np.abs(seg[:, 2] - seg[:, 0])))
    return seg[tilt <= max_tilt]


def _on_long_edge(segments: np.ndarray, x: float, y: float, along: tuple[float, float], knee_width: float,
                  reach: float) -> bool:
    """Whether straight edges near the joint line through (x, y) (direction `along`, within
    `reach` of it) continue well past the knee (`knee_width` wide) on a side: then the 'joint
    space' is a collimation or plate edge. A joint line ends with the bones."""
    if not len(segments):
        return False
    ux, uy = along
    x0, y0, x1, y1 = segments.T
    # the endpoints' positions along the joint line and distances off it
    t0, t1 = (x0 - x) * ux + (y0 - y) * uy, (x1 - x) * ux + (y1 - y) * uy
    n0, n1 = -(x0 - x) * uy + (y0 - y) * ux, -(x1 - x) * uy + (y1 - y) * ux
    half = 0.5 * knee_width
    lo, hi = np.minimum(t0, t1), np.maximum(t0, t1)
    # an edge through the knee: a line of text or a ruler beside it, in line with its joint
    # space, does not count
    near = (np.abs(n0) <= reach) & (np.abs(n1) <= reach) & (lo < half) & (hi > -half)
    if not near.any():
        return False
    lo, hi = lo[near], hi[near]
    beyond = (np.clip(hi - half, 0, None) + np.clip(-half - lo, 0, None)).sum()
    return bool((hi.max() > 1.5 * half or lo.min() < -1.5 * half) and beyond >= 0.3 * knee_width)


RUNS_ON = "runs on"
#: how `_verify` starts its reason for a candidate on a long edge: other candidates on the same
#: line are left out
ON_EDGE = "lies on a straight edge that runs on past the knee"


@dataclass(frozen=True)
class _Candidate:
    """A place scored by the joint search: (x, y) in working pixels, the search map it came
    from (rotated, possibly halved) and its (rx, ry) there."""

    score: float
    depth: float
    x: float
    y: float
    width: float  # in pixels of its search map
    angle: float
    map_index: int
    rx: int
    ry: int
    scale: float  # working pixels per pixel of its search map


def _on_line(c: _Candidate, x: float, y: float, ux: float, uy: float, width: float) -> bool:
    """Whether candidate `c`, a knee no wider than `width`, lies on the line through (x, y) along
    (ux, uy) (working pixels), within 1.5 `width` of (x, y) along it and 0.1 `width` across: an
    edge that runs on past a knee runs on past a narrower one too."""
    dx, dy = c.x - x, c.y - y
    return c.width * c.scale <= 1.01 * width and abs(dx * ux + dy * uy) <= 1.5 * width and abs(-dx * uy + dy * ux) <= max(1.5, 0.1 * width)


def _peaks(score: np.ndarray, radius: int, k: int = 3) -> list[tuple[float, int, int]]:
    """The `k` highest maxima (value, y, x) of `score` (positive ones), at least `radius` apart."""
    score = score.copy()
    out: list[tuple[float, int, int]] = []
    for _ in range(k):
        i = int(np.argmax(score))
        y, x = divmod(i, score.shape[1])
        value = float(score[y, x])
        if not value > 0:
            break
        out.append((value, y, x))
        score[max(0, y - radius):y + radius + 1, max(0, x - radius):x + radius + 1] = -np.inf
    return out


def _joint_extent(rv: np.ndarray, rm: np.ndarray, x: int, y: int, width: float,
                  cfg: ClassicalConfig) -> tuple[float | None, float | None, float] | str | None:
    """The joint space through (x, y) of the (rotated) working image, followed outwards from
    the middle of each compartment column by column (it may curve or tilt a little): its
    left and right ends (columns where it is darker than the bone above and below by at
    least a quarter of the compartments' typical depth; short breaks are bridged) and its
    row midway. An end hidden by the image border or a masked marker is None; None when the
    compartments show no joint space, `RUNS_ON` when neither end is found and on a side the
    dark band runs on far past the knee (an edge, not a joint space)."""
    h, w = rv.shape
    g = max(2, int(round(cfg.gap_height * width)))
    hb = max(3, int(round(cfg.bone_height * width)))
    top = y - g // 2
    reach = int(round(1.1 * width))
    c0, c1 = max(0, x - reach), min(w, x + reach + 1)
    k = max(1, int(round(0.02 * width)))
    drift = max(2, int(round(0.12 * width)))
    # rows top - drift - hb .. top + drift + g + hb of the columns c0..c1, rows outside the image unusable
    r_lo, r_hi = top - drift - hb, top + drift + g + hb
    sub_v = np.zeros((r_hi - r_lo, c1 - c0), np.float32)
    sub_m = np.zeros_like(sub_v)
    a0, a1 = max(0, r_lo), min(h, r_hi)
    if a1 > a0:
        sub_m[a0 - r_lo:a1 - r_lo] = rm[a0:a1, c0:c1]
        sub_v[a0 - r_lo:a1 - r_lo] = rv[a0:a1, c0:c1] * sub_m[a0 - r_lo:a1 - r_lo]
    sub_v, sub_m = (cv2.blur(a, (2 * k + 1, 1), borderType=cv2.BORDER_CONSTANT) for a in (sub_v, sub_m))
    cum_v = np.vstack([np.zeros((1, c1 - c0), np.float64), np.cumsum(sub_v, axis=0, dtype=np.float64)])
    cum_m = np.vstack([np.zeros((1, c1 - c0), np.float64), np.cumsum(sub_m, axis=0, dtype=np.float64)])

    columns = np.arange(c1 - c0)[None, :]

    def band(first: np.ndarray, height: int) -> tuple[np.ndarray, np.ndarray]:
        # rows [first, first + height) of every column (first: one row per offset)
        rows = first[:, None]
        vs = cum_v[rows + height, columns] - cum_v[rows, columns]
        ms = cum_m[rows + height, columns] - cum_m[rows, columns]
        return vs / np.maximum(ms, 1e-6), ms >= 0.5 * height

    offsets = np.arange(-drift, drift + 1)
    starts = top + offsets - r_lo  # the gap's first row, per offset
    above, ok_a = band(starts - hb, hb)
    gap, ok_g = band(starts, g)
    below, ok_b = band(starts + g, hb)
    depth = np.minimum(above, below) - gap
    ok = ok_a & ok_g & ok_b
    ci, co = (int(round(f_ * width)) for f_ in cfg.compartment)
    centre = x - c0
    n = c1 - c0
    bridge = max(1, int(round(0.1 * width)))
    near = np.abs(offsets) <= g // 2 + 1
    # follow the joint space from each compartment's middle outwards
    tracks: dict[int, tuple[int, dict[int, float]]] = {}
    for direction in (-1, 1):
        start = centre + direction * int(round(0.5 * (ci + co)))
        if not 0 <= start < n or not ok[near, start].any():
            return None
        o = int(np.flatnonzero(near)[np.argmax(np.where(ok[near, start], depth[near, start], -np.inf))])
        first = o
        seen: dict[int, float] = {}
        for d in range(0, reach):
            i = start + direction * d
            if not 0 <= i < n:
                break
            lo_, hi_ = max(0, o - 1), min(len(offsets), o + 2)
            col = np.where(ok[lo_:hi_, i], depth[lo_:hi_, i], -np.inf)
            if not np.isfinite(col).any():
                seen[i] = -np.inf  # unusable: hidden
                continue
            o = lo_ + int(np.argmax(col))
            seen[i] = float(depth[o, i])
        tracks[direction] = (first, seen)
    comp = [v for _, seen in tracks.values() for i, v in seen.items() if ci <= abs(i - centre) < co and np.isfinite(v)]
    if not comp:
        return None
    ref = float(np.median(comp))
    if ref <= 0:
        return None
    ends: list[float | None] = []
    ran_on = False
    for direction in (-1, 1):
        first, seen = tracks[direction]
        start = centre + direction * int(round(0.5 * (ci + co)))
        last, miss, end, hidden = None, 0, None, False
        for d in range(0, reach):
            i = start + direction * d
            value = seen.get(i)
            if value is None or not np.isfinite(value):
                hidden = True  # the edge is hidden (image border, a marker): not measured
                break
            if value > 0.25 * ref:
                last, miss = i, 0
            else:
                miss += 1
                if miss > bridge:
                    end = last
                    break
        ran_on |= end is None and not hidden
        ends.append(None if end is None else end + c0 + (1.0 if direction > 0 else 0.0))
    if ran_on and ends[0] is None and ends[1] is None:
        return RUNS_ON  # no end at all, and on a side the band runs on far past the knee
    row = top + g / 2.0 + 0.5 * (offsets[tracks[-1][0]] + offsets[tracks[1][0]])
    return ends[0], ends[1], float(row)


def _window_mean(rv: np.ndarray, rm: np.ndarray, r0: float, r1: float, c0: float, c1: float,
                 min_coverage: float = 0.5) -> float:
    """Mean of `rv` over its usable (`rm`) pixels in rows [r0, r1) x columns [c0, c1); NaN
    when the window (clipped to the map) has less than `min_coverage` of its area usable."""
    r0_, r1_ = int(round(r0)), int(round(r1))
    c0_, c1_ = int(round(c0)), int(round(c1))
    area = max(1, (r1_ - r0_) * (c1_ - c0_))
    r0_, r1_ = max(0, r0_), min(rv.shape[0], r1_)
    c0_, c1_ = max(0, c0_), min(rv.shape[1], c1_)
    if r1_ <= r0_ or c1_ <= c0_:
        return math.nan
    m = rm[r0_:r1_, c0_:c1_]
    wsum = float(m.sum())
    if wsum < min_coverage * area:
        return math.nan
    return float((rv[r0_:r1_, c0_:c1_] * m).sum() / wsum)


def _bone_flanks(rv: np.ndarray, rm: np.ndarray, mid: float, row: float, knee_w: float, g: int, hb: int
                 ) -> np.ndarray:
    """How much brighter the bones next to a joint space are than what flanks them: a (2, 2)
    array (condyles, plateau) x (left, right) of the bone window's level (the middle 70 % of
    the knee) minus the level just beyond the knee's edge on that side (NaN where that is
    not usable). A knee's bones stand out of the soft tissue beside them; the bright side of
    a collimation edge or a plate does not."""
    out = np.full((2, 2), np.nan)
    half = knee_w / 2.0
    for i, (r0, r1) in enumerate(((row - g / 2.0 - hb, row - g / 2.0), (row + g / 2.0, row + g / 2.0 + hb))):
        inner = _window_mean(rv, rm, r0, r1, mid - 0.35 * knee_w, mid + 0.35 * knee_w)
        for j, sign in enumerate((-1.0, 1.0)):
            a, b = mid + sign * (half + 0.08 * knee_w), mid + sign * (half + 0.35 * knee_w)
            flank = _window_mean(rv, rm, r0, r1, min(a, b), max(a, b))
            out[i, j] = inner - flank
    return out


def _as_spacing(pixel_spacing: float | Sequence[float] | None) -> float | None:
    if pixel_spacing is None:
        return None
    values = [float(pixel_spacing)] * 2 if np.isscalar(pixel_spacing) else [float(s) for s in pixel_spacing]
    if len(values) != 2 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"pixel_spacing must be a positive number or (row_mm, col_mm). Received: {pixel_spacing!r}")
    return float(np.sqrt(values[0] * values[1]))


def find_joint(image: np.ndarray, *, pixel_spacing: float | Sequence[float] | None = None,
               box_mm: float = CLASSICAL_BOX_MM, side_scale: float = CLASSICAL_SIDE_SCALE,
               config: ClassicalConfig = DEFAULT_CLASSICAL, source: str | Path | None = None) -> JointFinding:
    """The knee joint of a display-ready X-ray (bone bright), found without learning.

    1. The image is shrunk to `config.work_size` and normalised; the saturated level (lead
       markers, burned-in text, rulers, unexposed collimated areas and borders) is masked
       as small blobs or pieces touching the border, so nothing there is read as bone.
    2. For a range of knee widths and joint-line tilts, every pixel is scored as the centre
       of a joint space: in each compartment, a thin horizontal band darker than the bone
       above (femoral condyle) and the bone below (tibial plateau); the weaker compartment
       counts, and windows on masked pixels do not count.
    3. The best place must beat every distinct other place clearly (one knee), and its joint
       space must stand out of the noise.
    4. The bone width next to the joint space (condyles, plateau) must be found and agree;
       it gives the box centre column and, unless the pixel spacing is known, the side
       (`side_scale` x width). With a spacing the side is `box_mm` and the width must be a
       plausible knee's.

    5. When the knee is small in the image, the search is run again on the image cropped
       around it, at a finer resolution: it must find the joint again at the same place
       (else unsure), and its finer box is kept.
    6. The confidence drops (`ClassicalConfig.unsure_factor`) when the box lies mostly on bone
       clipped to the display's white, or the knee is too wide for its box.
    7. When steps 1-6 find no joint or are unsure of it, they are run again on a copy of the
       working image equalised tile by tile (CLAHE: a joint space that sharpening, compression
       and display LUTs left a faint dip in flattened bone stands out again), markers and
       text not masked but for text at the darkest level; a box from this second search is
       kept when it is the more confident and at least `equalise_inside` of it lies in the
       image, and always flagged (its confidence x `unsure_factor`).

    Raises `RoiNotFoundError` (naming `source`) whenever a step is unsure, or when the box
    at `pixel_spacing` is too large for `crop_box` to crop from the image;
    an image that is not 2-D or smaller than 8x8 raises `InputError`.
    """
    image = image_2d(image, "the classical ROI's input", min_side=8, path=source)
    spacing = _as_spacing(pixel_spacing)
    if spacing is not None and box_mm / spacing > math.sqrt(MAX_CROP_PADDING) * max(image.shape):  # crop refused
        raise RoiNotFoundError(source, f"a {box_mm:g} mm box is {box_mm / spacing:.0f} pixels at the pixel spacing "
                                       f"{spacing:g} mm, far larger than the {image.shape[1]}x{image.shape[0]} image: "
                                       "the spacing is wrong")
    try:
        masks: dict[tuple[int, ...], _Artefacts] = {}  # artefact masks, reused by the second search
        found: JointFinding | None = _look(image, spacing, box_mm, side_scale, config, source, masks)
        error = None
    except RoiNotFoundError as e:
        found, error = None, e
    unsure = found is None or found.confidence < config.equalise_below
    if config.equalise_clip > 0 and not config.equalised and unsure:
        try:
            again = _look(image, spacing, box_mm, side_scale, dataclasses.replace(config, equalised=True), source,
                          masks)
        except RoiNotFoundError:
            again = None
        inside = again.box.clip(image.shape[1], image.shape[0]).area if again is not None else 0.0
        if again is not None and inside < config.equalise_inside * again.box.area:
            again = None  # a box mostly off the image (a strip of bone without its joint)
        if again is not None and (found is None or again.confidence > found.confidence):
            # read from a copy without the marker mask, on a faint dip: always worth a look
            found = dataclasses.replace(again, confidence=again.confidence * config.unsure_factor)
    if found is None:
        raise error
    return found


def _look(image: np.ndarray, spacing: float | None, box_mm: float, side_scale: float, config: ClassicalConfig,
          source: str | Path | None, masks: dict[tuple[int, ...], _Artefacts] | None = None) -> JointFinding:
    """Steps 1-6 of `find_joint`: one search, its second look and the plausibility of its box."""
    found = _search(image, spacing, box_mm, side_scale, config, source, masks=masks)
    found = _second_look(image, found, spacing, box_mm, side_scale, config, source, masks)
    return dataclasses.replace(found, confidence=found.confidence * _plausibility(image, found, side_scale, config))


def _plausibility(image: np.ndarray, found: JointFinding, side_scale: float, config: ClassicalConfig) -> float:
    """A factor on `found`'s confidence: `config.unsure_factor` when its box is mostly bone
    clipped to the display's white (the joint space was read from the few pixels the noise
    leaves below the clip) or its knee is too wide for its box (the box side was fixed by the
    pixel spacing, and the joint space followed past the knee), else 1."""
    box = found.box.clip(image.shape[1], image.shape[0])
    x0, y0 = int(box.x0), int(box.y0)
    inner = image[y0:max(y0 + 1, int(math.ceil(box.y1))), x0:max(x0 + 1, int(math.ceil(box.x1)))]
    top = float(image.max())
    clipped = float(np.mean(inner >= top)) if top > float(image.min()) else 1.0
    too_wide = found.knee_width * side_scale > config.max_knee_box * found.box.width
    return config.unsure_factor if clipped > config.max_clipped or too_wide else 1.0


def _second_look(image: np.ndarray, found: JointFinding, spacing: float | None, box_mm: float, side_scale: float,
                 config: ClassicalConfig, source: str | Path | None,
                 masks: dict[tuple[int, ...], _Artefacts] | None = None) -> JointFinding:
    """`found` searched for again on the image cropped around it (`config.refine_reach` knee
    widths each way), at least `config.refine_gain` times finer; `found` itself when the
    crop would not be finer. Raises `RoiNotFoundError` when the finer search finds no
    joint, or one farther than `config.refine_agree` box sides away."""
    h, w = image.shape
    f = min(1.0, config.work_size / max(h, w))
    cx, cy = found.box.cx, found.box.cy
    reach = config.refine_reach * found.knee_width
    x0, x1 = max(0, int(cx - reach)), min(w, int(math.ceil(cx + reach)))
    y0, y1 = max(0, int(cy - reach)), min(h, int(math.ceil(cy + reach)))
    f2 = min(1.0, config.work_size / max(x1 - x0, y1 - y0))
    if f2 < config.refine_gain * f or min(x1 - x0, y1 - y0) < 16:
        return found
    # the same knee: tilts and widths near the first look's; one knee is already established
    near = tuple(a for a in config.angles if abs(a - found.angle) <= 6.5) or (found.angle,)
    narrow = dataclasses.replace(config, angles=near, num_widths=5, ambiguity=math.inf)
    widths = (found.knee_width / 1.5, found.knee_width * 1.5)
    try:
        fine = _search(image[y0:y1, x0:x1], spacing, box_mm, side_scale, narrow, source, widths=widths, masks=masks,
                       at=(y0, y1, x0, x1))
    except RoiNotFoundError as e:
        raise RoiNotFoundError(source, f"unsure: the joint found at ({cx:.0f}, {cy:.0f}) px is not found again "
                               f"at {f2 / f:.1f}x the resolution ({e.reason})") from None
    box = fine.box.shift(x0, y0)
    off = math.hypot(box.cx - cx, box.cy - cy) / found.box.width
    if off > config.refine_agree:
        raise RoiNotFoundError(source, f"unsure: the joint found at ({cx:.0f}, {cy:.0f}) px is found "
                               f"{off:.0%} of the box side away at {f2 / f:.1f}x the resolution")
    return JointFinding(box=box, confidence=found.confidence, knee_width=fine.knee_width,
                        angle=fine.angle, contrast=max(found.contrast, fine.contrast))


def _equalise(v: np.ndarray, valid: np.ndarray, config: ClassicalConfig) -> np.ndarray:
    """`v` (in [0, 1]) contrast-limited histogram-equalised over tiles (CLAHE), its usable
    (`valid`) pixels only: the others are set to the median of those first, so markers and
    the collimated outside do not steer the tiles' histograms."""
    work = np.where(valid, v, np.float32(np.median(v[valid])))
    u8 = np.round(work * 255.0).astype(np.uint8)
    clahe = cv2.createCLAHE(clipLimit=config.equalise_clip, tileGridSize=(config.equalise_tiles,) * 2)
    return _normalize01(clahe.apply(u8).astype(np.float32), 0.05, 99.95)


def _search(image: np.ndarray, spacing: float | None, box_mm: float, side_scale: float, config: ClassicalConfig,
            source: str | Path | None, widths: tuple[float, float] | None = None,
            masks: dict[tuple[int, ...], _Artefacts] | None = None, at: tuple[int, ...] = ()) -> JointFinding:
    """Steps 1-4 of `find_joint` on a 2-D image; knee widths searched in `widths` (pixels)
    when given, else in the config's ranges. `masks` keeps the artefact masks found, by `at`
    (the crop's rows and columns in the whole image; () for the whole image), for a later
    search of the same pixels."""
    h, w = image.shape
    f = min(1.0, config.work_size / max(h, w))
    small = _shrunk(image, f)
    sh, sw = small.shape
    fy, fx = sh / h, sw / w
    v = _normalize01(small, 0.05, 99.95)
    if not v.any():
        raise RoiNotFoundError(source, "no knee found: the image is constant")
    sigma = _noise_sigma(v)
    artefacts = masks.get(at) if masks is not None else None
    if artefacts is None:
        artefacts = _artefact_mask(image, v.shape, config)
        if masks is not None:
            masks[at] = artefacts
    valid = ~artefacts.all
    field = ~_outside_field(v, valid, sigma, config)
    # the second search reads what the first masks in noisy or clipped bone, but never the
    # small pieces at the darkest level (burned-in text): a line of it passes for a joint space
    valid = field & ~artefacts.dark if config.equalised else valid & field
    if valid.mean() < 0.03:
        raise RoiNotFoundError(source, f"no knee found: only {valid.mean():.0%} of the image is exposed")
    if config.equalised:
        v = _equalise(v, valid, config)
        sigma = _noise_sigma(v)
    v = cv2.GaussianBlur(v, (0, 0), 0.7)

    # 2. joint-space scores over widths and tilts
    if widths is not None:
        lo, hi = (wd * f for wd in widths)
    elif spacing is not None:
        lo, hi = (mm / spacing * f for mm in config.width_range_mm)
    else:
        lo, hi = (r * min(sh, sw) for r in config.width_range)
    widths = np.geomspace(lo, hi, config.num_widths)
    candidates: list[_Candidate] = []
    maps: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]] = []  # rotated v, valid, to working px, scale
    for angle in config.angles:
        rv, rm, inside, m = _rotate(v, valid.astype(np.float32), field.astype(np.uint8), angle)
        inv = cv2.invertAffineTransform(m)
        levels = {1.0: (rv, rm, inside, inv)}
        if widths[-1] >= 2 * config.coarse_width:  # wide knees are searched at half the resolution
            half = (max(1, rv.shape[1] // 2), max(1, rv.shape[0] // 2))
            sx, sy = rv.shape[1] / half[0], rv.shape[0] / half[1]
            levels[2.0] = (cv2.resize(rv, half, interpolation=cv2.INTER_AREA),
                           cv2.resize(rm, half, interpolation=cv2.INTER_AREA),
                           (cv2.resize(inside.astype(np.float32), half, interpolation=cv2.INTER_AREA) > 0.99
                            ).astype(np.uint8),
                           np.hstack([inv[:, :2] * [sx, sy], inv[:, 2:]]))
        for level in levels.values():
            maps.append((level[0], level[1], level[3], 0.0))
        for width in widths:
            if width < 10:
                continue
            scale = 2.0 if 2.0 in levels and width >= 2 * config.coarse_width else 1.0
            lv, lm, lin, linv = levels[scale]
            index = len(maps) - len(levels) + list(levels).index(scale)
            maps[index] = (lv, lm, linv, scale)
            response = _joint_response(lv, lm, lin, width / scale, config)
            weight = (width / widths[0]) ** config.width_weight
            for value, y, x in _peaks(response, int(round(0.3 * width / scale))):
                ox, oy = linv @ np.array([x + 0.5, y + 0.5, 1.0])
                candidates.append(_Candidate(value * weight, value, float(ox), float(oy), float(width / scale),
                                             float(angle), index, x, y, scale))
    if not candidates:
        raise RoiNotFoundError(source, "no joint space found (no dark band between two bright bones)")
    candidates.sort(key=lambda c: -c.score)

    # 3. the best places that pass every check; two distinct ones of similar score: unsure
    p2, p98 = (float(q) for q in np.percentile(v, [2, 98]))
    geometry = _Geometry(h=h, w=w, f=f, fx=fx, fy=fy, spacing=spacing, box_mm=box_mm, side_scale=side_scale,
                         sigma=sigma, p2=p2, span=max(p98 - p2, 1e-6), segments=_straight_edges(v, config.edge_gap), valid=valid)
    knees: list[_Knee] = []
    edges: list[tuple[float, float, float, float, float]] = []  # x, y, along, width of candidates on edges
    first_reason = None
    for c in candidates[:config.max_candidates]:
        if knees and not knees[0].apart(c):
            continue
        if any(_on_line(c, *e) for e in edges):
            continue  # on a straight edge already refused, seen at another width or tilt
        knee = _verify(c, maps[c.map_index], geometry, config)
        if isinstance(knee, str):
            if knee.startswith(ON_EDGE):
                inv = maps[c.map_index][2]
                ux, uy = inv[0, 0], inv[1, 0]
                norm = math.hypot(ux, uy)
                edges.append((c.x, c.y, ux / norm, uy / norm, c.width * c.scale))
            if first_reason is None:
                first_reason = f"the best candidate, at ({c.x / fx:.0f}, {c.y / fy:.0f}) px, {knee}"
            continue
        if knees and knees[0].inside(knee):
            continue  # a wider structure around the knee found (both legs), not another knee
        knees.append(knee)
        if len(knees) == 2:
            break
    if not knees:
        raise RoiNotFoundError(source, "no knee joint found: " + (first_reason or "no dark band between two bright "
                                                                              "bones"))
    best = knees[0]
    rival = knees[1] if len(knees) > 1 else None
    if rival is not None and rival.score >= config.ambiguity * best.score:
        raise RoiNotFoundError(source, f"two candidate knee joints of similar score ({best.score:.3f} at "
                               f"({best.box.cx:.0f}, {best.box.cy:.0f}) px, {rival.score:.3f} at "
                               f"({rival.box.cx:.0f}, {rival.box.cy:.0f}) px)")
    ratio = rival.score / best.score if rival is not None else 0.0
    confidence = float(np.clip(1.0 - ratio, 0.0, 1.0) * min(1.0, best.snr / (3 * config.min_contrast)))
    return JointFinding(box=best.box, confidence=confidence, knee_width=best.knee_width, angle=best.angle,
                        contrast=best.snr)


@dataclass(frozen=True)
class _Geometry:
    """What `_verify` needs to know about the image besides a candidate."""

    h: int
    w: int
    f: float
    fx: float
    fy: float
    spacing: float | None
    box_mm: float
    side_scale: float
    sigma: float
    p2: float
    span: float
    segments: np.ndarray
    valid: np.ndarray


@dataclass(frozen=True)
class _Knee:
    """A verified candidate: its box (full-image pixels) and joint line (working pixels)."""

    score: float
    box: Box
    knee_width: float
    angle: float
    snr: float
    x: float
    y: float
    along: tuple[float, float]
    width_work: float

    def apart(self, c: _Candidate) -> bool:
        """Whether candidate `c` lies off this knee's joint space (another joint line or knee)."""
        dx, dy = c.x - self.x, c.y - self.y
        along = abs(dx * self.along[0] + dy * self.along[1])
        normal = abs(-dx * self.along[1] + dy * self.along[0])
        return along > self.width_work or normal > 0.25 * self.width_work

    def inside(self, other: "_Knee") -> bool:
        """Whether `other` is much wider than this knee and spans it (both legs, say)."""
        dx, dy = self.x - other.x, self.y - other.y
        along = abs(dx * other.along[0] + dy * other.along[1])
        return other.width_work > 1.6 * self.width_work and along < 0.5 * other.width_work


def _verify(c: _Candidate, search_map: tuple[np.ndarray, np.ndarray, np.ndarray, float], geo: _Geometry,
            config: ClassicalConfig) -> _Knee | str:
    """Candidate `c` checked as a knee joint: a `_Knee`, or why it is not one. Lengths are in
    pixels of the candidate's search map (`scale` working pixels each) until said otherwise."""
    rv, rm, inv, scale = search_map
    width, rx, ry = c.width, c.rx, c.ry
    # a joint space lies inside the leg (never as dark as direct exposure), between bones of
    # similar brightness, and stands out of the noise
    levels = _window_levels(rv, rm, rx, ry, width, config)
    bones = levels[[0, 2]]
    bone_level = max(float(np.nanmin(bones)) - geo.p2, 1e-6)
    if (np.nanmean(levels[1]) - geo.p2) / bone_level < config.min_gap_level:
        return "is nearly as dark as the background"
    if c.depth / bone_level < config.min_depth:
        return f"is too shallow ({c.depth / bone_level:.1%} of the bones' level, at least {config.min_depth:.0%})"
    if np.nanmax(bones) > config.max_bone_ratio * max(float(np.nanmin(bones)), 1e-6):
        return "has bones of very unequal brightness above and below"
    g = max(2, int(round(config.gap_height * width)))
    hb = max(3, int(round(config.bone_height * width)))
    cw = max(2, int(round((config.compartment[1] - config.compartment[0]) * width)))
    sigma = geo.sigma / scale  # a halved map averages 4 pixels
    snr = c.depth / (sigma * math.sqrt(1.0 / (g * cw) + 1.0 / (hb * cw)))
    if snr < config.min_contrast:
        return f"has low contrast (the joint space is {snr:.1f} noise sigmas deep, at least {config.min_contrast:g} needed)"
    # the width of the joint space
    extent = _joint_extent(rv, rm, rx, ry, width, config)
    if extent is None:
        return "shows no joint space across the condyles"
    if extent == RUNS_ON:
        return ON_EDGE + " (a dark band that runs on past the knee)"
    left, right, row = extent
    if left is not None and right is not None:
        knee_w, mid = right - left, (left + right) / 2.0
    else:
        # an end hidden (image border, a marker): a knee as wide as the one searched for, or
        # as twice the half that shows, from the end that shows
        knee_w = config.extent_ratio * width
        if geo.spacing is not None:
            knee_w = geo.box_mm / geo.side_scale / geo.spacing * geo.f / scale
        mid = rx + 0.5
        for end, direction in ((left, -1.0), (right, 1.0)):
            if end is not None:
                knee_w = max(knee_w, 2.0 * abs(end - mid))
                mid = end - direction * knee_w / 2.0
    if not 0.5 * width <= knee_w <= 2.0 * width:
        return (f"has a joint space ({knee_w * scale / geo.f:.0f} px) that does not match its knee "
                f"({width * scale / geo.f:.0f} px)")
    flanks = _bone_flanks(rv, rm, mid, row, knee_w, g, hb) / bone_level
    ox, oy = inv @ np.array([mid, row, 1.0])
    # each bone brighter than the soft tissue beside it on at least one side that shows
    flank = np.array([np.nanmax(b) if np.isfinite(b).any() else np.inf for b in flanks])
    if (flank < config.min_flank).any():
        return (f"has no bone beside its joint space ({'condyles' if flank[0] < flank[1] else 'plateau'} "
                f"{float(flank.min()):.0%} of the bones' level brighter than beside them, at least "
                f"{config.min_flank:.0%}): a collimation or plate edge")
    along = (float(inv[0, 0]) / scale, float(inv[1, 0]) / scale)
    knee_w *= scale  # working pixels from here on
    reach = config.edge_reach * width * scale
    if _on_long_edge(geo.segments, float(ox), float(oy), along, knee_w, reach):
        return ON_EDGE + " (collimation or a plate)"
    cx, cy = ox / geo.fx, oy / geo.fy
    knee_w_full = knee_w / geo.f
    if geo.spacing is not None:
        knee_mm = knee_w_full * geo.spacing
        lo_mm, hi_mm = config.width_range_mm
        if not lo_mm <= knee_mm <= hi_mm:
            return (f"is {knee_mm:.0f} mm wide at the joint, not in the plausible {lo_mm:.0f}-{hi_mm:.0f} mm "
                    f"(pixel spacing {geo.spacing:g} mm)")
        side = geo.box_mm / geo.spacing
    else:
        side = geo.side_scale * knee_w_full
    if side < 24 or side > 1.05 * max(geo.h, geo.w):
        return f"gives a box ({side:.0f} px) too small or too large for the {geo.w}x{geo.h} image"
    box = square_box_around(cx, cy, side)
    # the box must lie mostly on usable pixels of the image
    inside = box.clip(geo.w, geo.h)
    usable = 0.0
    if inside.area > 0:
        sx0, sy0 = int(inside.x0 * geo.fx), int(inside.y0 * geo.fy)
        sx1 = max(sx0 + 1, int(math.ceil(inside.x1 * geo.fx)))
        sy1 = max(sy0 + 1, int(math.ceil(inside.y1 * geo.fy)))
        usable = float(geo.valid[sy0:sy1, sx0:sx1].mean()) * inside.area / box.area
    if usable < config.min_inside:
        return f"is at the edge of the exposed field ({usable:.0%} of its box on usable pixels)"
    return _Knee(score=c.score, box=box, knee_width=knee_w_full, angle=c.angle, snr=float(snr), x=c.x, y=c.y,
                 along=along, width_work=float(knee_w))


def classical_roi(image: np.ndarray, *, pixel_spacing: float | Sequence[float] | None = None,
                  box_mm: float = CLASSICAL_BOX_MM, side_scale: float = CLASSICAL_SIDE_SCALE,
                  config: ClassicalConfig = DEFAULT_CLASSICAL, source: str | Path | None = None) -> Box:
    """The square box on the knee joint of `find_joint` (see there); raises
    `RoiNotFoundError` when unsure."""
    return find_joint(image, pixel_spacing=pixel_spacing, box_mm=box_mm, side_scale=side_scale, config=config,
                      source=source).box


# === ROI sources ===

@runtime_checkable
class RoiSource(Protocol):
    """Anything that gives the ROI box of a case's X-ray (full image, display-ready).

    A source may also offer `finding_for(case_id, image, pixel_spacing=None) -> RoiFinding`
    (its box with how sure it is); `find_roi` asks any source for one."""

    def box_for(self, case_id: str, image: np.ndarray) -> Box:
        ...


@dataclass(frozen=True)
class RoiFinding:
    """An ROI source's answer for one X-ray: the box, which source gave it (`"csv"`,
    `"classical"`, `"detector:<file>"`, `"fixed"` or a class name), a `confidence` in [0, 1]
    (NaN when the source has none) and `flagged` (kept, but worth a look)."""

    box: Box
    source: str
    confidence: float = math.nan
    flagged: bool = False


#: pixel spacings (mm) and longer sides of the field of view (mm) a radiograph can have;
#: outside them `find_roi` ignores the spacing (the knee's size then comes from the image)
RADIOGRAPH_SPACING_MM = (0.01, 5.0)
RADIOGRAPH_FIELD_MM = (50.0, 2500.0)


def radiograph_spacing(pixel_spacing: Any, shape: Sequence[int], where: Any = None) -> Any:
    """`pixel_spacing` (a number or (row, col) mm), or None with a warning when it cannot be
    that of a radiograph of `shape` (rows, cols): 0.001 mm on a 320x320 DICOM once sized a
    100 mm box as 100,000 pixels. A malformed value is returned as it is, for its user to refuse."""
    if pixel_spacing is None:
        return None
    try:
        row, col = [float(pixel_spacing)] * 2 if np.isscalar(pixel_spacing) else [float(s) for s in pixel_spacing]
    except (TypeError, ValueError):
        return pixel_spacing
    if not (math.isfinite(row) and math.isfinite(col) and row > 0 and col > 0):
        return pixel_spacing
    field = max(shape[0] * row, shape[1] * col)
    low, high = RADIOGRAPH_SPACING_MM
    if low <= min(row, col) and max(row, col) <= high and RADIOGRAPH_FIELD_MM[0] <= field <= RADIOGRAPH_FIELD_MM[1]:
        return pixel_spacing
    log.warning("%s: pixel spacing %g x %g mm gives a %.4g mm field of view on %d x %d pixels, not a radiograph's; "
                "ignored (the knee's size is estimated from the image)", where or "an X-ray", row, col, field,
                shape[0], shape[1])
    return None


def find_roi(source: Any, case_id: str, image: np.ndarray, pixel_spacing: Any = None, *,
             where: Any = None) -> RoiFinding:
    """`source`'s `RoiFinding` for one X-ray: its `finding_for` when it has one, a detector's
    `detection_for` (box, confidence, flag), else its plain `box_for`. `pixel_spacing` (mm per
    pixel, a number or (row, col)) goes to the sources that use it, unless it cannot be a
    radiograph's (`radiograph_spacing`, whose warning names `where`, the file, else the id). A
    source with `uses_spacing = False` (a boxes CSV, a fixed box) or with a plain `box_for`
    gets none and so warns of none."""
    if getattr(source, "uses_spacing", hasattr(source, "finding_for") or hasattr(source, "detection_for")):
        pixel_spacing = radiograph_spacing(pixel_spacing, np.shape(image)[:2], where or case_id)
    else:
        pixel_spacing = None
    if hasattr(source, "finding_for"):
        return source.finding_for(case_id, image, pixel_spacing)
    path = getattr(source, "path", None)
    detector = hasattr(source, "detection_for") or (path is not None and Path(path).suffix == ".keras")
    label = (f"detector:{Path(path).name}" if path else "detector") if detector else type(source).__name__
    if hasattr(source, "detection_for"):
        if not float(np.min(image)) < float(np.max(image)):  # a detector would still give a box
            raise RoiNotFoundError(where, "no knee found: the image is constant")
        d = source.detection_for(case_id, image, pixel_spacing)
        return RoiFinding(d.box, label, float(d.confidence), bool(d.flagged))
    return RoiFinding(source.box_for(case_id, image), label)


class CsvRoi:
    """Boxes read from a CSV `id,x0,y0,x1,y1` (or given as a dict). A bad line fails only the
    X-ray of its id (as `kneetf prepare` skips only that pair); a bad line without an id is
    logged once."""

    uses_spacing = False

    def __init__(self, boxes: str | Path | Mapping[str, Box]) -> None:
        self.bad: dict[str, str] = {}  # id -> the reason its line was refused ("line N: ...")
        if isinstance(boxes, (str, Path)):
            self.path: Path | None = Path(boxes)
            result = read_boxes(boxes)
            self.boxes = result.boxes
            for case_id, e in result.errors:
                if case_id:
                    self.bad.setdefault(case_id, e.reason)
                else:
                    log.warning("%s", e)
        else:
            self.path = None
            self.boxes = dict(boxes)

    def box_for(self, case_id: str, image: np.ndarray, pixel_spacing: Any = None) -> Box:
        """The CSV's box of `case_id`; an InputError names the CSV (and the line) when it has none."""
        if case_id in self.bad:
            raise InputError(self.path, self.bad[case_id])
        try:
            return self.boxes[case_id]
        except KeyError:
            raise InputError(self.path, f"no ROI box for id {case_id!r}") from None

    def finding_for(self, case_id: str, image: np.ndarray, pixel_spacing: Any = None) -> RoiFinding:
        return RoiFinding(self.box_for(case_id, image), "csv")

    def __repr__(self) -> str:
        return f"CsvRoi({str(self.path) if self.path else f'{len(self.boxes)} boxes'})"


class FixedRoi:
    """The same box for every X-ray."""

    uses_spacing = False

    def __init__(self, box: Box) -> None:
        self.box = box

    def box_for(self, case_id: str, image: np.ndarray, pixel_spacing: Any = None) -> Box:
        return self.box

    def finding_for(self, case_id: str, image: np.ndarray, pixel_spacing: Any = None) -> RoiFinding:
        return RoiFinding(self.box, "fixed")

    def __repr__(self) -> str:
        return f"FixedRoi({self.box.as_tuple()})"


class ClassicalRoi:
    """The classical fallback (`find_joint`); no TensorFlow, picklable. It raises
    `RoiNotFoundError` when unsure, and flags the boxes it finds with a confidence below
    `flag_below` (kept, but worth a look)."""

    def __init__(self, side_scale: float = CLASSICAL_SIDE_SCALE, *, box_mm: float = CLASSICAL_BOX_MM,
                 flag_below: float = CLASSICAL_FLAG_BELOW) -> None:
        self.side_scale = float(side_scale)
        self.box_mm = float(box_mm)
        self.flag_below = float(flag_below)

    def finding_for(self, case_id: str, image: np.ndarray, pixel_spacing: Any = None) -> RoiFinding:
        found = find_joint(image, pixel_spacing=pixel_spacing, box_mm=self.box_mm, side_scale=self.side_scale)
        return RoiFinding(found.box, "classical", found.confidence, found.confidence < self.flag_below)

    def box_for(self, case_id: str, image: np.ndarray, pixel_spacing: Any = None) -> Box:
        return self.finding_for(case_id, image, pixel_spacing).box

    def __repr__(self) -> str:
        return f"ClassicalRoi(side_scale={self.side_scale}, box_mm={self.box_mm})"


# === Preview ===

def to_uint8(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """An image as 8 bits for display: `low` percentile -> 0, `high` -> 255."""
    return np.round(_normalize01(np.asarray(image, np.float32), low, high) * 255.0).astype(np.uint8)


def draw_box_png(path: str | Path, image: np.ndarray, box: Box | Iterable[Box], label: str | None = None,
                 *, colors: Sequence[tuple[int, int, int]] = ((0, 0, 255), (0, 255, 0))) -> Path:
    """Write an 8-bit PNG of `image` with `box` (or several boxes, one colour each, BGR) and
    an optional `label` drawn on it (for `--roi-preview`). Written atomically."""
    image = image_2d(image, "draw_box_png's input", min_side=1, path=path)
    canvas = cv2.cvtColor(to_uint8(image), cv2.COLOR_GRAY2BGR)
    h, w = image.shape
    thickness = max(1, round(max(h, w) / 300))
    boxes = [box] if isinstance(box, Box) else list(box)
    for i, b in enumerate(boxes):
        cv2.rectangle(canvas, (int(round(b.x0)), int(round(b.y0))), (int(round(b.x1)) - 1, int(round(b.y1)) - 1),
                      colors[i % len(colors)], thickness)
    if label:
        scale = max(0.4, max(h, w) / 800)
        cv2.putText(canvas, label, (4 * thickness, int(24 * scale) + 2 * thickness), cv2.FONT_HERSHEY_SIMPLEX,
                    scale, colors[0], thickness, cv2.LINE_AA)
    ok, data = cv2.imencode(".png", canvas)
    if not ok:
        raise InputError(path, "OpenCV could not encode the preview PNG")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())
    return Path(path)


__all__ = ["Box", "iou", "mean_iou", "square_box_around", "load_boxes", "read_boxes", "BoxesResult", "write_boxes",
           "check_box_fits",
           "crop_box", "classical_roi", "find_joint", "JointFinding", "ClassicalConfig", "DEFAULT_CLASSICAL", "RoiNotFoundError",
           "RoiSource", "RoiFinding", "find_roi", "CsvRoi", "FixedRoi", "ClassicalRoi", "draw_box_png", "to_uint8",
           "CLASSICAL_SIDE_SCALE", "CLASSICAL_BOX_MM", "radiograph_spacing", "CLASSICAL_FLAG_BELOW", "CLASSICAL_VERSION"]
