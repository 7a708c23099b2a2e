"""The tf.data pipeline over a cache: list shards -> interleave -> (shuffle) -> parse ->
batch -> prefetch. Streams from disk; never holds the dataset in memory."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from kneetf.data.cache import read_info
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


def augment_xray(xray: tf.Tensor, strength: float = 1.0) -> tf.Tensor:
    """Intensity augmentation of one normalised X-ray (H, W, 1): random gamma, contrast,
    brightness and noise. Geometry is untouched, so the X-ray / MRI pair stays consistent."""
    s = float(strength)
    gamma = tf.exp(tf.random.uniform([], -0.25 * s, 0.25 * s))
    x = tf.pow(tf.clip_by_value(xray, 1e-6, 1.0), gamma)
    contrast = tf.random.uniform([], 1.0 - 0.15 * s, 1.0 + 0.15 * s)
    mean = tf.reduce_mean(x)
    x = (x - mean) * contrast + mean + tf.random.uniform([], -0.05 * s, 0.05 * s)
    x = x + tf.random.normal(tf.shape(x), stddev=tf.random.uniform([], 0.0, 0.02 * s))
    return tf.clip_by_value(x, 0.0, 1.0)


def shift_xray(xray: tf.Tensor, max_shift: int) -> tf.Tensor:
    """Move one X-ray (H, W, C) by a random whole-pixel offset in [-max_shift, max_shift] per
    axis, edges mirrored: the error of a knee-ROI box, which the MRI does not depend on."""
    if max_shift <= 0:
        return xray
    h, w = tf.shape(xray)[0], tf.shape(xray)[1]
    padded = tf.pad(xray, [[max_shift, max_shift], [max_shift, max_shift], [0, 0]], mode="SYMMETRIC")
    dy, dx = (tf.random.uniform([], 0, 2 * max_shift + 1, dtype=tf.int32) for _ in range(2))
    return padded[dy:dy + h, dx:dx + w, :]


def make_dataset(cache_dir: str | Path, split: str = "train", batch_size: int = 32, *,
                 shuffle: bool = False, repeat: bool = False, seed: int = 0,
                 drop_remainder: bool = False, with_meta: bool = False,
                 shuffle_buffer: int = 256, augment: float = 0.0, shift: int = 0,
                 transform: Callable[[dict], dict] | None = None) -> tf.data.Dataset:
    """Batches of `(xray, {"xray_recon": xray, "mri": mri})` from the cache's `split`.

    With `with_meta=True` the elements are the parsed feature dicts (id, side, box, ...).
    Sharding under a tf.distribute strategy is by data (each worker sees every file).
    `augment` > 0 applies `augment_xray` with that strength to the input X-ray only; the
    reconstruction target stays the clean X-ray (a denoising auto-encoder). `shift` > 0 moves
    input and reconstruction target together by up to that many pixels (`shift_xray`).
    `transform` maps each parsed example dict (id, xray, mri, ...) before anything else, e.g.
    to adjust training targets.
    """
    info = read_info(cache_dir)
    size, slices = info["shapes"]["mri"][0], info["shapes"]["mri"][2]
    files = shard_files(cache_dir, split)
    if not files or int(info["counts"].get(split, 0)) == 0:
        raise InputError(cache_dir, f"split {split!r} is empty")
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(files)), block_length=1,
                           num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    else:  # evaluation order = cache order (split order of the manifest)
        ds = ds.flat_map(tf.data.TFRecordDataset)
    if repeat:
        ds = ds.repeat()
    # ordered maps: the same seed gives the same batches, and every worker of a multi-worker
    # run sees the same stream before DATA sharding (else a sample could land in two replicas)
    ds = ds.map(lambda s: parse_example(s, size, slices), num_parallel_calls=tf.data.AUTOTUNE)
    if transform is not None:
        ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    if not with_meta:
        if shift:
            ds = ds.map(lambda ex: {**ex, "xray": shift_xray(ex["xray"], shift)}, num_parallel_calls=tf.data.AUTOTUNE)
        if augment:
            ds = ds.map(lambda ex: (augment_xray(ex["xray"], augment), {"xray_recon": ex["xray"], "mri": ex["mri"]}),
                        num_parallel_calls=tf.data.AUTOTUNE)
        else:
            ds = ds.map(lambda ex: (ex["xray"], {"xray_recon": ex["xray"], "mri": ex["mri"]}))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if not repeat:
        # a known length: otherwise Keras 3 runs one empty step per epoch, counted in
        # optimizer.iterations (so in the schedule) and in the per-output loss means
        n = int(info["counts"].get(split, 0))
        ds = ds.apply(tf.data.experimental.assert_cardinality(n // batch_size if drop_remainder
                                                             else -(-n // batch_size)))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)


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
