"""Decoded pairs -> preprocessed TFRecord shards per split + `dataset.json`.

One builder serves every source (built-in synthetic knees, a manifest of DICOM / NIfTI /
PNG files): a source is a list of `CacheTask`s and a picklable `load_fn(payload, config)
-> RawPair` that decodes one pair on the CPU (ROI crop and slice window included). Loading
runs in a process pool; resize and robust normalisation (the TF ops of
`kneetf.preprocess.ops`) run in this process; each shard is written to a temporary file and
renamed, with a sidecar JSON of what it holds, so a killed run leaves no half shard and a
second run skips the finished ones. Bad inputs are skipped and listed in `errors.csv`.
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import datetime as _dt
import hashlib
import io
import json
import logging
import multiprocessing
import platform
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from kneetf.config import PreprocessConfig, config_hash, to_dict
from kneetf.errors import InputError, KneetfError
from kneetf.io.atomic import atomic_path, write_text_atomic
from kneetf.version import __version__

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DATASET_JSON = "dataset.json"
ERRORS_CSV = "errors.csv"


@dataclass
class RawPair:
    """One decoded pair before resize/normalisation.

    xray: 2-D, ROI-cropped, display polarity (MONOCHROME1 already inverted).
    mri: (slices, H, W), the selected slice window in sorted order.
    """

    id: str
    xray: np.ndarray
    mri: np.ndarray
    side: str = ""
    box: tuple[float, float, float, float] | None = None


@dataclass
class CacheTask:
    """One pair to load: `payload` is passed to the loader in a worker process."""

    id: str
    split: str
    payload: Any
    source: str = ""  # file(s) named in error reports


@dataclass
class CacheResult:
    """What `build_cache` did: counts written per split and the inputs it skipped."""

    out_dir: Path
    counts: dict[str, int]
    errors: list[dict[str, str]] = field(default_factory=list)
    skipped_shards: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def preprocess_pair(raw: RawPair, config: PreprocessConfig) -> "PreparedPair":
    """Resize + robust normalisation (the shared TF ops) of one RawPair; mirrors left knees
    when `config.mirror_left`. Raises InputError on unusable arrays."""
    from kneetf.data.records import PreparedPair
    from kneetf.preprocess import ops
    from kneetf.preprocess.image import image_2d
    from kneetf.preprocess.xray import mirror_volume, mirror_xray, mirrors

    xray = image_2d(raw.xray, "the X-ray", path=raw.id)
    mri = np.asarray(raw.mri)
    if mri.ndim != 3 or mri.shape[0] != config.num_slices:
        raise InputError(raw.id, f"MRI window must be ({config.num_slices}, H, W), got shape {mri.shape}")
    for name, a in (("X-ray", xray), ("MRI", mri)):
        if not np.all(np.isfinite(a)):
            raise InputError(raw.id, f"{name} contains NaN or infinite values")
    mirrored = mirrors(config, raw.side)
    if mirrored:
        xray, mri = mirror_xray(xray), mirror_volume(mri)
    x = ops.preprocess_xray(xray[None, :, :, None].astype("float32"), config.image_size,
                            config.low_percentile, config.high_percentile)
    m = ops.preprocess_mri(np.transpose(mri, (1, 2, 0))[None].astype("float32"), config.image_size,
                           config.low_percentile, config.high_percentile)
    box = tuple(float(v) for v in raw.box) if raw.box is not None else (-1.0, -1.0, -1.0, -1.0)
    return PreparedPair(id=raw.id, xray=x.numpy()[0], mri=m.numpy()[0], side=raw.side or "", box=box,
                        mirrored=mirrored)


def shard_plan(tasks: Sequence[CacheTask], shard_size: int) -> list[tuple[str, list[CacheTask]]]:
    """Deterministic shard names and members: tasks grouped by split, in the given order."""
    plan = []
    for split in SPLITS:
        members = [t for t in tasks if t.split == split]
        n = max(1, -(-len(members) // shard_size)) if members else 0
        for k in range(n):
            chunk = members[k * shard_size:(k + 1) * shard_size]
            plan.append((f"{split}-{k:05d}-of-{n:05d}.tfrecord", chunk))
    return plan


def _fingerprint(chunk: Sequence[CacheTask], prep_hash: str) -> str:
    h = hashlib.sha256(prep_hash.encode())
    for t in chunk:
        key = t.payload.cache_key() if hasattr(t.payload, "cache_key") else repr(t.payload)
        h.update(t.id.encode() + b"\0" + key.encode() + b"\n")
    return h.hexdigest()[:16]


def _load_one(load_fn: Callable, task: CacheTask, config: PreprocessConfig) -> RawPair | dict[str, str]:
    try:
        raw = load_fn(task.payload, config)
        if raw.id != task.id:
            raw.id = task.id
        return raw
    except InputError as e:
        return {"id": task.id, "file": e.path or task.source, "reason": e.reason}
    except KneetfError as e:
        return {"id": task.id, "file": task.source, "reason": str(e)}
    except Exception as e:  # a worker must not bring the whole job down; report it
        return {"id": task.id, "file": task.source, "reason": f"{type(e).__name__}: {e}"}


def _iter_loaded(tasks: Sequence[CacheTask], load_fn: Callable, config: PreprocessConfig,
                 workers: int) -> Iterator[RawPair | dict[str, str]]:
    """Load tasks in order, at most a bounded number in flight (memory stays flat)."""
    if workers <= 0:
        for t in tasks:
            yield _load_one(load_fn, t, config)
        return
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: deque = deque()
        it = iter(tasks)
        for t in it:
            pending.append(pool.submit(_load_one, load_fn, t, config))
            if len(pending) >= 4 * workers:
                break
        while pending:
            yield pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(_load_one, load_fn, nxt, config))


def build_cache(tasks: Sequence[CacheTask], load_fn: Callable[[Any, PreprocessConfig], RawPair],
                out_dir: str | Path, config: PreprocessConfig = PreprocessConfig(), *,
                shard_size: int = 64, workers: int = 2, progress: bool = True,
                source: dict[str, Any] | None = None,
                extra_errors: Sequence[dict[str, str]] = ()) -> CacheResult:
    """Write (or complete) the cache in `out_dir`; see the module docstring.

    Refuses to mix preprocessing configs: an `out_dir` whose dataset.json has another
    preprocessing hash raises a KneetfError. `extra_errors` (bad manifest lines, say) are
    reported in errors.csv with the loader's own.
    """
    from kneetf.data.records import encode_example

    import tensorflow as tf
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for debris in out.glob(".tmp-*"):  # left by a killed run; never listed in dataset.json
        if debris.is_file():
            debris.unlink()
    prep_hash = config_hash(config)
    existing = out / DATASET_JSON
    if existing.exists():
        info = json.loads(existing.read_text())
        if info.get("preprocess_hash") != prep_hash:
            raise KneetfError(f"{out}: cache was built with another preprocessing config "
                              f"(hash {info.get('preprocess_hash')} != {prep_hash}); use a new folder")
    ids = [t.id for t in tasks]
    if len(set(ids)) != len(ids):
        raise KneetfError("duplicate ids in the cache tasks")
    plan = shard_plan(tasks, shard_size)
    counts = {s: 0 for s in SPLITS}
    errors: list[dict[str, str]] = []
    skipped = 0
    todo = []
    for name, chunk in plan:
        side = out / (name + ".json")
        fp = _fingerprint(chunk, prep_hash)
        if (out / name).exists() and side.exists():
            meta = json.loads(side.read_text())
            if meta.get("fingerprint") == fp:
                counts[name.split("-")[0]] += meta["count"]
                errors.extend(meta.get("errors", []))
                skipped += 1
                continue
        todo.append((name, chunk, fp))
    if skipped:
        log.info("cache %s: %d shard(s) already complete, skipped", out, skipped)
    if todo and existing.exists():  # it would count shards about to be rewritten: the cache is not ready
        existing.unlink()
    bar = tqdm(total=sum(len(c) for _, c, _ in todo), desc="prepare", unit="pair", disable=not progress)
    flat = [t for _, chunk, _ in todo for t in chunk]
    loaded = _iter_loaded(flat, load_fn, config, workers)
    for name, chunk, fp in todo:
        shard_errors: list[dict[str, str]] = []
        count = 0
        with atomic_path(out / name, fault="prepare.shard") as tmp:
            with tf.io.TFRecordWriter(str(tmp)) as writer:
                for task in chunk:
                    item = next(loaded)
                    bar.update(1)
                    if isinstance(item, dict):
                        shard_errors.append(item)
                        continue
                    try:
                        writer.write(encode_example(preprocess_pair(item, config)))
                        count += 1
                    except InputError as e:
                        shard_errors.append({"id": task.id, "file": task.source, "reason": e.reason})
        write_text_atomic(out / (name + ".json"),
                          json.dumps({"fingerprint": fp, "count": count, "errors": shard_errors}),
                          fault="prepare.shard_info")
        counts[name.split("-")[0]] += count
        errors.extend(shard_errors)
    bar.close()
    errors = list(extra_errors) + errors
    _write_errors(out / ERRORS_CSV, errors)
    info = {
        "format": "kneetf-cache/1",
        "counts": counts,
        "shards": {s: [n for n, _ in plan if n.startswith(s + "-")] for s in SPLITS},
        "shapes": {"xray": [config.image_size, config.image_size, 1],
                   "mri": [config.image_size, config.image_size, config.num_slices]},
        "storage": "uint16 = round(value * 65535), value in [0, 1]",
        "preprocess": to_dict(config),
        "preprocess_hash": prep_hash,
        "errors": len(errors),
        "source": source or {},
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_text_atomic(out / DATASET_JSON, json.dumps(info, indent=2), fault="prepare.info")
    return CacheResult(out_dir=out, counts=counts, errors=errors, skipped_shards=skipped)


def _write_errors(path: Path, errors: Iterable[dict[str, str]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["id", "file", "reason"], lineterminator="\n")
    w.writeheader()
    for e in errors:
        w.writerow({k: e.get(k, "") for k in ("id", "file", "reason")})
    write_text_atomic(path, buf.getvalue())


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"kneetf": __version__, "python": platform.python_version()}
    for pkg in ("tensorflow", "keras", "numpy", "pydicom", "nibabel", "opencv-python-headless"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def read_info(cache_dir: str | Path) -> dict[str, Any]:
    """The cache's dataset.json; a clear error when the folder is not a cache."""
    path = Path(cache_dir) / DATASET_JSON
    if not path.exists():
        raise InputError(cache_dir, f"not a kneetf cache (no {DATASET_JSON}); build one with `kneetf prepare`")
    return json.loads(path.read_text())
