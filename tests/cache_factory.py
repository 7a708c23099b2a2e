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
