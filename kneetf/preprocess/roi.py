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

def _otsu3(values: np.ndarray, bins: int = 128) -> tuple[float, float]:
    """The two thresholds of a 3-class Otsu split (background, soft tissue, bone) of values in
    [0, 1]: the pair maximising the between-class variance of the histogram."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(1, hist.sum())
    centres = (edges[:-1] + edges[1:]) / 2.0
    w = np.concatenate([[0.0], np.cumsum(p)])            # w[i] = mass of bins [0, i)
    m = np.concatenate([[0.0], np.cumsum(p * centres)])  # first moment of bins [0, i)
    i, j = np.meshgrid(np.arange(1, bins), np.arange(1, bins), indexing="ij")
    valid = j > i
    w0, w1, w2 = w[i], w[j] - w[i], 1.0 - w[j]
    m0, m1, m2 = m[i], m[j] - m[i], m[-1] - m[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        score = sum(np.where(wk > 0, mk ** 2 / wk, 0.0) for wk, mk in ((w0, m0), (w1, m1), (w2, m2)))
    score = np.where(valid, score, -np.inf)
    a, b = np.unravel_index(int(np.argmax(score)), score.shape)
    return float(edges[i[a, b]]), float(edges[j[a, b]])


def _normalize01(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    lo, hi = np.percentile(image, [low, high])
    if hi - lo <= 1e-12:
        return np.zeros(image.shape, np.float32)
    return np.clip((image.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of the True runs of a 1-D boolean array."""
    padded = np.concatenate([[False], mask.astype(bool), [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def _run_containing(mask: np.ndarray, x: int) -> tuple[int, int] | None:
    """The True run of `mask` that contains `x`, else the nearest one."""
    runs = _runs(mask)
    if not runs:
        return None
    return min(runs, key=lambda r: 0 if r[0] <= x < r[1] else min(abs(r[0] - x), abs(r[1] - 1 - x)))


def classical_roi(image: np.ndarray, *, side_scale: float = CLASSICAL_SIDE_SCALE, work_size: int = 256) -> Box:
    """A square box on the knee joint found without learning (numpy/OpenCV).

    1. The image is shrunk to `work_size`, robustly normalised and smoothed.
    2. Bone is the brightest class of a 3-class Otsu split (background, soft tissue, bone).
       The knee's columns are the run of bone-bearing columns around the boniest one (on a
       bilateral image: the knee with more bone).
    3. In the central half of those columns, the row profile's deepest valley between two
       bright bands (femur above, tibia below) is the joint space: the box centre row.
    4. The bone width next to the joint (the condyles and the tibial plateau, the widest rows
       there) gives the box centre column and its side (`side_scale` x width).

    A degenerate image (constant, no bone found) gives a centred box of half the short side,
    with a warning.
    """
    image = image_2d(image, "classical_roi's input", min_side=8)
    h, w = image.shape
    fallback = square_box_around(w / 2.0, h / 2.0, min(h, w) / 2.0)
    f = min(1.0, work_size / max(h, w))
    small = image.astype(np.float32)
    if f < 1.0:
        small = cv2.resize(small, (max(8, round(w * f)), max(8, round(h * f))), interpolation=cv2.INTER_AREA)
    sh, sw = small.shape
    fy, fx = sh / h, sw / w
    norm = _normalize01(small)
    if not norm.any():
        log.warning("classical_roi: constant image; using a centred box")
        return fallback
    sigma = max(1.0, 0.006 * max(sh, sw))
    smooth = cv2.GaussianBlur(norm, (0, 0), sigma)

    # 2. bone mask and the knee's columns
    _, t_bone = _otsu3(smooth)
    bone = smooth > t_bone
    colfrac = cv2.GaussianBlur(bone.mean(axis=0).astype(np.float32)[None, :], (0, 0), sigma)[0]
    if colfrac.max() <= 0:
        log.warning("classical_roi: no bone found; using a centred box")
        return fallback
    run = _run_containing(colfrac > 0.5 * colfrac.max(), int(np.argmax(colfrac)))
    xa, xb = run
    xc = (xa + xb) / 2.0
    quarter = max(1.0, (xb - xa) / 4.0)
    band = slice(int(max(0, xc - quarter)), int(min(sw, xc + quarter + 1)))

    # 3. joint space: the deepest valley between two bright bands of the row profile
    profile = smooth[:, band].mean(axis=1)
    window = max(3, int(round(0.15 * sh)))
    margin = max(1, int(round(0.05 * sh)))
    best_y, best_score = sh // 2, -np.inf
    for y in range(margin, sh - margin):
        above = profile[max(0, y - window):y].max()
        below = profile[y + 1:y + 1 + window].max()
        score = min(above, below) - profile[y]
        if score > best_score:
            best_y, best_score = y, score
    # the valley's centre: the middle of the rows within 10% of its depth
    lo = best_y
    depth = best_score
    while lo > 0 and profile[lo - 1] - profile[best_y] < 0.1 * depth:
        lo -= 1
    hi = best_y
    while hi < sh - 1 and profile[hi + 1] - profile[best_y] < 0.1 * depth:
        hi += 1
    cy = (lo + hi + 1) / 2.0

    # 4. knee width: bone extent in rows next to the joint space
    reach = max(2, int(round(0.08 * sh)))
    widths, centres = [], []
    rows = list(range(max(0, lo - reach), lo)) + list(range(hi + 1, min(sh, hi + 1 + reach)))
    for y in rows:
        r = _run_containing(bone[y], int(xc))
        if r is not None and r[1] - r[0] > 1:
            widths.append(r[1] - r[0])
            centres.append((r[0] + r[1]) / 2.0)
    if widths:
        # the widest rows are the condyles and the tibial plateau; a high percentile, not the
        # maximum, so that one noisy row does not set the side
        widths_ = np.asarray(widths, np.float64)
        width = float(np.percentile(widths_, 90))
        cx = float(np.median(np.asarray(centres)[widths_ >= np.percentile(widths_, 50)]))
    else:
        width, cx = float(xb - xa), xc
    side = side_scale * width
    return square_box_around(cx / fx, cy / fy, side / max(fx, fy))


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
