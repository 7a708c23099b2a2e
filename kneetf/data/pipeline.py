"""The tf.data pipeline over a cache: list shards -> interleave -> (shuffle) -> parse ->
batch -> prefetch. Streams from disk; never holds the dataset in memory."""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from kneetf.data.cache import DATASET_JSON, read_info
from kneetf.data.records import parse_example
from kneetf.errors import InputError


def shard_files(cache_dir: str | Path, split: str) -> list[str]:
    """The shard paths of `split` that dataset.json lists (non-empty ones only)."""
    info = read_info(cache_dir)
    if split not in info["shards"]:
        raise InputError(cache_dir, f"unknown split {split!r}; the cache has {sorted(info['shards'])}")
    files = [str(Path(cache_dir) / n) for n in info["shards"][split]]
    missing = [f for f in files if not Path(f).exists()]
    if missing:
        raise InputError(missing[0], "shard listed in dataset.json is missing; re-run `kneetf prepare`")
    return files


def split_size(cache_dir: str | Path, split: str) -> int:
    return int(read_info(cache_dir)["counts"].get(split, 0))


def _draw(seed: tf.Tensor | None, k: int, shape: Any, low: Any, high: Any, dtype: Any = tf.float32) -> tf.Tensor:
    """The k-th uniform draw of an element: stateless from `seed` (shape [2]) when given."""
    if seed is None:
        return tf.random.uniform(shape, low, high, dtype=dtype)
    return tf.random.stateless_uniform(shape, tf.random.experimental.stateless_fold_in(seed, k), low, high,
                                       dtype=dtype)


def augment_xray(xray: tf.Tensor, strength: float = 1.0, seed: tf.Tensor | None = None) -> tf.Tensor:
    """Intensity augmentation of one normalised X-ray (H, W, 1): random gamma, contrast,
    brightness and noise. Geometry is untouched, so the X-ray / MRI pair stays consistent.
    With `seed` (int shape [2]) the draws are a function of it (stateless random ops)."""
    s = float(strength)
    gamma = tf.exp(_draw(seed, 0, [], -0.25 * s, 0.25 * s))
    x = tf.pow(tf.clip_by_value(xray, 1e-6, 1.0), gamma)
    contrast = _draw(seed, 1, [], 1.0 - 0.15 * s, 1.0 + 0.15 * s)
    mean = tf.reduce_mean(x)
    x = (x - mean) * contrast + mean + _draw(seed, 2, [], -0.05 * s, 0.05 * s)
    stddev = _draw(seed, 3, [], 0.0, 0.02 * s)
    if seed is None:
        noise = tf.random.normal(tf.shape(x), stddev=stddev)
    else:
        noise = tf.random.stateless_normal(tf.shape(x), tf.random.experimental.stateless_fold_in(seed, 4)) * stddev
    return tf.clip_by_value(x + noise, 0.0, 1.0)


def shift_xray(xray: tf.Tensor, max_shift: int, seed: tf.Tensor | None = None) -> tf.Tensor:
    """Move one X-ray (H, W, C) by a random whole-pixel offset in [-max_shift, max_shift] per
    axis, edges mirrored: the error of a knee-ROI box, which the MRI does not depend on.
    With `seed` (int shape [2]) the offset is a function of it."""
    if max_shift <= 0:
        return xray
    h, w = tf.shape(xray)[0], tf.shape(xray)[1]
    padded = tf.pad(xray, [[max_shift, max_shift], [max_shift, max_shift], [0, 0]], mode="SYMMETRIC")
    dy, dx = (_draw(seed, 10 + k, [], 0, 2 * max_shift + 1, dtype=tf.int32) for k in range(2))
    return padded[dy:dy + h, dx:dx + w, :]


def _epoch_seed(seed: int, epoch: tf.Tensor) -> tf.Tensor:
    return tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64)


