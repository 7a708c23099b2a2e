"""Fit the kernel ridge prior of a model (`kneetf.models.prior.KernelRidgePrior`) on the
training split, and the training-target offsets that keep its residual honest.

The prior is the RBF (or linear) kernel ridge baseline of `kneetf.baselines`: the same X-ray
features, the ridge strength and width chosen by the same k-fold cross-validation in voxel
space. Its targets are the coordinates of the training MRIs in a low-rank basis (PCA of the
MRIs area-downsampled to `prior_basis_size` in-plane), so the layer stays small.

Stacking. On its own training pairs the prior is better than on new ones: it was fitted on
them (with a few hundred pairs, its in-sample residual is about half its leave-one-out one).
A network trained on y - prior(x) would then learn a residual that is too small for new
X-rays. With `prior_loo_targets`, the training target of pair i becomes
y_i + prior(x_i) - prior_loo(x_i): the model, which outputs prior(x_i) + residual, then
learns the residual y_i - prior_loo(x_i), what it will face on new data. prior_loo has a
closed form for kernel ridge (`kneetf.baselines.leave_one_out_weights`); the offset lives in
the basis (one `rank`-vector per pair), and `offset_transform` adds it in the tf.data map.
"""
from __future__ import annotations

import json
import logging
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from kneetf import baselines as B
from kneetf.config import ModelConfig, TrainConfig, to_dict
from kneetf.errors import ConfigError
from kneetf.io.atomic import atomic_path

log = logging.getLogger(__name__)


@dataclass
class PriorFit:
    """Weights of the prior layer, the per-training-id target offsets (in the basis) and a
    JSON-safe description of the fit."""

    values: dict[str, Any]
    offset_ids: list[str]
    offsets: np.ndarray  # (n, rank)
    info: dict[str, Any]

    @property
    def num_landmarks(self) -> int:
        return int(self.values["landmarks"].shape[0])

    @property
    def rank(self) -> int:
        return int(self.values["basis"].shape[0])


