"""Decoded pairs -> preprocessed TFRecord shards per split + `dataset.json`.

One builder serves every source (built-in synthetic knees, a manifest of DICOM / NIfTI /
PNG files): a source is a list of `CacheTask`s and a picklable `load_fn(payload, config)
-> RawPair` that decodes one pair on the CPU (ROI crop and slice window included). Loading
runs in a process pool; resize and robust normalisation (the TF ops of
`kneetf.preprocess.ops`) run in this process; each shard is written to a temporary file and
renamed, with a sidecar JSON of what it holds, so a killed run leaves no half shard and a
second run skips the finished ones. Bad inputs are skipped and listed in `errors.csv`.

A decoding process that dies (the out-of-memory killer, a crashing decoder) does not end the
run: the pool is restarted and the files it had in flight are loaded again one at a time; a
file that kills its worker again is reported in `errors.csv` and the others are written.

A shard is reused when its fingerprint matches: the preprocessing hash, the ids and what
each payload's `cache_key()` says, and the size and modification time (ns) of every input
file a payload lists in `input_files()` (each file of a DICOM series folder). Size and time
rather than a content hash, so that checking the cache stays cheap (no input is read); a
replaced input changes them. A shard written before input files were fingerprinted is
reused when none of its inputs is newer than the shard, and rebuilt otherwise.
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import datetime as _dt
import hashlib
import io
import json
import logging
import math
import os
import platform
import signal
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from kneetf.config import PreprocessConfig, config_hash, to_dict
from kneetf.errors import ConfigError, InputError, KneetfError, RoiNotFoundError
from kneetf.io.atomic import atomic_path, write_text_atomic
from kneetf.version import __version__

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DATASET_JSON = "dataset.json"
ERRORS_CSV = "errors.csv"
#: One row per cached pair: where its X-ray crop came from (box, ROI source, confidence, flag).
ROIS_CSV = "rois.csv"
ROI_COLUMNS = ("id", "split", "x0", "y0", "x1", "y1", "source", "confidence", "flagged")
#: `stage` of an error whose ROI could not be found (the pair is skipped, like any bad input)
ROI_STAGE = "roi"


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
    #: where the box came from ("csv", "classical", "detector:<file>", "truth"), how sure that
    #: source was (NaN: it does not say) and whether it flagged the box for review
    roi_source: str = ""
    roi_confidence: float = math.nan
    roi_flagged: bool = False


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
    rois: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def roi_summary(self) -> dict[str, Any]:
        """Boxes per ROI source, how many were flagged for review, how many X-rays had no box."""
        return roi_summary(self.rois, self.errors)


def roi_summary(rois: Sequence[dict[str, Any]], errors: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """`{"by_source": {source: n}, "flagged": n, "failed": n}` of ROI records (rows of
    `rois.csv`) and errors (those of stage "roi" count as failed)."""
    by_source: dict[str, int] = {}
    for r in rois:
        by_source[r["source"] or "unknown"] = by_source.get(r["source"] or "unknown", 0) + 1
    return {"by_source": by_source, "flagged": sum(bool(r["flagged"]) for r in rois),
            "failed": sum(e.get("stage") == ROI_STAGE for e in errors)}


def _roi_record(raw: RawPair, split: str) -> dict[str, Any]:
    box = [float(v) for v in raw.box] if raw.box is not None else [math.nan] * 4
    return {"id": raw.id, "split": split, "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3],
            "source": raw.roi_source, "confidence": float(raw.roi_confidence), "flagged": bool(raw.roi_flagged)}


def _write_rois(path: Path, rois: Iterable[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(ROI_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rois:
        w.writerow({k: (int(r[k]) if k == "flagged" else ("" if isinstance(r[k], float) and math.isnan(r[k])
                                                            else r[k])) for k in ROI_COLUMNS})
    write_text_atomic(path, buf.getvalue())


def read_rois(cache_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a cache's `rois.csv` (empty for a cache written before it existed)."""
    path = Path(cache_dir) / ROIS_CSV
    if not path.exists():
        return []
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            rows.append({**r, **{k: float(r[k]) if r[k] != "" else math.nan for k in ("x0", "y0", "x1", "y1",
                                                                                       "confidence")},
                         "flagged": r["flagged"] == "1"})
    return rows


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
    settings = (config.image_size, config.low_percentile, config.high_percentile)
    x = ops.traced("xray", *settings)(xray[None, :, :, None].astype("float32"))
    m = ops.traced("mri", *settings)(np.transpose(mri, (1, 2, 0))[None].astype("float32"))
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


