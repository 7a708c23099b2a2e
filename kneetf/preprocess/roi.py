"""The knee-joint ROI: a square box centred on the joint space, from a CSV, a detector or a
classical fallback.

The paper crops the joint with YOLOv2. Here a box comes from one of these `RoiSource`s:

- `CsvRoi`: user boxes, a CSV `id,x0,y0,x1,y1` (`load_boxes`);
- `DetectorRoi` (in `kneetf.preprocess.roi_detector`): the small Keras detector
  `kneetf train-roi` trains;
- `ClassicalRoi`: no learning, numpy/OpenCV only (`classical_roi`): the joint space is the
  darkest horizontal band between the two bright bones, and the box side is proportional to
  the knee width;
- `FixedRoi`: one box for every X-ray.

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
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence, runtime_checkable

import cv2
import numpy as np

from kneetf.errors import InputError, ManifestError
from kneetf.io.atomic import atomic_path
from kneetf.preprocess.image import image_2d

log = logging.getLogger(__name__)

BOX_COLUMNS = ("id", "x0", "y0", "x1", "y1")
PAD_MODES = ("constant", "edge")

#: Box side / knee width (bone extent next to the joint space) of the classical fallback:
#: 1.44 +- 0.10 measured on 100 built-in synthetic knees (100 mm boxes); a joint box that
#: holds the condyles and the tibial plateau with a margin is of this order on real X-rays.
CLASSICAL_SIDE_SCALE = 1.45
#: Box side of the classical fallback when the X-ray's pixel spacing is known: the built-in
#: synthetic knees are cropped to 100 mm boxes (96-100 mm is the usual joint box).
CLASSICAL_BOX_MM = 100.0


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

def load_boxes(path: str | Path) -> dict[str, Box]:
    """Read a boxes CSV with header `id,x0,y0,x1,y1` (extra columns ignored).

    Coordinates are finite numbers with x1 > x0 and y1 > y0; ids are unique. Errors name the
    file and the line.
    """
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
    boxes: dict[str, Box] = {}
    first_line: dict[str, int] = {}
    for line, row in enumerate(rows, 2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise ManifestError(path, line, f"expected {len(header)} fields, got {len(row)}")
        case_id = row[col["id"]].strip()
        if not case_id:
            raise ManifestError(path, line, "empty id")
        if case_id in boxes:
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
        boxes[case_id] = box
        first_line[case_id] = line
    if not boxes:
        raise ManifestError(path, None, "no boxes (the CSV has a header only)")
    return boxes


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

def crop_box(image: np.ndarray, box: Box, *, pad_mode: str = "constant") -> np.ndarray:
    """Crop the square around `box` (`box.square()`, rounded to whole pixels) from `image`
    (H, W) or (H, W, C).

    Parts of the square outside the image are filled with the image minimum
    (`pad_mode="constant"`) or the nearest edge pixel (`"edge"`), so a box partly outside
    the image still gives a full square crop. A box entirely outside is refused.
    """
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}. Received: pad_mode={pad_mode!r}")
    image = np.asarray(image)
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(None, f"crop_box needs an (H, W) or (H, W, C) image. Received shape {image.shape}")
    h, w = image.shape[:2]
    sq = box.square()
    side = max(1, int(round(sq.width)))
    x0 = int(math.floor(sq.cx - side / 2.0 + 0.5))
    y0 = int(math.floor(sq.cy - side / 2.0 + 0.5))
    x1, y1 = x0 + side, y0 + side
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if ix0 >= ix1 or iy0 >= iy1:
        raise InputError(None, f"the ROI box {tuple(round(v, 1) for v in box.as_tuple())} lies outside "
                         f"the {w}x{h} image")
    inner = image[iy0:iy1, ix0:ix1]
    pad = [(iy0 - y0, y1 - iy1), (ix0 - x0, x1 - ix1)] + [(0, 0)] * (image.ndim - 2)
    if not any(p for pair in pad for p in pair):
        return inner.copy()
    if pad_mode == "edge":
        return np.pad(inner, pad, mode="edge")
    return np.pad(inner, pad, mode="constant", constant_values=image.min())


# === Classical fallback ===

class RoiNotFoundError(InputError):
    """The classical fallback is not sure where the knee joint is; `reason` says why. A batch
    job lists the file as failed instead of cropping the wrong place."""


@dataclass(frozen=True)
class JointFinding:
    """What `find_joint` found: the box and how sure it is.

    `confidence` in [0, 1]: 1 - (score of the best other place) / (score of this one),
    scaled down when the joint space is faint; `knee_width` is the bone width next to the
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
    angles: tuple[float, ...] = (-8.0, -4.0, 0.0, 4.0, 8.0)
    #: knee widths tried, as fractions of the image's short side (spacing unknown)
    width_range: tuple[float, float] = (0.14, 0.85)
    #: knee widths tried in millimetres when the pixel spacing is known (also the accepted range)
    width_range_mm: tuple[float, float] = (35.0, 150.0)
    num_widths: int = 9
    #: joint-space window: height, and each compartment's columns (from, to) off the centre, x W
    gap_height: float = 0.05
    bone_height: float = 0.16
    compartment: tuple[float, float] = (0.13, 0.42)
    #: least fraction of usable (not masked) pixels in every window
    min_coverage: float = 0.75
    #: refuse when the joint space is shallower than this many noise sigmas
    min_contrast: float = 4.0
    #: a joint space's level, from the 2nd (0) to the 98th (1) percentile of the image, at least
    min_gap_level: float = 0.25
    #: the brightest of the four bone windows over the darkest, at most
    max_bone_ratio: float = 2.0
    #: a place on a straight edge this many times as long as the knee is wide is not a joint
    edge_length: float = 1.5
    #: best-scoring places checked
    max_candidates: int = 40
    #: the score of a knee width W is its depth x (W / smallest W) ** width_weight (a deeper
    #: joint space over a wider knee is the likelier)
    width_weight: float = 0.5
    #: refuse when another place scores this fraction of the best, if it is off the best's
    #: joint line by distinct[0] x W, or along it by distinct[1] x W (another knee)
    ambiguity: float = 0.8
    distinct: tuple[float, float] = (0.35, 1.0)
    #: condylar / plateau width ratio accepted
    width_ratio: tuple[float, float] = (0.7, 1.45)
    #: joint-space width / knee width searched, when both ends of the joint space are hidden
    extent_ratio: float = 0.9
    #: least fraction of the box on usable pixels of the image
    min_inside: float = 0.35


