"""Knee radiographs as hospitals store them, simulated from the built-in synthetic knees.

A clean PA knee X-ray (the attenuation line integral of `kneetf.data.synthetic`) goes through
what an acquisition and a vendor's processing do to it, with the joint box carried along:

1. Geometry: a pixel spacing, an image size and aspect, the joint anywhere in the image (the
   box may leave it), an in-plane rotation; a part of the other knee at a side (the half of
   a bilateral view).
2. Objects on the detector: lead L/R letters (several fonts, sizes, frames, hollow ones),
   lead rulers, anywhere in the exposed field, on soft tissue too (never on the joint).
3. Exposure: rectangular collimation (possibly tilted; scatter outside, a penumbra),
   unexposed borders, the heel effect, quantum noise, detector blur.
4. Processing: an automatic window, dynamic-range compression, edge enhancement (unsharp
   masking), a gamma or sigmoid LUT, optionally CLAHE; the outside of the collimation left
   bright, blanked dark or grey (electronic shutters); burned-in text labels.
5. Storage: 8, 12 or 16 bits, MONOCHROME2 or MONOCHROME1 (stored inverted; `read_xray`
   inverts it back).

The truth is the square box of `roi_mm` centred on the joint (the point `joint_box` centres
its box on), in pixel coordinates of the stored image: `[x0, x1) x [y0, y1)`, pixel `i`
spanning `[i, i + 1)`, as `kneetf.preprocess.roi.Box`.

A `RadiographStyle` holds the ranges every random choice is drawn from. `STYLES` names them:
`train` is what `kneetf train-roi` learns from; the others are HELD-OUT styles whose
settings training never uses (other marker fonts and sizes, spacings, collimation and
processing, stronger rotation), and `HELDOUT_SETS` fixes their sizes and seeds. Drawing is
split in two: `sample_acquisition` makes every random choice (cheap; it gives the box),
`render_radiograph` renders it (deterministic). numpy/OpenCV only: no TensorFlow.

    >>> r = simulate(0, 3, "clinic")            # image 500 x 600, 0.3 mm, a 96 mm truth box
    >>> r.image.dtype, r.photometric, r.box
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from kneetf.config import from_dict
from kneetf.data.synthetic import KneeParams, SynthConfig, sample_params, xray_line_integral
from kneetf.errors import ConfigError, lookup
from kneetf.preprocess.roi import Box, square_box_around

#: OpenCV's Hershey fonts by name (`FONT_ITALIC` is a flag added to any of them).
FONTS = {"simplex": cv2.FONT_HERSHEY_SIMPLEX, "plain": cv2.FONT_HERSHEY_PLAIN, "duplex": cv2.FONT_HERSHEY_DUPLEX,
         "complex": cv2.FONT_HERSHEY_COMPLEX, "triplex": cv2.FONT_HERSHEY_TRIPLEX,
         "complex_small": cv2.FONT_HERSHEY_COMPLEX_SMALL, "script_simplex": cv2.FONT_HERSHEY_SCRIPT_SIMPLEX,
         "script_complex": cv2.FONT_HERSHEY_SCRIPT_COMPLEX}
MARKER_KINDS = ("plain", "framed", "hollow")
OUTSIDE_STYLES = ("bright", "dark", "grey")
LUTS = ("gamma", "sigmoid")
BIT_DEPTHS = (8, 10, 12, 14, 16)
#: words burned into the image by the modality or the PACS (training and held-out vocabularies)
TRAIN_LABELS = ("PA", "STANDING", "WB", "KNEE", "R", "L", "FLEX", "AP", "BILAT", "2019-03-12", "ID 0042117")
HELDOUT_LABELS = ("POST-ANT", "DEBOUT", "WEIGHT BEARING", "ROSENBERG", "SX", "DX", "CR 14x17", "12/11/2021",
                  "ACC 88213", "HOSP. GEN.", "kVp 65 mAs 8")
#: mm of the rendering grid never finer than this (the phantom is smooth; finer costs time)
MIN_RENDER_MM = 0.3
#: attenuation line integral above which a pixel is anatomy (direct beam: 0; a knee: 2-4)
BODY_LINE_INTEGRAL = 0.5
#: stream index of the acquisition's random draws (apart from the knee's, so that a paired
#: MRI is the one `kneetf synth` writes for the same seed and index)
ACQUISITION_STREAM = 0xAC0


Range = tuple[float, float]


@dataclass(frozen=True)
class RadiographStyle:
    """Ranges of every random choice of one acquisition style. Lengths in mm, angles in
    degrees; a `Range` is drawn uniformly (log-uniformly for `pixel_mm`, `field_mm`,
    `photons`); a probability `p_*` switches a feature on per image.
    """

    name: str = "train"
    # --- geometry ---
    #: pixel spacing (square pixels), log-uniform
    pixel_mm: Range = (0.14, 0.6)
    #: longer side of the field of view, log-uniform, and its width / height
    field_mm: Range = (140.0, 440.0)
    aspect: Range = (0.7, 1.4)
    #: exact (rows, cols); overrides `field_mm` and `aspect`
    size: tuple[int, int] | None = None
    #: simulate at a coarser spacing when the longer side would exceed this (None: never)
    max_side: int | None = None
    #: side of the truth box (None: the `SynthConfig`'s `roi_mm`)
    roi_mm: float | None = None
    #: the joint centre lies at least this fraction of the box side inside the image
    edge_margin: float = 0.3
    #: in-plane rotation: |angle| drawn uniformly in this range, either sign
    rotation_deg: Range = (0.0, 12.0)
    p_other_knee: float = 0.3
    #: distance between the knee centres (the other knee lies on the medial side)
    other_knee_mm: Range = (150.0, 230.0)
    # --- objects on the detector ---
    marker_count: tuple[int, int] = (0, 2)
    marker_fonts: tuple[str, ...] = ("simplex", "plain", "duplex", "complex_small")
    marker_italic: float = 0.0
    marker_kinds: tuple[str, ...] = ("plain", "framed")
    marker_mm: Range = (7.0, 20.0)
    #: markers keep this distance (mm) from the joint centre
    marker_clear_mm: float = 45.0
    #: markers sit in the image corners (within this fraction of the sides) when > 0
    marker_corner: float = 0.0
    p_ruler: float = 0.2
    # --- exposure ---
    p_collimation: float = 0.7
    #: half-sizes of the exposed field around the joint (x, y), and its tilt
    collimation_half_mm: Range = (50.0, 150.0)
    collimation_tilt_deg: float = 4.0
    #: exposure outside the collimation, a fraction of the primary beam (scatter)
    scatter: Range = (0.0, 0.08)
    collimation_outside: tuple[str, ...] = ("bright", "dark", "grey")
    p_border: float = 0.3
    border_mm: Range = (2.0, 15.0)
    photons: Range = (400.0, 20000.0)
    heel: Range = (0.0, 0.25)
    blur_px: Range = (0.3, 1.2)
    # --- processing ---
    window_low_pct: Range = (0.2, 3.0)
    window_high_pct: Range = (97.0, 99.9)
    drc: Range = (0.0, 0.6)
    drc_sigma_mm: Range = (15.0, 50.0)
    edge_gain: Range = (0.0, 1.2)
    edge_sigma_mm: Range = (0.6, 3.0)
    luts: tuple[str, ...] = ("gamma", "sigmoid")
    gamma: Range = (0.6, 1.6)
    sigmoid_slope: Range = (3.0, 8.0)
    p_clahe: float = 0.0
    # --- burned-in text and storage ---
    label_count: tuple[int, int] = (0, 3)
    label_words: tuple[str, ...] = TRAIN_LABELS
    label_fonts: tuple[str, ...] = ("simplex", "plain", "duplex", "complex_small")
    label_mm: Range = (3.0, 10.0)
    bits: tuple[int, ...] = (8, 12, 16)
    p_monochrome1: float = 0.5

    def __post_init__(self) -> None:
        ranges = ("pixel_mm", "field_mm", "aspect", "rotation_deg", "other_knee_mm", "marker_mm",
                  "collimation_half_mm", "scatter", "border_mm", "photons", "heel", "blur_px", "window_low_pct",
                  "window_high_pct", "drc", "drc_sigma_mm", "edge_gain", "edge_sigma_mm", "gamma", "sigmoid_slope",
                  "label_mm")
        for name in ranges:
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ConfigError(f"{name} must be a range 0 <= low <= high. Received: {name}={(lo, hi)}")
        for name in ("pixel_mm", "field_mm", "aspect", "photons", "marker_mm", "label_mm", "gamma"):
            if getattr(self, name)[0] <= 0:
                raise ConfigError(f"{name} must be > 0. Received: {name}={getattr(self, name)}")
        for name in ("p_other_knee", "marker_italic", "p_ruler", "p_collimation", "p_border", "p_clahe",
                     "p_monochrome1", "edge_margin"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1]. Received: {name}={getattr(self, name)}")
        if self.window_high_pct[1] > 100 or self.window_low_pct[1] >= self.window_high_pct[0]:
            raise ConfigError("window_low_pct must lie below window_high_pct, both in [0, 100]. Received: "
                              f"{self.window_low_pct}, {self.window_high_pct}")
        for name, allowed in (("marker_fonts", FONTS), ("label_fonts", FONTS), ("marker_kinds", MARKER_KINDS),
                              ("collimation_outside", OUTSIDE_STYLES), ("luts", LUTS), ("bits", BIT_DEPTHS)):
            values = getattr(self, name)
            bad = [v for v in values if v not in allowed]
            if not values or bad:
                raise ConfigError(f"{name} must be a non-empty choice among {tuple(allowed)}. Received: {values}")
        for name in ("marker_count", "label_count"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ConfigError(f"{name} must be 0 <= low <= high. Received: {name}={(lo, hi)}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 32):
            raise ConfigError(f"size must be (rows, cols), each >= 32. Received: size={self.size}")
        if self.max_side is not None and self.max_side < 64:
            raise ConfigError(f"max_side must be >= 64. Received: max_side={self.max_side}")
        if self.roi_mm is not None and self.roi_mm <= 0:
            raise ConfigError(f"roi_mm must be > 0. Received: roi_mm={self.roi_mm}")

    def acquisition(self, seed: int, index: int, knee: KneeParams, synth: SynthConfig) -> "Acquisition":
        """The acquisition of radiograph `index` of a set drawn from `seed` in this style."""
        return sample_acquisition(acquisition_rng(seed, index), self, knee, synth)

    def render(self, knee: KneeParams, acq: "Acquisition", synth: SynthConfig) -> "Radiograph":
        """`knee` imaged with `acq` (`render_radiograph`)."""
        return render_radiograph(knee, acq, synth)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RadiographStyle":
        return from_dict(cls, d)


# === Named styles ===

TRAIN = RadiographStyle()

STYLES: dict[str, RadiographStyle] = {
    "train": TRAIN,
    # the user's report: 600 x 500 px (width x height) at 0.3 mm, a lead letter in a
    # corner, collimation edges and unexposed borders, both photometric interpretations, the
    # knee off-centre; the truth a 96 mm square. Fonts, marker kinds, labels held out.
    "clinic": dataclasses.replace(
        TRAIN, name="clinic", pixel_mm=(0.3, 0.3), size=(500, 600), roi_mm=96.0, edge_margin=0.35,
        marker_count=(1, 1), marker_fonts=("complex", "triplex"), marker_italic=0.3, marker_kinds=("framed",
                                                                                                   "hollow"),
        marker_mm=(8.0, 14.0), marker_corner=0.2, p_ruler=0.0, p_collimation=0.9, collimation_half_mm=(55.0, 110.0),
        p_border=0.7, border_mm=(3.0, 12.0), p_other_knee=0.2, label_words=HELDOUT_LABELS,
        label_fonts=("complex", "triplex", "script_simplex"), bits=(12, 16)),
    # OAI-like bilateral halves: finer spacing than training, tall fields, the other knee cut
    # by the edge, 16 bits, little collimation
    "oai": dataclasses.replace(
        TRAIN, name="oai", pixel_mm=(0.1, 0.14), field_mm=(300.0, 380.0), aspect=(0.45, 0.62), edge_margin=0.4,
        p_other_knee=0.9, other_knee_mm=(140.0, 190.0), rotation_deg=(0.0, 5.0), marker_fonts=("triplex",),
        marker_kinds=("framed",), p_collimation=0.2, p_border=0.0, label_words=HELDOUT_LABELS,
        label_fonts=("complex",), bits=(16,), p_monochrome1=0.3, drc=(0.3, 0.7), photons=(3000.0, 30000.0)),
    # a small knee in a big field: coarse spacing, long fields
    "wide": dataclasses.replace(
        TRAIN, name="wide", pixel_mm=(0.6, 0.9), field_mm=(400.0, 480.0), aspect=(0.55, 1.3),
        marker_fonts=("complex", "script_complex"), marker_kinds=("hollow",), marker_mm=(12.0, 25.0),
        label_words=HELDOUT_LABELS, label_fonts=("triplex",), p_other_knee=0.5, bits=(10, 14)),
    # stronger in-plane rotation than training
    "rotated": dataclasses.replace(
        TRAIN, name="rotated", rotation_deg=(12.0, 25.0), marker_fonts=("triplex", "script_simplex"),
        marker_italic=0.5, label_words=HELDOUT_LABELS, label_fonts=("complex",), bits=(10, 14)),
    # processing outside the training ranges: CLAHE, strong unsharp masking and compression
    "processed": dataclasses.replace(
        TRAIN, name="processed", edge_gain=(1.2, 2.5), edge_sigma_mm=(3.0, 6.0), drc=(0.6, 0.85),
        drc_sigma_mm=(6.0, 15.0), gamma=(1.6, 2.2), sigmoid_slope=(8.0, 11.0), p_clahe=0.5, photons=(250.0, 400.0),
        blur_px=(1.2, 2.0),
        marker_fonts=("complex",), label_words=HELDOUT_LABELS,
        label_fonts=("triplex",), bits=(8, 10)),
    # tight, strongly tilted collimation, mid-grey outside, big lead letters near the knee
    "collimated": dataclasses.replace(
        TRAIN, name="collimated", p_collimation=1.0, collimation_half_mm=(42.0, 65.0), collimation_tilt_deg=12.0,
        scatter=(0.08, 0.2), collimation_outside=("grey",), marker_count=(1, 3), marker_fonts=("triplex",
                                                                                               "script_complex"),
        marker_kinds=("plain", "framed", "hollow"), marker_mm=(20.0, 28.0), marker_clear_mm=35.0, p_ruler=0.6,
        p_border=0.6, border_mm=(15.0, 30.0), label_count=(2, 5), label_words=HELDOUT_LABELS,
        label_fonts=("complex", "script_simplex"), label_mm=(8.0, 16.0), field_mm=(200.0, 330.0), bits=(12,)),
}


@dataclass(frozen=True)
class HeldoutSet:
    """A named held-out set: `n` radiographs of style `name`, subject `i` from seed `seed`."""

    name: str
    n: int
    seed: int


#: The held-out sets the detector and the fallback are scored on (`tools/bench_roi.py`).
HELDOUT_SETS: tuple[HeldoutSet, ...] = (
    HeldoutSet("clinic", 320, 9101), HeldoutSet("oai", 200, 9102), HeldoutSet("wide", 200, 9103),
    HeldoutSet("rotated", 200, 9104), HeldoutSet("processed", 200, 9105), HeldoutSet("collimated", 200, 9106),
)


def get_style(style: str | RadiographStyle) -> RadiographStyle:
    """A style by name (see `STYLES`) or as given."""
    if isinstance(style, RadiographStyle):
        return style
    return lookup(STYLES, style, "radiograph style")


# === One acquisition's random choices ===

@dataclass(frozen=True)
class Marker:
    """A lead object on the detector (`kind` plain/framed/hollow letter, or `ruler`)."""

    kind: str
    text: str
    font: int
    height_px: float
    x: float
    y: float
    angle: float


@dataclass(frozen=True)
class Label:
    """Text burned into the stored image (`value` 0 = black, 1 = white)."""

    text: str
    font: int
    height_px: float
    x: float
    y: float
    value: float


@dataclass(frozen=True)
class Acquisition:
    """Every random choice of one radiograph; `render_radiograph` turns it into pixels.

    Positions are continuous pixel coordinates of the stored image (x = column).
    """

    style: str
    shape: tuple[int, int]
    pixel_mm: float
    angle: float
    joint: tuple[float, float]
    #: joint centre relative to the knee centre (mm, rendering frame)
    joint_mm: tuple[float, float]
    roi_mm: float
    other: KneeParams | None
    #: the other knee's centre relative to this knee's centre (mm, rendering frame)
    other_offset_mm: tuple[float, float]
    collimation: tuple[float, float, float, float, float] | None  # cx, cy, half_w, half_h (px), tilt
    outside: str
    outside_grey: float
    scatter: float
    border: tuple[int, int, int, int]  # top, bottom, left, right (px)
    border_value: float
    markers: tuple[Marker, ...]
    labels: tuple[Label, ...]
    photons: float
    heel: float
    heel_angle: float
    blur_px: float
    window: tuple[float, float]
    drc: float
    drc_sigma_px: float
    edge_gain: float
    edge_sigma_px: float
    lut: str
    gamma: float
    sigmoid_slope: float
    clahe: bool
    bits: int
    monochrome1: bool
    noise_seed: int

    @property
    def box(self) -> Box:
        """The truth box in pixels of the stored image."""
        return square_box_around(self.joint[0], self.joint[1], self.roi_mm / self.pixel_mm)


@dataclass
class Radiograph:
    """A simulated radiograph: `image` as stored (uint8 / uint16, `photometric`), its
    truth `box`, pixel spacing (row, col) mm, the knee `side` and the `acquisition`."""

    image: np.ndarray
    photometric: str
    bits: int
    pixel_spacing: tuple[float, float]
    box: Box
    side: str
    acquisition: Acquisition = field(repr=False)

    def presentation(self) -> np.ndarray:
        """Display-ready float32 (bright = dense): what `kneetf.io.readers.read_xray` returns."""
        image = self.image.astype(np.float32)
        if self.photometric == "MONOCHROME1":
            image = float(2 ** self.bits - 1) - image
        return image


def _loguniform(rng: np.random.Generator, r: Range) -> float:
    return float(math.exp(rng.uniform(math.log(r[0]), math.log(r[1])))) if r[1] > r[0] else float(r[0])


def _uniform(rng: np.random.Generator, r: Range) -> float:
    return float(rng.uniform(r[0], r[1])) if r[1] > r[0] else float(r[0])


def _joint_offset_mm(p: KneeParams) -> tuple[float, float]:
    """The joint centre relative to the knee centre, as `joint_box` places it (mm)."""
    return p.place_x, -0.25 * (p.jsw_medial + p.jsw_lateral) + p.place_y


def _rotate(v: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate (..., 2) vectors (x right, y down) by `angle_deg` counter-clockwise as displayed."""
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    return np.stack([c * v[..., 0] + s * v[..., 1], -s * v[..., 0] + c * v[..., 1]], axis=-1)


