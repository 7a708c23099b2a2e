"""Training the knee-joint ROI detector (`kneetf.preprocess.roi_detector`): examples,
augmentation, the tf.data pipeline, `train_detector` and `train_roi_detector` (what
`kneetf train-roi` runs).

Examples are whole X-rays (display-ready, bone bright) and their boxes: by default built-in
synthetic X-rays with their known boxes (`synthetic_examples`; held out: the next seed), or
a manifest with a boxes CSV (`manifest_examples`; held out: the manifest's val/test rows,
else a random fraction).

Training augments every epoch afresh: random square crops of the letterboxed image (zoom in
or out, shifts, partly outside the image), horizontal flips and random gamma/contrast, with
the box transformed consistently. This is what lets a few hundred images generalise.

TensorFlow and Keras load inside the functions that use them, so that the configs (and
`kneetf train-roi --help`) do not load them.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from kneetf.errors import ConfigError, InputError
from kneetf.io.atomic import write_text_atomic
from kneetf.preprocess.roi import Box, classical_roi, crop_box, iou

if TYPE_CHECKING:
    from kneetf.preprocess.roi_detector import RoiDetector, RoiDetectorConfig

log = logging.getLogger(__name__)

#: Boxes CSVs looked for beside a manifest when none is named.
ROI_CSV_NAMES = ("rois.csv", "boxes.csv")

#: Training X-rays project the bones on a 2.8 mm grid instead of 1.4 mm: 10x faster to render,
#: a mean absolute difference of ~0.5 % of the image's spread, far below what the detector's
#: 128 px input (2.5 mm per pixel) resolves. Held-out X-rays use the default renderer.
FAST_XRAY_COMPUTE_MM = 2.8

#: (ids, whole X-rays, boxes) of one set of examples.
Examples = tuple[list[str], list[np.ndarray], list[Box]]


@dataclass(frozen=True)
class RoiTrainConfig:
    """Optimisation and augmentation of the ROI detector."""

    epochs: int = field(default=30, metadata={"help": "epochs"})
    batch_size: int = field(default=32, metadata={"help": "batch size"})
    learning_rate: float = field(default=2e-3, metadata={"help": "initial Adam rate, cosine decay"})
    seed: int = field(default=0, metadata={"help": "synthetic training seed (held out: seed + 1) and training seed"})
    # augmentation: crop side as a fraction of the letterboxed image, probability of the
    # un-augmented full image, flips, gamma range
    crop_scale: tuple[float, float] = (0.5, 1.2)
    p_full: float = 0.2
    flip: bool = True
    gamma: tuple[float, float] = (0.7, 1.4)
    work_size: int = 256  # letterboxed images are shrunk to this once, before cropping

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "work_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1. Received: {name}={getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0. Received: learning_rate={self.learning_rate}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1]:
            raise ConfigError(f"crop_scale must be 0 < low <= high. Received: crop_scale={self.crop_scale}")


@dataclass(frozen=True)
class RoiDataConfig:
    """Where the detector's examples come from when no manifest is given (built-in synthetic
    X-rays), and how a manifest without val/test rows is split."""

    n: int = field(default=400, metadata={"help": "synthetic training X-rays"})
    n_val: int = field(default=100, metadata={"help": "synthetic held-out X-rays"})
    val_fraction: float = field(default=0.2, metadata={
        "help": "held-out fraction of --data when its manifest has no val/test rows"})

    def __post_init__(self) -> None:
        for name in ("n", "n_val"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1. Received: {name}={getattr(self, name)}")


# === Examples ===

def synthetic_examples(n: int, seed: int, *, fast: bool = False) -> Examples:
    """`n` built-in synthetic X-rays (MONOCHROME2: bone bright) and their known boxes.

    Subject `i` of dataset `seed` has the anatomy and box of `generate_knee(seed, i)`; only the
    X-ray is rendered (not the MRI), so its quantum-noise draw differs. `fast` renders the bone
    projection on a coarser grid (`FAST_XRAY_COMPUTE_MM`).
    """
    from kneetf.data.synthetic import SynthConfig, render_xray, sample_params

    config = SynthConfig(xray_compute_mm=FAST_XRAY_COMPUTE_MM) if fast else SynthConfig()
    ids, images, boxes = [], [], []
    for i in range(n):
        rng = np.random.default_rng([int(seed), int(i)])
        xray, box = render_xray(sample_params(rng, config), config, rng)
        ids.append(f"knee{i:05d}")
        images.append(np.asarray(xray, np.float32))
        boxes.append(Box(*map(float, box)))
    return ids, images, boxes


def _find_manifest(data: Path) -> Path:
    if data.is_dir():
        manifest = data / "manifest.csv"
        if not manifest.is_file():
            raise InputError(data, "folder has no manifest.csv")
        return manifest
    if not data.is_file():
        raise InputError(data, "not found")
    return data


def _find_rois(manifest: Path, rois: str | Path | None) -> Path:
    if rois:
        return Path(rois)
    for name in ROI_CSV_NAMES:
        if (manifest.parent / name).is_file():
            return manifest.parent / name
    raise InputError(manifest.parent, f"no boxes CSV ({' or '.join(ROI_CSV_NAMES)}) beside the manifest; "
                                      "pass --rois")


def manifest_examples(data: str | Path, rois: str | Path | None, *, val_fraction: float, seed: int,
                      allow_outside: bool = False) -> dict[str, Examples]:
    """Train / held-out (ids, X-rays, boxes) from a manifest and a boxes CSV.

    `data` is a manifest CSV or a folder holding `manifest.csv`; `rois` defaults to one of
    `ROI_CSV_NAMES` beside it. X-rays are read as `kneetf prepare` reads them (MONOCHROME1
    inverted, `xray_half` kept), and boxes are pixel coordinates of that image. The MRI
    column is not needed. Rows without a box are skipped with a warning; unreadable X-rays
    are skipped and logged.
    """
    from kneetf.io.manifest import read_manifest
    from kneetf.io.readers import read_xray
    from kneetf.preprocess.roi import load_boxes

    manifest = _find_manifest(Path(data))
    rois_path = _find_rois(manifest, rois)
    boxes = load_boxes(rois_path)
    result = read_manifest(manifest, allow_outside=allow_outside, require_mri=False)
    for e in result.errors:
        log.warning("skipped a manifest row: %s", e)
    cases = [c for c in result.cases if c.id in boxes]
    missing = [c.id for c in result.cases if c.id not in boxes]
    if missing:
        log.warning("%d case(s) have no box in %s and are skipped (first: %s)", len(missing), rois_path, missing[0])
    held = [c for c in cases if (c.split or "train") in ("val", "test")]
    if not held:
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in (0, 1). Received: {val_fraction}")
        order = np.random.default_rng(seed).permutation(len(cases))
        n_val = max(1, int(round(val_fraction * len(cases)))) if len(cases) > 1 else 0
        held = [cases[i] for i in order[:n_val]]
    held_ids = {c.id for c in held}
    out: dict[str, Examples] = {"train": ([], [], []), "val": ([], [], [])}
    for case in cases:
        try:
            image, _meta = read_xray(case.xray, half=case.xray_half)
        except InputError as e:
            log.warning("skipped %s: %s", case.id, e)
            continue
        ids, images, bxs = out["val" if case.id in held_ids else "train"]
        ids.append(case.id)
        images.append(np.asarray(image, np.float32).squeeze())
        bxs.append(boxes[case.id])
    if not out["train"][0]:
        raise InputError(manifest, f"no trainable X-ray with a box (boxes from {rois_path})")
    return out


# === Augmentation and the pipeline ===

def _shrink(image: np.ndarray, box: Box, work_size: int) -> tuple[np.ndarray, Box]:
    """Letterbox and area-shrink (the ops.resize implementation) to `work_size`, once."""
    import tensorflow as tf

    from kneetf.preprocess.ops import resize
    from kneetf.preprocess.roi_detector import letterbox

    sq = letterbox(image).astype(np.float32)
    side = sq.shape[0]
    if side <= work_size:
        return sq, box
    small = resize(tf.constant(sq[None, :, :, None]), work_size).numpy()[0, :, :, 0]
    return small, box.scale(work_size / side)


def augment_example(image: np.ndarray, box: Box, rng: np.random.Generator,
                    train: RoiTrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """One random square crop of a square `image` holding `box`, as (crop, target).

    The crop's side is `crop_scale` x the image side (never smaller than the box), placed so
    that the box stays inside it; parts outside the image are padded with its minimum. With
    probability `p_full` the crop is the whole image. A flip mirrors image and box.
    """
    from kneetf.preprocess.roi_detector import encode_box

    side = image.shape[0]
    bside = max(box.width, box.height)
    if rng.random() < train.p_full:
        ox, oy, c = 0.0, 0.0, float(side)
    else:
        c = max(rng.uniform(*train.crop_scale) * side, 1.1 * bside)
        # the box inside the crop, and the crop not too far outside the image
        slack = 0.15 * side
        ranges = []
        for b0, b1 in ((box.x0, box.x1), (box.y0, box.y1)):
            lo, hi = max(b1 - c, -slack), min(b0, side + slack - c)
            if lo > hi:
                lo, hi = b1 - c, b0
            ranges.append((lo, max(lo, hi)))
        ox, oy = (rng.uniform(lo, hi) for lo, hi in ranges)
        c = float(round(c))
        ox, oy = float(round(ox)), float(round(oy))
    crop = crop_box(image, Box(ox, oy, ox + c, oy + c)) if (ox, oy, c) != (0.0, 0.0, float(side)) else image
    cbox = box.shift(-ox, -oy)
    if train.flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
        cbox = Box(c - cbox.x1, cbox.y0, c - cbox.x0, cbox.y1)
    return np.ascontiguousarray(crop, np.float32), encode_box(cbox, c)


def make_train_dataset(images: Sequence[np.ndarray], boxes: Sequence[Box], image_size: int,
                       train: RoiTrainConfig) -> Any:
    """Endless-per-epoch tf.data of augmented (input, target): crops drawn in Python (fresh
    every epoch), then `preprocess_xray` and a random gamma/contrast as graph ops."""
    import tensorflow as tf

    from kneetf.preprocess.ops import preprocess_xray

    work = [_shrink(im, b, train.work_size) for im, b in zip(images, boxes)]
    rng = np.random.default_rng(train.seed)

    def generate():
        for i in rng.permutation(len(work)):
            yield augment_example(work[i][0], work[i][1], rng, train)

    spec = (tf.TensorSpec((None, None), tf.float32), tf.TensorSpec((3,), tf.float32))
    ds = tf.data.Dataset.from_generator(generate, output_signature=spec)
    g_lo, g_hi = math.log(train.gamma[0]), math.log(train.gamma[1])

    def to_input(crop: Any, target: Any) -> tuple[Any, Any]:
        x = preprocess_xray(crop[None, :, :, None], image_size)[0]
        gamma = tf.exp(tf.random.uniform((), g_lo, g_hi))
        x = tf.pow(tf.maximum(x, 1e-6), gamma)
        return x, target

    ds = ds.map(to_input, num_parallel_calls=2)
    return ds.batch(train.batch_size).prefetch(2)


# === Training ===

def evaluate_boxes(pred: Sequence[Box], true: Sequence[Box]) -> dict[str, float]:
    """Mean / median / 10th percentile IoU and the fraction >= 0.5 and >= 0.75."""
    ious = np.asarray([iou(p, t) for p, t in zip(pred, true)], np.float64)
    return {"n": int(ious.size), "mean_iou": float(ious.mean()), "median_iou": float(np.median(ious)),
            "p10_iou": float(np.percentile(ious, 10)), "frac_iou_ge_0.5": float((ious >= 0.5).mean()),
            "frac_iou_ge_0.75": float((ious >= 0.75).mean())}


def _val_iou_callback(x: np.ndarray, sides: Sequence[float], boxes: Sequence[Box]) -> Any:
    """A Keras callback logging the held-out mean IoU on whole images (the inference path)
    after every epoch as `val_mean_iou`. Monitoring only: the weights of the last epoch are
    kept, so that the held-out score is not chosen on the held-out set."""
    import keras

    from kneetf.preprocess.roi_detector import decode_box

    class ValIoU(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            out = self.model.predict(x, verbose=0, batch_size=64)
            value = float(np.mean([iou(decode_box(t, s), b) for t, s, b in zip(out, sides, boxes)]))
            if logs is not None:
                logs["val_mean_iou"] = value

    return ValIoU()


def train_detector(images: Sequence[np.ndarray], boxes: Sequence[Box], *,
                   config: RoiDetectorConfig | None = None, train: RoiTrainConfig = RoiTrainConfig(),
                   val_images: Sequence[np.ndarray] | None = None, val_boxes: Sequence[Box] | None = None,
                   steps_per_epoch: int | None = None, verbose: int = 0,
                   callbacks: Sequence[Any] = ()) -> tuple[RoiDetector, dict[str, list[float]]]:
    """Train a detector (`config`: a `RoiDetectorConfig`, default the default size) on whole
    X-rays (display-ready, bone bright) and their boxes.

    With validation images, their mean IoU (whole-image inference path) is logged every
    epoch as `val_mean_iou` (the last epoch's weights are returned, not the best). Returns the
    model and the history dict. Seeds Python, numpy and TF globally with `train.seed`.
    """
    import keras

    from kneetf.preprocess.roi_detector import RoiDetector, RoiDetectorConfig, detector_input

    config = config or RoiDetectorConfig()
    if len(images) != len(boxes) or not images:
        raise InputError(None, f"need as many boxes as images, at least one. Received {len(images)} images "
                         f"and {len(boxes)} boxes")
    keras.utils.set_random_seed(train.seed)
    t0 = time.perf_counter()
    ds = make_train_dataset(images, boxes, config.image_size, train)
    steps = steps_per_epoch or max(1, math.ceil(len(images) / train.batch_size))
    model = RoiDetector(config)
    schedule = keras.optimizers.schedules.CosineDecay(train.learning_rate, decay_steps=steps * train.epochs,
                                                      alpha=0.02)
    model.compile_for_training(schedule)
    cbs = list(callbacks)
    if val_images:
        x_val = np.stack([detector_input(im, config.image_size) for im in val_images])
        cbs.append(_val_iou_callback(x_val, [max(np.shape(im)[:2]) for im in val_images], val_boxes))
    history = model.fit(ds.repeat(), epochs=train.epochs, steps_per_epoch=steps, verbose=verbose,
                        callbacks=cbs, shuffle=False)
    log.info("trained the ROI detector in %.1f s", time.perf_counter() - t0)
    return model, history.history


@dataclass
class RoiTrainingResult:
    """What `train_roi_detector` did: the model, the report it wrote, and the held-out
    examples with the detector's boxes (`predicted`, empty without held-out X-rays)."""

    model: Any  # RoiDetector
    report: dict[str, Any]
    report_path: Path
    val: Examples
    predicted: list[Box] = field(default_factory=list)


def train_roi_detector(out: str | Path, *, data: str | Path | None = None, rois: str | Path | None = None,
                       examples: RoiDataConfig = RoiDataConfig(), config: RoiDetectorConfig | None = None,
                       train: RoiTrainConfig = RoiTrainConfig(), arch: str = "", allow_outside: bool = False,
                       report_path: str | Path | None = None, verbose: int = 0) -> RoiTrainingResult:
    """`kneetf train-roi`: load the examples (`data`: a manifest with boxes, else built-in
    synthetic X-rays), train a detector of `config` (default size by default), save it to
    `out` (`.keras`) and write a JSON report (default: `out` with `.json`) with the held-out
    IoU of the detector beside the classical fallback's."""
    from kneetf.preprocess.roi_detector import save_detector

    out = Path(out)
    if out.suffix != ".keras":
        raise ConfigError(f"--out must end in .keras. Received: {out}")
    t0 = time.perf_counter()
    if data:
        parts = manifest_examples(data, rois, val_fraction=examples.val_fraction, seed=train.seed,
                                  allow_outside=allow_outside)
        (_, train_x, train_b), val = parts["train"], parts["val"]
        source: dict[str, Any] = {"kind": "manifest", "data": str(data), "rois": str(rois or "")}
    else:
        _, train_x, train_b = synthetic_examples(examples.n, train.seed, fast=True)
        val = synthetic_examples(examples.n_val, train.seed + 1)
        source = {"kind": "synthetic", "n": examples.n, "seed": train.seed, "n_val": examples.n_val,
                  "val_seed": train.seed + 1}
    _, val_x, val_b = val
    t_data = time.perf_counter() - t0
    log.info("loaded %d training and %d held-out X-rays in %.1f s", len(train_x), len(val_x), t_data)

    t1 = time.perf_counter()
    model, history = train_detector(train_x, train_b, config=config, train=train, val_images=val_x or None,
                                    val_boxes=val_b or None, verbose=verbose)
    t_train = time.perf_counter() - t1
    save_detector(model, out)

    report: dict[str, Any] = {"model": str(out), "source": source, "n_train": len(train_x), "n_val": len(val_x),
                              "arch": arch, "epochs": train.epochs, "data_s": round(t_data, 1),
                              "train_s": round(t_train, 1)}
    predicted: list[Box] = []
    if val_x:
        predicted = model.predict_boxes(val_x)
        report["detector"] = evaluate_boxes(predicted, val_b)
        report["classical"] = evaluate_boxes([classical_roi(x) for x in val_x], val_b)
        report["val_mean_iou_per_epoch"] = [round(float(v), 4) for v in history.get("val_mean_iou", [])]
    else:
        log.warning("no held-out X-rays: IoU not measured")
    path = Path(report_path) if report_path else out.with_suffix(".json")
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    return RoiTrainingResult(model=model, report=report, report_path=path, val=val, predicted=predicted)


__all__ = ["RoiTrainConfig", "RoiDataConfig", "ROI_CSV_NAMES", "FAST_XRAY_COMPUTE_MM", "synthetic_examples",
           "manifest_examples", "augment_example", "make_train_dataset", "evaluate_boxes", "train_detector",
           "RoiTrainingResult", "train_roi_detector"]