def input_stamps(paths: Iterable[str | Path]) -> tuple[str, int]:
    """(digest of the size and mtime_ns of `paths`, newest mtime_ns). A folder stands for the
    plain files directly inside it (a DICOM series); a missing path is stamped as missing."""
    h = hashlib.sha256()
    newest = 0
    for raw in paths:
        path = Path(raw)
        try:
            entries = ([e for e in sorted(os.scandir(path), key=lambda e: e.name) if e.is_file()]
                       if path.is_dir() else [path])
            for entry in entries:
                st = entry.stat()
                newest = max(newest, st.st_mtime_ns)
                h.update(f"{raw}\0{getattr(entry, 'name', '')}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{raw}\0missing\n".encode())
    return h.hexdigest()[:16], newest


def _stamps(chunk: Sequence[CacheTask]) -> tuple[list[str], int]:
    """Per task the stamp of its payload's input files ("" when it lists none), and the newest mtime."""
    stamps, newest = [], 0
    for t in chunk:
        files = t.payload.input_files() if hasattr(t.payload, "input_files") else ()
        if files:
            stamp, latest = input_stamps(files)
            newest = max(newest, latest)
        else:
            stamp = ""
        stamps.append(stamp)
    return stamps, newest


def _fingerprint(chunk: Sequence[CacheTask], prep_hash: str, stamps: Sequence[str] | None = None) -> str:
    """Fingerprint of a shard; without `stamps` the one written before input files counted."""
    h = hashlib.sha256(prep_hash.encode())
    for i, t in enumerate(chunk):
        key = t.payload.cache_key() if hasattr(t.payload, "cache_key") else repr(t.payload)
        stamp = stamps[i] if stamps else ""
        h.update(t.id.encode() + b"\0" + key.encode() + (b"\0" + stamp.encode() if stamp else b"") + b"\n")
    return h.hexdigest()[:16]


def _load_one(load_fn: Callable, task: CacheTask, config: PreprocessConfig) -> RawPair | dict[str, str]:
    try:
        raw = load_fn(task.payload, config)
        if raw.id != task.id:
            raw.id = task.id
        return raw
    except InputError as e:
        error = {"id": task.id, "file": e.path or task.source, "reason": e.reason}
        if isinstance(e, RoiNotFoundError):
            error["stage"] = ROI_STAGE
        return error
    except KneetfError as e:
        return {"id": task.id, "file": task.source, "reason": str(e)}
    except Exception as e:  # a worker must not bring the whole job down; report it
        return {"id": task.id, "file": task.source, "reason": f"{type(e).__name__}: {e}"}


def _how_it_died(processes: Sequence[Any]) -> str:
    """What the exit codes of a broken pool's worker processes say about the one that died."""
    for p in processes:
        code = getattr(p, "exitcode", None)
        if code is None or code == 0 or code == -signal.SIGTERM:  # SIGTERM: the pool stopping the others
            continue
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            return f"killed by {name}" + (", as the out-of-memory killer does" if -code == signal.SIGKILL else "")
        return f"exit status {code}"
    return "it ended abruptly"


def _failed(task: CacheTask, error: BaseException) -> dict[str, str]:
    return {"id": task.id, "file": task.source, "reason": f"{type(error).__name__}: {error}"}


def _died(task: CacheTask, how: str) -> dict[str, str]:
    return {"id": task.id, "file": task.source,
            "reason": f"the decoding worker process died while reading it ({how}), twice, the second time "
                      "reading it alone; skipped"}


def _new_pool(workers: int) -> cf.ProcessPoolExecutor:
    from kneetf.workers import process_pool

    return process_pool(workers)


