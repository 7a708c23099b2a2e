"""Built-in synthetic paired knees: a 3-D knee phantom seen by a sagittal MRI and a PA X-ray.

One set of anatomy parameters per subject (size, joint-space width per compartment with
KL-grade-like narrowing, osteophytes, rotations, left/right side, placement of the field of
view) drives both modalities, so a model reading the X-ray can learn the MRI; noise, a bias
field and a small independent pose jitter are MRI-only, so it cannot learn it exactly.

Geometry (millimetres). The anatomy frame of a RIGHT knee: origin at the joint centre (the
tibial plateau at the centre of the knee), `x` towards the patient's left (= medial for a
right knee), `y` inferior, `z` posterior. A left knee is the mirror image (x -> -x), so its
medial side is towards the patient's right. The world frame of both acquisitions has the same
axes (patient left, inferior, posterior).

- MRI: `mri[k, r, c]`, slice `k` along the left-right axis, from the patient's LEFT to the
  patient's RIGHT (the default sagittal geometry of `kneetf.io.writers`: slice normal =
  row x column direction = towards the patient's right), row `r` superior -> inferior, column
  `c` anterior -> posterior. A right knee has its medial condyle at low slice numbers and its
  lateral condyle (and the fibula) at high ones; a left knee the reverse. The knee centre
  (intercondylar notch) sits near slice `mri_center_slice` (29.5 = the middle of the window
  [20, 40) that the pipeline keeps) moved by the placement offset, so that reversing the
  window of a left knee gives a right-looking knee (what `PreprocessConfig.mirror_left` does).
- X-ray: a PA view displayed as if facing the patient, `xray[r, c]`, row superior ->
  inferior, column from the patient's RIGHT (left of the image) to the patient's LEFT. For a
  RIGHT knee the medial compartment is on the RIGHT of the image; for a LEFT knee on the
  LEFT. Flipping the columns of a left knee's X-ray gives a right-looking knee.
- The ROI box `(x0, y0, x1, y1)` covers `xray[y0:y1, x0:x1]` (ends exclusive), a square of
  `roi_mm` centred on the joint centre moved by the same placement offset as the MRI field
  of view (a simulated operator aims both at the joint with one error), so where the knee sits
  in the ROI tells where it sits among the MRI slices.

The MRI is rendered directly on its 64 x 160 x 160 grid; the X-ray is Beer-Lambert on a
coarse grid for the bones (soft-edged, so the sum along the beam is smooth) plus analytic
chords through the soft tissue, upsampled to the detector. This module must not import
TensorFlow (it runs in spawned worker processes).
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from kneetf.errors import ConfigError, InputError
from kneetf.io.atomic import write_text_atomic
from kneetf.version import __version__
from kneetf.workers import process_pool

log = logging.getLogger(__name__)

FORMATS = ("dicom", "nifti", "png")
SPLITS = ("train", "val", "test")


# === Configuration ===

@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the synthetic dataset. All lengths in millimetres, angles in degrees.

    The MRI-only variation (`mri_noise`, `bias_field`, `pose_jitter_deg`, `shift_jitter_mm`)
    is what an X-ray cannot predict; set them to 0 for a noiseless, exactly-paired phantom.
    """

    mri_slices: int = 64
    mri_size: int = 160
    xray_size: int = 320
    mri_slice_mm: float = 3.0
    mri_pixel_mm: float = 0.875
    #: slice index of the knee centre (before the placement offset): the middle of [20, 40)
    mri_center_slice: float = 29.5
    xray_pixel_mm: float = 0.7
    #: grid step of the X-ray bone projection (upsampled to the detector)
    xray_compute_mm: float = 1.4
    #: side of the square joint ROI
    roi_mm: float = 100.0
    #: Rician noise sigma as a fraction of the cartilage intensity (1000)
    mri_noise: float = 0.03
    #: amplitude of the smooth multiplicative bias field (0.15 = +-15 %)
    bias_field: float = 0.15
    #: MRI-only pose jitter (rotation sd, per axis) and shift jitter (sd, per axis)
    pose_jitter_deg: float = 1.0
    shift_jitter_mm: float = 0.5
    #: sd of the MRI-only antero-posterior placement of the field of view
    mri_shift_mm: float = 1.0
    #: photons per detector pixel of the unattenuated beam (X-ray quantum noise); 0 = none
    xray_photons: float = 20000.0
    monochrome1_fraction: float = field(default=0.0, metadata={
        "help": "fraction of X-rays stored inverted as MONOCHROME1", "metavar": "F"})
    left_fraction: float = field(default=0.5, metadata={"help": "fraction of left knees", "metavar": "F"})
    #: KL-grade-like probabilities of grades 0..4
    kl_probabilities: tuple[float, ...] = (0.3, 0.25, 0.2, 0.17, 0.08)
    #: sd of the overall size factor (mean 1)
    size_sd: float = 0.06
    #: sd of the shared pose angles (flexion, varus/valgus, axial rotation)
    rotation_deg: float = 3.0
    #: sd of the shared placement offset of the MRI field of view / ROI box (left-right, sup-inf)
    placement_mm: tuple[float, float] = (3.0, 4.0)
    #: largest off-centre shift of the knee on the detector
    detector_shift_mm: float = 25.0

    def __post_init__(self) -> None:
        if self.mri_slices < 8 or self.mri_size < 16 or self.xray_size < 32:
            raise ConfigError("mri_slices >= 8, mri_size >= 16 and xray_size >= 32 are required. Received: "
                              f"mri_slices={self.mri_slices}, mri_size={self.mri_size}, xray_size={self.xray_size}")
        for name in ("monochrome1_fraction", "left_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1]. Received: {name}={v}")
        for name in ("mri_noise", "bias_field", "pose_jitter_deg", "shift_jitter_mm", "mri_shift_mm", "xray_photons",
                     "size_sd",
                     "rotation_deg", "detector_shift_mm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0. Received: {name}={getattr(self, name)}")
        if len(self.kl_probabilities) != 5 or min(self.kl_probabilities) < 0 or sum(self.kl_probabilities) <= 0:
            raise ConfigError(f"kl_probabilities must be 5 non-negative weights. Received: {self.kl_probabilities}")
        for name in ("mri_slice_mm", "mri_pixel_mm", "xray_pixel_mm", "xray_compute_mm", "roi_mm"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0. Received: {name}={getattr(self, name)}")
        if self.roi_mm >= self.xray_size * self.xray_pixel_mm - 2 * self.detector_shift_mm:
            raise ConfigError(f"roi_mm={self.roi_mm} does not fit the detector "
                              f"({self.xray_size} x {self.xray_pixel_mm} mm) with detector_shift_mm="
                              f"{self.detector_shift_mm}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SynthConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown SynthConfig fields: {sorted(unknown)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)


@dataclass
class SyntheticKnee:
    """One generated subject: full X-ray, joint box and the MRI volume (see module docstring)."""

    id: str
    side: str
    xray: np.ndarray
    photometric: str
    box: tuple[int, int, int, int]
    mri: np.ndarray
    mri_spacing: tuple[float, float, float]
    xray_spacing: tuple[float, float]
    params: dict = field(default_factory=dict)


# === Tissues: (MRI intensity, DESS-like arbitrary units; X-ray attenuation, 1/mm) ===

TISSUES: dict[str, tuple[float, float]] = {
    "air": (0.0, 0.0),
    "skin": (480.0, 0.021),
    "fat": (760.0, 0.018),
    "muscle": (330.0, 0.021),
    "cortical": (35.0, 0.055),
    "marrow": (620.0, 0.028),
    "cartilage": (1000.0, 0.021),
    "fluid": (1350.0, 0.020),
    "meniscus": (90.0, 0.022),
    "ligament": (110.0, 0.022),
}
#: attenuation that bone replaces (the soft tissue around it)
MU_SOFT = 0.020


# === Anatomy parameters ===

@dataclass(frozen=True)
class KneeParams:
    """Everything that decides one subject's images except the noise (floats, mm / degrees)."""

    left: bool
    scale: float                # overall size
    width: float                # medio-lateral / antero-posterior proportion
    kl_grade: float
    jsw_medial: float           # bone-to-bone joint-space width, medial compartment
    jsw_lateral: float
    cartilage: float            # cartilage thickness away from the contact zones
    osteophytes: tuple[float, float, float, float]  # medial tibia, lateral tibia, medial femur, lateral femur
    tibial_slope: float
    patella_height: float
    fat: float                  # subcutaneous fat thickness
    effusion: float             # suprapatellar effusion thickness (MRI only)
    flexion: float              # shared pose, degrees (about x, y, z)
    axial: float
    varus: float
    place_x: float              # shared placement of the MRI field of view / ROI box
    place_y: float
    mri_place_z: float          # MRI-only placement (antero-posterior)
    mri_jitter_rot: tuple[float, float, float]
    mri_jitter_shift: tuple[float, float, float]
    detector_x: float           # knee centre on the detector, mm from the detector centre
    detector_y: float
    xray_gain: float            # exposure / processing variation (X-ray only)
    mri_gain: float
    monochrome1: bool

    def as_dict(self) -> dict[str, float]:
        d: dict[str, float] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                for i, x in enumerate(v):
                    d[f"{f.name}_{i}"] = float(x)
            else:
                d[f.name] = float(v)
        return d

    def mirrored(self) -> "KneeParams":
        """The same knee on the other side (mirror image, placement mirrored too)."""
        rx, ry, rz = self.mri_jitter_rot
        sx, sy, sz = self.mri_jitter_shift
        return dataclasses.replace(self, left=not self.left, place_x=-self.place_x, detector_x=-self.detector_x,
                                   mri_jitter_rot=(rx, -ry, -rz), mri_jitter_shift=(-sx, sy, sz),
                                   axial=-self.axial, varus=-self.varus)


def sample_params(rng: np.random.Generator, config: SynthConfig = SynthConfig()) -> KneeParams:
    """Draw one subject's parameters (a fixed number of draws, whatever the config)."""
    u = rng.random(8)
    left = bool(u[0] < config.left_fraction)
    mono1 = bool(u[1] < config.monochrome1_fraction)
    p = np.asarray(config.kl_probabilities, float)
    kl = int(np.searchsorted(np.cumsum(p / p.sum()), u[2], side="right"))
    kl = min(kl, 4)
    z = rng.standard_normal(24)
    scale = float(np.clip(1.0 + config.size_sd * z[0], 0.8, 1.2))
    width = float(np.clip(1.0 + 0.04 * z[1], 0.9, 1.1))
    # joint-space width: normal values, then KL-like narrowing of the affected compartment
    jsw_m0 = (5.4 + 0.5 * z[2]) * scale
    jsw_l0 = (6.4 + 0.5 * z[3]) * scale
    narrowing = (0.0, 0.06, 0.22, 0.5, 0.82)[kl] + 0.06 * z[4] * (kl > 0)
    narrowing = float(np.clip(narrowing, 0.0, 0.9))
    if u[3] < 0.8:  # medial OA (the common pattern)
        jsw_m, jsw_l = jsw_m0 * (1 - narrowing), jsw_l0 * (1 - 0.25 * narrowing)
    else:
        jsw_m, jsw_l = jsw_m0 * (1 - 0.25 * narrowing), jsw_l0 * (1 - narrowing)
    jsw_m, jsw_l = max(jsw_m, 0.6), max(jsw_l, 0.6)
    lo, hi = ((0.0, 0.0), (0.0, 1.2), (1.0, 3.0), (2.0, 4.5), (3.0, 6.0))[kl]
    osteo = tuple(float((lo + (hi - lo) * v) * w) for v, w in zip(rng.random(4), (1.0, 0.7, 0.9, 0.6)))
    cart = float(np.clip((2.4 + 0.2 * z[5]) * scale * (1 - 0.1 * kl), 1.0, 3.5))
    rot = config.rotation_deg
    pj, sj = config.pose_jitter_deg, config.shift_jitter_mm
    px, py = config.placement_mm
    dmax = config.detector_shift_mm
    return KneeParams(
        left=left, scale=scale, width=width, kl_grade=float(kl), jsw_medial=float(jsw_m), jsw_lateral=float(jsw_l),
        cartilage=cart, osteophytes=osteo,  # type: ignore[arg-type]
        tibial_slope=float(7.0 + 2.5 * z[6]), patella_height=float(4.0 * z[7]),
        fat=float((5.0 + 9.0 * u[4]) * scale), effusion=float(np.exp(0.5 + 0.6 * z[8])),
        flexion=float(rot * 1.3 * z[9]), axial=float(rot * 1.5 * z[10]), varus=float(rot * 0.7 * z[11]),
        place_x=float(np.clip(px * z[12], -2.5 * px, 2.5 * px)),
        place_y=float(np.clip(py * z[13], -2.5 * py, 2.5 * py)),
        mri_place_z=float(np.clip(config.mri_shift_mm * z[14], -3 * config.mri_shift_mm, 3 * config.mri_shift_mm)),
        mri_jitter_rot=(float(pj * z[15]), float(pj * z[16]), float(pj * z[17])),
        mri_jitter_shift=(float(sj * z[18]), float(sj * z[19]), float(sj * z[20])),
        detector_x=float(dmax * (2 * u[5] - 1)), detector_y=float(dmax * (2 * u[6] - 1)),
        xray_gain=float(1.0 + 0.06 * z[21]), mri_gain=float(1.0 + 0.05 * z[22]), monochrome1=mono1,
    )


# === Signed-distance primitives (positive inside, approximately millimetres) ===

def _ellipsoid(u, v, w, a: float, b: float, c: float):
    """Approximate signed distance to an axis-aligned ellipsoid centred at the origin."""
    pu, pv, pw = u / a, v / b, w / c
    k0 = np.sqrt(pu * pu + pv * pv + pw * pw)
    k1 = np.sqrt((pu / a) ** 2 + (pv / b) ** 2 + (pw / c) ** 2)
    rmin = min(a, b, c)
    return (1.0 - k0) * (k0 + 1e-3) / (k1 + 1e-3 / rmin)


def _ellipse2(u, w, a, b):
    """Approximate signed distance to an ellipse (arrays of radii allowed)."""
    pu, pw = u / a, w / b
    k0 = np.sqrt(pu * pu + pw * pw)
    k1 = np.sqrt((pu / a) ** 2 + (pw / b) ** 2)
    rmin = np.minimum(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else min(a, b)
    return (1.0 - k0) * (k0 + 1e-3) / (k1 + 1e-3 / rmin)


def _blob(u, v, w, a: float, b: float, c: float):
    """Rough signed distance to an ellipsoid (exact along its axes only): for soft, blurred
    shapes where the distance scale hardly matters; cheaper than `_ellipsoid`."""
    pu, pv, pw = u * (1.0 / a), v * (1.0 / b), w * (1.0 / c)
    return (1.0 - np.sqrt(pu * pu + pv * pv + pw * pw)) * min(a, b, c)


def _round_ellipse2(u, w, a, b):
    """Cheaper signed distance to a nearly circular ellipse (exact for a circle)."""
    pu, pw = u / a, w / b
    return (1.0 - np.sqrt(pu * pu + pw * pw)) * (0.5 * (a + b))


def _capsule(u, v, w, a: Sequence[float], b: Sequence[float], r: float, sx: float = 1.0):
    """Signed distance to the segment a-b thickened by r; x squeezed by sx (a flat band)."""
    bax, bay, baz = b[0] - a[0], b[1] - a[1], b[2] - a[2]
    pax, pay, paz = u - a[0], v - a[1], w - a[2]
    h = np.clip((pax * bax + pay * bay + paz * baz) / (bax * bax + bay * bay + baz * baz), 0.0, 1.0)
    dx, dy, dz = (pax - bax * h) / sx, pay - bay * h, paz - baz * h
    return r - np.sqrt(dx * dx + dy * dy + dz * dz)


def _smax(a, b, k: float):
    """Smooth union (maximum) of two signed distances, blend radius k."""
    h = np.clip(0.5 + 0.5 * (a - b) / k, 0.0, 1.0)
    return b + (a - b) * h + k * h * (1.0 - h)


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix of angles (degrees) about x, then y, then z."""
    ax, ay, az = np.deg2rad([rx, ry, rz])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


class _Profile:
    """A piecewise-linear function y(x) evaluated through a fine float32 lookup table (np.interp
    is float64 and several times slower on large arrays)."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], step: float = 0.1):
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        self.x0, self.inv = float(xs[0]), 1.0 / step
        grid = xs[0] + step * np.arange(int(math.ceil((xs[-1] - xs[0]) / step)) + 2)
        self.table = np.interp(grid, xs, ys).astype(np.float32)
        self.last = len(self.table) - 1

    def __call__(self, x):
        idx = (x * np.float32(self.inv) + np.float32(0.5 - self.x0 * self.inv)).astype(np.int32)
        return np.take(self.table, idx, mode="clip")


def _f32(x: float) -> np.float32:
    return np.float32(x)


# === The phantom ===

Bounds = tuple[tuple[float, float, float], tuple[float, float, float]]


@dataclass
class _Object:
    """A solid with nested layers: `layers` = [(inset mm or fn(u,v,w), tissue), ...], outer first."""

    name: str
    bounds: Bounds
    sd: Callable[..., np.ndarray]
    layers: list[tuple[Any, str]]
    bone: bool = False  # seen by the X-ray
    edge: float = 0.0   # extra blur of the edges (mm), for soft-tissue boundaries


class _Knee:
    """The anatomy of one subject in its anatomy frame (see module docstring)."""

    def __init__(self, p: KneeParams):
        self.p = p
        s, wr = p.scale, p.width
        self.s, self.wr = s, wr
        # --- tibia (the reference frame: plateau top at y = 0 under the condyles) ---
        self.slope = math.tan(math.radians(p.tibial_slope))
        self.tm = (19.0 * wr * s, 1.0 * s)   # medial plateau centre (x, z)
        self.tl = (-18.0 * wr * s, 1.0 * s)
        self.plateau_r = (14.0 * wr * s, 19.0 * s)
        # proximal tibia: wide plateau, concave metaphyseal flare, shaft
        self.tib_y = np.array([-8.0, 8, 20, 32, 48, 70, 110, 400]) * s
        self.tib_rx = np.array([37.5 * wr, 37 * wr, 34 * wr, 28, 21, 16.5, 14, 13.5]) * s
        self.tib_rz = np.array([25.0, 24.5, 23, 20, 17, 14.5, 13, 12.5]) * s
        self.tib_cz = np.array([2.0, 2, 1, -1, -3, -4, -4, -4]) * s
        self.tib_prx = _Profile(self.tib_y, self.tib_rx)
        self.tib_prz = _Profile(self.tib_y, self.tib_rz)
        self.tib_pcz = _Profile(self.tib_y, self.tib_cz)
        # --- femur frame: condyles (femur coordinates; lowest points at y = 0) ---
        self.cm = dict(c=(21.0 * wr * s, -21.0 * s, 5.0 * s), r=(13.0 * wr * s, 21.0 * s, 25.0 * s))
        self.cl = dict(c=(-20.0 * wr * s, -20.0 * s - 0.6 * s, 4.0 * s), r=(12.5 * wr * s, 20.0 * s, 24.0 * s))
        self.fem_y = np.array([-400.0, -95, -60, -40, -22]) * s
        self.fem_rx = np.array([14.5, 15.5, 21, 29 * wr, 35.5 * wr]) * s
        self.fem_rz = np.array([13.5, 13.5, 16, 20, 23.5]) * s
        self.fem_cz = np.array([-2.0, -2, -1, 0, 2]) * s
        self.fem_prx = _Profile(self.fem_y, self.fem_rx)
        self.fem_prz = _Profile(self.fem_y, self.fem_rz)
        self.fem_pcz = _Profile(self.fem_y, self.fem_cz)
        self.tib_cortex = _Profile((10.0 * s, 60.0 * s), (1.2, 4.0))
        self.fem_cortex = _Profile((-70.0 * s, -20.0 * s), (4.0, 1.2))
        body_y = np.array([-400.0, -90, -40, 0, 50, 100, 400]) * s
        self.body_prx = _Profile(body_y, np.array([62.0, 58, 48, 43, 45, 44, 38]) * s + p.fat, step=0.25)
        self.body_prz = _Profile(body_y, np.array([60.0, 56, 50, 50, 52, 50, 44]) * s + p.fat, step=0.25)
        # place the femur: each condyle's lowest point jsw above the plateau under it
        xm, zm = self.cm["c"][0], self.cm["c"][2]
        xl, zl = self.cl["c"][0], self.cl["c"][2]
        ym_low = self.cm["c"][1] + self.cm["r"][1]
        yl_low = self.cl["c"][1] + self.cl["r"][1]
        tm_y = self.plateau_top(np.array(xm), np.array(zm)) - p.jsw_medial
        tl_y = self.plateau_top(np.array(xl), np.array(zl)) - p.jsw_lateral
        dx = xm - xl
        theta = math.asin(np.clip(((float(tm_y) - float(tl_y)) - (ym_low - yl_low)) / dx, -0.3, 0.3))
        self.f_cos, self.f_sin = math.cos(theta), math.sin(theta)
        # t = target - R @ P for the midpoint of the two lowest points
        mx, my = 0.5 * (xm + xl), 0.5 * (ym_low + yl_low)
        rx_, ry_ = self.f_cos * mx - self.f_sin * my, self.f_sin * mx + self.f_cos * my
        self.f_t = (mx - rx_, 0.5 * (float(tm_y) + float(tl_y)) - ry_, 0.0)
        self.femur_theta = theta
        # patella (femur frame), its cartilage against the trochlear cartilage
        self.pat_r = (21.0 * wr * s, 21.0 * s, 9.5 * s)
        pat_y = -30.0 * s + p.patella_height
        front = float(np.interp(pat_y, self.fem_y, self.fem_cz) - np.interp(pat_y, self.fem_y, self.fem_rz))
        self.pat_c = (2.0 * s, pat_y, front - self.pat_r[2] - 2.4 * p.cartilage - 0.4)

    # --- helpers ---
    def plateau_top(self, u, w):
        """Height (y, inferior positive) of the tibial bone surface at (x, z)."""
        s = self.s
        y = self.slope * w
        (xm, zm), (xl, zl), (rx, rz) = self.tm, self.tl, self.plateau_r
        bm = np.maximum(0.0, 1.0 - ((u - xm) / rx) ** 2 - ((w - zm) / rz) ** 2)
        bl = np.maximum(0.0, 1.0 - ((u - xl) / rx) ** 2 - ((w - zl) / rz) ** 2)
        em = np.exp(-((u / (5.0 * s)) ** 2) - ((w - 1.0 * s) / (11.0 * s)) ** 2)
        return y + 1.8 * s * bm - 0.8 * s * bl - 6.5 * s * em

    def femur_coords(self, u, v, w):
        """Tibial-frame coordinates -> femur-frame coordinates."""
        tu, tv = u - self.f_t[0], v - self.f_t[1]
        return self.f_cos * tu + self.f_sin * tv, -self.f_sin * tu + self.f_cos * tv, w

    # --- solids ---
    def sd_tibia(self, u, v, w):
        s = self.s
        rx, rz, cz = self.tib_prx(v), self.tib_prz(v), self.tib_pcz(v)
        d = _ellipse2(u - 0.5 * s, w - cz, rx, rz)
        d = np.minimum(d, v - self.plateau_top(u, w))
        tub = _ellipsoid(u - 2.0 * s, v - 32.0 * s, w + 14.0 * s, 11.0 * s, 15.0 * s, 6.0 * s)
        d = _smax(d, tub, 3.0 * s)
        om, ol = self.p.osteophytes[0], self.p.osteophytes[1]
        for o, sign in ((om, 1.0), (ol, -1.0)):
            if o > 0.2:
                ost = _ellipsoid(u - sign * (float(self.tib_rx[0]) - 1.5 * s + 0.4 * o), v - 1.5 * s, w - 1.0 * s,
                                 1.2 * o, 0.8 * o + 0.5, 1.6 * o + 1.0)
                d = _smax(d, ost, 1.0)
        return d

    def sd_femur(self, u, v, w):
        s = self.s
        uf, vf, wf = self.femur_coords(u, v, w)
        rx, rz, cz = self.fem_prx(vf), self.fem_prz(vf), self.fem_pcz(vf)
        d = _ellipse2(uf - 0.5 * s, wf - cz, rx, rz)
        d = np.minimum(d, (-16.0 * s - 0.3 * wf) - vf)  # notch roof / trochlea, deeper in front
        for c in (self.cm, self.cl):
            (cx, cy, cz_), (a, b, cc) = c["c"], c["r"]
            d = _smax(d, _ellipsoid(uf - cx, vf - cy, wf - cz_, a, b, cc), 3.0 * s)
        om, ol = self.p.osteophytes[2], self.p.osteophytes[3]
        for o, c, sign in ((om, self.cm, 1.0), (ol, self.cl, -1.0)):
            if o > 0.2:
                (cx, cy, cz_), (a, b, cc) = c["c"], c["r"]
                ost = _ellipsoid(uf - (cx + sign * (a - 0.5 * s + 0.4 * o)), vf - (cy + 0.55 * b), wf - cz_,
                                 1.1 * o, 1.7 * o + 0.5, 1.4 * o + 1.0)
                d = _smax(d, ost, 1.0)
        return d

    def sd_condyle_shell(self, u, v, w):
        """Distance field of the articular surfaces of the femur: both condyles (not their side
        walls, nor above the posterior condyles) and the trochlea (for cartilage and fluid)."""
        uf, vf, wf = self.femur_coords(u, v, w)
        out = None
        for c in (self.cm, self.cl):
            (cx, cy, cz_), (a, b, cc) = c["c"], c["r"]
            d = _ellipsoid(uf - cx, vf - cy, wf - cz_, a, b, cc)
            d = np.minimum(d, 0.85 * a - np.abs(uf - cx))
            d = np.minimum(d, vf - (cy - 0.3 * b) + np.maximum(0.0, cz_ - wf))
            out = d if out is None else np.maximum(out, d)
        rx, rz, cz = self.fem_prx(vf), self.fem_prz(vf), self.fem_pcz(vf)
        tro = _ellipse2(uf - 0.5 * self.s, wf - cz, rx, rz)
        tro = np.minimum(tro, 2.0 - tro)  # a shell: nothing deep inside the bone
        tro = np.minimum(tro, vf + 45.0 * self.s)
        tro = np.minimum(tro, (-16.0 * self.s - 0.3 * wf) - vf + 3.0)
        tro = np.minimum(tro, (cz - 0.3 * rz) - wf)
        tro = np.minimum(tro, 0.75 * rx - np.abs(uf))
        return np.maximum(out, tro)

    def femoral_cartilage_thickness(self, u, v, w):
        """Thickness of femoral cartilage: the compartment's contact value (0.55 x JSW) at the
        weight-bearing bottom of each condyle, the general value elsewhere."""
        uf, vf, _ = self.femur_coords(u, v, w)
        cy = np.where(uf > 0, _f32(self.cm["c"][1]), _f32(self.cl["c"][1]))
        b = self.cm["r"][1]
        wgt = np.clip((vf - cy) / (0.6 * b), 0.0, 1.0)
        contact = np.where(uf > 0, _f32(0.55 * self.p.jsw_medial), _f32(0.55 * self.p.jsw_lateral))
        return wgt * contact + (1.0 - wgt) * self.p.cartilage

    def sd_tibial_slab(self, u, v, w, thickness):
        """The layer of `thickness` on top of the plateau, inside the two compartments."""
        top = self.plateau_top(u, w)
        (xm, zm), (xl, zl), (rx, rz) = self.tm, self.tl, self.plateau_r
        comp = np.maximum(_ellipse2(u - xm, w - zm, rx * 1.08, rz * 1.1),
                          _ellipse2(u - xl, w - zl, rx * 1.08, rz * 1.1))
        return np.minimum(np.minimum(v - (top - thickness), top + 1.0 - v), comp)

    def sd_menisci(self, u, v, w):
        s = self.s
        top = self.plateau_top(u, w)
        out = None
        (rx, rz) = self.plateau_r
        for (cx, cz), jsw in ((self.tm, self.p.jsw_medial), (self.tl, self.p.jsw_lateral)):
            rho = np.sqrt(((u - cx) / (rx * 1.12)) ** 2 + ((w - cz) / (rz * 1.12)) ** 2)
            inner = 0.6
            h = (2.0 * s + 0.7 * jsw) * np.clip((rho - inner) / (1.0 - inner), 0.0, 1.0) + 1.2 * s
            d = np.minimum(np.minimum((1.0 - rho) * rx, v - (top - h)), top + 1.0 - v)
            d = np.minimum(d, (rho - inner) * rx)
            out = d if out is None else np.maximum(out, d)
        return out

    def sd_fibula(self, u, v, w):
        s, wr = self.s, self.wr
        hx = -30.0 * wr * s  # the head sits postero-lateral, against the tibia
        head = _ellipsoid(u - hx, v - 22.0 * s, w - 21.0 * s, 9.5 * s, 11.0 * s, 9.5 * s)
        shaft = _capsule(u, v, w, (hx, 25.0 * s, 21.0 * s), (hx - 4.0 * s, 400.0 * s, 14.0 * s), 6.5 * s)
        return _smax(head, shaft, 4.0 * s)

    def sd_patella(self, u, v, w):
        uf, vf, wf = self.femur_coords(u, v, w)
        (cx, cy, cz), (a, b, c) = self.pat_c, self.pat_r
        return _ellipsoid(uf - cx, vf - cy, wf - cz, a, b, c)

    def sd_patellar_cartilage(self, u, v, w):
        uf, vf, wf = self.femur_coords(u, v, w)
        (cx, cy, cz), (a, b, c) = self.pat_c, self.pat_r
        d = _ellipsoid(uf - cx, vf - cy, wf - cz, a, b, c)
        return np.minimum(d + self.p.cartilage * 1.4, (wf - cz) - 1.0)

    def sd_effusion(self, u, v, w):
        """The suprapatellar pouch, in front of the distal femur, `effusion` mm thick."""
        s, e = self.s, self.p.effusion
        uf, vf, wf = self.femur_coords(u, v, w)
        return _blob(uf - 1.0 * s, vf + 52.0 * s, wf - (-20.0 * s - 0.5 * e), 22.0 * s, 24.0 * s, 0.5 * e + 0.4)

    def body_radii(self, v):
        rx, rz = self.body_prx(v), self.body_prz(v)
        return rx, rz

    def sd_body(self, u, v, w):
        rx, rz = self.body_radii(v)
        return _round_ellipse2(u - 1.0 * self.s, w - 2.0 * self.s, rx, rz)

    def objects(self) -> list[_Object]:
        """Solids in painting order (later ones cover earlier ones)."""
        s, p = self.s, self.p
        big = 450.0 * s
        rxb, rzb = (64.0 * s + p.fat), (62.0 * s + p.fat)
        fluid_t = 0.9
        spur = 12.0  # room for osteophytes (mm, not scaled) in the bounds of the bones

        def femoral_cart_inset(extra):
            def inset(u, v, w):
                return -(self.femoral_cartilage_thickness(u, v, w) + extra)
            return inset

        def tib_cart(u, v, w, extra):
            t = np.where(u > 0, _f32(0.45 * p.jsw_medial), _f32(0.45 * p.jsw_lateral))
            return self.sd_tibial_slab(u, v, w, t + extra)

        pat = self.pat_c
        objs = [
            _Object("body", ((-rxb, -big, -rzb + 2 * s), (rxb, big, rzb + 2 * s)), self.sd_body,
                    [(0.0, "skin"), (1.6, "fat"), (1.6 + p.fat, "muscle")]),
            # periarticular fat (Hoffa, popliteal fossa, around the joint capsule)
            _Object("joint fat", ((-52 * s, -40 * s, -52 * s), (52 * s, 38 * s, 52 * s)),
                    lambda u, v, w: np.minimum(_blob(u, v + 2.0 * s, w, 50 * s, 36 * s, 50 * s),
                                               self.sd_body(u, v, w) - 1.6), [(0.0, "fat")], edge=6.0),
            # gastrocnemius heads, posterior to each condyle
            _Object("gastrocnemius", ((-42 * s, -90 * s, 14 * s), (42 * s, 60 * s, 70 * s)),
                    lambda u, v, w: np.minimum(np.maximum(
                        _blob(u - 20 * s, v + 10 * s, w - 40 * s, 14 * s, 60 * s, 13 * s),
                        _blob(u + 20 * s, v + 10 * s, w - 40 * s, 13 * s, 60 * s, 12 * s)),
                        self.sd_body(u, v, w) - 1.6 - p.fat), [(0.0, "muscle")], edge=3.0),
            _Object("suprapatellar effusion", ((-30 * s, -90 * s, -45 * s), (30 * s, -20 * s, -10 * s)),
                    self.sd_effusion, [(0.0, "fluid")]),
            _Object("quadriceps tendon", ((-30 * s, -130 * s, -60 * s), (30 * s, -10 * s, -10 * s)),
                    lambda u, v, w: _capsule(*self.femur_coords(u, v, w), (pat[0], pat[1] - 15 * s, pat[2] - 2 * s),
                                             (1 * s, -130 * s, -27 * s), 3.5 * s, 3.0), [(0.0, "ligament")]),
            _Object("patellar tendon", ((-30 * s, -25 * s, -60 * s), (30 * s, 45 * s, -5 * s)),
                    lambda u, v, w: _capsule(u, v, w, (pat[0], pat[1] + 18 * s + self.f_t[1], pat[2] + 1 * s),
                                             (2 * s, 34 * s, -21 * s), 3.0 * s, 3.2), [(0.0, "ligament")]),
            # joint fluid film + cartilage on the femoral condyles and trochlea
            _Object("femoral cartilage", ((-48 * s, -60 * s, -40 * s), (48 * s, 10 * s, 40 * s)),
                    self.sd_condyle_shell,
                    [(femoral_cart_inset(fluid_t), "fluid"), (femoral_cart_inset(0.0), "cartilage")]),
            _Object("tibial fluid", ((-45 * s, -12 * s, -30 * s), (45 * s, 10 * s, 35 * s)),
                    lambda u, v, w: tib_cart(u, v, w, fluid_t), [(0.0, "fluid")]),
            _Object("tibial cartilage", ((-45 * s, -12 * s, -30 * s), (45 * s, 10 * s, 35 * s)),
                    lambda u, v, w: tib_cart(u, v, w, 0.0), [(0.0, "cartilage")]),
            _Object("menisci", ((-45 * s, -16 * s, -30 * s), (45 * s, 10 * s, 35 * s)), self.sd_menisci,
                    [(0.0, "meniscus")]),
            _Object("femoral cartilage (contact)", ((-48 * s, -60 * s, -40 * s), (48 * s, 10 * s, 40 * s)),
                    self.sd_condyle_shell, [(femoral_cart_inset(0.0), "cartilage")]),
            _Object("cruciate ligaments", ((-20 * s, -32 * s, -20 * s), (20 * s, 12 * s, 32 * s)),
                    lambda u, v, w: np.maximum(
                        _capsule(u, v, w, (-8 * s, -24 * s + self.f_t[1], 16 * s), (-2 * s, -1 * s, -7 * s), 3.5 * s),
                        _capsule(u, v, w, (8 * s, -25 * s + self.f_t[1], 1 * s), (0.5 * s, 6 * s, 22 * s), 4.5 * s)),
                    [(0.0, "ligament")]),
            _Object("patellar cartilage", ((-30 * s, -65 * s, -60 * s), (30 * s, 5 * s, -15 * s)),
                    self.sd_patellar_cartilage, [(0.0, "cartilage")]),
            _Object("tibia", ((-42 * s - spur, -12 * s, -35 * s), (42 * s + spur, big, 35 * s)), self.sd_tibia,
                    [(0.0, "cortical"), (lambda u, v, w: self.tib_cortex(v), "marrow")], bone=True),
            _Object("fibula", ((-50 * s, 8 * s, 4 * s), (-17 * s, big, 34 * s)), self.sd_fibula,
                    [(0.0, "cortical"), (1.3, "marrow")], bone=True),
            _Object("femur", ((-42 * s - spur, -big, -35 * s), (42 * s + spur, 12 * s, 38 * s)), self.sd_femur,
                    [(0.0, "cortical"),
                     (lambda u, v, w: self.fem_cortex(self.femur_coords(u, v, w)[1]), "marrow")],
                    bone=True),
            _Object("patella", ((-30 * s, -65 * s, -60 * s), (30 * s, 5 * s, -15 * s)), self.sd_patella,
                    [(0.0, "cortical"), (0.8, "marrow")], bone=True),
        ]
        return objs


# === Rendering ===

class _Grid:
    """A regular world grid (three ascending axes) and the world -> anatomy map anat = A @ world + b."""

    def __init__(self, axes: Sequence[np.ndarray], to_anat: np.ndarray, offset: np.ndarray):
        self.axes = [np.asarray(a, np.float32) for a in axes]
        self.A = np.asarray(to_anat, np.float64)
        self.b = np.asarray(offset, np.float64)
        self.A_inv = np.linalg.inv(self.A)
        # the grid's own bounding box in the anatomy frame, to cut long objects to what it sees
        world = _corners([a[0] for a in self.axes], [a[-1] for a in self.axes])
        anat = world @ self.A.T + self.b
        self.anat_lo, self.anat_hi = anat.min(0), anat.max(0)

    def block(self, bounds: Bounds):
        """Index slices of the grid covering `bounds` (anatomy frame) and anatomy coords there."""
        lo = np.maximum(np.asarray(bounds[0], float), self.anat_lo)
        hi = np.minimum(np.asarray(bounds[1], float), self.anat_hi)
        if (hi <= lo).any():
            return None
        corners = _corners(lo, hi)
        world = (corners - self.b) @ self.A_inv.T
        wlo, whi = world.min(0), world.max(0)
        slices = []
        for k, ax in enumerate(self.axes):
            i0 = int(np.searchsorted(ax, wlo[k], side="left"))
            i1 = int(np.searchsorted(ax, whi[k], side="right"))
            if i1 <= i0:
                return None
            slices.append(slice(max(i0 - 1, 0), min(i1 + 1, len(ax))))
        x = self.axes[0][slices[0]][:, None, None]
        y = self.axes[1][slices[1]][None, :, None]
        z = self.axes[2][slices[2]][None, None, :]
        A, b = self.A.astype(np.float32), self.b.astype(np.float32)
        coords = [A[i, 0] * x + A[i, 1] * y + A[i, 2] * z + b[i] for i in range(3)]
        return tuple(slices), coords


def _corners(lo: Sequence[float], hi: Sequence[float]) -> np.ndarray:
    """The 8 corners (8, 3) of the box [lo, hi]."""
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])], float)


