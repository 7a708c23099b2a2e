"""Sources of pairs for the cache: the built-in synthetic knees (generated in memory) and a
manifest of files (decoded with kneetf.io). Each defines a picklable loader that runs in a
worker process and returns a `RawPair` (ROI-cropped X-ray, MRI slice window)."""
from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kneetf.config import PreprocessConfig
from kneetf.data.cache import CacheResult, CacheTask, RawPair, build_cache
from kneetf.errors import InputError, RoiNotFoundError
from kneetf.io.limits import ReaderConfig, current_reader_config
from kneetf.io.outdir import OutputFolder
from kneetf.protocol import ROI_DETECTOR_FILE

log = logging.getLogger(__name__)

#: ROI source of the built-in synthetic knees: their true joint boxes
TRUTH_ROI = "truth"
#: the copy of the ROI detector a cache was prepared with, in the cache folder
CACHE_DETECTOR_FILE = ROI_DETECTOR_FILE


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
    return RawPair(id=knee.id, xray=crop_box(xray, box), mri=window, side=knee.side, box=box.as_tuple(),
                   roi_source=TRUTH_ROI)


def build_synthetic_cache(out_dir: str | Path, n: int = 256, seed: int = 0, config: PreprocessConfig = PreprocessConfig(),
                          synth_config: Any = None, *, workers: int = 2, progress: bool = True,
                          fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> CacheResult:
    """The synthetic dataset straight into a cache (no intermediate files); resumable."""
    from kneetf.data.synthetic import SynthConfig, assign_split

    synth_config = synth_config or SynthConfig()
    tasks = [CacheTask(id=f"knee{i:05d}", split=assign_split(seed, i, n, fractions),
                       payload=SyntheticPayload(seed, i, synth_config), source=f"synthetic:{seed}:{i}")
             for i in range(n)]
    source = {"kind": "synthetic", "n": n, "seed": seed, "config": asdict(synth_config), "roi": {"source": TRUTH_ROI}}
    return build_cache(tasks, load_synthetic, out_dir, config, workers=workers, progress=progress, source=source)


# --- a manifest of files ------------------------------------------------------------------
@dataclass(frozen=True)
class FilePayload:
    id: str
    xray: str
    mri: str
    side: str
    box: tuple[float, float, float, float] | None  # from a boxes CSV; None = detect
    detector: str | None  # a trained ROI detector (.keras path or "builtin"); None = classical fallback
    extra: tuple[tuple[str, str], ...] = ()
    # the readers' limit: it decides which files are refused, not what a pair decodes to,
    # so it stays out of repr() and thereby out of the cache key
    max_pixels: int | None = field(default=None, repr=False)

    def cache_key(self) -> str:
        """What decides the cached pair: the payload, and the classical fallback's version
        or the built-in detector's SHA-256 when one of them finds the box."""
        from kneetf.preprocess.roi import CLASSICAL_VERSION
        from kneetf.preprocess.roi_detector_config import BUILTIN_NAME

        if self.box is not None:
            return repr(self)
        if not self.detector:
            return repr(self) + f" classical/{CLASSICAL_VERSION}"
        if self.detector == BUILTIN_NAME:  # a user's detector is stamped as an input file
            return repr(self) + f" builtin/{builtin_detector_sha256()[:16]}"
        return repr(self)

    def input_files(self) -> tuple[str, ...]:
        """The files the pair is made of; replacing one rebuilds its cache shard. The built-in
        detector is no user file: its SHA-256 is in `cache_key`."""
        from kneetf.preprocess.roi_detector_config import is_named_source

        user_detector = self.detector and not is_named_source(self.detector)
        return (self.xray, self.mri) + ((self.detector,) if user_detector else ())


#: ROI sources of this worker process by detector path (None: the classical fallback), so
#: that a detector loads once per process
_ROI_SOURCES: dict[str | None, Any] = {}


def _roi_finding(payload: FilePayload, case_id: str, image: np.ndarray, meta: Any):
    """The box of one X-ray with its source, confidence and review flag (`RoiFinding`)."""
    from kneetf.preprocess.roi import Box, RoiFinding, find_roi
    from kneetf.preprocess.roi_detector_config import CLASSICAL_NAME
    from kneetf.preprocess.xray import roi_source

    if payload.box is not None:  # looked up in the boxes CSV by `manifest_tasks`
        return RoiFinding(Box(*payload.box), "csv")
    source = _ROI_SOURCES.get(payload.detector)
    if source is None:
        source = _ROI_SOURCES[payload.detector] = roi_source(detector=payload.detector or CLASSICAL_NAME)
    try:
        return find_roi(source, case_id, image, getattr(meta, "pixel_spacing", None), where=payload.xray)
    except RoiNotFoundError as e:  # name the X-ray the knee was not found in
        raise RoiNotFoundError(e.path or payload.xray, e.reason) from None


def load_files(payload: FilePayload, config: PreprocessConfig) -> RawPair:
    """Decode one manifest row: X-ray -> ROI crop; MRI series -> sorted slice window."""
    from kneetf.io.readers import read_mri_window, read_xray
    from kneetf.preprocess.roi import crop_box

    xray, meta = read_xray(payload.xray, max_pixels=payload.max_pixels, **dict(payload.extra))
    case_id = payload.id
    found = _roi_finding(payload, case_id, xray, meta)
    mri, _ = read_mri_window(payload.mri, config.slice_start, config.slice_stop, max_pixels=payload.max_pixels)
    low, high = float(np.min(mri)), float(np.max(mri))
    if low == high:
        raise InputError(payload.mri, f"slices [{config.slice_start}, {config.slice_stop}) of the MRI are constant "
                                      f"(every value {low:g}): nothing to learn from")
    return RawPair(id=case_id, xray=crop_box(xray, found.box, max_pixels=payload.max_pixels), mri=mri,
                   side=payload.side, box=found.box.as_tuple(), roi_source=found.source,
                   roi_confidence=found.confidence, roi_flagged=found.flagged)


def manifest_tasks(manifest: str | Path, *, rois: str | Path | None = None, detector: str | Path | None = None,
                   allow_outside: bool = False, reader: ReaderConfig | None = None) -> tuple[list[CacheTask], list[dict[str, str]]]:
    """Cache tasks for every valid manifest row, and the bad rows as error dicts. Boxes come
    from `rois`, else from `detector` (default: the built-in one; "classical": the classical
    fallback). `reader` (default: the current `ReaderConfig`) limits what the workers decode.
    Rows without a split are split by id (`DEFAULT_SPLIT`, a seeded shuffle that depends only
    on their ids)."""
    from kneetf.io.manifest import DEFAULT_SPLIT, read_manifest, split_participants
    from kneetf.preprocess.roi import BoxesResult, read_boxes
    from kneetf.preprocess.roi_detector_config import resolved_detector

    reader = reader or current_reader_config()
    detector = resolved_detector(rois, detector)

    result = read_manifest(manifest, allow_outside=allow_outside)
    boxes = read_boxes(rois) if rois else BoxesResult({}, [], set())
    errors = [{"id": "", "file": str(e.path), "reason": e.reason} for e in result.errors]
    ids = {case.id for case in result.cases}
    errors += [{"id": case_id, "file": str(e.path), "reason": e.reason} for case_id, e in boxes.errors
               if case_id in ids or not case_id]  # a bad box of an id outside the manifest loses nothing
    unsplit = [case.id for case in result.cases if not case.split]
    splits = split_participants(unsplit, DEFAULT_SPLIT, seed=0) if unsplit else {}
    if unsplit:
        log.info("%s: %d row(s) without a split, assigned to train / val / test (%s) by id", manifest,
                 len(unsplit), " / ".join(f"{f:g}" for f in DEFAULT_SPLIT))
    tasks = []
    for case in result.cases:
        box = boxes.boxes.get(case.id)
        if rois and box is None:
            if case.id not in boxes.bad_ids:  # a bad line is reported above, once
                errors.append({"id": case.id, "file": str(rois), "reason": "no box for this id in the ROI CSV"})
            continue
        extra = (("half", case.xray_half),) if case.xray_half else ()  # one knee of a bilateral X-ray
        payload = FilePayload(id=case.id, xray=str(case.xray), mri=str(case.mri), side=case.side or "",
                              box=box.as_tuple() if box is not None else None,
                              detector=str(detector) if detector else None, extra=extra,
                              max_pixels=reader.max_pixels)
        tasks.append(CacheTask(id=case.id, split=case.split or splits[case.id], payload=payload,
                               source=f"{case.xray} | {case.mri}"))
    return tasks, errors


@dataclass(frozen=True)
class PrepareOptions:
    """How `kneetf prepare` runs; the defaults of `prepare_manifest`'s keywords."""

    roi_preview: bool = field(default=False, metadata={
        "help": "write contact sheets of every crop (roi_preview/sheet-001.png, ...: one thumbnail per pair with "
                "its id, framed by its ROI source and review flag, and the X-rays whose knee was not found)"})
    workers: int = field(default=2, metadata={"help": "decoding processes (0 = in-process)"})
    shard_size: int = field(default=64, metadata={"help": "pairs per TFRecord shard"})
    allow_outside: bool = field(default=False, metadata={
        "help": "allow manifest paths that leave the manifest's folder tree"})


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, in hex."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def builtin_detector_sha256() -> str:
    from kneetf.preprocess.roi_detector_config import BUILTIN_DETECTOR

    return file_sha256(BUILTIN_DETECTOR)


def detector_file(detector: str | Path) -> Path:
    """The file of an ROI detector given as a path or as "builtin" (the one shipped with kneetf)."""
    if str(detector) == "builtin":
        from kneetf.preprocess.roi_detector_config import BUILTIN_DETECTOR

        return BUILTIN_DETECTOR
    return Path(detector)


def roi_record(rois: str | Path | None = None, detector: str | Path | None = None) -> dict[str, Any]:
    """What `dataset.json` records of the ROI source a manifest is prepared with: "csv" (the
    boxes file's name), "detector" (its name, SHA-256 and the copy kept in the cache; the
    built-in one by default) or "classical" (the fallback's version and box convention)."""
    from kneetf.preprocess.roi_detector_config import resolved_detector

    detector = resolved_detector(rois, detector)
    if rois:
        return {"source": "csv", "boxes": Path(rois).name}
    if detector:
        record: dict[str, Any] = {"source": "detector", "name": Path(detector).name}
        file = detector_file(detector)
        if file.is_file():
            record.update(sha256=file_sha256(file), file=CACHE_DETECTOR_FILE)
        return record
    from kneetf.preprocess.roi import CLASSICAL_BOX_MM, CLASSICAL_SIDE_SCALE, CLASSICAL_VERSION

    return {"source": "classical", "version": CLASSICAL_VERSION, "box_mm": CLASSICAL_BOX_MM,
            "side_scale": CLASSICAL_SIDE_SCALE}


def copy_roi_detector(cache_dir: str | Path, dest_dir: str | Path) -> Path | None:
    """Copy the ROI detector a cache was prepared with (its recorded copy) into `dest_dir`
    under the same name, so that it travels with a model trained on the cache; the copy's
    path, or None when the cache was not prepared with a detector."""
    import shutil

    from kneetf.data.cache import read_info
    from kneetf.io.atomic import atomic_path

    roi = (read_info(cache_dir).get("source") or {}).get("roi") or {}
    name = roi.get("file")
    if not name:
        return None
    src, dest = Path(cache_dir) / name, Path(dest_dir) / name
    if not src.is_file():
        raise InputError(src, "the ROI detector this cache was prepared with is missing from the cache folder")
    if not (dest.is_file() and file_sha256(dest) == file_sha256(src)):
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
    return dest


def prepare_manifest(manifest: str | Path, out_dir: str | Path, config: PreprocessConfig = PreprocessConfig(), *,
                     rois: str | Path | None = None, detector: str | Path | None = None,
                     allow_outside: bool = PrepareOptions.allow_outside, roi_preview: bool = PrepareOptions.roi_preview,
                     workers: int = PrepareOptions.workers, shard_size: int = PrepareOptions.shard_size,
                     progress: bool = True, reader: ReaderConfig | None = None) -> CacheResult:
    """`kneetf prepare`: every valid manifest row into the cache; bad rows and files (for
    instance larger than `reader.max_pixels`, or an X-ray whose knee the classical fallback
    finds nowhere) are skipped and listed in `errors.csv`. Boxes come from `rois`, else from
    `detector`: the built-in detector by default, "classical" for the classical fallback.
    Every pair's box, ROI source, confidence and review flag go to `rois.csv`; the ROI
    source (with a copy of the detector) to `dataset.json`. `roi_preview` writes contact
    sheets of the crops (`roi_preview/`)."""
    out = Path(out_dir)
    folder = OutputFolder(out)
    try:
        return _prepare_into(folder, manifest, config, rois=rois, detector=detector, allow_outside=allow_outside,
                             reader=reader, workers=workers, shard_size=shard_size, progress=progress,
                             roi_preview=roi_preview)
    finally:
        folder.release()


def _prepare_into(folder: OutputFolder, manifest: str | Path, config: PreprocessConfig, *,
                  rois: str | Path | None, detector: str | Path | None, allow_outside: bool,
                  reader: ReaderConfig | None, workers: int, shard_size: int, progress: bool,
                  roi_preview: bool) -> CacheResult:
    from kneetf.preprocess.roi_detector_config import is_named_source, resolved_detector

    out = folder.path
    tasks, errors = manifest_tasks(manifest, rois=rois, detector=detector, allow_outside=allow_outside,
                                   reader=reader)
    chosen = resolved_detector(rois, detector)
    folder.refuse_inputs([manifest, *(p for p in (rois, chosen) if p and not is_named_source(p)),
                          *(p for task in tasks for p in task.payload.input_files())])
    roi = roi_record(rois, detector)
    if roi.get("file"):  # the detector travels with the cache (and from there with the model)
        import shutil

        from kneetf.io.atomic import atomic_path

        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / CACHE_DETECTOR_FILE) as tmp:
            shutil.copyfile(detector_file(chosen), tmp)
    source = {"kind": "manifest", "manifest": Path(manifest).name, "rois": roi["source"], "roi": roi}
    result = build_cache(tasks, load_files, out, config, workers=workers, shard_size=shard_size,
                         progress=progress, source=source, extra_errors=errors)
    if roi_preview:
        from kneetf.data.review import write_contact_sheets

        write_contact_sheets(out, out / "roi_preview")
    return result