def make_dataset(cache_dir: str | Path, split: str = "train", batch_size: int = 32, *,
                 shuffle: bool = False, repeat: bool = False, seed: int = 0,
                 drop_remainder: bool = False, with_meta: bool = False,
                 shuffle_buffer: int = 256, augment: float = 0.0, shift: int = 0,
                 transform: Callable[[dict], dict] | None = None, epochs: tuple[int, int] | None = None
                 ) -> tf.data.Dataset:
    """Batches of `(xray, {"xray_recon": xray, "mri": mri})` from the cache's `split`.

    With `with_meta=True` the elements are the parsed feature dicts (id, side, box, ...).
    Sharding under a tf.distribute strategy is by data (each worker sees every file).
    `augment` > 0 applies `augment_xray` with that strength to the input X-ray only; the
    reconstruction target stays the clean X-ray (a denoising auto-encoder). `shift` > 0 moves
    input and reconstruction target together by up to that many pixels (`shift_xray`).
    `transform` maps each parsed example dict (id, xray, mri, ...) before anything else, e.g.
    to adjust training targets.

    `epochs=(start, stop)` gives the passes of epochs start..stop-1 one after the other
    (fit it with `steps_per_epoch` = batches per pass): the order and augmentation of epoch
    e are a function of (`seed`, e) alone, so that a run resumed at epoch e sees exactly the
    batches an uninterrupted run would have seen.
    """
    info = read_info(cache_dir)
    size, slices = info["shapes"]["mri"][0], info["shapes"]["mri"][2]
    files = shard_files(cache_dir, split)
    if not files or int(info["counts"].get(split, 0)) == 0:
        raise InputError(cache_dir, f"split {split!r} is empty")
    n = int(info["counts"].get(split, 0))

    def one_pass(epoch: tf.Tensor | None) -> tf.data.Dataset:
        if not shuffle:  # evaluation order = cache order (split order of the manifest)
            ds = tf.data.Dataset.from_tensor_slices(files).flat_map(tf.data.TFRecordDataset)
        elif epoch is None:
            ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
            ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(files)), block_length=1,
                               num_parallel_calls=tf.data.AUTOTUNE)
            ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        else:
            # stateless shuffles keyed by (seed, epoch): shard order, then blocks of
            # `shuffle_buffer` records (the interleave mixes the shards within a block)
            key = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
            order = tf.random.experimental.stateless_shuffle(tf.constant(files), seed=key)
            ds = tf.data.Dataset.from_tensor_slices(order)
            ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(files)), block_length=1,
                               num_parallel_calls=tf.data.AUTOTUNE)
            ds = ds.batch(shuffle_buffer).enumerate().map(
                lambda i, block: tf.random.experimental.stateless_shuffle(
                    block, seed=tf.random.experimental.stateless_fold_in(key, i))).unbatch()
        if repeat and epoch is None:
            ds = ds.repeat()
        # ordered maps: the same seed gives the same batches, and every worker of a multi-worker
        # run sees the same stream before DATA sharding (else a sample could land in two replicas)
        ds = ds.map(lambda s: parse_example(s, size, slices), num_parallel_calls=tf.data.AUTOTUNE)
        if transform is not None:
            ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
        if not with_meta:
            def to_pair(ex: dict, element_seed: Any = None) -> tuple:
                xray = ex["xray"]
                if shift:
                    xray = shift_xray(xray, shift, element_seed)
                x = augment_xray(xray, augment, element_seed) if augment else xray
                return x, {"xray_recon": xray, "mri": ex["mri"]}

            if epoch is None:
                ds = ds.map(to_pair, num_parallel_calls=tf.data.AUTOTUNE)
            else:  # one stateless seed per element: (seed, epoch, position in the pass)
                ds = ds.enumerate().map(lambda i, ex: to_pair(ex, tf.stack([_epoch_seed(seed, epoch), i])),
                                        num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(batch_size, drop_remainder=drop_remainder)

    if epochs is not None:
        start, stop = (int(e) for e in epochs)
        ds = tf.data.Dataset.range(start, stop).flat_map(one_pass)
    else:
        ds = one_pass(None)
        if not repeat:
            # a known length: otherwise Keras 3 runs one empty step per epoch, counted in
            # optimizer.iterations (so in the schedule) and in the per-output loss means
            ds = ds.apply(tf.data.experimental.assert_cardinality(n // batch_size if drop_remainder
                                                                 else -(-n // batch_size)))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)


def steps_per_pass(cache_dir: str | Path, split: str, batch_size: int, drop_remainder: bool = False) -> int:
    """Batches in one pass over `split`."""
    n = split_size(cache_dir, split)
    return n // batch_size if drop_remainder else -(-n // batch_size)


def load_arrays(cache_dir: str | Path, split: str, limit: int | None = None) -> dict[str, Any]:
    """A whole split as numpy arrays (ids, xray, mri, side): for evaluation of small splits."""
    ids, xs, ms, sides = [], [], [], []
    for ex in make_dataset(cache_dir, split, batch_size=64, with_meta=True):
        ids += [v.decode() for v in ex["id"].numpy()]
        sides += [v.decode() for v in ex["side"].numpy()]
        xs.append(ex["xray"].numpy())
        ms.append(ex["mri"].numpy())
        if limit and len(ids) >= limit:
            break
    xray, mri = np.concatenate(xs), np.concatenate(ms)
    if limit:
        ids, sides, xray, mri = ids[:limit], sides[:limit], xray[:limit], mri[:limit]
    return {"id": ids, "side": sides, "xray": xray, "mri": mri}


def _cache_shards(folder: Path) -> list[Path]:
    """The shards of the caches under `folder`: those each `dataset.json` lists (a shard left
    over from an earlier build is never read), every .tfrecord where no description is readable."""
    if not folder.is_dir():
        return []
    descriptions = sorted(folder.rglob(DATASET_JSON))
    if not descriptions:
        return sorted(folder.rglob("*.tfrecord"))
    shards: list[Path] = []
    for description in descriptions:
        cache = description.parent
        try:
            listed = read_info(cache)["shards"].values()
            shards += [cache / name for names in listed for name in names
                       if isinstance(name, str) and (cache / name).is_file()]
        except (InputError, TypeError):
            shards += sorted(cache.glob("*.tfrecord"))
    return shards


def corrupt_shards(folders: Sequence[str | Path]) -> list[Path]:
    """The TFRecord shards of the caches under `folders` (`_cache_shards`) that do not read to
    their end (truncated, or a record whose checksum fails)."""
    bad = []
    for folder in folders:
        for shard in _cache_shards(Path(folder)):
            try:
                for _ in tf.data.TFRecordDataset(str(shard)):
                    pass
            except tf.errors.DataLossError:
                bad.append(shard)
    return bad


@contextlib.contextmanager
def corrupt_shards_named(*folders: str | Path) -> Iterator[None]:
    """Turn TensorFlow's DataLossError from reading a cache under `folders` into an InputError
    naming the corrupt shard(s) and how to rebuild them."""
    try:
        yield
    except tf.errors.DataLossError as e:
        bad = corrupt_shards(folders)
        if not bad:
            raise
        more = f" (and {len(bad) - 1} more: {', '.join(str(p) for p in bad[1:4])})" if len(bad) > 1 else ""
        first = str(e.message).splitlines()[0] if str(e.message) else "unreadable"
        found = re.search(r"(?:truncated|corrupted) record at \d+", first)  # the rest is TensorFlow's graph talk
        reason = found.group(0) if found else re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\].*", "",
                                                      first)[:200]
        raise InputError(bad[0], f"corrupt TFRecord shard{more}: {reason}. Delete it and its .json sidecar, then "
                                 "run the same `kneetf prepare` (or training) command again: only the missing "
                                 "shards are rebuilt") from None