def _occupancy(sd, width: float):
    return np.clip(0.5 + sd * (1.0 / width), 0.0, 1.0)


def _inset(layer_inset, u, v, w):
    return layer_inset(u, v, w) if callable(layer_inset) else layer_inset


def _anatomy_map(p: KneeParams, extra_rot=(0.0, 0.0, 0.0), extra_shift=(0.0, 0.0, 0.0), beam_tilt: float = 0.0):
    """world = R (F anat) + t  ->  anat = F R^T (world - t); F mirrors x for a left knee.

    `beam_tilt` (degrees, about the left-right axis) adds to the flexion: the PA view tilts the
    beam along the tibial slope, as fixed-flexion protocols do, so the joint space is crisp."""
    rot = _rotation(*extra_rot) @ _rotation(p.flexion + beam_tilt, p.axial, p.varus)
    mirror = np.diag([-1.0 if p.left else 1.0, 1.0, 1.0])
    A = mirror @ rot.T
    b = -A @ np.asarray(extra_shift, float)
    return A, b


def render_mri(p: KneeParams, config: SynthConfig = SynthConfig(),
               rng: np.random.Generator | None = None) -> np.ndarray:
    """The MRI volume (slices, rows, cols) = (x, y, z), float32; noiseless when `rng` is None."""
    S, N = config.mri_slices, config.mri_size
    ds, dp = config.mri_slice_mm, config.mri_pixel_mm
    # slice k lies at world x = -(k - centre) * ds + place_x (index towards the patient's
    # right, as the DICOM writer's default orientation says); rendered ascending, then reversed
    ax_x = (np.arange(S) - (S - 1 - config.mri_center_slice)) * ds + p.place_x
    ax_y = (np.arange(N) - (N - 1) / 2.0) * dp + p.place_y
    ax_z = (np.arange(N) - (N - 1) / 2.0) * dp + p.mri_place_z
    A, b = _anatomy_map(p, p.mri_jitter_rot, p.mri_jitter_shift)
    grid = _Grid((ax_x, ax_y, ax_z), A, b)
    vol = np.zeros((S, N, N), np.float32)
    knee = _Knee(p)
    width = dp  # partial-volume width of an edge
    cache: dict[Any, Any] = {}
    for obj in knee.objects():
        key = (obj.sd, obj.bounds)
        if key not in cache:
            blk = grid.block(obj.bounds)
            cache[key] = None if blk is None else (blk, obj.sd(*blk[1]))
        if cache[key] is None:
            continue
        (sl, (u, v, w)), sd = cache[key]
        sub = vol[sl]
        for inset, tissue in obj.layers:
            occ = _occupancy(sd - _inset(inset, u, v, w), width + obj.edge)
            sub += (TISSUES[tissue][0] - sub) * occ  # `sub` is a view of `vol`
    vol *= p.mri_gain
    if rng is not None:
        if config.bias_field > 0:
            vol *= _bias_field(rng, (ax_x, ax_y, ax_z), config.bias_field)
        if config.mri_noise > 0:
            # Rician: |signal + n1 + i n2|. One normal draw serves both parts: n2 is n1 read
            # backwards, independent of n1 at every voxel (but the centre one)
            sigma = np.float32(config.mri_noise * 1000.0)
            noise = rng.standard_normal(vol.size, dtype=np.float32)
            noise *= sigma
            imag = np.square(noise[::-1]).reshape(vol.shape)
            real = noise.reshape(vol.shape)
            real += vol
            np.square(real, out=real)
            real += imag
            vol = np.sqrt(real, out=real)
    # integer-valued intensities, as a scanner stores them; slice index towards the patient's right
    return np.ascontiguousarray(np.rint(vol)[::-1])