def _pca(low: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Top-`rank` principal axes (rank, V) of centred rows (n, V) via the (n x n) Gram matrix,
    the rows' coordinates (n, rank) and the share of the variance they keep."""
    gram = low @ low.T
    lam, u = np.linalg.eigh(gram.astype(np.float64))
    order = np.argsort(lam)[::-1][:rank]
    lam, u = np.maximum(lam[order], 1e-12), u[:, order]
    basis = (u / np.sqrt(lam)).T @ low.astype(np.float64)
    return basis, low.astype(np.float64) @ basis.T, float(lam.sum() / max(np.trace(gram), 1e-12))


def fit_prior(train_batches: Callable[[], Any], *, kernel: str = "rbf", max_landmarks: int = 1024, rank: int = 64,
              basis_size: int = 32, downsample: int = 4, features: str = "pixels", gradient_weight: float = 0.5,
              folds: int = B.DEFAULT_FOLDS, cv_repeats: int = 1, exact_limit: int = B.EXACT_LIMIT,
              seed: int = 0) -> PriorFit:
    """Fit the prior on the training split; `train_batches()` returns a fresh iterable of
    numpy batches {"id", "xray", "mri"} (called twice).

    `features` as `kneetf.baselines.xray_features`; the standardised gradient features are
    multiplied by `gradient_weight`. The ridge strength and RBF width minimise the
    cross-validated error averaged over `cv_repeats` fold splits.

    The number of landmarks is min(n, `max_landmarks`) and the rank min(`rank`, n - 1): a
    model built for the fit uses `PriorFit.num_landmarks` and `PriorFit.rank`."""
    t0 = time.monotonic()
    summary = B.summarize_training(train_batches(), downsample, exact_limit=exact_limit, seed=seed, features=features)
    n = summary.count
    if n < 3:
        raise ConfigError(f"the kernel ridge prior needs at least 3 training pairs; the training split has {n} "
                          "(train with --recipe mean, whose template is the mean training volume)")
    sub = summary.subset
    scaler = B.Standardizer.fit(summary.features)
    if features == "pixels+gradient":
        per_map = summary.features.shape[1] // 2
        scaler = scaler.weighted(np.r_[np.ones(per_map), np.full(per_map, gradient_weight)])
    fsub = scaler(summary.features[sub])
    med = B.median_sq_distance(fsub, seed=seed)
    cv = B.cv_kernel_ridge(fsub, B.span_coordinates(summary.gram), kernel, gammas=[g / med for g in B.GAMMA_GRID],
                           folds=min(folds, len(sub)), seed=seed, n_values=summary.n_values, repeats=cv_repeats)
    for name in cv.at_edge():
        log.warning("kernel ridge prior: cross-validation chose %s=%.4g at the end of its grid", name, cv.best[name])
    krr = B.fit_kernel_ridge(summary.features, kernel, cv.best["alpha"], cv.best.get("gamma", 1.0),
                             max_landmarks=max_landmarks, seed=seed, scaler=scaler)

    # low-resolution training MRIs -> PCA basis and coordinates
    size, slices = summary.mean.shape[0], summary.mean.shape[2]
    if size % basis_size:
        raise ValueError(f"basis_size={basis_size} must divide the MRI size {size}")
    b, f = basis_size, size // basis_size
    low = np.concatenate([np.asarray(batch["mri"], np.float32).reshape(-1, b, f, b, f, slices).mean(axis=(2, 4))
                          .reshape(-1, b * b * slices) for batch in train_batches()])
    rank = max(1, min(rank, n - 1))
    # coordinates of y - mean: the layer adds their expansion to the full-resolution mean
    basis, coords, kept = _pca(low - low.mean(axis=0), rank)
    coef = krr.coefficients(coords)  # (m, rank)

    # leave-one-out offsets of the training targets (in the basis)
    k_nl = krr.landmark_kernel(summary.features)
    fitted = k_nl @ coef  # in-sample prior coordinates of every training pair
    h = krr.leverage
    offsets = (h / np.maximum(1.0 - h, 1e-6))[:, None] * (coords - fitted)
    in_mse = float(np.mean((coords - fitted) ** 2))
    loo_mse = float(np.mean((coords - (fitted - offsets)) ** 2))
    values = {"feature_mean": scaler.mean, "feature_scale": scaler.scale, "landmarks": krr.landmarks,
              "gamma": np.float32(krr.gamma), "coefficients": coef, "basis": basis.reshape(rank, b, b, slices),
              "mean": summary.mean}
    size = sum(int(np.asarray(v).size) for v in values.values()) * 4
    info = {"kernel": kernel, "features": features, "downsample": downsample,
            **({"gradient_weight": gradient_weight} if features == "pixels+gradient" else {}),
            "cv_repeats": cv_repeats, "alpha": krr.alpha, "gamma": krr.gamma,
            "gamma_relative": cv.best.get("gamma", 0.0) * med, "cv": cv.to_dict(), "train_pairs": n,
            "landmarks": int(len(krr.landmark_index)), "nystrom": krr.nystrom, "rank": rank,
            "basis_size": b, "pca_variance_kept": round(kept, 4), "bytes": size,
            "mean_leverage": round(float(h.mean()), 4),
            # MSE of the basis coordinates of the training MRIs: in-sample fit vs leave-one-out
            "residual_in_sample": round(in_mse, 6), "residual_loo": round(loo_mse, 6),
            "seconds": round(time.monotonic() - t0, 1)}
    log.info("kernel ridge prior: %s kernel, alpha=%.3g, gamma=%.3g/median d^2, %d landmarks%s, rank %d "
             "(%.1f%% of the low-res variance), %.1f MB; training residual in-sample %.4g vs leave-one-out %.4g",
             kernel, krr.alpha, info["gamma_relative"], info["landmarks"],
             " (Nystrom)" if krr.nystrom else "", rank, 100 * kept, size / 1e6, in_mse, loo_mse)
    return PriorFit(values, summary.ids, offsets.astype(np.float32), info)


def fit_model_prior(train_batches: Callable[[], Any], model_config: ModelConfig, train_config: TrainConfig, *,
                    seed: int = 0) -> PriorFit:
    """`fit_prior` with the sizes of a model config and the folds of a training config."""
    return fit_prior(train_batches, kernel=model_config.prior_kernel, max_landmarks=model_config.prior_landmarks,
                     rank=model_config.prior_rank, basis_size=model_config.prior_basis_size,
                     downsample=model_config.prior_downsample, features=model_config.prior_features,
                     gradient_weight=train_config.prior_gradient_weight, folds=train_config.prior_folds,
                     cv_repeats=train_config.prior_cv_repeats, seed=seed)


def fit_key(cache: str | Path, info: Mapping[str, Any], model_config: ModelConfig,
            train_config: TrainConfig) -> dict[str, Any]:
    """What a prior fit depends on: the cache (its path, and the creation stamp and split counts of
    its `dataset.json` `info`), the model's prior settings and the training config's prior settings
    and seed."""
    model = {k: v for k, v in to_dict(model_config).items() if k.startswith("prior_") or k == "image_size"}
    train = {k: v for k, v in to_dict(train_config).items() if k.startswith("prior_") or k == "seed"}
    return {"cache": str(Path(cache).resolve()), "created": info.get("created"), "counts": info.get("counts"),
            "model": model, "train": train}


def save_fit(fit: PriorFit, path: str | Path, key: dict[str, Any]) -> None:
    """Write `fit` and the `key` it was fitted for (`fit_key`) to an .npz file, atomically."""
    arrays = {f"value_{name}": np.asarray(v) for name, v in fit.values.items()}
    with atomic_path(path, fault="train.prior") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, offset_ids=np.asarray(fit.offset_ids, dtype=str), offsets=fit.offsets,
                 info=np.asarray(json.dumps(fit.info)), key=np.asarray(json.dumps(key, sort_keys=True)), **arrays)


