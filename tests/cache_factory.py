"""Small caches for tests: random pairs (training data whose content does not matter), pairs a
model can learn (`learnable_cache`), and disc pairs whose MRI follows the X-ray (`load_disc_pair`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kneetf.config import PreprocessConfig
from kneetf.data.cache import CacheTask, RawPair, build_cache

DISC_SIZE, DISC_SLICES = 128, 20


def load_random_pair(payload: int, config: PreprocessConfig) -> RawPair:
    """A random pair (module level, so a process pool could pickle it)."""
    rng = np.random.default_rng(payload)
    return RawPair(id=str(payload), xray=rng.random((96, 96), dtype=np.float32),
                   mri=rng.random((config.num_slices, 48, 48), dtype=np.float32), side="right")


def random_cache(out: Path, n_train: int, n_val: int, shard_size: int) -> Path:
    """Write `n_train` + `n_val` random pairs (ids k000...) as a cache in `out`."""
    tasks = [CacheTask(id=f"k{i:03d}", split="train" if i < n_train else "val", payload=i)
             for i in range(n_train + n_val)]
    build_cache(tasks, load_random_pair, out, shard_size=shard_size, workers=0, progress=False)
    return out


def load_or_die(payload: dict, config: PreprocessConfig) -> RawPair:
    """`load_random_pair`, except that the worker process kills itself (SIGKILL, as the
    out-of-memory killer does) when the payload says "die", or says "die_once" and that
    marker file does not exist yet (it is created first)."""
    import os
    import signal

    once = payload.get("die_once")
    if payload.get("die") or (once and not Path(once).exists()):
        if once:
            Path(once).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return load_random_pair(payload["i"], config)


def learnable_pair(i: int, config: PreprocessConfig) -> RawPair:
    """The X-ray shows a bar whose height sets where a bright band sits in every MRI slice."""
    rng = np.random.default_rng(i)
    pos = 20 + (i * 7) % 70
    xray = rng.normal(100, 5, (128, 128))
    xray[pos:pos + 20, 30:100] += 400
    mri = rng.normal(50, 3, (config.num_slices, 128, 128))
    mri[:, pos:pos + 20, :] += 500
    return RawPair(id="x", xray=xray, mri=mri.astype("float32"))


def learnable_cache(out: Path, n: int = 24) -> Path:
    """`n` `learnable_pair`s (every sixth in val, the others in train) as a cache in `out`."""
    splits = ["val" if i % 6 == 0 else "train" for i in range(n)]
    build_cache([CacheTask(f"k{i}", splits[i], i) for i in range(n)], learnable_pair, out, workers=0, progress=False)
    return out


def disc_knee(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An X-ray with a bright disc at a position set by `seed`, and an MRI whose slices hold
    a disc at the same place (radius varying with the slice): the MRI depends on the X-ray."""
    rng = np.random.default_rng(seed)
    cx, cy = rng.uniform(35, 93, 2)
    yy, xx = np.mgrid[0:DISC_SIZE, 0:DISC_SIZE]
    d2 = (xx - cx) ** 2 + (yy - cy) ** 2
    xray = np.exp(-d2 / (2 * 14.0 ** 2)) + 0.02 * rng.standard_normal((DISC_SIZE, DISC_SIZE))
    radius = 10 + 8 * np.sin(np.linspace(0, np.pi, DISC_SLICES))
    mri = np.stack([(d2 < r ** 2).astype(np.float64) * 0.8 + 0.1 for r in radius])
    mri += 0.01 * rng.standard_normal(mri.shape)
    return xray.astype("float32"), mri.astype("float32")


def load_disc_pair(payload: int, config: PreprocessConfig) -> RawPair:
    """`disc_knee(payload)` as a right knee with id k<payload>."""
    xray, mri = disc_knee(payload)
    return RawPair(id=f"k{payload:03d}", xray=xray, mri=mri, side="right")
