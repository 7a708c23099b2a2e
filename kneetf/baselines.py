"""Baselines a model must beat to be worth anything, computed from a training split:

- **mean**: the mean training MRI volume, the same prediction for every X-ray;
- **nn**: nearest-neighbour retrieval: the training MRI whose X-ray is closest (L2 distance
  between the normalised X-rays, area-downsampled by `downsample`, 4 by default: 32x32);
- **knn<k>**: the average of the `k` nearest training MRIs (k = 5 by default).

The training split may be streamed (`streamed_baseline_predictions` makes two passes over
it, holding only downsampled X-rays, the running sum and one accumulator per evaluated
subject) or given as arrays (`baseline_predictions`). A training entry with the same id as
the evaluated subject is never its own neighbour (so evaluating on the training split
gives leave-one-out numbers, not a perfect score).

numpy only; arrays use the model's layout: xray (N, H, W, 1), mri (N, H, W, slices).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_K = 5
DEFAULT_DOWNSAMPLE = 4

#: baseline name -> label used in tables
LABELS = {"mean": "mean baseline", "nn": "NN baseline"}


def label(name: str) -> str:
    """Human label of a baseline name ("knn5" -> "5-NN baseline")."""
    if name in LABELS:
        return LABELS[name]
    if name.startswith("knn"):
        return f"{name[3:]}-NN baseline"
    return name


def baseline_names(k: int = DEFAULT_K) -> list[str]:
    """Names of the baselines computed for `k` (k <= 1 leaves out the k-NN average)."""
    return ["mean", "nn"] + ([f"knn{k}"] if k > 1 else [])


def xray_features(xray: Any, downsample: int = DEFAULT_DOWNSAMPLE) -> np.ndarray:
    """Flattened X-rays (N, H, W[, 1]) after area downsampling by `downsample`: (N, D) float32."""
    x = np.asarray(xray, dtype=np.float32)
    if x.ndim == 4:
        if x.shape[-1] != 1:
            raise ValueError(f"X-rays must have one channel. Received shape {x.shape}")
        x = x[..., 0]
    if x.ndim != 3:
        raise ValueError(f"X-rays must be (N, H, W) or (N, H, W, 1). Received shape {x.shape}")
    if downsample < 1:
        raise ValueError(f"downsample must be >= 1. Received: downsample={downsample}")
    n, h, w = x.shape
    if downsample > 1:
        if h % downsample or w % downsample:
            raise ValueError(f"downsample={downsample} must divide the X-ray size {h}x{w}")
        x = x.reshape(n, h // downsample, downsample, w // downsample, downsample).mean(axis=(2, 4))
    return x.reshape(n, -1)


def nearest_neighbours(train_features: np.ndarray, query_features: np.ndarray, k: int = 1, *,
                       train_ids: Sequence[str] | None = None,
                       query_ids: Sequence[str] | None = None) -> np.ndarray:
    """Indices (N_query, k) of the `k` closest training rows (L2), nearest first.

    Ties go to the lower training index. A training row whose id equals the query's id is
    excluded.
    """
    a = np.asarray(train_features, dtype=np.float64)
    q = np.asarray(query_features, dtype=np.float64)
    excluded = 1 if train_ids is not None and query_ids is not None else 0
    if k < 1 or k > len(a) - excluded:
        raise ValueError(f"k must be in [1, {len(a) - excluded}] for {len(a)} training entries. Received: k={k}")
    out = np.empty((len(q), k), dtype=np.int64)
    a_sq = np.einsum("ij,ij->i", a, a)
    id_rows: dict[str, list[int]] = {}
    if excluded:
        for j, t in enumerate(train_ids):
            id_rows.setdefault(str(t), []).append(j)
    chunk = 256
    for s in range(0, len(q), chunk):
        qc = q[s:s + chunk]
        d = a_sq[None, :] - 2.0 * qc @ a.T + np.einsum("ij,ij->i", qc, qc)[:, None]
        d = np.maximum(d, 0.0)
        if excluded:
            for r, qid in enumerate(query_ids[s:s + chunk]):
                for j in id_rows.get(str(qid), ()):
                    d[r, j] = np.inf
        out[s:s + chunk] = np.argsort(d, axis=1, kind="stable")[:, :k]
    return out


def streamed_baseline_predictions(train_batches: Callable[[], Iterable[Mapping[str, Any]]],
                                  eval_xray: Any, eval_ids: Sequence[str] | None = None, *,
                                  k: int = DEFAULT_K, downsample: int = DEFAULT_DOWNSAMPLE
                                  ) -> dict[str, np.ndarray]:
    """Baseline predictions for the evaluated X-rays `eval_xray` (N, H, W, 1).

    `train_batches()` returns a fresh iterable of dicts with "id", "xray", "mri" (numpy
    batches); it is called twice. Returns {"mean": (H, W, S), "nn": (N, H, W, S),
    "knn<k>": (N, H, W, S)} float32 (the mean is one volume; broadcast it as needed). With
    too few training entries, k is lowered (with a warning) and the key says so.
    """
    feats, ids = [], []
    total, count = None, 0
    for batch in train_batches():
        feats.append(xray_features(batch["xray"], downsample))
        ids += [str(i) for i in batch["id"]]
        s = np.asarray(batch["mri"], dtype=np.float64).sum(axis=0)
        total = s if total is None else total + s
        count += len(batch["mri"])
    if not count:
        raise ValueError("the baseline training set is empty")
    train_feats = np.concatenate(feats)
    mean = (total / count).astype(np.float32)
    eval_ids = None if eval_ids is None else [str(i) for i in eval_ids]
    overlap = set(ids) & set(eval_ids or [])
    if overlap:
        log.warning("%d evaluated id(s) are also in the baseline training set; they are excluded from "
                    "their own neighbours (leave-one-out)", len(overlap))
    available = count - (1 if overlap else 0)
    kk = max(1, min(k, available))
    if kk < k:
        log.warning("the baseline training set has %d usable entries: k-NN uses k=%d instead of %d",
                    available, kk, k)
    names = baseline_names(kk)
    nbrs = nearest_neighbours(train_feats, xray_features(eval_xray, downsample), kk,
                              train_ids=ids if overlap else None, query_ids=eval_ids if overlap else None)
    n_eval = len(nbrs)
    nn = np.zeros((n_eval,) + mean.shape, np.float32)
    knn = np.zeros((n_eval,) + mean.shape, np.float64) if kk > 1 else None
    # rows of the training set -> (evaluated subject, rank) that use them
    users: dict[int, list[tuple[int, int]]] = {}
    for i, row in enumerate(nbrs):
        for r, j in enumerate(row):
            users.setdefault(int(j), []).append((i, r))
    offset = 0
    for batch in train_batches():
        mri = np.asarray(batch["mri"], dtype=np.float32)
        for b in range(len(mri)):
            for i, r in users.get(offset + b, ()):
                if r == 0:
                    nn[i] = mri[b]
                if knn is not None:
                    knn[i] += mri[b]
        offset += len(mri)
    if offset != count:
        raise ValueError(f"the baseline training set changed between passes ({count} then {offset} entries)")
    out = {"mean": mean, "nn": nn}
    if knn is not None:
        out[names[2]] = (knn / kk).astype(np.float32)
    return out


def baseline_predictions(train_arrays: Mapping[str, Any], eval_arrays: Mapping[str, Any], *,
                         k: int = DEFAULT_K, downsample: int = DEFAULT_DOWNSAMPLE) -> dict[str, np.ndarray]:
    """Baseline predictions for `eval_arrays` from in-memory `train_arrays` (dicts with
    "id", "xray", "mri" as `kneetf.data.pipeline.load_arrays` returns), every entry
    (N_eval, H, W, S) float32: {"mean", "nn", "knn<k>"}."""
    out = streamed_baseline_predictions(lambda: [train_arrays], eval_arrays["xray"], eval_arrays.get("id"),
                                        k=k, downsample=downsample)
    n = len(eval_arrays["xray"])
    out["mean"] = np.broadcast_to(out["mean"], (n,) + out["mean"].shape).copy()
    return out


__all__ = ["DEFAULT_K", "DEFAULT_DOWNSAMPLE", "label", "baseline_names", "xray_features", "nearest_neighbours",
           "streamed_baseline_predictions", "baseline_predictions"]
