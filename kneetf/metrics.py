"""Image-quality metrics of reconstructed volumes: the ONE implementation used by training
logs, `kneetf evaluate` and the benchmarks.

Volumes are given in the model's layout, (H, W, slices), unless `slice_axis` says
otherwise; batches are (N, H, W, slices). Values live in the normalised [0, 1] space, so
`data_range` defaults to 1.

- `psnr`: over the whole volume, 10 log10(data_range^2 / MSE). Identical volumes give
  `inf` (as scikit-image does) unless `cap_db` is given; `summarize` and `keras_psnr` cap at
  `PSNR_CAP_DB` (100 dB, an MSE of 1e-10) so that means and training logs stay finite.
- `ssim_2d`: SSIM of each slice, averaged over slices; `ssim_3d`: SSIM with a 3-D window.
  Both follow Wang et al. (2004): Gaussian window of sigma 1.5 truncated at 3.5 sigma
  (11 taps), K1 = 0.01, K2 = 0.03, population covariances, the SSIM map cropped by the
  window radius before averaging: scikit-image's `structural_similarity(...,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)`.
- `mae`: mean absolute error.

Only numpy and scipy here; `keras_psnr` and `keras_ssim_2d` (the training logs' versions)
import Keras / TensorFlow when called.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

#: PSNR reported for (near-)identical volumes where a finite number is needed.
PSNR_CAP_DB = 100.0
#: Wang et al. (2004) constants.
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
#: Per-subject metrics, in table order.
METRICS = ("psnr", "ssim_2d", "ssim_3d", "mae")


def _pair(true: Any, pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(true, dtype=np.float64)
    p = np.asarray(pred, dtype=np.float64)
    if t.shape != p.shape:
        raise ValueError(f"true and pred must have the same shape. Received: {t.shape} and {p.shape}")
    return t, p


def _psnr_from_mse(mse: np.ndarray, data_range: float, cap_db: float | None) -> np.ndarray:
    mse = np.asarray(mse, dtype=np.float64)
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10((data_range ** 2) / mse)
    if cap_db is not None:
        out = np.minimum(out, cap_db)
    return out


def mse(true: Any, pred: Any) -> float:
    """Mean squared error over all values."""
    t, p = _pair(true, pred)
    return float(np.mean((t - p) ** 2))


def mae(true: Any, pred: Any) -> float:
    """Mean absolute error over all values."""
    t, p = _pair(true, pred)
    return float(np.mean(np.abs(t - p)))


def psnr(true: Any, pred: Any, data_range: float = 1.0, cap_db: float | None = None) -> float:
    """PSNR in dB over the whole volume; `inf` for identical inputs unless `cap_db` is set."""
    return float(_psnr_from_mse(mse(true, pred), data_range, cap_db))


def per_slice_psnr(true: Any, pred: Any, data_range: float = 1.0, slice_axis: int = -1,
                   cap_db: float | None = None) -> np.ndarray:
    """PSNR of each slice along `slice_axis`, shape (slices,)."""
    t, p = _pair(true, pred)
    axes = tuple(a for a in range(t.ndim) if a != slice_axis % t.ndim)
    return _psnr_from_mse(np.mean((t - p) ** 2, axis=axes), data_range, cap_db)


def _ssim_map(t: np.ndarray, p: np.ndarray, sigmas: tuple[float, ...], data_range: float) -> np.ndarray:
    """The SSIM map of Wang et al. with a Gaussian window of per-axis `sigmas` (0 = no
    smoothing along that axis, so several 2-D images are handled in one call)."""
    from scipy.ndimage import gaussian_filter

    def blur(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a, sigma=sigmas, truncate=SSIM_TRUNCATE, mode="reflect")

    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ux, uy = blur(t), blur(p)
    vx = blur(t * t) - ux * ux
    vy = blur(p * p) - uy * uy
    vxy = blur(t * p) - ux * uy
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))


def _window_radius(sigma: float = SSIM_SIGMA) -> int:
    return int(SSIM_TRUNCATE * sigma + 0.5)


def _check_window(shape: tuple[int, ...], axes: tuple[int, ...], what: str) -> None:
    size = 2 * _window_radius() + 1
    small = [shape[a] for a in axes if shape[a] < size]
    if small:
        raise ValueError(f"{what} needs every windowed axis >= {size} pixels. Received shape {shape}")


def per_slice_ssim(true: Any, pred: Any, data_range: float = 1.0, slice_axis: int = -1) -> np.ndarray:
    """SSIM of each 2-D slice along `slice_axis`, shape (slices,)."""
    t, p = _pair(true, pred)
    if t.ndim != 3:
        raise ValueError(f"per_slice_ssim expects a 3-D volume. Received shape {t.shape}")
    axis = slice_axis % 3
    t, p = np.moveaxis(t, axis, -1), np.moveaxis(p, axis, -1)
    _check_window(t.shape, (0, 1), "per-slice SSIM")
    r = _window_radius()
    s = _ssim_map(t, p, (SSIM_SIGMA, SSIM_SIGMA, 0.0), data_range)
    return s[r:-r, r:-r, :].mean(axis=(0, 1))


def ssim_2d(true: Any, pred: Any, data_range: float = 1.0, slice_axis: int = -1) -> float:
    """Mean over slices of the per-slice SSIM."""
    return float(np.mean(per_slice_ssim(true, pred, data_range, slice_axis)))


def ssim_3d(true: Any, pred: Any, data_range: float = 1.0) -> float:
    """SSIM with a 3-D Gaussian window (every axis >= 11 values)."""
    t, p = _pair(true, pred)
    if t.ndim != 3:
        raise ValueError(f"ssim_3d expects a 3-D volume. Received shape {t.shape}")
    _check_window(t.shape, (0, 1, 2), "3-D SSIM")
    r = _window_radius()
    s = _ssim_map(t, p, (SSIM_SIGMA,) * 3, data_range)
    return float(s[r:-r, r:-r, r:-r].mean())


def subject_scores(true: Any, pred: Any, data_range: float = 1.0, slice_axis: int = -1,
                   cap_db: float | None = PSNR_CAP_DB) -> dict[str, np.ndarray]:
    """Per-subject metrics of batches (N, H, W, slices): {metric: (N,)} for `METRICS`,
    plus "slice_psnr" (N, slices). PSNR is capped at `cap_db` (finite means)."""
    t, p = _pair(true, pred)
    if t.ndim != 4:
        raise ValueError(f"subject_scores expects batches (N, H, W, slices). Received shape {t.shape}")
    axis = slice_axis % 4
    if axis == 0:
        raise ValueError("slice_axis cannot be the batch axis")
    out: dict[str, list] = {m: [] for m in METRICS}
    out["slice_psnr"] = []
    for ti, pi in zip(t, p):
        ti, pi = np.moveaxis(ti, axis - 1, -1), np.moveaxis(pi, axis - 1, -1)
        err = ti - pi
        out["psnr"].append(float(_psnr_from_mse(np.mean(err ** 2), data_range, cap_db)))
        out["mae"].append(float(np.mean(np.abs(err))))
        out["ssim_2d"].append(ssim_2d(ti, pi, data_range))
        out["ssim_3d"].append(ssim_3d(ti, pi, data_range))
        out["slice_psnr"].append(per_slice_psnr(ti, pi, data_range, -1, cap_db))
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def summarize_scores(scores: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "std", "median", "min", "max"}} of per-subject scores (population std)."""
    out = {}
    for name in METRICS:
        if name not in scores:
            continue
        v = np.asarray(scores[name], dtype=np.float64)
        out[name] = {"mean": float(np.mean(v)), "std": float(np.std(v)), "median": float(np.median(v)),
                     "min": float(np.min(v)), "max": float(np.max(v))}
    return out


