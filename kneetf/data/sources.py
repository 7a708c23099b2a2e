"""Sources of pairs for the cache: the built-in synthetic knees (generated in memory) and a
manifest of files (decoded with kneetf.io). Each defines a picklable loader that runs in a
worker process and returns a `RawPair` (ROI-cropped X-ray, MRI slice window)."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from kneetf.config import PreprocessConfig
from kneetf.data.cache import CacheResult, CacheTask, RawPair, build_cache
from kneetf.errors import InputError
from kneetf.io.limits import ReaderConfig, current_reader_config

log = logging.getLogger(__name__)


# --- built-in synthetic knees -------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticPayload:
    seed: int
    index: int
    config: Any  # SynthConfig


def load_synthetic(payload: SyntheticPayload, config: PreprocessConfig) -> RawPair:
    """Generate one synthetic knee and crop its X-ray to the known joint box."""
    from kneetf.data.synthetic import generate_knee
    from kneetf.preprocess.roi import Box, crop_box

    knee = generate_knee(payload.seed, payload.index, payload.config)
    xray = knee.xray.astype("float32")
    if knee.photometric == "MONOCHROME1":
        xray = float(xray.max()) - xray
    box = Box(*map(float, knee.box))
    window = knee.mri[config.slice_start:config.slice_stop]
    if window.shape[0] != config.num_slices:
        raise InputError(knee.id, f"synthetic MRI has {knee.mri.shape[0]} slices, fewer than the window "
                                  f"[{config.slice_start}, {config.slice_stop})")
    return RawPair(id=knee.id, xray=crop_box(xray, box), mri=window, side=knee.side, box=box.as_tuple())


def build_synthetic_cache(out_dir: str | Path, n: int = 256, seed: int = 0, config: PreprocessConfig = PreprocessConfig(),
                          synth_config: Any = None, *, workers: int = 2, progress: bool = True,
                          fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> CacheResult:
    """The synthetic dataset straight into a cache (no intermediate files); resumable."""
    from kneetf.data.synthetic import SynthConfig, assign_split

    synth_config = synth_config or SynthConfig()
    tasks = [CacheTask(id=f"knee{i:05d}", split=assign_split(seed, i, n, fractions),
                       payload=SyntheticPayload(seed, i, synth_config), source=f"synthetic:{seed}:{i}")
             for i in range(n)]
    source = {"kind": "synthetic", "n": n, "seed": seed, "config": asdict(synth_config)}
    return build_cache(tasks, load_synthetic, out_dir, config, workers=workers, progress=progress, source=source)


# --- a manifest of files ------------------------------------------------------------------
@dataclass(frozen=True)
class FilePayload:
    id: str
    xray: str
    mri: str
    side: str
    box: tuple[float, float, float, float] | None  # from a boxes CSV; None = detect
    detector: str | None  # path of a trained ROI detector (.keras); None = classical fallback
    extra: tuple[tuple[str, str], ...] = ()
    preview_dir: str | None = None  # write `<id>.png` with the box drawn (kneetf prepare --roi-preview)
    # the readers' limit: it decides which files are refused, not what a pair decodes to,
    # so it stays out of repr() and thereby out of the cache key
    max_pixels: int | None = field(default=None, repr=False)

    def cache_key(self) -> str:
        """What decides the cached pair (the preview folder does not)."""
        return repr(replace(self, preview_dir=None))

    def input_files(self) -> tuple[str, ...]:
        """The files the pair is made of; replacing one rebuilds its cache shard."""
        return (self.xray, self.mri) + ((self.detector,) if self.detector else ())


#: ROI sources of this worker process by detector path (None: the classical fallback), so
#: that a detector loads once per process
_ROI_SOURCES: dict[str | None, Any] = {}


def _roi_box(payload: FilePayload, case_id: str, image: np.ndarray):
    from kneetf.preprocess.roi import Box
    from kneetf.preprocess.xray import roi_source

    if payload.box is not None:  # looked up in the boxes CSV by `manifest_tasks`
        return Box(*payload.box)
    source = _ROI_SOURCES.get(payload.detector)
    if source is None:
        source = _ROI_SOURCES[payload.detector] = roi_source(detector=payload.detector)
    return source.box_for(case_id, image)


def load_files(payload: FilePayload, config: PreprocessConfig) -> RawPair:
    """Decode one manifest row: X-ray -> ROI crop; MRI series -> sorted slice window."""
    from kneetf.io.readers import read_mri_window, read_xray
    from kneetf.preprocess.roi import crop_box

    xray, _ = read_xray(payload.xray, max_pixels=payload.max_pixels, **dict(payload.extra))
    case_id = payload.id
    box = _roi_box(payload, case_id, xray)
    mri, _ = read_mri_window(payload.mri, config.slice_start, config.slice_stop, max_pixels=payload.max_pixels)
    if payload.preview_dir:
        from kneetf.preprocess.roi import draw_box_png

        draw_box_png(Path(payload.preview_dir) / f"{case_id}.png", xray, box, label=case_id)
    return RawPair(id=case_id, xray=crop_box(xray, box), mri=mri, side=payload.side, box=box.as_tuple())


def manifest_tasks(manifest: str | Path, *, rois: str | Path | None = None, detector: str | Path | None = None,
                   allow_outside: bool = False, preview_dir: str | Path | None = None,
                   reader: ReaderConfig | None = None) -> tuple[list[CacheTask], list[dict[str, str]]]:
    """Cache tasks for every valid manifest row, and the bad rows as error dicts. `reader`
    (default: the current `ReaderConfig`) limits what the workers decode."""
    reader = reader or current_reader_config()
    from kneetf.io.manifest import read_manifest
    from kneetf.preprocess.roi import load_boxes

    result = read_manifest(manifest, allow_outside=allow_outside)
    boxes = load_boxes(rois) if rois else {}
    errors = [{"id": "", "file": str(e.path), "reason": e.reason} for e in result.errors]
    tasks = []
    for case in result.cases:
        box = boxes.get(case.id)
        if rois and box is None:
            errors.append({"id": case.id, "file": str(rois), "reason": "no box for this id in the ROI CSV"})
            continue
        extra = (("half", case.xray_half),) if case.xray_half else ()  # one knee of a bilateral X-ray
        payload = FilePayload(id=case.id, xray=str(case.xray), mri=str(case.mri), side=case.side or "",
                              box=box.as_tuple() if box is not None else None,
                              detector=str(detector) if detector else None, extra=extra,
                              preview_dir=str(preview_dir) if preview_dir else None,
                              max_pixels=reader.max_pixels)
        tasks.append(CacheTask(id=case.id, split=case.split or "train", payload=payload,
                               source=f"{case.xray} | {case.mri}"))
    return tasks, errors


@dataclass(frozen=True)
class PrepareOptions:
    """How `kneetf prepare` runs; the defaults of `prepare_manifest`'s keywords."""

    roi_preview: bool = field(default=False, metadata={"help": "write roi_preview/<id>.png with the box drawn"})
    workers: int = field(default=2, metadata={"help": "decoding processes (0 = in-process)"})
    shard_size: int = field(default=64, metadata={"help": "pairs per TFRecord shard"})
    allow_outside: bool = field(default=False, metadata={
        "help": "allow manifest paths that leave the manifest's folder tree"})


def prepare_manifest(manifest: str | Path, out_dir: str | Path, config: PreprocessConfig = PreprocessConfig(), *,
                     rois: str | Path | None = None, detector: str | Path | None = None,
                     allow_outside: bool = PrepareOptions.allow_outside, roi_preview: bool = PrepareOptions.roi_preview,
                     workers: int = PrepareOptions.workers, shard_size: int = PrepareOptions.shard_size,
                     progress: bool = True, reader: ReaderConfig | None = None) -> CacheResult:
    """`kneetf prepare`: every valid manifest row into the cache; bad rows and files (for
    instance larger than `reader.max_pixels`) are skipped and listed in `errors.csv`."""
    out = Path(out_dir)
    preview = out / "roi_preview" if roi_preview else None
    tasks, errors = manifest_tasks(manifest, rois=rois, detector=detector, allow_outside=allow_outside,
                                   preview_dir=preview, reader=reader)
    source = {"kind": "manifest", "manifest": Path(manifest).name, "rois": "csv" if rois else
              ("detector" if detector else "classical")}
    return build_cache(tasks, load_files, out, config, workers=workers, shard_size=shard_size,
                       progress=progress, source=source, extra_errors=errors)