def sample_acquisition(rng: np.random.Generator, style: str | RadiographStyle, knee: KneeParams,
                       synth: SynthConfig = SynthConfig()) -> Acquisition:
    """Draw every random choice of a radiograph of `knee` in `style`."""
    st = get_style(style)
    roi_mm = float(st.roi_mm or synth.roi_mm)
    # --- size and spacing ---
    px = _loguniform(rng, st.pixel_mm)
    if st.size is not None:
        rows, cols = st.size
        aspect = cols / rows
    else:
        long_mm = _loguniform(rng, st.field_mm)
        aspect = _uniform(rng, st.aspect)
        w_mm, h_mm = (long_mm, long_mm / aspect) if aspect >= 1 else (long_mm * aspect, long_mm)
        rows, cols = max(32, int(round(h_mm / px))), max(32, int(round(w_mm / px)))
    if st.max_side is not None and max(rows, cols) > st.max_side:
        f = st.max_side / max(rows, cols)
        rows, cols, px = max(32, int(round(rows * f))), max(32, int(round(cols * f))), px / f
    side = roi_mm / px
    # --- the joint in the image ---
    m = st.edge_margin * side
    jx = rng.uniform(m, cols - m) if cols > 2 * m else cols / 2.0 + rng.uniform(-0.1, 0.1) * cols
    jy = rng.uniform(m, rows - m) if rows > 2 * m else rows / 2.0 + rng.uniform(-0.1, 0.1) * rows
    angle = _uniform(rng, st.rotation_deg) * (1.0 if rng.random() < 0.5 else -1.0)
    other, other_offset = None, (0.0, 0.0)
    if rng.random() < st.p_other_knee:
        q = sample_params(rng, synth)
        other = dataclasses.replace(q, left=not knee.left, detector_x=0.0, detector_y=0.0)
        # the patient's other knee is towards the image's right for a right knee; only a part
        # of it shows: its joint lies outside the image (by 15 % of the box side at least),
        # else the image would hold two knees and no single answer
        sign = 1.0 if not knee.left else -1.0
        distance, dy = _uniform(rng, st.other_knee_mm), float(rng.uniform(-15, 15))
        while distance < 600.0:
            x, y = np.array([jx, jy]) + _rotate(np.array([sign * distance, dy]) / px, angle)
            if not (-0.15 * side < x < cols + 0.15 * side and -0.15 * side < y < rows + 0.15 * side):
                break
            distance += 5.0
        other_offset = (sign * distance, dy)
    # --- collimation, borders ---
    collimation = None
    if rng.random() < st.p_collimation:
        hw = _uniform(rng, st.collimation_half_mm) / px
        hh = _uniform(rng, st.collimation_half_mm) / px * rng.uniform(1.0, 1.4)
        hw, hh = max(hw, 0.5 * side + 4), max(hh, 0.5 * side + 4)
        slack_x, slack_y = max(0.0, hw - 0.5 * side), max(0.0, hh - 0.5 * side)
        ccx = jx + rng.uniform(-0.6, 0.6) * slack_x
        ccy = jy + rng.uniform(-0.6, 0.6) * slack_y
        collimation = (float(ccx), float(ccy), float(hw), float(hh),
                       float(rng.uniform(-st.collimation_tilt_deg, st.collimation_tilt_deg)))
    outside = str(rng.choice(st.collimation_outside))
    outside_grey = float(rng.uniform(0.25, 0.65))
    scatter = _uniform(rng, st.scatter)
    border = (0, 0, 0, 0)
    if rng.random() < st.p_border:
        sides = rng.random(4) < 0.5
        sides[rng.integers(4)] = True
        widths = [int(round(_uniform(rng, st.border_mm) / px)) if s else 0 for s in sides]
        border = tuple(widths)  # type: ignore[assignment]
    border_value = float(rng.choice([0.0, 1.0]))
    # --- lead markers and rulers, inside the exposed field, clear of the joint ---
    markers: list[Marker] = []
    n_markers = int(rng.integers(st.marker_count[0], st.marker_count[1] + 1))
    side_letter = "L" if knee.left else "R"
    for k in range(n_markers):
        h = _uniform(rng, st.marker_mm) / px
        text = side_letter if k == 0 or rng.random() < 0.5 else str(rng.choice(["L", "R", "PA", "WB"]))
        font = FONTS[str(rng.choice(st.marker_fonts))] | (cv2.FONT_ITALIC if rng.random() < st.marker_italic else 0)
        pos = _free_position(rng, (rows, cols), (jx, jy), st.marker_clear_mm / px + h, collimation, st.marker_corner)
        markers.append(Marker(str(rng.choice(st.marker_kinds)), text, int(font), float(h), pos[0], pos[1],
                              float(rng.uniform(-10, 10))))
    if rng.random() < st.p_ruler:
        length = rng.uniform(80.0, 250.0) / px
        vertical = bool(rng.random() < 0.6)
        pos = _free_position(rng, (rows, cols), (jx, jy), st.marker_clear_mm / px + 0.1 * length, collimation, 0.0)
        markers.append(Marker("ruler", "", 0, float(length), pos[0], pos[1], 90.0 if vertical else 0.0))
    # --- burned-in text, anywhere but on the joint ---
    labels: list[Label] = []
    for _ in range(int(rng.integers(st.label_count[0], st.label_count[1] + 1))):
        h = _uniform(rng, st.label_mm) / px
        pos = _free_position(rng, (rows, cols), (jx, jy), 0.6 * side + h, None, 0.25)
        labels.append(Label(str(rng.choice(st.label_words)), FONTS[str(rng.choice(st.label_fonts))], float(h),
                            pos[0], pos[1], float(rng.choice([1.0, 1.0, 0.0]))))
    # --- exposure and processing ---
    lo_pct, hi_pct = _uniform(rng, st.window_low_pct), _uniform(rng, st.window_high_pct)
    return Acquisition(
        style=st.name, shape=(int(rows), int(cols)), pixel_mm=float(px), angle=float(angle),
        joint=(float(jx), float(jy)), joint_mm=_joint_offset_mm(knee), roi_mm=roi_mm, other=other,
        other_offset_mm=(float(other_offset[0]), float(other_offset[1])), collimation=collimation, outside=outside,
        outside_grey=outside_grey, scatter=scatter, border=border, border_value=border_value, markers=tuple(markers),
        labels=tuple(labels), photons=_loguniform(rng, st.photons), heel=_uniform(rng, st.heel),
        heel_angle=float(rng.uniform(0, 360)), blur_px=_uniform(rng, st.blur_px), window=(lo_pct, hi_pct),
        drc=_uniform(rng, st.drc), drc_sigma_px=_uniform(rng, st.drc_sigma_mm) / px,
        edge_gain=_uniform(rng, st.edge_gain), edge_sigma_px=_uniform(rng, st.edge_sigma_mm) / px,
        lut=str(rng.choice(st.luts)), gamma=_uniform(rng, st.gamma), sigmoid_slope=_uniform(rng, st.sigmoid_slope),
        clahe=bool(rng.random() < st.p_clahe), bits=int(rng.choice(st.bits)),
        monochrome1=bool(rng.random() < st.p_monochrome1), noise_seed=int(rng.integers(2 ** 31)))