def _bias_field(rng: np.random.Generator, axes, amplitude: float) -> np.ndarray:
    """A smooth multiplicative field 1 + amplitude * q(x, y, z), q a random quadratic
    polynomial scaled to max |q| = 1 over the volume (so the field lies in [1-a, 1+a])."""
    c = rng.standard_normal(9).astype(np.float32)
    x, y, z = ((np.asarray(a, np.float32) - np.float32(np.mean(a))) / np.float32(100.0) for a in axes)
    fx = c[0] * x + 0.5 * c[3] * x * x                     # separable parts, 1-D
    fy = c[1] * y + 0.5 * c[4] * y * y
    fz = c[2] * z + 0.5 * c[5] * z * z
    poly = (fx[:, None, None] + fy[None, :, None]) + fz[None, None, :]
    poly += (0.5 * c[6]) * (x[:, None, None] * y[None, :, None])
    poly += (0.5 * c[7]) * (y[:, None] * z[None, :])[None]
    poly += (0.5 * c[8]) * (x[:, None, None] * z[None, None, :])
    m = float(np.abs(poly).max()) or 1.0
    poly *= np.float32(amplitude / m)
    poly += np.float32(1.0)
    return poly


def xray_line_integral(p: KneeParams, config: SynthConfig = SynthConfig()) -> np.ndarray:
    """The noiseless attenuation line integral (sum of mu x length along the beam, an (H, W)
    float array) of the PA view of knee `p`: what `render_xray` exposes and stores, before the
    quantum noise and the detector's gain. Geometry as in the module docstring."""
    H = W = config.xray_size
    px = config.xray_pixel_mm
    # world coordinates of detector pixel centres; the knee centre sits at detector_(x, y)
    col_x = (np.arange(W) - (W - 1) / 2.0) * px - p.detector_x
    row_y = (np.arange(H) - (H - 1) / 2.0) * px - p.detector_y
    A, b = _anatomy_map(p, beam_tilt=p.tibial_slope)
    knee = _Knee(p)
    # soft tissue: analytic chords through the (vertical) leg, skin+fat and muscle
    sign = -1.0 if p.left else 1.0
    ua = sign * col_x[None, :] - 1.0 * knee.s
    rx, rz = knee.body_radii(row_y[:, None])
    chord_body = 2.0 * rz * np.sqrt(np.clip(1.0 - (ua / rx) ** 2, 0.0, None))
    rxm, rzm = rx - p.fat - 1.6, rz - p.fat - 1.6
    chord_muscle = 2.0 * rzm * np.sqrt(np.clip(1.0 - (ua / rxm) ** 2, 0.0, None))
    line = TISSUES["fat"][1] * chord_body + (TISSUES["muscle"][1] - TISSUES["fat"][1]) * chord_muscle
    # bones: soft-edged voxels on a coarse grid, summed along the beam (z)
    f = max(1, int(round(config.xray_compute_mm / px)))
    if W % f or H % f:
        f = 1
    step = px * f
    cx = col_x.reshape(-1, f).mean(1)
    cy = row_y.reshape(-1, f).mean(1)
    cz = np.arange(-80.0, 80.0 + 1e-6, step)
    grid = _Grid((cx, cy, cz), A, b)
    bones = np.zeros((cx.size, cy.size), np.float32)
    for obj in knee.objects():
        if not obj.bone:
            continue
        blk = grid.block(obj.bounds)
        if blk is None:
            continue
        sl, (u, v, w) = blk
        sd = obj.sd(u, v, w)
        prev = MU_SOFT
        acc = np.zeros(sd.shape[:2], np.float32)
        for inset, tissue in obj.layers:
            mu = TISSUES[tissue][1]
            acc += (mu - prev) * _occupancy(sd - _inset(inset, u, v, w), step).sum(axis=2)
            prev = mu
        bones[sl[0], sl[1]] += acc * step
    if f > 1:
        import cv2

        bones = cv2.resize(bones.T, (W, H), interpolation=cv2.INTER_LINEAR)
    else:
        bones = bones.T
    return line + bones


