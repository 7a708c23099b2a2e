"""Training the knee-joint ROI detector (`kneetf.preprocess.roi_detector`): examples,
augmentation, the tf.data pipeline, `train_detector` and `train_roi_detector` (what
`kneetf train-roi` runs).

Examples are whole X-rays (display-ready, bone bright) and their boxes: by default simulated
hospital radiographs (`radiograph_examples`: `kneetf.data.radiograph`, style `train`), plus
a manifest with a boxes CSV when given (`manifest_examples`; held out: the manifest's
val/test rows, else a random fraction). The held-out score comes from radiographs of every
held-out style (`heldout_examples`), which training never uses. (`synthetic_examples`, the
plain built-in X-rays, remains for experiments.)

Every example is letterboxed and shrunk once to a work square (`work_square`); training
augments every epoch afresh: random square crops (zoom in or out, shifts, partly outside the
image, the joint centre kept inside), horizontal flips, random gamma, blur or sharpening and
noise, with the box transformed consistently.

TensorFlow and Keras load inside the functions that use them, so that the configs (and
`kneetf train-roi --help`) do not load them.
"""
from __future__ import annotations

import dataclasses
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

    epochs: int = field(default=12, metadata={"help": "epochs"})
    batch_size: int = field(default=32, metadata={"help": "batch size"})
    learning_rate: float = field(default=2e-3, metadata={"help": "initial Adam rate, cosine decay"})
    seed: int = field(default=0, metadata={"help": "seed of the simulated training radiographs and of training"})
    # augmentation: crop side as a fraction of the letterboxed image, probability of the
    # un-augmented full image, flips, gamma range; the joint centre stays `edge_margin` x the
    # box side inside a crop
    crop_scale: tuple[float, float] = (0.5, 1.2)
    p_full: float = 0.3
    flip: bool = True
    gamma: tuple[float, float] = (0.7, 1.4)
    #: half of the inputs are blurred or sharpened (x + k (x - blur(x)), k in this range, blur
    #: sd 0.7-2 input pixels), half get Gaussian noise of sd up to `noise`
    sharpen: tuple[float, float] = (-0.8, 1.5)
    noise: float = 0.05
    edge_margin: float = 0.3
    work_size: int = 256  # letterboxed images are shrunk to this once, before cropping
    #: the initial rate when fine-tuning an existing detector (`--init`)
    finetune_learning_rate: float = field(default=5e-4, metadata={"help": "initial Adam rate with --init"})

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "work_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1. Received: {name}={getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0. Received: learning_rate={self.learning_rate}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1]:
            raise ConfigError(f"crop_scale must be 0 < low <= high. Received: crop_scale={self.crop_scale}")
        if not 0.0 <= self.edge_margin <= 0.5:
            raise ConfigError(f"edge_margin must lie in [0, 0.5]. Received: edge_margin={self.edge_margin}")