def _broken_pool(pool: cf.ProcessPoolExecutor) -> str:
    """Shut down a pool after a worker died -> how it died."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=True, cancel_futures=True)
    return _how_it_died(processes)


def _retry_alone(suspects: Sequence[list], load_fn: Callable, config: PreprocessConfig, how: str) -> None:
    """Load each [task, future] of `suspects` again in a one-process pool, one at a time;
    a task whose worker dies again is the culprit and becomes an error."""
    names = ", ".join(f"{t.id} ({t.source})" if t.source else t.id for t, _ in suspects)
    log.warning("a decoding worker process died (%s) with %d pair(s) in flight: %s; loading each of them "
                "again, alone", how, len(suspects), names)
    solo = None
    try:
        for entry in suspects:
            task = entry[0]
            solo = solo or _new_pool(1)
            try:
                entry[1] = solo.submit(_load_one, load_fn, task, config).result()
            except cf.process.BrokenProcessPool:
                again = _broken_pool(solo)
                solo = None
                entry[1] = _died(task, again)
                log.error("%s (%s) killed its decoding worker again (%s); skipped", task.id, task.source, again)
    finally:
        if solo is not None:
            solo.shutdown(wait=True)


def _iter_loaded(tasks: Sequence[CacheTask], load_fn: Callable, config: PreprocessConfig,
                 workers: int) -> Iterator[RawPair | dict[str, str]]:
    """Load tasks in order, at most a bounded number in flight (memory stays flat). A dead
    worker process restarts the pool; the pairs in flight are loaded again one at a time."""
    if workers <= 0:
        for t in tasks:
            yield _load_one(load_fn, t, config)
        return
    it = iter(tasks)
    pending: deque[list] = deque()  # [task, None (not submitted) / future / loaded result], in task order
    pool = _new_pool(workers)
    try:
        while True:
            while len(pending) < 4 * workers and (task := next(it, None)) is not None:
                pending.append([task, None])
            if not pending:
                return
            try:
                for entry in pending:
                    if entry[1] is None:
                        entry[1] = pool.submit(_load_one, load_fn, entry[0], config)
                if isinstance(pending[0][1], cf.Future):
                    pending[0][1] = pending[0][1].result()
            except cf.process.BrokenProcessPool:
                how = _broken_pool(pool)
                suspects = []
                for entry in pending:
                    if not isinstance(entry[1], cf.Future):
                        continue
                    if entry[1].cancelled():
                        entry[1] = None  # never started: submitted again
                    elif isinstance(entry[1].exception(), cf.process.BrokenProcessPool):
                        suspects.append(entry)
                    else:  # finished before the worker died
                        error = entry[1].exception()
                        entry[1] = _failed(entry[0], error) if error else entry[1].result()
                if suspects:
                    _retry_alone(suspects, load_fn, config, how)
                pool = _new_pool(workers)
                continue
            except Exception as error:  # e.g. a result that cannot be unpickled
                pending[0][1] = _failed(pending[0][0], error)
            yield pending.popleft()[1]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


#: How a shard's sidecar fingerprints its input files (absent in sidecars written before).
INPUT_STAMP = "size+mtime_ns"


def _reusable_shard(shard: Path, fp: str, legacy_fp: str, newest_input_ns: int) -> dict[str, Any] | None:
    """The sidecar of a finished shard that can be kept, else None (the shard is rebuilt).

    A sidecar written before input files were fingerprinted is kept when its old fingerprint
    matches and no input file is newer than the shard; it is then rewritten with `fp`.
    """
    side = shard.with_name(shard.name + ".json")
    if not (shard.exists() and side.exists()):
        return None
    try:
        meta = json.loads(side.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        st = shard.stat()
        if "bytes" in meta and meta["bytes"] != st.st_size:
            log.warning("%s: %d bytes where %s were written (truncated or altered); rebuilding the shard",
                        shard, st.st_size, meta["bytes"])
            return None
        if meta.get("fingerprint") == fp:
            return meta
        if ("inputs" not in meta and meta.get("fingerprint") == legacy_fp
                and newest_input_ns <= st.st_mtime_ns):
            meta = {**meta, "fingerprint": fp, "inputs": INPUT_STAMP}
            write_text_atomic(side, json.dumps(meta))
            return meta
    except (OSError, ValueError, AttributeError, TypeError) as e:
        log.warning("%s: unreadable sidecar (%s); rebuilding the shard", side, e)
    return None


class _ShardWriter:
    """A TFRecord shard that opens its writer on the first record, so that TensorFlow is
    loaded only once a pair decodes (a shard without a record is an empty file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: Any = None

    def write(self, pair: Any) -> None:
        from kneetf.data.records import encode_example

        record = encode_example(pair)
        if self._writer is None:
            import tensorflow as tf

            self._writer = tf.io.TFRecordWriter(str(self.path))
        self._writer.write(record)

    def __enter__(self) -> "_ShardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._writer is not None:
            self._writer.close()


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
    from tqdm.auto import tqdm

    if shard_size < 1:
        raise ConfigError(f"shard_size must be at least 1. Received: shard_size={shard_size}")
    if workers < 0:
        raise ConfigError(f"workers must be 0 (in-process) or more. Received: workers={workers}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for debris in out.glob(".tmp-*"):  # left by a killed run; never listed in dataset.json
        if debris.is_file():
            debris.unlink()
    prep_hash = config_hash(config)
    existing = out / DATASET_JSON
    old_info: dict[str, Any] = {}
    if existing.exists():
        try:
            old_info = json.loads(existing.read_text())
        except (OSError, ValueError) as e:  # rewritten below; every shard's fingerprint holds the hash too
            log.warning("%s: unreadable (%s); checking the shards one by one", existing, e)
            old_info = {"preprocess_hash": prep_hash}
        if not isinstance(old_info, dict):
            old_info = {"preprocess_hash": prep_hash}
        if old_info.get("preprocess_hash") != prep_hash:
            raise KneetfError(f"{out}: cache was built with another preprocessing config "
                              f"(hash {old_info.get('preprocess_hash')} != {prep_hash}); use a new folder")
    ids = [t.id for t in tasks]
    if len(set(ids)) != len(ids):
        raise KneetfError("duplicate ids in the cache tasks")
    plan = shard_plan(tasks, shard_size)
    counts = {s: 0 for s in SPLITS}
    errors: list[dict[str, str]] = []
    rois: list[dict[str, Any]] = []
    skipped = 0
    todo = []
    for name, chunk in plan:
        stamps, newest = _stamps(chunk)
        fp = _fingerprint(chunk, prep_hash, stamps)
        meta = _reusable_shard(out / name, fp, _fingerprint(chunk, prep_hash), newest)
        if meta is not None:
            counts[name.split("-")[0]] += meta["count"]
            errors.extend(meta.get("errors", []))
            rois.extend(meta.get("rois", []))
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
        shard_rois: list[dict[str, Any]] = []
        count = 0
        with atomic_path(out / name, fault="prepare.shard") as tmp:
            with _ShardWriter(tmp) as writer:
                for task in chunk:
                    item = next(loaded)
                    bar.update(1)
                    if isinstance(item, dict):
                        shard_errors.append(item)
                        continue
                    try:
                        writer.write(preprocess_pair(item, config))
                        count += 1
                        shard_rois.append(_roi_record(item, task.split))
                    except InputError as e:
                        shard_errors.append({"id": task.id, "file": task.source, "reason": e.reason})
            written = tmp.stat().st_size if tmp.exists() else 0
        write_text_atomic(out / (name + ".json"), json.dumps({"fingerprint": fp, "inputs": INPUT_STAMP,
                                                              "count": count, "bytes": written,
                                                              "errors": shard_errors, "rois": shard_rois}),
                          fault="prepare.shard_info")
        counts[name.split("-")[0]] += count
        errors.extend(shard_errors)
        rois.extend(shard_rois)
    bar.close()
    errors = list(extra_errors) + errors
    _write_errors(out / ERRORS_CSV, errors)
    _write_rois(out / ROIS_CSV, rois)
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
        "rois": {"file": ROIS_CSV, **roi_summary(rois, errors)},
        "source": source or {},
        "versions": _versions(),
        # kept while no shard is rebuilt: a kernel ridge prior fitted on this cache stays valid
        "created": (old_info.get("created") if not todo and old_info.get("preprocess_hash") == prep_hash else None)
        or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_text_atomic(out / DATASET_JSON, json.dumps(info, indent=2), fault="prepare.info")
    return CacheResult(out_dir=out, counts=counts, errors=errors, skipped_shards=skipped, rois=rois)


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
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(path, f"unreadable ({e}); run `kneetf prepare` again on the same --out to rewrite it") from None
    if not isinstance(info, dict):
        raise InputError(path, "is not a kneetf cache description (not a JSON object)")
    missing = [k for k in ("counts", "shards", "shapes", "preprocess") if not isinstance(info.get(k), dict)]
    if missing:
        raise InputError(path, f"is not a kneetf cache description (no {', '.join(missing)}); run `kneetf prepare` "
                               "again on the same --out to rewrite it")
    return info