def summarize(true: Any, pred: Any, data_range: float = 1.0) -> dict[str, dict[str, float]]:
    """Means and stds over subjects of batches (N, H, W, slices) (PSNR capped at `PSNR_CAP_DB`),
    e.g. `{"psnr": {"mean": 21.3, "std": 1.2, ...}, "ssim_2d": ..., "ssim_3d": ..., "mae": ...}`."""
    return summarize_scores(subject_scores(true, pred, data_range))


def keras_psnr(y_true: Any, y_pred: Any) -> Any:
    """PSNR per sample over the whole volume as a Keras metric function (data range 1,
    capped at `PSNR_CAP_DB`): `model.compile(..., metrics={"mri": [keras_psnr]})`."""
    from keras import ops

    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    axes = tuple(range(1, len(y_true.shape)))
    err = ops.mean(ops.square(y_true - y_pred), axis=axes)
    floor = 10.0 ** (-PSNR_CAP_DB / 10.0)
    return 10.0 * ops.log(1.0 / ops.maximum(err, floor)) / math.log(10.0)


keras_psnr.__name__ = "psnr"


def keras_ssim_2d(y_true: Any, y_pred: Any) -> Any:
    """SSIM-2D per sample of (batch, H, W, slices) volumes in TensorFlow (`tf.image.ssim`:
    the same Gaussian window, constants and cropping as `ssim_2d`, data range 1)."""
    import tensorflow as tf

    return tf.image.ssim(tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32), max_val=1.0)


keras_ssim_2d.__name__ = "ssim"

__all__ = ["PSNR_CAP_DB", "METRICS", "mse", "mae", "psnr", "per_slice_psnr",
           "per_slice_ssim", "ssim_2d", "ssim_3d", "subject_scores", "summarize", "summarize_scores",
           "keras_psnr", "keras_ssim_2d"]