@dataclass(frozen=True)
class RoiDataConfig:
    """Where the detector's examples come from: simulated hospital radiographs
    (`kneetf.data.radiograph`, style `style`) and/or a manifest with boxes; what it is scored
    on: `n_val` radiographs of each held-out style (`HELDOUT_SETS`) and the manifest's
    held-out rows."""

    n: int = field(default=2000, metadata={"help": "simulated training radiographs (0: none, only --data)"})
    n_val: int = field(default=40, metadata={"help": "simulated radiographs per held-out style scored after "
                                                     "training (0: none)"})
    style: str = field(default="train", metadata={"help": "style of the simulated training radiographs"})
    val_fraction: float = field(default=0.2, metadata={
        "help": "held-out fraction of --data when its manifest has no val/test rows"})
    user_share: float = field(default=0.3, metadata={
        "help": "share of the training draws that are --data examples when simulated ones are mixed in"})
    workers: int = field(default=2, metadata={"help": "processes simulating radiographs"})
    #: the simulated radiographs are made at a coarser spacing when larger than this (training
    #: sees them shrunk to `RoiTrainConfig.work_size` anyway; it saves time)
    max_side: int = 640
    val_max_side: int = 1024

    def __post_init__(self) -> None:
        for name in ("n", "n_val"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0. Received: {name}={getattr(self, name)}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1. Received: workers={self.workers}")
        if not 0.0 < self.user_share <= 1.0:
            raise ConfigError(f"user_share must lie in (0, 1]. Received: user_share={self.user_share}")
        from kneetf.data.radiograph import get_style

        get_style(self.style)


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


def _simulate_square(seed: int, index: int, style: Any, work_size: int) -> tuple[np.ndarray, tuple[float, ...]]:
    """Radiograph `index` of (`seed`, `style`) as a work square (float16) and its box there."""
    from kneetf.data.radiograph import simulate

    r = simulate(seed, index, style)
    square, box = work_square(r.presentation(), r.box, work_size)
    return square.astype(np.float16), box.as_tuple()


def _simulate_full(seed: int, index: int, style: Any) -> tuple[np.ndarray, tuple[float, ...], float]:
    from kneetf.data.radiograph import simulate

    r = simulate(seed, index, style)
    return r.presentation(), r.box.as_tuple(), r.pixel_spacing[0]


def _pool_map(fn: Any, jobs: list[tuple], workers: int) -> list[Any]:
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*j) for j in jobs]
    from kneetf.workers import process_pool

    with process_pool(workers) as pool:
        return list(pool.map(fn, *zip(*jobs), chunksize=8))


def radiograph_examples(n: int, seed: int, *, style: Any = "train", max_side: int | None = 640,
                        work_size: int = 256, workers: int = 2) -> Examples:
    """`n` simulated hospital radiographs of `style` (`kneetf.data.radiograph.simulate(seed,
    i, style)`, made at most `max_side` pixels long) as work squares (`work_square`, float16)
    with their true boxes in that frame: what training draws its crops from."""
    import dataclasses

    from kneetf.data.radiograph import get_style

    st = get_style(style)
    if max_side is not None:
        st = dataclasses.replace(st, max_side=max_side)
    results = _pool_map(_simulate_square, [(int(seed), i, st, work_size) for i in range(n)], workers)
    return ([f"{st.name}-{i:05d}" for i in range(n)], [r[0] for r in results], [Box(*r[1]) for r in results])


def heldout_examples(n: int, *, max_side: int | None = 1024, workers: int = 2
                     ) -> dict[str, tuple[Examples, list[float]]]:
    """The first `n` radiographs of each held-out set (`HELDOUT_SETS`), whole and display-ready
    (made at most `max_side` pixels long), with their pixel spacings."""
    import dataclasses

    from kneetf.data.radiograph import HELDOUT_SETS, get_style

    out = {}
    for spec in HELDOUT_SETS:
        st = get_style(spec.name)
        if max_side is not None:
            st = dataclasses.replace(st, max_side=max_side)
        results = _pool_map(_simulate_full, [(spec.seed, i, st) for i in range(min(n, spec.n))], workers)
        out[spec.name] = (([f"{spec.name}-{i:05d}" for i in range(len(results))], [r[0] for r in results],
                           [Box(*r[1]) for r in results]), [r[2] for r in results])
    return out


def data_files(data: str | Path | None, rois: str | Path | None) -> list[Path]:
    """The files `manifest_examples` reads for `data` and `rois` (the manifest, the boxes CSV):
    [] without `data`. InputError when either cannot be found."""
    if not data:
        return []
    manifest = _find_manifest(Path(data))
    return [manifest, _find_rois(manifest, rois)]


