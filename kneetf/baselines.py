"""Baselines a model must beat to be worth anything, fitted on a training split only:

- **mean**: the mean training MRI volume, the same prediction for every X-ray;
- **nn**: nearest-neighbour retrieval: the training MRI whose X-ray is closest (L2 distance
  between the normalised X-rays, area-downsampled by `downsample`, 4 by default: 32x32);
- **knn<k>**: the average of the `k` nearest training MRIs (k = 5 by default);
- **knn_cv**: the k-NN average with k chosen by k-fold cross-validation on the training split;
- **krr_linear**, **krr_rbf**: kernel ridge regression from the downsampled X-ray, standardised
  per pixel, to the MRI voxels, with a linear and an RBF kernel; the ridge strength (and the RBF
  width) chosen by k-fold cross-validation on the training split.

Every baseline is a linear smoother: its prediction is `mean + sum_j w_j (y_j - mean)` over
the training MRIs y_j, with weights that depend on the X-ray only. The training split is
therefore streamed twice (`fit_baselines`): once for the X-ray features, the mean and the Gram
matrix of the MRIs, once to accumulate the weighted sums for the evaluated subjects.

Cross-validation never forms an (n x voxels) matrix. Every cross-validated prediction is a
combination of training MRIs, so its squared error in voxel space is a quadratic form in
the Gram matrix G = Y Y^T (n x n, computed once). `span_coordinates` turns G into
coordinates Z (Z Z^T = G) in which these errors are exact. Kernel ridge is solved in the
dual: one eigendecomposition of each fold's kernel per RBF width, after which every ridge
strength costs O(n^2) (`cv_kernel_ridge`).

Cost and scale. With n training pairs and V voxels (327,680 for 128x128x20): the Gram
matrix takes n^2 V flops and holds the n MRIs as 16-bit values while it is built (0.66 MB a
pair); each RBF width costs one eigendecomposition per fold (about n^3); the final fit one
(n x n) solve; the second pass n_eval x n x V flops per baseline. Above `exact_limit` training
pairs (2048 by default) the cost would grow as n^2 to n^3 with an n x V memory, so the
baselines switch: cross-validation runs on a random subset of `exact_limit` pairs (exact, as
above) and kernel ridge is fitted on all n pairs with a Nystrom approximation on
`exact_limit` landmark X-rays (O(n m^2) time, O(n m) memory). `tools/bench_baselines.py`
measures the time, memory and error of both regimes.

A training entry with the same id as an evaluated subject never predicts itself: the k-NN
baselines skip it, kernel ridge uses its closed-form leave-one-out prediction (so evaluating
on the training split gives honest numbers, not a perfect score).

numpy only; arrays use the model's layout: xray (N, H, W, 1), mri (N, H, W, slices).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_K = 5
DEFAULT_DOWNSAMPLE = 4
DEFAULT_FOLDS = 5
#: training pairs above which cross-validation uses a subset and kernel ridge a Nystrom approximation
EXACT_LIMIT = 2048
#: k values the cross-validated k-NN tries (those above the fold size are skipped)
K_GRID = (1, 2, 3, 4, 5, 7, 10, 15, 20, 25, 30, 40, 50, 70, 100)
#: ridge strengths tried by cross-validation (the kernels are scaled so that K_ii is about 1)
ALPHA_GRID = tuple(float(a) for a in 10.0 ** np.arange(-3.0, 2.01, 0.25))
#: RBF widths tried, as multiples of 1 / (median squared distance between training X-rays)
GAMMA_GRID = (0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
KERNELS = ("linear", "rbf")
#: X-ray feature sets: the downsampled pixels, or those followed by the downsampled gradient magnitude
FEATURES = ("pixels", "pixels+gradient")
#: baselines fitted by cross-validation ("strong" ones)
STRONG = ("knn_cv", "krr_linear", "krr_rbf")

#: baseline name -> label used in tables
LABELS = {"mean": "mean baseline", "nn": "NN baseline", "knn_cv": "k-NN baseline (k by CV)",
          "krr_linear": "kernel ridge (linear)", "krr_rbf": "kernel ridge (RBF)"}


def label(name: str) -> str:
    """Human label of a baseline name ("knn5" -> "5-NN baseline")."""
    if name in LABELS:
        return LABELS[name]
    if name.startswith("knn"):
        return f"{name[3:]}-NN baseline"
    return name


def baseline_names(k: int = DEFAULT_K, strong: bool = False) -> list[str]:
    """Names of the baselines computed for `k` (k <= 1 leaves out the k-NN average)."""
    return ["mean", "nn"] + ([f"knn{k}"] if k > 1 else []) + (list(STRONG) if strong else [])


# === X-ray features ===

def gradient_magnitude(x: np.ndarray) -> np.ndarray:
    """|dx| + |dy| of images (N, H, W) by forward differences (0 on the last row / column)."""
    x = np.asarray(x, dtype=np.float32)
    gy = np.abs(np.diff(x, axis=1, append=x[:, -1:]))
    gx = np.abs(np.diff(x, axis=2, append=x[:, :, -1:]))
    return gx + gy


def xray_features(xray: Any, downsample: int = DEFAULT_DOWNSAMPLE, features: str = "pixels") -> np.ndarray:
    """Flattened X-rays (N, H, W[, 1]) after area downsampling by `downsample`: (N, D) float32;
    with `features="pixels+gradient"` followed by the area-downsampled gradient magnitude
    (`gradient_magnitude` of the full-resolution X-ray): (N, 2 D)."""
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}. Received: features={features!r}")
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
    if downsample > 1 and (h % downsample or w % downsample):
        raise ValueError(f"downsample={downsample} must divide the X-ray size {h}x{w}")

    def pooled(a: np.ndarray) -> np.ndarray:
        if downsample > 1:
            a = a.reshape(n, h // downsample, downsample, w // downsample, downsample).mean(axis=(2, 4))
        return a.reshape(n, -1)

    if features == "pixels":
        return pooled(x)
    return np.concatenate([pooled(x), pooled(gradient_magnitude(x))], axis=1)


@dataclass(frozen=True)
class Standardizer:
    """Per-feature standardisation fitted on training features: (f - mean) / scale."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> "Standardizer":
        f = np.asarray(features, dtype=np.float64)
        std = f.std(axis=0)
        # a constant pixel carries no information: leave it at 0 instead of dividing by ~0
        scale = np.where(std > 1e-6 * max(float(std.max(initial=0.0)), 1e-12), std, 1.0)
        return cls(f.mean(axis=0), scale)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, dtype=np.float64) - self.mean) / self.scale

    def weighted(self, weights: np.ndarray) -> "Standardizer":
        """The same standardisation with feature j multiplied by `weights[j]` afterwards."""
        return Standardizer(self.mean, self.scale / np.asarray(weights, dtype=np.float64))


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