def render_xray(p: KneeParams, config: SynthConfig = SynthConfig(), rng: np.random.Generator | None = None
                ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The full PA X-ray (MONOCHROME2 uint16, bone bright) and the joint ROI box."""
    line = xray_line_integral(p, config)
    if rng is not None and config.xray_photons > 0:
        counts = config.xray_photons * np.exp(-line)
        counts = counts + np.sqrt(counts) * rng.standard_normal(counts.shape)
        line = -np.log(np.clip(counts, 1.0, None) / config.xray_photons)
    value = 80.0 + 950.0 * p.xray_gain * line
    xray = np.clip(np.rint(value), 0, 4095).astype(np.uint16)
    return xray, joint_box(p, config)


def joint_box(p: KneeParams, config: SynthConfig = SynthConfig()) -> tuple[int, int, int, int]:
    """The square joint ROI `(x0, y0, x1, y1)` (ends exclusive) of knee `p` on its X-ray: `roi_mm`
    wide, centred on the joint space (half the mean joint-space width above the tibial
    plateau at the knee centre) moved by the shared placement offset."""
    W = H = config.xray_size
    px = config.xray_pixel_mm
    side = int(round(config.roi_mm / px))
    # continuous pixel coordinates: pixel i spans [i, i + 1), so its centre is i + 0.5
    joint_space_y = -0.25 * (p.jsw_medial + p.jsw_lateral)
    cx = W / 2.0 + (p.place_x + p.detector_x) / px
    cy = H / 2.0 + (joint_space_y + p.place_y + p.detector_y) / px
    x0 = min(max(int(round(cx - side / 2.0)), 0), W - side)
    y0 = min(max(int(round(cy - side / 2.0)), 0), H - side)
    return (x0, y0, x0 + side, y0 + side)


# === Public API ===

def generate_knee(seed: int, index: int, config: SynthConfig = SynthConfig()) -> SyntheticKnee:
    """Generate subject `index` of the dataset `seed`.

    Deterministic: depends only on (seed, index, config), through
    `np.random.default_rng([seed, index])`.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    p = sample_params(rng, config)
    return render_knee(p, config, rng, knee_id=f"knee{int(index):05d}")


def render_knee(p: KneeParams, config: SynthConfig = SynthConfig(), rng: np.random.Generator | None = None,
                knee_id: str = "knee") -> SyntheticKnee:
    """Both images of the knee `p`; noiseless (and exactly mirror-symmetric) when `rng` is None."""
    mri = render_mri(p, config, rng)
    xray, box = render_xray(p, config, rng)
    photometric = "MONOCHROME1" if p.monochrome1 else "MONOCHROME2"
    if p.monochrome1:
        xray = (4095 - xray).astype(np.uint16)
    params = p.as_dict()
    params["femur_varus_deg"] = math.degrees(_Knee(p).femur_theta)
    return SyntheticKnee(id=knee_id, side="left" if p.left else "right", xray=xray, photometric=photometric,
                         box=box, mri=mri, mri_spacing=(config.mri_slice_mm, config.mri_pixel_mm, config.mri_pixel_mm),
                         xray_spacing=(config.xray_pixel_mm, config.xray_pixel_mm), params=params)


@functools.lru_cache(maxsize=16)
def _split_table(seed: int, n: int, fractions: tuple[float, ...]) -> tuple[str, ...]:
    f = np.asarray(fractions, float)
    if f.shape != (3,) or (f < 0).any() or f.sum() <= 0:
        raise ConfigError(f"fractions must be 3 non-negative numbers (train, val, test). Received: {fractions}")
    f = f / f.sum()
    n_val, n_test = int(round(n * f[1])), int(round(n * f[2]))
    n_val, n_test = min(n_val, n), min(n_test, n - min(n_val, n))
    order = np.random.default_rng([int(seed), n, 0x5B117]).permutation(n)
    table = ["train"] * n
    for k, i in enumerate(order):
        if k < n_val:
            table[i] = "val"
        elif k < n_val + n_test:
            table[i] = "test"
    return tuple(table)


def assign_split(seed: int, index: int, n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """The split ("train", "val" or "test") of subject `index` of `n`: a seeded permutation gives
    exactly round(n * val) val and round(n * test) test subjects (fractions are normalised)."""
    if not 0 <= index < n:
        raise ConfigError(f"index must lie in [0, n). Received: index={index}, n={n}")
    return _split_table(int(seed), int(n), tuple(float(f) for f in fractions))[index]


# === Writing a dataset ===

@dataclass(frozen=True)
class SynthSummary:
    """What `synthesize` did."""

    out_dir: Path
    manifest: Path
    n: int
    generated: int
    reused: int
    seconds: float


def _subject_paths(out_dir: Path, knee_id: str, formats: Sequence[str]) -> dict[str, Path]:
    paths = {}
    if "dicom" in formats:
        paths["mri_dicom"] = out_dir / "mri" / knee_id
        paths["xray_dicom"] = out_dir / "xray" / f"{knee_id}.dcm"
    if "nifti" in formats:
        paths["mri_nifti"] = out_dir / "mri" / f"{knee_id}.nii.gz"
    if "png" in formats:
        paths["xray_png"] = out_dir / "xray" / f"{knee_id}.png"
    return paths


def _complete(paths: dict[str, Path], config: SynthConfig) -> bool:
    for key, path in paths.items():
        if key == "mri_dicom":
            if not path.is_dir() or sum(1 for f in path.iterdir() if f.suffix == ".dcm") != config.mri_slices:
                return False
        elif not path.is_file():
            return False
    return True


def _mri_origin(p: KneeParams, config: SynthConfig) -> tuple[float, float, float]:
    """LPS position (mm, knee joint centre = 0) of voxel (0, 0, 0), as `render_mri` places it."""
    N, dp = config.mri_size, config.mri_pixel_mm
    return (config.mri_center_slice * config.mri_slice_mm + p.place_x,
            -(N - 1) / 2.0 * dp + p.mri_place_z,
            (N - 1) / 2.0 * dp - p.place_y)


def _write_subject(out_dir: str, seed: int, index: int, config: SynthConfig, formats: tuple[str, ...],
                   radiograph: Any = None) -> tuple[str, str, tuple[float, ...], bool]:
    """Generate and write one subject unless all its files exist. Runs in a worker process.

    With a `radiograph` style (`kneetf.data.radiograph`), the X-ray is that style's simulated
    radiograph of the same knee (the MRI is unchanged). Returns (id, side, box, generated)."""
    from kneetf.io import writers

    out = Path(out_dir)
    knee_id = f"knee{index:05d}"
    paths = _subject_paths(out, knee_id, formats)
    rng = np.random.default_rng([int(seed), int(index)])
    p = sample_params(rng, config)
    acquisition = None
    if radiograph is not None:
        acquisition = radiograph.acquisition(seed, index, p, config)
    if _complete(paths, config):
        box = joint_box(p, config) if acquisition is None else acquisition.box.as_tuple()
        return knee_id, "left" if p.left else "right", box, False
    side = "left" if p.left else "right"
    mri_spacing = (config.mri_slice_mm, config.mri_pixel_mm, config.mri_pixel_mm)
    if acquisition is None:
        knee = render_knee(p, config, rng, knee_id=knee_id)
        mri = knee.mri
        # presentation values (bone bright); the DICOM writer stores MONOCHROME1 inverted itself
        shown = knee.xray if knee.photometric == "MONOCHROME2" else (4095 - knee.xray).astype(np.uint16)
        photometric, spacing, bits, box = knee.photometric, knee.xray_spacing, 16, knee.box
    else:
        mri = render_mri(p, config, rng)  # the MRI of the plain dataset: its draws come first there too
        rad = radiograph.render(p, acquisition, config)
        shown = rad.presentation().astype(np.uint16)
        photometric, spacing, bits, box = rad.photometric, rad.pixel_spacing, rad.bits, rad.box.as_tuple()
    side_code = "L" if side == "left" else "R"
    patient = {"PatientName": knee_id, "PatientID": knee_id}
    if "mri_dicom" in paths and not _complete({"mri_dicom": paths["mri_dicom"]}, config):
        writers.write_dicom_series(paths["mri_dicom"], mri, mri_spacing, origin=_mri_origin(p, config),
                                   series_description=f"SAG_3D_DESS_{side.upper()}", shuffle_names=True,
                                   seed=int(seed) * 100003 + int(index), patient=patient, laterality=side_code)
    if "xray_dicom" in paths and not paths["xray_dicom"].is_file():
        writers.write_dicom_xray(paths["xray_dicom"], shown, pixel_spacing=spacing, photometric=photometric,
                                 laterality=side_code, patient=patient, view_position="PA", bits_stored=bits)
    if "mri_nifti" in paths and not paths["mri_nifti"].is_file():
        writers.write_nifti(paths["mri_nifti"], mri, mri_spacing, origin=_mri_origin(p, config),
                            dtype=np.int16)
    if "xray_png" in paths and not paths["xray_png"].is_file():
        writers.write_png(paths["xray_png"], shown, bits=8 if bits <= 8 else 16)
    return knee_id, side, box, True


def _check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(f.strip().lower() for f in formats if f.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown formats {unknown}; choose from {FORMATS}. Received: formats={formats}")
    if "dicom" not in formats and not {"nifti", "png"} <= set(formats):
        raise ConfigError("formats must give an X-ray and an MRI file: 'dicom', or both 'nifti' and 'png'. "
                          f"Received: formats={formats}")
    return formats


def synthesize(out_dir: str | Path, n: int = 256, seed: int = 0, config: SynthConfig = SynthConfig(), *,
               fractions: Sequence[float] = (0.8, 0.1, 0.1), formats: Iterable[str] = FORMATS, workers: int = 2,
               progress: bool = True, radiograph: Any = None) -> SynthSummary:
    """`write_synthetic_dataset`, returning a summary (counts, time) instead of the manifest path.

    `radiograph`: a `kneetf.data.radiograph.RadiographStyle` (`get_style(name)`): the X-rays
    are that style's simulated radiographs (pixel spacing, bit depth and photometric
    interpretation as drawn; `monochrome1_fraction` is then the style's), the boxes their
    truth boxes (floats)."""
    t0 = time.perf_counter()
    if radiograph is not None and not hasattr(radiograph, "acquisition"):
        raise ConfigError("radiograph takes a style object (kneetf.data.radiograph.get_style(name)). "
                          f"Received: radiograph={radiograph!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    formats = _check_formats(formats)
    if n < 1:
        raise ConfigError(f"n must be >= 1. Received: n={n}")
    splits = [assign_split(seed, i, n, fractions) for i in range(n)]
    info_path = out / "synth.json"
    info = {"kind": "kneetf-synthetic", "n": int(n), "seed": int(seed), "config": config.to_dict(),
            "fractions": [float(f) for f in fractions], "formats": list(formats), "kneetf_version": __version__}
    if radiograph is not None:
        info["radiograph"] = radiograph.to_dict()
    if info_path.is_file():
        try:
            old = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(info_path, f"cannot read the existing dataset description: {e}") from e
        if (old.get("seed") != info["seed"] or old.get("config") != json.loads(json.dumps(info["config"]))
                or old.get("radiograph") != json.loads(json.dumps(info.get("radiograph")))):
            raise InputError(out, "holds a synthetic dataset written with another seed or config "
                                  f"(seed {old.get('seed')}); write to an empty folder instead")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[int, tuple[str, str, tuple[int, int, int, int], bool]] = {}
    args = []
    for i in range(n):  # complete subjects are answered here (cheap), without a worker
        if _complete(_subject_paths(out, f"knee{i:05d}", formats), config):
            results[i] = _write_subject(str(out), int(seed), i, config, formats, radiograph)
        else:
            args.append((str(out), int(seed), i, config, formats, radiograph))
    bar = _progress(len(args), progress)
    try:
        if workers <= 1 or len(args) <= 1:
            for a in args:
                results[a[2]] = _write_subject(*a)
                bar.update(1)
        else:
            with process_pool(workers) as pool:
                futures = {pool.submit(_write_subject, *a): a[2] for a in args}
                for fut in concurrent.futures.as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update(1)
    finally:
        bar.close()
    manifest = _write_tables(out, results, splits, formats)
    write_text_atomic(info_path, json.dumps(info, indent=2) + "\n")
    generated = sum(1 for r in results.values() if r[3])
    summary = SynthSummary(out_dir=out, manifest=manifest, n=n, generated=generated, reused=n - generated,
                           seconds=time.perf_counter() - t0)
    log.debug("synthetic dataset %s: %d knees (%d generated, %d reused) in %.1f s", out, n, generated,
             n - generated, summary.seconds)
    return summary


def write_synthetic_dataset(out_dir: str | Path, n: int = 256, seed: int = 0, config: SynthConfig = SynthConfig(), *,
                            fractions: Sequence[float] = (0.8, 0.1, 0.1), formats: Iterable[str] = FORMATS,
                            workers: int = 2, progress: bool = True, radiograph: Any = None) -> Path:
    """Write `n` synthetic paired knees under `out_dir`; returns the path of `manifest.csv`.

    Layout: `mri/<id>/` (DICOM series, shuffled file names), `mri/<id>.nii.gz`, `xray/<id>.dcm`,
    `xray/<id>.png`, `manifest.csv` (`id,xray,mri,side,split`, DICOM files when written),
    `manifest_nifti_png.csv` (PNG X-ray + NIfTI MRI, when both are written), `rois.csv`
    (`id,x0,y0,x1,y1`) and `synth.json` (n, seed, config, kneetf version). Resumable: a
    subject whose files all exist is not generated again; every file is written atomically.
    `workers` > 1 generates in spawned processes.
    """
    return synthesize(out_dir, n, seed, config, fractions=fractions, formats=formats, workers=workers,
                      progress=progress, radiograph=radiograph).manifest


def _write_tables(out: Path, results: dict, splits: Sequence[str], formats: Sequence[str]) -> Path:
    def table(rows: list[list[Any]]) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerows(rows)
        return buf.getvalue()

    header = ["id", "xray", "mri", "side", "split"]
    ids = sorted(results)
    xray_key = "dcm" if "dicom" in formats else "png"
    mri_dicom = "dicom" in formats
    rows = [header]
    for i in ids:
        knee_id, side, _box, _ = results[i]
        rows.append([knee_id, f"xray/{knee_id}.{xray_key}", f"mri/{knee_id}" if mri_dicom else f"mri/{knee_id}.nii.gz",
                     side, splits[i]])
    manifest = write_text_atomic(out / "manifest.csv", table(rows))
    if "nifti" in formats and "png" in formats:
        rows = [header] + [[results[i][0], f"xray/{results[i][0]}.png", f"mri/{results[i][0]}.nii.gz",
                            results[i][1], splits[i]] for i in ids]
        write_text_atomic(out / "manifest_nifti_png.csv", table(rows))
    rows = [["id", "x0", "y0", "x1", "y1"]] + [[results[i][0], *results[i][2]] for i in ids]
    write_text_atomic(out / "rois.csv", table(rows))
    return manifest


class _NoBar:
    def update(self, k: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="synthetic knees", unit="knee")


__all__ = ["SynthConfig", "SyntheticKnee", "KneeParams", "generate_knee", "render_knee", "sample_params",
           "render_mri", "render_xray", "xray_line_integral", "joint_box", "assign_split", "write_synthetic_dataset",
           "synthesize", "SynthSummary", "TISSUES"]