def load_fit(path: str | Path, key: dict[str, Any]) -> PriorFit | None:
    """The fit `save_fit` wrote to `path` for the same `key`; None when there is none, it cannot
    be read, or it was fitted for another cache or other settings."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["key"])) != json.loads(json.dumps(key, sort_keys=True)):
                log.info("kernel ridge prior: %s was fitted for other data or settings; fitting again", path)
                return None
            values = {name.removeprefix("value_"): z[name] for name in z.files if name.startswith("value_")}
            return PriorFit(values, [str(i) for i in z["offset_ids"]], z["offsets"], json.loads(str(z["info"])))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("kernel ridge prior: cannot read %s (%s); fitting again", path, e)
        return None


def offset_transform(fit: PriorFit, image_size: int) -> Callable[[dict], dict]:
    """A tf.data map over parsed examples that adds each training pair's leave-one-out offset
    (prior - prior_loo) to its MRI target; ids without an offset are left as they are."""
    import tensorflow as tf

    from kneetf.models.prior import expand_basis

    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(fit.offset_ids), tf.range(len(fit.offset_ids), dtype=tf.int64)),
        default_value=-1)
    offsets = tf.constant(np.concatenate([fit.offsets, np.zeros((1, fit.rank), np.float32)]))
    basis = tf.constant(np.asarray(fit.values["basis"], np.float32))

    @tf.autograph.experimental.do_not_convert
    def transform(ex: dict) -> dict:
        row = table.lookup(ex["id"])
        row = tf.where(row < 0, tf.constant(len(fit.offset_ids), tf.int64), row)
        delta = expand_basis(tf.gather(offsets, row)[None], basis, image_size)[0]
        return {**ex, "mri": ex["mri"] + tf.cast(delta, ex["mri"].dtype)}

    return transform


def iterate_split(cache: str | Path, split: str, batch_size: int = 64) -> Callable[[], Any]:
    """A callable giving fresh numpy batches {"id", "xray", "mri"} of a cache split."""
    from kneetf.data.pipeline import make_dataset

    def batches() -> Any:
        for ex in make_dataset(cache, split, batch_size, with_meta=True):
            yield {"id": [v.decode() for v in ex["id"].numpy()], "xray": ex["xray"].numpy(), "mri": ex["mri"].numpy()}

    return batches


__all__ = ["PriorFit", "fit_prior", "fit_model_prior", "fit_key", "save_fit", "load_fit", "offset_transform",
           "iterate_split"]