# === kernels ===

def kernel_matrix(a: np.ndarray, b: np.ndarray, kernel: str, gamma: float = 1.0) -> np.ndarray:
    """Kernel between standardised feature rows: "linear" a b^T / D (so K_ii is about 1) or
    "rbf" exp(-gamma |a - b|^2). (len(a), len(b)) float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if kernel == "linear":
        return a @ b.T / a.shape[1]
    if kernel == "rbf":
        d2 = np.einsum("ij,ij->i", a, a)[:, None] + np.einsum("ij,ij->i", b, b)[None, :] - 2.0 * a @ b.T
        return np.exp(-gamma * np.maximum(d2, 0.0))
    raise ValueError(f"kernel must be one of {KERNELS}. Received: kernel={kernel!r}")


def median_sq_distance(features: np.ndarray, max_rows: int = 1000, seed: int = 0) -> float:
    """Median squared L2 distance between distinct rows (of at most `max_rows` random rows):
    the scale the RBF widths of `GAMMA_GRID` are relative to."""
    f = np.asarray(features, dtype=np.float64)
    if len(f) > max_rows:
        f = f[np.sort(np.random.default_rng(seed).choice(len(f), max_rows, replace=False))]
    sq = np.einsum("ij,ij->i", f, f)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * f @ f.T, 0.0)
    values = d2[np.triu_indices(len(f), 1)]
    med = float(np.median(values)) if values.size else 0.0
    return med if med > 0 else 1.0


# === training MRIs in Gram form ===

def span_coordinates(gram: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """Coordinates Z (n, q) of the training MRIs in an orthonormal basis of their span: Z Z^T
    equals the Gram matrix, so the squared voxel-space norm of any combination c^T Y of
    training MRIs is |c^T Z|^2."""
    g = np.asarray(gram, dtype=np.float64)
    lam, u = np.linalg.eigh((g + g.T) / 2)
    keep = lam > rtol * max(float(lam.max(initial=0.0)), 1e-300)
    return u[:, keep] * np.sqrt(lam[keep])


def fold_indices(n: int, folds: int, seed: int = 0) -> list[np.ndarray]:
    """`folds` disjoint random index sets covering range(n) (sizes differ by at most one)."""
    if not 2 <= folds <= n:
        raise ValueError(f"need 2 <= folds <= {n} training entries. Received: folds={folds}")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, folds)]


@dataclass
class CVResult:
    """A cross-validation sweep: the chosen values and the mean squared error (per voxel when
    `n_values` was given) of every candidate."""

    best: dict[str, float]
    grid: dict[str, list[float]]
    mse: np.ndarray
    seconds: float = 0.0

    def at_edge(self) -> list[str]:
        """Names of the searched values that were chosen at an end of their grid."""
        out = []
        for name, values in self.grid.items():
            if len(values) > 1 and self.best[name] in (values[0], values[-1]):
                out.append(name)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"best": self.best, "grid": self.grid, "cv_mse": np.round(self.mse, 8).tolist(),
                "seconds": round(self.seconds, 2)}


def cv_knn(features: np.ndarray, coords: np.ndarray, k_grid: Sequence[int] = K_GRID, folds: int = DEFAULT_FOLDS,
           seed: int = 0, n_values: int = 1) -> CVResult:
    """k-fold cross-validated error of the k-NN average for every k of `k_grid` (those larger
    than the smallest fold's training part are skipped); `coords` from `span_coordinates`."""
    t0 = time.monotonic()
    f = np.asarray(features, dtype=np.float64)
    z = np.asarray(coords, dtype=np.float64)
    parts = fold_indices(len(f), folds, seed)
    n_train_min = len(f) - max(len(p) for p in parts)
    ks = [int(k) for k in k_grid if 1 <= k <= n_train_min]
    if not ks:
        raise ValueError(f"no k of {tuple(k_grid)} fits {n_train_min} training entries per fold")
    kmax = max(ks)
    sse = np.zeros(len(ks))
    for held in parts:
        train = np.setdiff1d(np.arange(len(f)), held)
        nbrs = nearest_neighbours(f[train], f[held], kmax)
        for s in range(0, len(held), 64):
            rows = held[s:s + 64]
            cum = np.cumsum(z[train][nbrs[s:s + 64]], axis=1)  # (rows, kmax, q)
            for i, k in enumerate(ks):
                sse[i] += np.sum((z[rows] - cum[:, k - 1] / k) ** 2)
    mse = sse / (len(f) * n_values)
    best = ks[int(np.argmin(mse))]
    return CVResult({"k": best}, {"k": ks}, mse, time.monotonic() - t0)


def cv_kernel_ridge(features: np.ndarray, coords: np.ndarray, kernel: str, *, gammas: Sequence[float] = (1.0,),
                    alphas: Sequence[float] = ALPHA_GRID, folds: int = DEFAULT_FOLDS, seed: int = 0,
                    n_values: int = 1, repeats: int = 1) -> CVResult:
    """k-fold cross-validated error of kernel ridge regression (centred targets) for every
    (gamma, alpha) pair; `features` standardised, `coords` from `span_coordinates`, `gammas`
    absolute (ignored by the linear kernel). With `repeats` > 1 the error is averaged over
    that many fold splits (seeds `seed`, `seed + 1`, ...), so that the choice depends less on
    one split.

    Per fold and gamma, the fold's kernel is eigendecomposed once, K_ff = Q diag(lam) Q^T; the
    held-out error |A - M D R|^2 with A = Z_h - mean(Z_f), M = K_hf Q, R = Q^T (Z_f - mean(Z_f))
    and D = diag(1 / (lam + alpha)) expands to |A|^2 - 2 d.u + d^T C d with u and C
    independent of alpha: each alpha then costs O(n^2).
    """
    t0 = time.monotonic()
    f = np.asarray(features, dtype=np.float64)
    z = np.asarray(coords, dtype=np.float64)
    gammas = [float(g) for g in gammas] if kernel == "rbf" else [0.0]
    alphas = [float(a) for a in alphas]
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1. Received: repeats={repeats}")
    sse = np.zeros((len(gammas), len(alphas)))
    splits = [held for r in range(repeats) for held in fold_indices(len(f), folds, seed + r)]
    for held in splits:
        train = np.setdiff1d(np.arange(len(f)), held)
        zbar = z[train].mean(axis=0)
        a = z[held] - zbar
        a2 = float(np.sum(a * a))
        zc = z[train] - zbar
        for gi, gamma in enumerate(gammas):
            lam, q = np.linalg.eigh(kernel_matrix(f[train], f[train], kernel, gamma))
            lam = np.maximum(lam, 0.0)
            m = kernel_matrix(f[held], f[train], kernel, gamma) @ q
            r = q.T @ zc
            u = np.einsum("jc,jc->j", m.T @ a, r)
            c = (m.T @ m) * (r @ r.T)
            for ai, alpha in enumerate(alphas):
                d = 1.0 / (lam + alpha)
                sse[gi, ai] += a2 - 2.0 * d @ u + d @ c @ d
    mse = sse / (len(f) * n_values * repeats)
    gi, ai = np.unravel_index(int(np.argmin(mse)), mse.shape)
    best = {"alpha": alphas[ai]}
    grid: dict[str, list[float]] = {"alpha": alphas}
    if kernel == "rbf":
        best["gamma"] = gammas[gi]
        grid = {"gamma": gammas, "alpha": alphas}
    return CVResult(best, grid, mse if kernel == "rbf" else mse[0], time.monotonic() - t0)


# === kernel ridge regression ===

@dataclass
class KernelRidge:
    """A fitted kernel ridge regression from X-ray features to training targets, as weights:
    the prediction for X-ray x is `mean + w(x) (Y - mean)` with `w(x) = k_L(x) P^T`, the
    kernel against the landmark X-rays L (all training X-rays, or `max_landmarks` of them for a
    Nystrom approximation) times the (n, m) matrix `projection` P.

    Exact: L = all, P = (K + alpha I)^-1. Nystrom: Phi = K_nL K_LL^-1/2 and
    P = Phi (Phi^T Phi + alpha I)^-1 K_LL^-1/2 (ridge on the Nystrom features).
    """

    kernel: str
    alpha: float
    gamma: float
    scaler: Standardizer
    landmarks: np.ndarray  # (m, D) standardised features of the landmark X-rays
    landmark_index: np.ndarray  # (m,) their training rows
    projection: np.ndarray  # (n, m)
    leverage: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (n,) diagonal of the hat matrix

    @property
    def nystrom(self) -> bool:
        return self.projection.shape[1] < self.projection.shape[0]

    def landmark_kernel(self, features: np.ndarray) -> np.ndarray:
        """Kernel (N, m) between raw (unstandardised) features and the landmarks."""
        return kernel_matrix(self.scaler(features), self.landmarks, self.kernel, self.gamma)

    def weights(self, features: np.ndarray) -> np.ndarray:
        """Weights (N, n) over the training rows for raw features (N, D)."""
        return self.landmark_kernel(features) @ self.projection.T

    def coefficients(self, targets: np.ndarray) -> np.ndarray:
        """Per-landmark coefficients (m, r) of centred training targets (n, r): the prediction
        for x is then `k_L(x) @ coefficients`."""
        return self.projection.T @ np.asarray(targets, dtype=np.float64)


def fit_kernel_ridge(features: np.ndarray, kernel: str, alpha: float, gamma: float = 1.0, *,
                     max_landmarks: int = EXACT_LIMIT, seed: int = 0,
                     scaler: Standardizer | None = None) -> KernelRidge:
    """Fit kernel ridge on raw training features (n, D) (standardised here); exact for n <=
    `max_landmarks`, else Nystrom on `max_landmarks` random landmarks."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0. Received: alpha={alpha}")
    raw = np.asarray(features, dtype=np.float64)
    scaler = scaler or Standardizer.fit(raw)
    f = scaler(raw)
    n = len(f)
    if n <= max_landmarks:
        index = np.arange(n)
        k = kernel_matrix(f, f, kernel, gamma)
        lam, q = np.linalg.eigh(k)
        proj = (q / (np.maximum(lam, 0.0) + alpha)) @ q.T
        k_nl = k
    else:
        index = np.sort(np.random.default_rng(seed).choice(n, max_landmarks, replace=False))
        k_ll = kernel_matrix(f[index], f[index], kernel, gamma)
        lam, q = np.linalg.eigh(k_ll)
        keep = lam > 1e-10 * lam.max()
        inv_sqrt = (q[:, keep] / np.sqrt(lam[keep])) @ q[:, keep].T
        k_nl = kernel_matrix(f, f[index], kernel, gamma)
        phi = k_nl @ inv_sqrt
        proj = phi @ np.linalg.solve(phi.T @ phi + alpha * np.eye(len(index)), inv_sqrt)
    leverage = np.einsum("il,il->i", k_nl, proj)
    return KernelRidge(kernel, float(alpha), float(gamma), scaler, f[index], index, proj, leverage)


def leave_one_out_weights(weights: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Turn the kernel ridge weights of training X-rays into their leave-one-out weights.

    `weights` (N, n) are those of queries that are training rows `rows` (N,) (the same
    X-rays): the prediction without row i is (yhat_i - H_ii y_i) / (1 - H_ii), i.e. its own
    weight set to 0 and the others divided by 1 - H_ii (exact for ridge on centred targets).
    """
    w = np.array(weights, dtype=np.float64)
    idx = np.arange(len(w))
    h = w[idx, rows]
    w[idx, rows] = 0.0
    return w / np.maximum(1.0 - h, 1e-6)[:, None]


# === fitting on a (streamed) training split ===

@dataclass
class TrainingSummary:
    """What the baselines keep of the training split after one pass."""

    ids: list[str]
    features: np.ndarray  # (n, D) downsampled X-rays
    mean: np.ndarray  # (H, W, S) float64
    gram: np.ndarray | None  # (n_sub, n_sub) Gram matrix of the MRIs of rows `subset`, less a fixed volume
    subset: np.ndarray  # rows the Gram matrix covers (all of them up to the exact limit)

    @property
    def count(self) -> int:
        return len(self.ids)

    @property
    def n_values(self) -> int:
        return int(np.prod(self.mean.shape))


def summarize_training(train_batches: Iterable[Mapping[str, Any]], downsample: int = DEFAULT_DOWNSAMPLE, *,
                       gram: bool = True, exact_limit: int = EXACT_LIMIT, seed: int = 0,
                       features: str = "pixels") -> TrainingSummary:
    """One pass over the training batches: ids, features (`xray_features`), mean and (with `gram`) the Gram
    matrix of the MRIs of all rows, or of a random subset of `exact_limit` rows (reservoir
    sampling) above that. The MRIs are held as 16-bit values meanwhile."""
    rng = np.random.default_rng(seed)
    feats, ids = [], []
    total, count = None, 0
    held: list[np.ndarray] = []  # uint16 rows of the (sub)set: exact for a cache's MRIs
    rows: list[int] = []
    clipped = False
    for batch in train_batches:
        feats.append(xray_features(batch["xray"], downsample, features))
        ids += [str(i) for i in batch["id"]]
        mri = np.asarray(batch["mri"], dtype=np.float32)
        s = mri.sum(axis=0, dtype=np.float64)
        total = s if total is None else total + s
        if not gram:
            count += len(mri)
            continue
        clipped = clipped or bool(mri.min(initial=0.0) < 0.0 or mri.max(initial=0.0) > 1.0)
        for v in mri.reshape(len(mri), -1):
            q = np.round(np.clip(v, 0.0, 1.0) * 65535.0).astype(np.uint16)
            if len(held) < exact_limit:
                held.append(q)
                rows.append(count)
            else:  # reservoir sampling: every row has the same chance to be in the subset
                j = int(rng.integers(0, count + 1))
                if j < exact_limit:
                    held[j], rows[j] = q, count
            count += 1
    if not count:
        raise ValueError("the baseline training set is empty")
    if clipped:
        log.warning("training MRI values outside [0, 1] are clipped for the cross-validation of the baselines")
    g = None
    subset = np.arange(count)
    if gram:
        # the Gram matrix of Y - c for a fixed volume c (the first held MRI): the errors of
        # the baselines are affine combinations of rows with weights summing to 0, so they
        # do not depend on c, and the shift keeps float32 products accurate
        order = np.argsort(rows)
        subset = np.asarray(rows)[order]
        y = [held[i] for i in order]
        unit = np.float32(1.0 / 65535.0)
        ref = y[0].astype(np.float32) * unit

        def block(a: int, b: int) -> np.ndarray:
            return np.stack(y[a:b]).astype(np.float32) * unit - ref

        g = np.zeros((len(y), len(y)))
        step = 128
        for a in range(0, len(y), step):
            ya = block(a, a + step)
            for b in range(0, a + 1, step):
                yb = ya if b == a else block(b, b + step)
                g[a:a + len(ya), b:b + len(yb)] = ya @ yb.T
                g[b:b + len(yb), a:a + len(ya)] = g[a:a + len(ya), b:b + len(yb)].T
    return TrainingSummary(ids, np.concatenate(feats), total / count, g, subset)


@dataclass
class BaselineFit:
    """Baseline predictions for the evaluated subjects plus what was chosen and how long it took."""

    predictions: dict[str, np.ndarray]
    labels: dict[str, str]
    details: dict[str, Any]


def _knn_weights(nbrs: np.ndarray, n: int) -> np.ndarray:
    w = np.zeros((len(nbrs), n))
    np.put_along_axis(w, nbrs, 1.0 / nbrs.shape[1], axis=1)
    return w


def fit_baselines(train_batches: Callable[[], Iterable[Mapping[str, Any]]], eval_xray: Any,
                  eval_ids: Sequence[str] | None = None, *, k: int = DEFAULT_K,
                  downsample: int = DEFAULT_DOWNSAMPLE, strong: bool = True, folds: int = DEFAULT_FOLDS,
                  exact_limit: int = EXACT_LIMIT, seed: int = 0) -> BaselineFit:
    """Fit every baseline on the training split and predict the evaluated X-rays (N, H, W, 1).

    `train_batches()` returns a fresh iterable of dicts with "id", "xray", "mri" (numpy
    batches); it is called twice. Predictions are (N, H, W, S) float32, except "mean", one
    (H, W, S) volume. `strong` adds the cross-validated ones (`STRONG`). With too few training
    entries, k is lowered (with a warning) and the key says so.
    """
    t0 = time.monotonic()
    summary = summarize_training(train_batches(), downsample, gram=strong, exact_limit=exact_limit, seed=seed)
    n, ids = summary.count, summary.ids
    eval_ids = None if eval_ids is None else [str(i) for i in eval_ids]
    overlap = set(ids) & set(eval_ids or [])
    if overlap:
        log.warning("%d evaluated id(s) are also in the baseline training set; they are excluded from "
                    "their own neighbours (leave-one-out)", len(overlap))
    available = n - (1 if overlap else 0)
    kk = max(1, min(k, available))
    if kk < k:
        log.warning("the baseline training set has %d usable entries: k-NN uses k=%d instead of %d",
                    available, kk, k)
    ev_feats = xray_features(eval_xray, downsample)
    nn_ids = (ids, eval_ids) if overlap else (None, None)
    weights: dict[str, np.ndarray] = {}
    labels = {"mean": label("mean"), "nn": label("nn")}
    details: dict[str, Any] = {"train_pairs": n, "downsample": downsample}

    def neighbours(kq: int) -> np.ndarray:
        return nearest_neighbours(summary.features, ev_feats, kq, train_ids=nn_ids[0], query_ids=nn_ids[1])

    weights["nn"] = _knn_weights(neighbours(1), n)
    if kk > 1:
        weights[f"knn{kk}"] = _knn_weights(neighbours(kk), n)
        labels[f"knn{kk}"] = label(f"knn{kk}")
    if strong:
        sub = summary.subset
        folds_used = min(folds, len(sub))
        if len(sub) < max(3, folds_used) or folds_used < 2:
            log.warning("only %d training entries: the cross-validated baselines are left out", len(sub))
        else:
            z = span_coordinates(summary.gram)
            details["cv"] = {"folds": folds_used, "pairs": int(len(sub)), "exact": bool(len(sub) == n)}
            cvk = cv_knn(summary.features[sub], z, folds=folds_used, seed=seed, n_values=summary.n_values)
            kcv = min(int(cvk.best["k"]), available)
            weights["knn_cv"] = _knn_weights(neighbours(kcv), n)
            labels["knn_cv"] = f"k-NN baseline (k={kcv} by {folds_used}-fold CV)"
            details["knn_cv"] = cvk.to_dict()
            scaler = Standardizer.fit(summary.features)
            fsub = scaler(summary.features[sub])
            med = median_sq_distance(fsub, seed=seed)
            for kernel in KERNELS:
                cv = cv_kernel_ridge(fsub, z, kernel, gammas=[g / med for g in GAMMA_GRID], folds=folds_used,
                                     seed=seed, n_values=summary.n_values)
                for name in cv.at_edge():
                    log.warning("kernel ridge (%s): cross-validation chose %s=%.4g at the end of its grid",
                                kernel, name, cv.best[name])
                t1 = time.monotonic()
                model = fit_kernel_ridge(summary.features, kernel, cv.best["alpha"], cv.best.get("gamma", 1.0),
                                         max_landmarks=exact_limit, seed=seed, scaler=scaler)
                w = model.weights(ev_feats)
                if overlap:
                    row_of = {t: j for j, t in enumerate(ids)}
                    hit = np.array([i for i, e in enumerate(eval_ids) if e in row_of])
                    w[hit] = leave_one_out_weights(w[hit], np.array([row_of[eval_ids[i]] for i in hit]))
                name = f"krr_{kernel}"
                weights[name] = w
                hp = f"alpha={cv.best['alpha']:.3g}" + (f", gamma={cv.best['gamma'] * med:.3g}/median d^2"
                                                          if kernel == "rbf" else "")
                labels[name] = f"kernel ridge, {kernel} ({hp}, {folds_used}-fold CV)"
                details[name] = {**cv.to_dict(), "median_sq_distance": med, "nystrom": model.nystrom,
                                 "landmarks": int(len(model.landmark_index)),
                                 "fit_seconds": round(time.monotonic() - t1, 2)}
    # second pass: weighted sums of the training MRIs; the mean takes the weight left over,
    # mean + w (Y - mean) = w Y + (1 - sum w) mean (so a one-hot weight returns the MRI exactly)
    mean = summary.mean
    w32 = {name: w.astype(np.float32) for name, w in weights.items()}
    acc = {name: np.zeros((len(ev_feats), mean.size), np.float32) for name in weights}
    offset = 0
    for batch in train_batches():
        y = np.asarray(batch["mri"], dtype=np.float32).reshape(len(batch["mri"]), -1)
        for name, w in w32.items():
            acc[name] += w[:, offset:offset + len(y)] @ y
        offset += len(y)
    if offset != n:
        raise ValueError(f"the baseline training set changed between passes ({n} then {offset} entries)")
    preds = {"mean": mean.astype(np.float32)}
    for name, w in weights.items():
        rest = (1.0 - w.sum(axis=1))[:, None] * mean.reshape(1, -1)
        preds[name] = (acc[name] + rest.astype(np.float32)).reshape((-1,) + mean.shape)
    details["seconds"] = round(time.monotonic() - t0, 2)
    return BaselineFit(preds, {name: labels[name] for name in preds}, details)


def streamed_baseline_predictions(train_batches: Callable[[], Iterable[Mapping[str, Any]]],
                                  eval_xray: Any, eval_ids: Sequence[str] | None = None, *,
                                  k: int = DEFAULT_K, downsample: int = DEFAULT_DOWNSAMPLE, strong: bool = False,
                                  folds: int = DEFAULT_FOLDS) -> dict[str, np.ndarray]:
    """Baseline predictions for the evaluated X-rays (`fit_baselines(...).predictions`):
    {"mean": (H, W, S), "nn": (N, H, W, S), "knn<k>": ..., and with `strong` the
    cross-validated ones}, float32."""
    return fit_baselines(train_batches, eval_xray, eval_ids, k=k, downsample=downsample, strong=strong,
                         folds=folds).predictions


def baseline_predictions(train_arrays: Mapping[str, Any], eval_arrays: Mapping[str, Any], *,
                         k: int = DEFAULT_K, downsample: int = DEFAULT_DOWNSAMPLE,
                         strong: bool = False) -> dict[str, np.ndarray]:
    """Baseline predictions for `eval_arrays` from in-memory `train_arrays` (dicts with
    "id", "xray", "mri" as `kneetf.data.pipeline.load_arrays` returns), every entry
    (N_eval, H, W, S) float32: {"mean", "nn", "knn<k>"} (+ `STRONG` with `strong`)."""
    out = streamed_baseline_predictions(lambda: [train_arrays], eval_arrays["xray"], eval_arrays.get("id"),
                                        k=k, downsample=downsample, strong=strong)
    n = len(eval_arrays["xray"])
    out["mean"] = np.broadcast_to(out["mean"], (n,) + out["mean"].shape).copy()
    return out


__all__ = ["DEFAULT_K", "DEFAULT_DOWNSAMPLE", "DEFAULT_FOLDS", "EXACT_LIMIT", "K_GRID", "ALPHA_GRID", "GAMMA_GRID",
           "KERNELS", "FEATURES", "STRONG", "label", "baseline_names", "gradient_magnitude",
           "xray_features", "Standardizer", "nearest_neighbours",
           "kernel_matrix", "median_sq_distance", "span_coordinates", "fold_indices", "CVResult", "cv_knn",
           "cv_kernel_ridge", "KernelRidge", "fit_kernel_ridge", "leave_one_out_weights", "TrainingSummary",
           "summarize_training", "BaselineFit", "fit_baselines", "streamed_baseline_predictions",
           "baseline_predictions"]