def _free_position(rng: np.random.Generator, shape: tuple[int, int], joint: tuple[float, float], clear: float,
                   collimation: tuple[float, ...] | None, corner: float) -> tuple[float, float]:
    """A random point of the image (of the exposed field when given; of the corners when
    `corner` > 0) at least `clear` px from the joint; the farthest of 30 tries otherwise."""
    rows, cols = shape
    best, best_d = (cols / 2.0, rows / 2.0), -1.0
    for _ in range(30):
        if corner > 0:
            x = rng.uniform(0, corner) * cols
            y = rng.uniform(0, corner) * rows
            x = x if rng.random() < 0.5 else cols - x
            y = y if rng.random() < 0.5 else rows - y
        elif collimation is not None:
            cx, cy, hw, hh, tilt = collimation
            local = np.array([rng.uniform(-0.9, 0.9) * hw, rng.uniform(-0.9, 0.9) * hh])
            x, y = (np.array([cx, cy]) + _rotate(local, tilt)).tolist()
        else:
            x, y = rng.uniform(0.03, 0.97) * cols, rng.uniform(0.03, 0.97) * rows
        x, y = float(np.clip(x, 0.02 * cols, 0.98 * cols)), float(np.clip(y, 0.02 * rows, 0.98 * rows))
        d = math.hypot(x - joint[0], y - joint[1])
        if d >= clear:
            return x, y
        if d > best_d:
            best, best_d = (x, y), d
    return best