def report_file(out: str | Path, report_path: str | Path | None = None) -> Path:
    """Where `train_roi_detector` writes its JSON report: `report_path`, else `out` with .json."""
    return Path(report_path) if report_path else Path(out).with_suffix(".json")


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
    column is not needed. Rows without a box are skipped with a warning; so are bad lines of
    the boxes CSV (as `kneetf prepare` skips them), unreadable X-rays and boxes that do not
    fit their X-ray (`check_box_fits`); the skipped cases are summed up at the end.
    """
    from kneetf.io.manifest import read_manifest
    from kneetf.io.readers import read_xray
    from kneetf.preprocess.roi import check_box_fits, read_boxes

    manifest = _find_manifest(Path(data))
    rois_path = _find_rois(manifest, rois)
    read = read_boxes(rois_path)
    boxes = read.boxes
    skipped: list[str] = []
    for case_id, e in read.errors:
        log.warning("skipped a line of the boxes CSV: %s", e)
        skipped += [case_id] if case_id else []
    result = read_manifest(manifest, allow_outside=allow_outside, require_mri=False)
    for e in result.errors:
        log.warning("skipped a manifest row: %s", e)
    cases = [c for c in result.cases if c.id in boxes]
    missing = [c.id for c in result.cases if c.id not in boxes and c.id not in read.bad_ids]
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
            try:
                check_box_fits(np.shape(image), boxes[case.id])
            except InputError as e:  # the box's line, not the X-ray, is wrong
                raise InputError(rois_path, f"id {case.id!r}: {e.reason} ({case.xray})") from None
        except InputError as e:
            log.warning("skipped %s: %s", case.id, e)
            skipped.append(case.id)
            continue
        ids, images, bxs = out["val" if case.id in held_ids else "train"]
        ids.append(case.id)
        images.append(np.asarray(image, np.float32).squeeze())
        bxs.append(boxes[case.id])
    if skipped:
        log.warning("%d case(s) skipped (bad boxes line, unreadable X-ray or a box that does not fit it; see "
                    "above): %s", len(skipped), ", ".join(skipped[:10]) + (", ..." if len(skipped) > 10 else ""))
    if not out["train"][0]:
        raise InputError(manifest, f"no trainable X-ray with a box (boxes from {rois_path})")
    return out


# === Augmentation and the pipeline ===

def work_square(image: np.ndarray, box: Box, work_size: int) -> tuple[np.ndarray, Box]:
    """Letterbox and area-shrink to `work_size` once (`shrunk_square`, as `detector_input`
    does), float32 min-max scaled to [0, 1] (the detector's robust normalisation does not see
    it); the box in that frame. A square of at most `work_size` is only scaled."""
    from kneetf.preprocess.roi_detector import shrunk_square

    side = max(np.shape(image)[:2])
    small = shrunk_square(image, work_size)
    lo, hi = float(small.min()), float(small.max())
    small = (small - lo) / (hi - lo) if hi > lo else np.zeros_like(small)
    return small, box.scale(small.shape[0] / side)


def augment_example(image: np.ndarray, box: Box, rng: np.random.Generator,
                    train: RoiTrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """One random square crop of a square `image` holding `box`, as (crop, target).

    The crop's side is `crop_scale` x the image side (never smaller than the box), placed so
    that the box's centre stays inside it by `edge_margin` x the box side, and the crop not
    more than 15 % of the image outside it; parts outside the image are padded with its
    minimum. With probability `p_full` the crop is the whole image. A flip mirrors image and
    box. `target` is `encode_box` of the box in the crop.
    """
    from kneetf.preprocess.roi_detector import encode_box

    side = image.shape[0]
    bside = max(box.width, box.height)
    if rng.random() < train.p_full:
        ox, oy, c = 0.0, 0.0, float(side)
    else:
        c = max(rng.uniform(*train.crop_scale) * side, bside)
        margin = train.edge_margin * bside
        slack = 0.15 * side
        origins = []
        for centre in (box.cx, box.cy):
            lo, hi = max(centre + margin - c, -slack), min(centre - margin, side + slack - c)
            if lo > hi:
                lo = hi = centre - c / 2.0
            origins.append(rng.uniform(lo, hi))
        c = float(round(c))
        ox, oy = (float(round(o)) for o in origins)
    crop = crop_box(image, Box(ox, oy, ox + c, oy + c)) if (ox, oy, c) != (0.0, 0.0, float(side)) else image
    cbox = box.shift(-ox, -oy)
    if train.flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
        cbox = Box(c - cbox.x1, cbox.y0, c - cbox.x0, cbox.y1)
    return np.ascontiguousarray(crop, np.float32), encode_box(cbox, c)


def make_train_dataset(images: Sequence[np.ndarray], boxes: Sequence[Box], config: RoiDetectorConfig,
                       train: RoiTrainConfig, weights: Sequence[float] | None = None) -> Any:
    """Endless-per-epoch tf.data of augmented (input, target): crops drawn in Python (fresh
    every epoch; `weights`: how often each example is drawn, default once each), then
    `preprocess_xray`, a random gamma and the head's targets as graph ops."""
    import tensorflow as tf

    from kneetf.preprocess.ops import preprocess_xray
    from kneetf.preprocess.roi_detector import heatmap_targets

    work = [_as_work(im, b, train.work_size) for im, b in zip(images, boxes)]
    rng = np.random.default_rng(train.seed)
    order = np.arange(len(work)) if weights is None else _weighted_order(weights, rng)

    def generate():
        for i in rng.permutation(order):
            yield augment_example(work[i][0], work[i][1], rng, train)

    spec = (tf.TensorSpec((None, None), tf.float32), tf.TensorSpec((3,), tf.float32))
    ds = tf.data.Dataset.from_generator(generate, output_signature=spec)
    g_lo, g_hi = math.log(train.gamma[0]), math.log(train.gamma[1])
    size, heatmap, grid = config.image_size, config.head == "heatmap", config.grid

    k_lo, k_hi = train.sharpen

    def to_input(crop: Any, target: Any) -> tuple[Any, Any]:
        x = preprocess_xray(crop[None, :, :, None], size)
        gamma = tf.exp(tf.random.uniform((), g_lo, g_hi))
        x = tf.pow(tf.maximum(x, 1e-6), gamma)
        if k_hi > k_lo or k_lo != 0:
            k = tf.random.uniform((), k_lo, k_hi) * tf.cast(tf.random.uniform(()) < 0.5, tf.float32)
            x = x + k * (x - _gaussian_blur(x, tf.random.uniform((), 0.7, 2.0)))
        if train.noise > 0:
            sd = tf.random.uniform((), 0.0, train.noise) * tf.cast(tf.random.uniform(()) < 0.5, tf.float32)
            x = x + sd * tf.random.normal(tf.shape(x))
        x = tf.clip_by_value(x, 0.0, 1.0)[0]
        return x, (heatmap_targets(target[None], grid)[0] if heatmap else target)

    ds = ds.map(to_input, num_parallel_calls=2)
    return ds.batch(train.batch_size).prefetch(2)


