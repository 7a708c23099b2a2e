"""A small cache of random pairs, for tests that need training data but not its content."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kneetf.config import PreprocessConfig
from kneetf.data.cache import CacheTask, RawPair, build_cache


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