# === Rendering ===

def _render_line(p: KneeParams, acq: Acquisition, synth: SynthConfig, centre_mm: tuple[float, float],
                 render_size: int) -> np.ndarray:
    """The attenuation line integral of knee `p` warped onto the stored image's grid.

    `centre_mm`: the knee centre relative to the primary knee's centre (rendering frame). The
    knee is rendered on a square grid centred on its centre, just large enough to cover the
    image after the rotation, then mapped by the similarity (joint -> `acq.joint`, scale
    render mm -> image pixels, rotation `acq.angle`)."""
    rows, cols = acq.shape
    jx_mm, jy_mm = acq.joint_mm
    # image corners as mm offsets from the joint, in the rendering frame (un-rotated)
    corners = np.array([[0, 0], [cols, 0], [0, rows], [cols, rows]], float) - np.array(acq.joint)
    corners_mm = _rotate(corners * acq.pixel_mm, -acq.angle)
    rel = corners_mm + np.array([jx_mm - centre_mm[0], jy_mm - centre_mm[1]])
    extent = float(np.abs(rel).max()) + 4.0
    r = max(2.0 * extent / render_size, MIN_RENDER_MM)
    n = int(math.ceil(2.0 * extent / r / 12.0)) * 12
    f = min((1, 2, 3, 4, 6, 12), key=lambda d: abs(d * r - 2.8))
    config = dataclasses.replace(synth, xray_size=n, xray_pixel_mm=r, xray_compute_mm=f * r, detector_shift_mm=0.0,
                                 roi_mm=min(synth.roi_mm, 0.5 * n * r))
    line = np.asarray(xray_line_integral(dataclasses.replace(p, detector_x=0.0, detector_y=0.0), config), np.float32)
    # continuous coordinates: render point q -> image point  joint + s R (q - j_r)
    j_r = np.array([n / 2.0 + (jx_mm - centre_mm[0]) / r, n / 2.0 + (jy_mm - centre_mm[1]) / r])
    scale = r / acq.pixel_mm
    a = math.radians(acq.angle)
    rot = scale * np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    t = np.array(acq.joint) - rot @ j_r
    # OpenCV maps pixel indices (centres at integer + 0.5 in continuous coordinates)
    t_idx = t + rot @ np.array([0.5, 0.5]) - 0.5
    m = np.hstack([rot, t_idx[:, None]]).astype(np.float64)
    return cv2.warpAffine(line, m, (cols, rows), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur; large sigmas on a shrunk copy (same result to the eye, much faster)."""
    if sigma <= 0.05:
        return image
    if sigma <= 6:
        return cv2.GaussianBlur(image, (0, 0), sigma)
    f = 3.0 / sigma
    h, w = image.shape
    small = cv2.resize(image, (max(4, int(round(w * f))), max(4, int(round(h * f)))), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), 3.0)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _text_patch(text: str, font: int, height_px: float, kind: str) -> np.ndarray:
    """A float32 mask (1 = lead) of `text` whose capitals are `height_px` tall."""
    (_, base_h), _ = cv2.getTextSize("L", font, 1.0, 1)
    scale = max(0.05, height_px / max(base_h, 1))
    thick = max(1, int(round(0.12 * height_px)))
    (tw, th), baseline = cv2.getTextSize(text, font, scale, thick)
    pad = max(2, int(round(0.3 * height_px)))
    patch = np.zeros((th + baseline + 2 * pad, tw + 2 * pad), np.uint8)
    cv2.putText(patch, text, (pad, pad + th), font, scale, 255, thick, cv2.LINE_AA)
    mask = patch.astype(np.float32) / 255.0
    if kind == "framed":
        cv2.rectangle(mask, (0, 0), (mask.shape[1] - 1, mask.shape[0] - 1), 1.0, max(1, thick // 2))
    elif kind == "hollow":  # a lead plate with the letter cut out
        mask = 1.0 - mask
    return mask


def _ruler_patch(length_px: float, pixel_mm: float) -> np.ndarray:
    """A lead ruler: a strip with a tick every 10 mm (longer every 50 mm), horizontal."""
    length = max(8, int(round(length_px)))
    width = max(3, int(round(8.0 / pixel_mm)))
    mask = np.zeros((width, length), np.float32)
    line = max(1, int(round(0.6 / pixel_mm)))
    mask[:line] = 1.0
    for k, x in enumerate(np.arange(0, length, 10.0 / pixel_mm)):
        tick = width if k % 5 == 0 else width // 2
        mask[:tick, int(x):int(x) + line] = 1.0
    return mask


def _paste(canvas: np.ndarray, patch: np.ndarray, x: float, y: float, angle: float, value: float | None = None) -> None:
    """Paste `patch` centred on (x, y), rotated by `angle`: canvas = max(canvas, patch) when
    `value` is None, else canvas blended towards `value` by the patch."""
    ph, pw = patch.shape
    diag = int(math.ceil(math.hypot(ph, pw))) + 2
    m = cv2.getRotationMatrix2D((pw / 2.0, ph / 2.0), angle, 1.0)
    m[:, 2] += (diag / 2.0 - pw / 2.0, diag / 2.0 - ph / 2.0)
    rotated = cv2.warpAffine(patch, m, (diag, diag), flags=cv2.INTER_LINEAR)
    x0, y0 = int(round(x - diag / 2.0)), int(round(y - diag / 2.0))
    h, w = canvas.shape
    ax0, ay0, ax1, ay1 = max(x0, 0), max(y0, 0), min(x0 + diag, w), min(y0 + diag, h)
    if ax0 >= ax1 or ay0 >= ay1:
        return
    sub = rotated[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0]
    region = canvas[ay0:ay1, ax0:ax1]
    if value is None:
        np.maximum(region, sub, out=region)
    else:
        region += (np.float32(value) - region) * sub


def _collimation_mask(acq: Acquisition) -> np.ndarray:
    """1 inside the exposed field, 0 outside (hard edges; the caller blurs the penumbra)."""
    rows, cols = acq.shape
    mask = np.ones((rows, cols), np.float32)
    if acq.collimation is not None:
        cx, cy, hw, hh, tilt = acq.collimation
        corners = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
        pts = np.array([cx, cy]) + _rotate(corners, tilt) - 0.5
        mask[:] = 0.0
        cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1.0, lineType=cv2.LINE_8, shift=4)
    t, b, l, r = acq.border
    if t:
        mask[:t] = 0.0
    if b:
        mask[rows - b:] = 0.0
    if l:
        mask[:, :l] = 0.0
    if r:
        mask[:, cols - r:] = 0.0
    return mask


def _window(image: np.ndarray, where: np.ndarray, pct: tuple[float, float]) -> np.ndarray:
    """`image` with its `pct` percentiles over `where` mapped to 0 and 1 (not clipped)."""
    values = image[where]
    step = max(1, values.size // 200000)
    lo, hi = np.percentile(values[::step], list(pct))
    return (image - np.float32(lo)) / np.float32(max(hi - lo, 1e-3))


def render_radiograph(knee: KneeParams, acq: Acquisition, synth: SynthConfig = SynthConfig(), *,
                      render_size: int = 384) -> Radiograph:
    """Pixels of the acquisition `acq` of `knee` (deterministic: noise from `acq.noise_seed`)."""
    rows, cols = acq.shape
    rng = np.random.default_rng(acq.noise_seed)
    line = _render_line(knee, acq, synth, (0.0, 0.0), render_size)
    if acq.other is not None:
        line += _render_line(acq.other, acq, synth, acq.other_offset_mm, render_size)
    # lead objects: nearly opaque (mu x length ~ 6) where they lie
    lead = np.zeros((rows, cols), np.float32)
    for mk in acq.markers:
        patch = _ruler_patch(mk.height_px, acq.pixel_mm) if mk.kind == "ruler" else _text_patch(
            mk.text, mk.font, mk.height_px, mk.kind)
        _paste(lead, patch, mk.x, mk.y, mk.angle)
    line += 6.0 * lead
    line = _blur(line, acq.blur_px)
    # exposure: collimation (scatter outside, a penumbra), borders, heel effect, quantum noise
    exposed = _collimation_mask(acq)
    field_ = _blur(exposed, max(0.5, 1.5 / acq.pixel_mm))
    beam = acq.scatter + (1.0 - acq.scatter) * field_
    a = math.radians(acq.heel_angle)
    gx = (np.arange(cols, dtype=np.float32) / cols - 0.5) * np.float32(2.0 * acq.heel * math.cos(a))
    gy = (np.arange(rows, dtype=np.float32) / rows - 0.5) * np.float32(2.0 * acq.heel * math.sin(a))
    heel = 1.0 + gx[None, :] + gy[:, None]
    counts = np.float32(acq.photons) * beam * heel * np.exp(-line)
    counts += np.sqrt(counts) * rng.standard_normal(counts.shape, dtype=np.float32)
    raw = -np.log(np.maximum(counts, 0.3) / acq.photons)
    # processing: window on the exposed field, compression, unsharp masking, LUT
    # the window comes from the anatomy in the exposed field (no direct beam, no collimated
    # area, no lead), as a modality's histogram analysis does
    inside = (exposed > 0.5) & (line > BODY_LINE_INTEGRAL) & (lead < 0.5)
    if inside.sum() < 100:
        inside = exposed > 0.5
    if inside.sum() < 100:
        inside[:] = True
    u = _window(raw, inside, acq.window)
    if acq.drc > 0 or acq.edge_gain > 0:
        if acq.drc > 0:
            low = _blur(u, acq.drc_sigma_px)
            u = u - acq.drc * (low - float(np.median(low)))
        if acq.edge_gain > 0:
            u = u + acq.edge_gain * (u - _blur(u, acq.edge_sigma_px))
        u = _window(u, inside, acq.window)  # the LUT is fitted to the processed image
    u = np.clip(u, 0.0, 1.0)
    if acq.lut == "gamma":
        u = np.power(u, acq.gamma)
    else:
        k = acq.sigmoid_slope
        s0, s1 = 1 / (1 + math.exp(k * 0.5)), 1 / (1 + math.exp(-k * 0.5))
        u = (1.0 / (1.0 + np.exp(-k * (u - 0.5))) - s0) / (s1 - s0)
    if acq.clahe:
        q = np.round(np.clip(u, 0, 1) * 4095).astype(np.uint16)
        tiles = max(2, int(round(max(rows, cols) * acq.pixel_mm / 40.0)))
        u = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(tiles, tiles)).apply(q).astype(np.float32) / 4095.0
    # electronic shutters and burned-in text
    if acq.collimation is not None and acq.outside != "bright":
        shade = 0.0 if acq.outside == "dark" else acq.outside_grey
        out_mask = 1.0 - _blur(exposed, 0.7)
        u = u + (shade - u) * out_mask
    t, b, l, r = acq.border
    for sl in (np.s_[:t, :], np.s_[rows - b:, :] if b else None, np.s_[:, :l], np.s_[:, cols - r:] if r else None):
        if sl is not None:
            u[sl] = acq.border_value
    u = np.ascontiguousarray(u, np.float32)
    for lb in acq.labels:
        _paste(u, _text_patch(lb.text, lb.font, lb.height_px, "plain"), lb.x, lb.y, 0.0, lb.value)
    top = float(2 ** acq.bits - 1)
    value = np.round(np.clip(u, 0.0, 1.0) * top)
    stored = top - value if acq.monochrome1 else value
    image = stored.astype(np.uint8 if acq.bits <= 8 else np.uint16)
    return Radiograph(image=image, photometric="MONOCHROME1" if acq.monochrome1 else "MONOCHROME2", bits=acq.bits,
                      pixel_spacing=(acq.pixel_mm, acq.pixel_mm), box=acq.box, side="left" if knee.left else "right",
                      acquisition=acq)


# === Public helpers ===

def acquisition_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of subject `index`'s acquisition in dataset `seed` (apart from the knee's)."""
    return np.random.default_rng([int(seed), int(index), ACQUISITION_STREAM])


def knee_params(seed: int, index: int, synth: SynthConfig = SynthConfig()) -> KneeParams:
    """The knee of subject `index` in dataset `seed`: `generate_knee`'s anatomy."""
    return sample_params(np.random.default_rng([int(seed), int(index)]), synth)


def simulate(seed: int, index: int, style: str | RadiographStyle = "train", synth: SynthConfig | None = None,
             *, render_size: int = 384) -> Radiograph:
    """Radiograph `index` of the set (`seed`, `style`): deterministic in its arguments.

    The knee is `generate_knee(seed, index, synth)`'s anatomy; `synth` defaults to a
    `SynthConfig` without the MRI placement offset, so that the box is centred on the joint.
    """
    synth = SynthConfig(placement_mm=(0.0, 0.0)) if synth is None else synth
    knee = knee_params(seed, index, synth)
    acq = sample_acquisition(acquisition_rng(seed, index), style, knee, synth)
    return render_radiograph(knee, acq, synth, render_size=render_size)


def simulate_set(name: str | HeldoutSet, n: int | None = None, seed: int | None = None) -> list[Radiograph]:
    """The held-out set `name` (see `HELDOUT_SETS`), or `n` radiographs of style `name` from `seed`."""
    spec = name if isinstance(name, HeldoutSet) else next((s for s in HELDOUT_SETS if s.name == name), None)
    style = spec.name if spec is not None else name
    n = n if n is not None else (spec.n if spec is not None else 100)
    seed = seed if seed is not None else (spec.seed if spec is not None else 0)
    return [simulate(seed, i, style) for i in range(n)]


__all__ = ["RadiographStyle", "STYLES", "TRAIN", "HeldoutSet", "HELDOUT_SETS", "Acquisition", "Marker", "Label",
           "Radiograph", "get_style", "sample_acquisition", "render_radiograph", "acquisition_rng", "knee_params",
           "simulate", "simulate_set", "FONTS"]