def _as_work(image: np.ndarray, box: Box, work_size: int) -> tuple[np.ndarray, Box]:
    """A work square (float16 or float32, kept as it is: `radiograph_examples` gives them) or
    `work_square` of a whole X-ray."""
    image = np.asarray(image)
    if image.ndim == 2 and image.shape[0] == image.shape[1] <= work_size and image.dtype == np.float16:
        return image, box
    square, box = work_square(image, box, work_size)
    return square.astype(np.float16), box


def _gaussian_blur(x: Any, sigma: Any, radius: int = 4) -> Any:
    """(1, H, W, 1) images blurred by a Gaussian of sd `sigma` pixels (a TF scalar), separable."""
    import tensorflow as tf

    t = tf.range(-radius, radius + 1, dtype=tf.float32)
    g = tf.exp(-t * t / (2.0 * sigma * sigma))
    g = g / tf.reduce_sum(g)
    x = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    x = tf.nn.conv2d(x, tf.reshape(g, (-1, 1, 1, 1)), 1, "VALID")
    return tf.nn.conv2d(x, tf.reshape(g, (1, -1, 1, 1)), 1, "VALID")


def _weighted_order(weights: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Example indices repeated in proportion to `weights` (each at least once)."""
    w = np.asarray(weights, np.float64)
    reps = np.maximum(1, np.round(w / w.min())).astype(int)
    return np.repeat(np.arange(len(w)), reps)


# === Training ===

def evaluate_boxes(pred: Sequence[Box], true: Sequence[Box]) -> dict[str, float]:
    """Mean / median / 10th percentile IoU and the fraction >= 0.5 and >= 0.75, with the
    found-rate (`kneetf.preprocess.roi_score`)."""
    from kneetf.preprocess.roi_score import score_boxes

    ious = np.asarray([iou(p, t) for p, t in zip(pred, true)], np.float64)
    return {"n": int(ious.size), "mean_iou": float(ious.mean()), "median_iou": float(np.median(ious)),
            "p10_iou": float(np.percentile(ious, 10)), "frac_iou_ge_0.5": float((ious >= 0.5).mean()),
            "frac_iou_ge_0.75": float((ious >= 0.75).mean()),
            "found_rate": score_boxes(list(pred), list(true))["found_rate"]}


def _val_callback(images: Sequence[np.ndarray], boxes: Sequence[Box]) -> Any:
    """A Keras callback logging the held-out mean IoU and found-rate on whole images (the
    inference path, one reading without the mirror image) after every epoch as
    `val_mean_iou` / `val_found_rate`. Monitoring only: the weights of the last epoch are
    kept, so that the held-out score is not chosen on the held-out set."""
    import keras

    from kneetf.preprocess.roi_score import score_boxes

    class ValScore(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            pred = self.model.predict_boxes(images, flip=False)
            score = score_boxes(pred, list(boxes))
            if logs is not None:
                logs["val_mean_iou"] = score["mean_iou"]
                logs["val_found_rate"] = score["found_rate"]

    return ValScore()


def train_detector(images: Sequence[np.ndarray], boxes: Sequence[Box], *,
                   config: RoiDetectorConfig | None = None, train: RoiTrainConfig = RoiTrainConfig(),
                   val_images: Sequence[np.ndarray] | None = None, val_boxes: Sequence[Box] | None = None,
                   steps_per_epoch: int | None = None, verbose: int = 0, callbacks: Sequence[Any] = (),
                   init: RoiDetector | None = None, weights: Sequence[float] | None = None
                   ) -> tuple[RoiDetector, dict[str, list[float]]]:
    """Train a detector (`config`: a `RoiDetectorConfig`, default the default size; or
    fine-tune `init`, whose config is kept) on whole X-rays (display-ready, bone bright) and
    their boxes; `weights` draws some examples more often.

    With validation images, their mean IoU and found-rate (whole-image inference path) are
    logged every epoch as `val_mean_iou` / `val_found_rate` (the last epoch's weights are
    returned, not the best). Returns the model and the history dict. Seeds Python, numpy and
    TF globally with `train.seed`.
    """
    import keras

    from kneetf.models.training_state import build_training_state
    from kneetf.preprocess.roi_detector import RoiDetector, RoiDetectorConfig

    if len(images) != len(boxes) or not images:
        raise InputError(None, f"need as many boxes as images, at least one. Received {len(images)} images "
                         f"and {len(boxes)} boxes")
    keras.utils.set_random_seed(train.seed)
    t0 = time.perf_counter()
    if init is not None:
        model, config = init, init.detector_config
    else:
        config = config or RoiDetectorConfig()
        model = RoiDetector(config)
    ds = make_train_dataset(images, boxes, config, train, weights)
    n = len(images) if weights is None else len(_weighted_order(weights, np.random.default_rng(0)))
    steps = steps_per_epoch or max(1, math.ceil(n / train.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(train.learning_rate, decay_steps=steps * train.epochs,
                                                      alpha=0.02)
    model.compile_for_training(schedule)
    cbs = list(callbacks)
    if val_images:
        cbs.append(_val_callback(val_images, val_boxes))
    build_training_state(model, ds)  # the step traced once, as KneeNet.fit does
    history = model.fit(ds.repeat(), epochs=train.epochs, steps_per_epoch=steps, verbose=verbose,
                        callbacks=cbs, shuffle=False)
    log.info("trained the ROI detector in %.1f s", time.perf_counter() - t0)
    return model, history.history


@dataclass
class RoiTrainingResult:
    """What `train_roi_detector` did: the model, the report it wrote, and the held-out
    examples shown in previews (the manifest's held-out rows, else the first held-out set)
    with the detector's boxes (`predicted`)."""

    model: Any  # RoiDetector
    report: dict[str, Any]
    report_path: Path
    val: Examples
    predicted: list[Box] = field(default_factory=list)


def _classical_boxes(images: Sequence[np.ndarray], spacings: Sequence[float | None]) -> list[Box | None]:
    """The classical fallback's boxes (None where it reports a failure); told the pixel
    spacing when it takes one."""
    import inspect

    from kneetf.errors import KneetfError

    takes_spacing = "pixel_spacing" in inspect.signature(classical_roi).parameters
    out: list[Box | None] = []
    for image, spacing in zip(images, spacings):
        try:
            kw = {"pixel_spacing": spacing} if takes_spacing and spacing else {}
            out.append(classical_roi(image, **kw))
        except KneetfError:
            out.append(None)
    return out


def _score(model: Any, images: Sequence[np.ndarray], boxes: Sequence[Box],
           spacings: Sequence[float | None]) -> tuple[dict[str, Any], list[Box]]:
    from kneetf.preprocess.roi_score import score_boxes

    det = model.detect(list(images), pixel_spacings=list(spacings))
    found = score_boxes([d.box for d in det], list(boxes), [d.flagged for d in det])
    classical = score_boxes(_classical_boxes(images, spacings), list(boxes))
    return {"n": len(boxes), "detector": found, "classical": classical}, [d.box for d in det]


def train_roi_detector(out: str | Path, *, data: str | Path | None = None, rois: str | Path | None = None,
                       examples: RoiDataConfig = RoiDataConfig(), config: RoiDetectorConfig | None = None,
                       train: RoiTrainConfig = RoiTrainConfig(), init: str | Path | None = None, arch: str = "",
                       allow_outside: bool = False, report_path: str | Path | None = None,
                       verbose: int = 0) -> RoiTrainingResult:
    """`kneetf train-roi`: train a detector of `config` (or fine-tune the detector `init`, a
    `.keras` file or "builtin") on `examples.n` simulated radiographs plus the training rows
    of `data` (a manifest with a boxes CSV, drawn `examples.user_share` of the time), save it
    to `out` (`.keras`) and write a JSON report (default: `out` with `.json`): found-rate,
    IoU and centre error of the detector and of the classical fallback on `examples.n_val`
    radiographs of every held-out style and on the manifest's held-out rows."""
    from kneetf.data.radiograph import get_style
    from kneetf.data.synthetic import SynthConfig
    from kneetf.preprocess.roi_detector import load_detector, save_detector, with_settings

    out = Path(out)
    if out.suffix != ".keras":
        raise ConfigError(f"--out must end in .keras. Received: {out}")
    if not data and examples.n == 0:
        raise ConfigError("nothing to train on: --n 0 needs --data with boxes")
    t0 = time.perf_counter()
    initial = load_detector(init) if init else None  # errors about the inputs first, before any simulation
    source: dict[str, Any] = {"simulated": {"n": examples.n, "style": examples.style, "seed": train.seed}}
    user_train: Examples = ([], [], [])
    user_val: Examples = ([], [], [])
    if data:
        parts = manifest_examples(data, rois, val_fraction=examples.val_fraction, seed=train.seed,
                                  allow_outside=allow_outside)
        user_train, user_val = parts["train"], parts["val"]
        source["manifest"] = {"data": str(data), "rois": str(rois or "")}
    ids: list[str] = []
    train_x: list[np.ndarray] = []
    train_b: list[Box] = []
    if examples.n:
        ids, train_x, train_b = radiograph_examples(examples.n, train.seed, style=examples.style,
                                                    max_side=examples.max_side, work_size=train.work_size,
                                                    workers=examples.workers)
    weights = None
    n_user = len(user_train[0])
    if data:
        if train_x:
            share = examples.user_share
            weights = [1.0] * len(train_x) + [share * len(train_x) / max(1.0, (1 - share) * n_user)] * n_user
        ids, train_x, train_b = ids + user_train[0], train_x + user_train[1], train_b + user_train[2]
        if weights is not None and max(weights) <= 1.0:
            weights = None
    heldout = heldout_examples(examples.n_val, max_side=examples.val_max_side,
                               workers=examples.workers) if examples.n_val else {}
    t_data = time.perf_counter() - t0
    log.info("made %d training X-rays (%d from --data) and %d held-out in %.1f s", len(train_x), n_user,
             sum(len(v[0][0]) for v in heldout.values()) + len(user_val[0]), t_data)

    if init:
        train = dataclasses.replace(train, learning_rate=train.finetune_learning_rate)
        source["init"] = str(init)
    monitor = user_val if user_val[0] else (next(iter(heldout.values()))[0] if heldout else ([], [], []))
    t1 = time.perf_counter()
    model, history = train_detector(train_x, train_b, config=config, train=train, init=initial,
                                    val_images=monitor[1] or None, val_boxes=monitor[2] or None, verbose=verbose,
                                    weights=weights)
    t_train = time.perf_counter() - t1
    # the box side in mm, used when an X-ray's spacing is known: the simulated radiographs'
    # (an --init detector's own when fine-tuned without them); unknown for the user's boxes
    if data:
        box_mm = None
    elif initial is not None and not examples.n:
        box_mm = initial.detector_config.box_mm
    else:
        box_mm = float(get_style(examples.style).roi_mm or SynthConfig().roi_mm)
    model = with_settings(model, box_mm=box_mm)
    save_detector(model, out)

    report: dict[str, Any] = {"model": str(out), "source": source, "n_train": len(train_x), "n_train_data": n_user,
                              "n_val": len(user_val[0]), "arch": arch, "epochs": train.epochs,
                              "config": dataclasses.asdict(model.detector_config), "data_s": round(t_data, 1),
                              "train_s": round(t_train, 1), "heldout": {}}
    for name, ((_, x, b), spacings) in heldout.items():
        report["heldout"][name], _ = _score(model, x, b, spacings)
    predicted: list[Box] = []
    val = user_val if user_val[0] else (next(iter(heldout.values()))[0] if heldout else ([], [], []))
    if user_val[0]:
        report["data_val"], predicted = _score(model, user_val[1], user_val[2], [None] * len(user_val[0]))
    elif heldout:
        predicted = model.predict_boxes(val[1])
    if report["heldout"]:
        report["heldout_min_found_rate"] = min(v["detector"]["found_rate"] for v in report["heldout"].values())
    report["val_found_rate_per_epoch"] = [round(float(v), 4) for v in history.get("val_found_rate", [])]
    path = report_file(out, report_path)
    write_text_atomic(path, json.dumps(report, indent=2, default=float) + "\n")
    return RoiTrainingResult(model=model, report=report, report_path=path, val=val, predicted=predicted)


__all__ = ["RoiTrainConfig", "RoiDataConfig", "ROI_CSV_NAMES", "FAST_XRAY_COMPUTE_MM", "synthetic_examples",
           "radiograph_examples", "heldout_examples", "manifest_examples", "data_files", "report_file",
           "work_square", "augment_example",
           "make_train_dataset", "evaluate_boxes", "train_detector", "RoiTrainingResult", "train_roi_detector"]