DEFAULT_CLASSICAL = ClassicalConfig()


def _normalize01(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    lo, hi = np.percentile(image, [low, high])
    if hi - lo <= 1e-12:
        return np.zeros(image.shape, np.float32)
    return np.clip((image.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def _noise_sigma(v: np.ndarray) -> float:
    """Robust noise sigma of an image: the MAD of its difference to a 3x3 median."""
    step = max(1, int(math.sqrt(v.size / 65536)))
    d = (v - cv2.medianBlur(v.astype(np.float32), 3))[::step, ::step]
    return float(1.4826 * np.median(np.abs(d - np.median(d)))) + 1e-6


def _artefact_mask(image: np.ndarray, work_shape: tuple[int, int]) -> np.ndarray:
    """Pixels of the working image to ignore: pieces of the brightest, saturated level that
    stand out sharply from what surrounds them, where lead markers and letters, burned-in
    text, rulers and unexposed collimated areas sit. Found at (up to) full resolution, where
    thin strokes are still saturated; the top of a bone clipped by the display processing is
    kept (its surroundings are nearly as bright). A working pixel is masked when any of its
    pixels is."""
    h, w = image.shape
    f = min(1.0, 1024.0 / max(h, w))
    img = image.astype(np.float32)
    if f < 1.0:
        img = cv2.resize(img, (max(8, round(w * f)), max(8, round(h * f))), interpolation=cv2.INTER_AREA)
    lo, hi = (float(q) for q in np.percentile(img[::2, ::2], [0.05, 99.95]))
    if hi <= lo:
        return np.zeros(work_shape, bool)
    v = (img - lo) / (hi - lo)
    tol = max(0.04, 3.0 * _noise_sigma(v))
    sat = (v >= 1.0 - tol).astype(np.uint8)
    n, labels = cv2.connectedComponents(sat, connectivity=8)
    if n <= 1:
        return np.zeros(work_shape, bool)
    # the mean level of a 2-pixel ring around each piece
    grown = cv2.dilate(labels.astype(np.float32), np.ones((5, 5), np.uint8)).astype(np.int32)
    ring = (sat == 0) & (grown > 0)
    counts = np.bincount(grown[ring], minlength=n)
    level = np.bincount(grown[ring], weights=v[ring], minlength=n) / np.maximum(counts, 1)
    keep = (counts > 0) & (level < 1.0 - max(0.15, 3.0 * tol))
    keep[0] = False
    mask = keep[labels].astype(np.float32)
    return cv2.resize(mask, (work_shape[1], work_shape[0]), interpolation=cv2.INTER_AREA) > 0


def _rotate(v: np.ndarray, valid: np.ndarray, angle: float
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`v` and `valid` rotated by `angle` degrees about the centre on a canvas that holds the
    whole image, the canvas pixels inside the image, and the 2x3 matrix mapping original to
    rotated coordinates."""
    h, w = v.shape
    if angle == 0.0:
        return v, valid, np.ones((h, w), np.uint8), np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(math.ceil(h * sin + w * cos)), int(math.ceil(h * cos + w * sin))
    m[0, 2] += nw / 2.0 - w / 2.0
    m[1, 2] += nh / 2.0 - h / 2.0
    rv = cv2.warpAffine(v, m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=0.0)
    rm = cv2.warpAffine(valid, m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=0.0)
    inside = cv2.warpAffine(np.ones((h, w), np.float32), m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=0.0)
    return rv, rm, (inside > 0.99).astype(np.uint8), m


def _joint_response(v: np.ndarray, valid: np.ndarray, inside: np.ndarray, width: float,
                    cfg: ClassicalConfig) -> np.ndarray:
    """The joint-space score of every pixel as the centre of a knee `width` pixels wide: in
    each compartment (medial and lateral windows), how much darker a thin horizontal band is
    than the bone above and the bone below it; the weaker compartment counts. -inf where a
    window leaves the image (`inside`) or has too few usable (`valid`) pixels."""
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

    bone_v, bone_m, gap_v, gap_m = sums(vp, hb), sums(mp, hb), sums(vp, g), sums(mp, g)
    bands = {"above": (bone_v, bone_m, top - hb, hb), "gap": (gap_v, gap_m, top, g),
             "below": (bone_v, bone_m, top + g, hb)}
    score = None
    for c0 in (-co, ci):
        means = {}
        bad = np.zeros((h, w), bool)
        for name, (sv, sm, r0, height) in bands.items():
            rows, cols = slice(pad + r0, pad + r0 + h), slice(pad + c0, pad + c0 + w)
            count = sm[rows, cols]
            bad |= count < cfg.min_coverage * height * cw
            means[name] = sv[rows, cols] / np.maximum(count, 1e-6)
        s = np.minimum(means["above"], means["below"]) - means["gap"]
        s[bad] = -np.inf
        score = s if score is None else np.minimum(score, s)
    # every window inside the image: erode with their bounding rectangle
    kernel = np.ones((g + 2 * hb, 2 * co), np.uint8)
    whole = cv2.erode(inside, kernel, anchor=(co, hb - top), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    score[whole == 0] = -np.inf
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


def _straight_edges(v: np.ndarray, max_tilt: float = 25.0) -> np.ndarray:
    """Long straight, roughly horizontal edges of the working image (collimation edges, plate
    and ruler edges): an (n, 4) array of segments x0, y0, x1, y1."""
    u8 = np.round(np.clip(v, 0.0, 1.0) * 255.0).astype(np.uint8)
    edges = cv2.Canny(u8, 30, 90, L2gradient=True)
    short = min(v.shape)
    lines = cv2.HoughLinesP(edges, 1, np.pi / 360, threshold=max(8, int(0.1 * short)),
                            minLineLength=max(8, int(0.2 * short)), maxLineGap=3)
    if lines is None:
        return np.zeros((0, 4), np.float64)
    seg = lines.reshape(-1, 4).astype(np.float64)
    tilt = np.degrees(np.arctan2(np.abs(seg[:, 3] - seg[:, 1]), np.abs(seg[:, 2] - seg[:, 0])))
    return seg[tilt <= max_tilt]


def _on_long_edge(segments: np.ndarray, x: float, y: float, width: float, cfg: ClassicalConfig) -> bool:
    """Whether a straight edge longer than the knee (`cfg.edge_length` x width) runs through the
    joint windows around (x, y): then the 'joint space' is a collimation or plate edge."""
    if not len(segments):
        return False
    x0, y0, x1, y1 = segments.T
    dx, dy = x1 - x0, y1 - y0
    length = np.hypot(dx, dy)
    t = ((x - x0) * dx + (y - y0) * dy) / np.maximum(length ** 2, 1e-9)  # position along the segment
    off = np.abs((x - x0) * dy - (y - y0) * dx) / np.maximum(length, 1e-9)  # distance to its line
    reach = (cfg.gap_height / 2 + cfg.bone_height) * width
    margin = 0.5 * width / np.maximum(length, 1e-9)
    hit = (length >= cfg.edge_length * width) & (off <= reach) & (t >= -margin) & (t <= 1 + margin)
    return bool(hit.any())


@dataclass(frozen=True)
class _Candidate:
    """A place scored by the joint search: (x, y) in working pixels, the search map it came
    from and its (rx, ry) there."""

    score: float
    depth: float
    x: float
    y: float
    width: float
    angle: float
    map_index: int
    rx: int
    ry: int


def _peaks(score: np.ndarray, radius: int, k: int = 3) -> list[tuple[float, int, int]]:
    """The `k` highest local maxima (value, y, x) of `score`, at least `radius` apart."""
    finite = np.where(np.isfinite(score), score, -1e9).astype(np.float32)
    size = 2 * max(1, radius) + 1
    dil = cv2.dilate(finite, cv2.getStructuringElement(cv2.MORPH_RECT, (size, size)))
    ys, xs = np.nonzero((finite >= dil) & (finite > 0))
    order = np.argsort(-finite[ys, xs])[:k]
    return [(float(finite[ys[i], xs[i]]), int(ys[i]), int(xs[i])) for i in order]


def _joint_extent(rv: np.ndarray, rm: np.ndarray, x: int, y: int, width: float,
                  cfg: ClassicalConfig) -> tuple[float | None, float | None] | None:
    """The left and right ends (columns) of the joint space through (x, y) of the (rotated)
    working image: from the centre outwards, the columns where the band at row `y` is darker
    than the bone above and below it by at least a quarter of the compartments' typical
    depth (short breaks, such as the intercondylar notch, are bridged). An end hidden by the
    image border or a masked marker is None; None when the compartments show no joint space."""
    h, w = rv.shape
    g = max(2, int(round(cfg.gap_height * width)))
    hb = max(3, int(round(cfg.bone_height * width)))
    top = y - g // 2
    reach = int(round(1.1 * width))
    c0, c1 = max(0, x - reach), min(w, x + reach + 1)
    k = max(1, int(round(0.02 * width)))

    def band(r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        r0, r1 = max(0, r0), min(h, r1)
        if r1 <= r0:
            return np.zeros(c1 - c0), np.zeros(c1 - c0, bool)
        wsum = rm[r0:r1, c0:c1].sum(axis=0)
        vsum = (rv[r0:r1, c0:c1] * rm[r0:r1, c0:c1]).sum(axis=0)
        wsum, vsum = (cv2.blur(a[None, :].astype(np.float32), (2 * k + 1, 1))[0] for a in (wsum, vsum))
        return vsum / np.maximum(wsum, 1e-6), wsum >= 0.5 * (r1 - r0)

    above, ok_a = band(top - hb, top)
    below, ok_b = band(top + g, top + g + hb)
    # the darkest row of the band (and a little around it) per column: a curved joint line
    rows = [band(r, r + 1) for r in range(top - g // 2, top + g + g // 2)]
    gap = np.min([np.where(r[1], r[0], np.inf) for r in rows], axis=0)
    ok = ok_a & ok_b & (np.mean([r[1] for r in rows], axis=0) >= 0.5)
    depth = np.where(ok, np.minimum(above, below) - gap, -np.inf)
    ci, co = (int(round(f_ * width)) for f_ in cfg.compartment)
    centre = x - c0
    idx = np.arange(depth.size)
    comp = ok & (np.abs(idx - centre) >= ci) & (np.abs(idx - centre) < co)
    if not comp.any():
        return None
    ref = float(np.median(depth[comp]))
    if ref <= 0:
        return None
    inside = depth > 0.25 * ref
    unknown = ~ok
    bridge = max(1, int(round(0.1 * width)))
    edges: list[float | None] = []
    for direction in (-1, 1):
        last, miss, edge = None, 0, None
        for d in range(0, reach + 1):
            i = centre + direction * d
            if not 0 <= i < depth.size or unknown[i]:
                break  # the edge is hidden (image border, a marker): not measured
            if inside[i]:
                last, miss = i, 0
            elif d > ci:
                miss += 1
                if miss > bridge:
                    edge = last
                    break
        edges.append(None if edge is None else edge + c0 + (1.0 if direction > 0 else 0.0))
    return edges[0], edges[1]


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

    Raises `RoiNotFoundError` (naming `source`) whenever a step is unsure; an image that is
    not 2-D or smaller than 8x8 raises `InputError`.
    """
    image = image_2d(image, "the classical ROI's input", min_side=8, path=source)
    spacing = _as_spacing(pixel_spacing)
    h, w = image.shape
    f = min(1.0, config.work_size / max(h, w))
    small = image.astype(np.float32)
    if f < 1.0:
        small = cv2.resize(small, (max(8, round(w * f)), max(8, round(h * f))), interpolation=cv2.INTER_AREA)
    sh, sw = small.shape
    fy, fx = sh / h, sw / w
    v = _normalize01(small, 0.05, 99.95)
    if not v.any():
        raise RoiNotFoundError(source, "no knee found: the image is constant")
    sigma = _noise_sigma(v)
    valid = ~_artefact_mask(image, v.shape)
    if valid.mean() < 0.2:
        raise RoiNotFoundError(source, f"no knee found: only {valid.mean():.0%} of the image is exposed")
    v = cv2.GaussianBlur(v, (0, 0), 0.7)

    # 2. joint-space scores over widths and tilts
    if spacing is not None:
        lo, hi = (mm / spacing * f for mm in config.width_range_mm)
    else:
        lo, hi = (r * min(sh, sw) for r in config.width_range)
    widths = np.geomspace(lo, hi, config.num_widths)
    candidates: list[_Candidate] = []
    maps = []
    for angle in config.angles:
        rv, rm, inside, m = _rotate(v, valid.astype(np.float32), angle)
        inv = cv2.invertAffineTransform(m)
        for width in widths:
            if width < 10:
                continue
            response = _joint_response(rv, rm, inside, width, config)
            maps.append((rv, rm, inv))
            weight = (width / widths[0]) ** config.width_weight
            for value, y, x in _peaks(response, int(round(0.3 * width))):
                ox, oy = inv @ np.array([x + 0.5, y + 0.5, 1.0])
                candidates.append(_Candidate(value * weight, value, float(ox), float(oy), float(width), float(angle),
                                             len(maps) - 1, x, y))
    if not candidates:
        raise RoiNotFoundError(source, "no joint space found (no dark band between two bright bones)")
    candidates.sort(key=lambda c: -c.score)
    # a joint space lies inside the leg (never as dark as direct exposure) between bones of
    # similar brightness; the best place passing that is the knee
    p2, p98 = (float(q) for q in np.percentile(v[valid], [2, 98]))
    span = max(p98 - p2, 1e-6)

    segments = _straight_edges(v)

    def plausible(c: _Candidate) -> bool:
        if _on_long_edge(segments, c.x, c.y, c.width, config):
            return False
        rv, rm, _ = maps[c.map_index]
        levels = _window_levels(rv, rm, c.rx, c.ry, c.width, config)
        bones = levels[[0, 2]]
        return bool((np.nanmax(levels[1]) - p2) / span >= config.min_gap_level
                    and np.nanmax(bones) <= config.max_bone_ratio * max(np.nanmin(bones), 1e-6))

    kept = [c for c in candidates[:config.max_candidates] if plausible(c)]
    if not kept:
        raise RoiNotFoundError(source, "no joint space found (no dark band inside the leg between two bright "
                               "bones)")
    candidates = kept
    best = candidates[0]
    width, angle, rx, ry = best.width, best.angle, best.rx, best.ry
    contrast = best.depth / sigma
    if contrast < config.min_contrast:
        raise RoiNotFoundError(source, f"low contrast: the joint space is {contrast:.1f} noise sigmas deep "
                               f"(at least {config.min_contrast} needed)")
    # 3. one knee: no other joint line (off this one's line, or beside this knee) scores nearly as well
    rv, rm, inv = maps[best.map_index]
    along, normal = inv[:, 0], inv[:, 1]
    rival = None
    for c in candidates[1:]:
        d = np.array([c.x - best.x, c.y - best.y])
        if abs(d @ normal) > config.distinct[0] * width or abs(d @ along) > config.distinct[1] * width:
            rival = c
            break
    if rival is not None and rival.score >= config.ambiguity * best.score:
        raise RoiNotFoundError(source, f"two candidate knee joints of similar score ({best.score:.3f} at "
                               f"({best.x / fx:.0f}, {best.y / fy:.0f}) px, {rival.score:.3f} at "
                               f"({rival.x / fx:.0f}, {rival.y / fy:.0f}) px)")

    # 4. the width of the joint space
    extent = _joint_extent(rv, rm, rx, ry, width, config)
    if extent is None:
        raise RoiNotFoundError(source, "no joint space found between the condyles and the tibial plateau")
    left, right = extent
    if left is not None and right is not None:
        knee_w, mid = right - left, (left + right) / 2.0
    elif left is not None or right is not None:  # one end hidden: the other, mirrored about the centre
        knee_w, mid = 2.0 * abs((left if left is not None else right) - (rx + 0.5)), rx + 0.5
    else:
        knee_w, mid = config.extent_ratio * width, rx + 0.5
    if not 0.5 * width <= knee_w <= 2.0 * width:
        raise RoiNotFoundError(source, f"the joint space's width ({knee_w / f:.0f} px) does not match the knee "
                               f"found ({width / f:.0f} px)")
    ox, oy = inv @ np.array([mid, ry + 0.5, 1.0])
    cx, cy = ox / fx, oy / fy
    knee_w_full = knee_w / f
    if spacing is not None:
        knee_mm = knee_w_full * spacing
        lo_mm, hi_mm = config.width_range_mm
        if not lo_mm <= knee_mm <= hi_mm:
            raise RoiNotFoundError(source, f"the knee found is {knee_mm:.0f} mm wide at the joint, not in the "
                                   f"plausible {lo_mm:.0f}-{hi_mm:.0f} mm (pixel spacing {spacing:g} mm)")
        side = box_mm / spacing
    else:
        side = side_scale * knee_w_full
    if side < 24 or side > 1.05 * max(h, w):
        raise RoiNotFoundError(source, f"the box found ({side:.0f} px) is too small or too large for the "
                               f"{w}x{h} image")
    box = square_box_around(cx, cy, side)
    # the box must lie mostly on usable pixels of the image
    inside = box.clip(w, h)
    if inside.area > 0:
        sx0, sy0 = int(inside.x0 * fx), int(inside.y0 * fy)
        sx1, sy1 = max(sx0 + 1, int(math.ceil(inside.x1 * fx))), max(sy0 + 1, int(math.ceil(inside.y1 * fy)))
        usable = float(valid[sy0:sy1, sx0:sx1].mean()) * inside.area / box.area
    else:
        usable = 0.0
    if usable < config.min_inside:
        raise RoiNotFoundError(source, f"the box found is at the edge of the exposed field ({usable:.0%} of it "
                               f"on usable pixels)")
    ratio = rival.score / best.score if rival is not None else 0.0
    confidence = float(np.clip(1.0 - ratio, 0.0, 1.0) * min(1.0, contrast / (3 * config.min_contrast)))
    return JointFinding(box=box, confidence=confidence, knee_width=knee_w_full, angle=float(angle),
                        contrast=float(contrast))


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
    """Anything that gives the ROI box of a case's X-ray (full image, display-ready)."""

    def box_for(self, case_id: str, image: np.ndarray) -> Box:
        ...


class CsvRoi:
    """Boxes read from a CSV `id,x0,y0,x1,y1` (or given as a dict)."""

    def __init__(self, boxes: str | Path | Mapping[str, Box]) -> None:
        if isinstance(boxes, (str, Path)):
            self.path: Path | None = Path(boxes)
            self.boxes = load_boxes(boxes)
        else:
            self.path = None
            self.boxes = dict(boxes)

    def box_for(self, case_id: str, image: np.ndarray) -> Box:
        """The CSV's box of `case_id`; an InputError names the CSV when it has none."""
        try:
            return self.boxes[case_id]
        except KeyError:
            raise InputError(self.path, f"no ROI box for id {case_id!r}") from None

    def __repr__(self) -> str:
        return f"CsvRoi({str(self.path) if self.path else f'{len(self.boxes)} boxes'})"


class FixedRoi:
    """The same box for every X-ray."""

    def __init__(self, box: Box) -> None:
        self.box = box

    def box_for(self, case_id: str, image: np.ndarray) -> Box:
        return self.box

    def __repr__(self) -> str:
        return f"FixedRoi({self.box.as_tuple()})"


class ClassicalRoi:
    """The classical fallback (`classical_roi`); no TensorFlow, picklable."""

    def __init__(self, side_scale: float = CLASSICAL_SIDE_SCALE) -> None:
        self.side_scale = float(side_scale)

    def box_for(self, case_id: str, image: np.ndarray) -> Box:
        return classical_roi(image, side_scale=self.side_scale)

    def __repr__(self) -> str:
        return f"ClassicalRoi(side_scale={self.side_scale})"


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


__all__ = ["Box", "iou", "mean_iou", "square_box_around", "load_boxes", "write_boxes", "crop_box",
           "classical_roi", "RoiSource", "CsvRoi", "FixedRoi", "ClassicalRoi", "draw_box_png", "to_uint8",
           "CLASSICAL_SIDE_SCALE"]
