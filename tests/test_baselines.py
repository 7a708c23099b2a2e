"""The cross-validated baselines against brute-force references on tiny problems."""
from __future__ import annotations

import numpy as np
import pytest

from kneetf import baselines as B


def _problem(n: int = 30, d: int = 6, v: int = 40, noise: float = 0.05, seed: int = 0):
    """Features (n, d) and targets (n, v) that depend smoothly on them, plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    w = rng.standard_normal((d, v))
    y = np.tanh(x @ w / np.sqrt(d)) + 0.3 * np.sin(x[:, :1] * 2) + noise * rng.standard_normal((n, v))
    return x, y


def _brute_krr(x_train, y_train, x_query, kernel, alpha, gamma):
    """ybar + k(x) (K + alpha I)^-1 (Y - ybar) with a plain np.linalg.solve."""
    ybar = y_train.mean(axis=0)
    k = B.kernel_matrix(x_train, x_train, kernel, gamma)
    coef = np.linalg.solve(k + alpha * np.eye(len(x_train)), y_train - ybar)
    return ybar + B.kernel_matrix(x_query, x_train, kernel, gamma) @ coef


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cv_kernel_ridge_equals_refitting_every_fold(kernel):
    x, y = _problem()
    gammas, alphas, folds = [0.05, 0.3], [0.01, 0.3, 3.0], 4
    # the Gram matrix of y less any fixed vector gives the same errors
    z = B.span_coordinates((y - y[3]) @ (y - y[3]).T)
    cv = B.cv_kernel_ridge(x, z, kernel, gammas=gammas, alphas=alphas, folds=folds, seed=1, n_values=y.shape[1])
    expected = np.zeros((len(gammas) if kernel == "rbf" else 1, len(alphas)))
    for held in B.fold_indices(len(x), folds, seed=1):
        train = np.setdiff1d(np.arange(len(x)), held)
        for gi, g in enumerate(gammas if kernel == "rbf" else [0.0]):
            for ai, a in enumerate(alphas):
                pred = _brute_krr(x[train], y[train], x[held], kernel, a, g)
                expected[gi, ai] += np.sum((y[held] - pred) ** 2)
    expected /= y.size
    np.testing.assert_allclose(cv.mse, expected if kernel == "rbf" else expected[0], rtol=1e-8)
    gi, ai = np.unravel_index(np.argmin(expected), expected.shape)
    assert cv.best["alpha"] == alphas[ai]
    if kernel == "rbf":
        assert cv.best["gamma"] == gammas[gi]


def test_cv_knn_equals_brute_force():
    x, y = _problem(n=25)
    cv = B.cv_knn(x, B.span_coordinates(y @ y.T), k_grid=(1, 3, 5, 30), folds=5, seed=2, n_values=y.shape[1])
    assert cv.grid["k"] == [1, 3, 5]  # 30 > the 20 training rows of a fold
    expected = np.zeros(3)
    for held in B.fold_indices(len(x), 5, seed=2):
        train = np.setdiff1d(np.arange(len(x)), held)
        for h in held:
            order = np.argsort(((x[train] - x[h]) ** 2).sum(axis=1), kind="stable")
            for i, k in enumerate((1, 3, 5)):
                expected[i] += np.sum((y[h] - y[train][order[:k]].mean(axis=0)) ** 2)
    np.testing.assert_allclose(cv.mse, expected / y.size, rtol=1e-9)


def test_cross_validation_picks_sensible_values():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((80, 5))
    noise = rng.standard_normal((80, 30))
    signal = np.sin(x @ rng.standard_normal((5, 30)) / 2) + 0.3 * noise
    f = B.Standardizer.fit(x)(x)
    med = B.median_sq_distance(f)
    gammas = [g / med for g in B.GAMMA_GRID]
    # a smooth function of the features plus noise: a width and a ridge inside their grids,
    # a few neighbours
    z = B.span_coordinates(signal @ signal.T)
    smooth = B.cv_kernel_ridge(f, z, "rbf", gammas=gammas, seed=0)
    assert not smooth.at_edge() and 0.01 < smooth.best["alpha"] < 10
    assert 0.1 < smooth.best["gamma"] * med < 10
    assert B.cv_knn(f, z, seed=0).best["k"] <= 10
    # pure noise: the strongest ridge (predict the mean) and the largest k
    z = B.span_coordinates(noise @ noise.T)
    assert B.cv_kernel_ridge(f, z, "rbf", gammas=gammas, seed=0).best["alpha"] == B.ALPHA_GRID[-1]
    assert B.cv_knn(f, z, seed=0).best["k"] >= 40


def test_fit_weights_and_leave_one_out_equal_direct_solves():
    x, y = _problem(n=20)
    model = B.fit_kernel_ridge(x, "rbf", alpha=0.2, gamma=0.1)
    f = model.scaler(x)
    q = np.random.default_rng(4).standard_normal((3, x.shape[1]))
    ybar = y.mean(axis=0)
    np.testing.assert_allclose(ybar + model.weights(q) @ (y - ybar),
                               _brute_krr(f, y, model.scaler(q), "rbf", 0.2, 0.1), atol=1e-10)
    # leave-one-out weights = refit without the row, with that row's centring
    loo = B.leave_one_out_weights(model.weights(x[[2, 7]]), np.array([2, 7]))
    for r, i in enumerate((2, 7)):
        keep = np.delete(np.arange(len(x)), i)
        k = B.kernel_matrix(f[keep], f[keep], "rbf", 0.1)
        direct = B.kernel_matrix(f[i:i + 1], f[keep], "rbf", 0.1) @ np.linalg.solve(k + 0.2 * np.eye(len(keep)),
                                                                                   y[keep] - ybar)
        assert loo[r, i] == 0.0
        np.testing.assert_allclose(loo[r] @ (y - ybar), direct[0], atol=1e-10)


def test_nystrom_is_ridge_on_nystrom_features_and_exact_with_every_landmark():
    x, y = _problem(n=40)
    exact = B.fit_kernel_ridge(x, "rbf", alpha=0.1, gamma=0.1)
    q = np.random.default_rng(5).standard_normal((50, x.shape[1]))
    err = {m: np.mean((B.fit_kernel_ridge(x, "rbf", alpha=0.1, gamma=0.1, max_landmarks=m).weights(q) @ y
                       - exact.weights(q) @ y) ** 2) for m in (5, 30)}
    assert not exact.nystrom and err[30] < err[5] / 4  # more landmarks, closer to the exact fit
    small = B.fit_kernel_ridge(x, "rbf", alpha=0.1, gamma=0.1, max_landmarks=10, seed=0)
    assert small.nystrom and len(small.landmark_index) == 10
    f, idx = small.scaler(x), small.landmark_index
    lam, u = np.linalg.eigh(B.kernel_matrix(f[idx], f[idx], "rbf", 0.1))
    phi = lambda a: B.kernel_matrix(a, f[idx], "rbf", 0.1) @ u @ np.diag(lam ** -0.5) @ u.T  # noqa: E731
    beta = np.linalg.solve(phi(f).T @ phi(f) + 0.1 * np.eye(10), phi(f).T @ y)
    np.testing.assert_allclose(small.weights(q) @ y, phi(small.scaler(q)) @ beta, atol=1e-8)
    # leverages are the diagonal of the hat matrix
    np.testing.assert_allclose(small.leverage, np.diag(small.weights(x)), atol=1e-10)


def _arrays(n: int, seed: int, prefix: str):
    """Tiny X-ray / MRI pairs whose MRI depends on the X-ray."""
    rng = np.random.default_rng(seed)
    xray = rng.random((n, 8, 8, 1)).astype("float32")
    w = np.random.default_rng(99).standard_normal((16, 8 * 8 * 3))
    feats = xray.reshape(n, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(n, -1)
    mri = 1 / (1 + np.exp(-(feats - 0.5) @ w)) * 0.8 + 0.1 + 0.02 * rng.standard_normal((n, 192))
    return {"id": [f"{prefix}{i}" for i in range(n)], "xray": xray,
            "mri": np.clip(mri, 0, 1).reshape(n, 8, 8, 3).astype("float32")}


def test_fit_baselines_predicts_with_the_chosen_values_and_never_sees_itself():
    train, evald = _arrays(40, 0, "t"), _arrays(5, 1, "e")
    batches = [{k: v[s:s + 16] for k, v in train.items()} for s in range(0, 40, 16)]
    fit = B.fit_baselines(lambda: batches, evald["xray"], evald["id"], k=3, downsample=2, folds=4)
    assert set(fit.predictions) == {"mean", "nn", "knn3", "knn_cv", "krr_linear", "krr_rbf"}
    feats = B.xray_features(train["xray"], 2)
    y = train["mri"].reshape(40, -1).astype(np.float64)
    for kernel in ("linear", "rbf"):
        best = fit.details[f"krr_{kernel}"]["best"]
        model = B.fit_kernel_ridge(feats, kernel, best["alpha"], best.get("gamma", 1.0))
        direct = _brute_krr(model.scaler(feats), y, model.scaler(B.xray_features(evald["xray"], 2)), kernel,
                            best["alpha"], model.gamma)
        np.testing.assert_allclose(fit.predictions[f"krr_{kernel}"].reshape(5, -1), direct, atol=1e-5)
        assert f"{kernel}" in fit.labels[f"krr_{kernel}"] and "CV" in fit.labels[f"krr_{kernel}"]
    # on this learnable map kernel ridge beats the mean
    err = lambda p: np.mean((p - evald["mri"]) ** 2)  # noqa: E731
    assert err(fit.predictions["krr_rbf"]) < err(fit.predictions["mean"])
    # evaluated on its own training split: leave-one-out, not a perfect score
    own = B.fit_baselines(lambda: batches, train["xray"][:4], train["id"][:4], downsample=2, folds=4)
    assert np.mean((own.predictions["krr_rbf"] - train["mri"][:4]) ** 2) > 1e-4
    assert not any(np.array_equal(own.predictions["nn"][i], train["mri"][i]) for i in range(4))


def test_cross_validation_on_a_subset_above_the_exact_limit():
    train, evald = _arrays(40, 2, "t"), _arrays(3, 3, "e")
    fit = B.fit_baselines(lambda: [train], evald["xray"], evald["id"], downsample=2, folds=3, exact_limit=20)
    assert fit.details["cv"] == {"folds": 3, "pairs": 20, "exact": False}
    assert fit.details["krr_rbf"]["nystrom"] and fit.details["krr_rbf"]["landmarks"] == 20
    summary = B.summarize_training([train], 2, exact_limit=20, seed=0)
    y = train["mri"].reshape(40, -1)[summary.subset].astype(np.float64)
    d = y - y[0]
    np.testing.assert_allclose(summary.gram, d @ d.T, atol=1e-3)


def test_repeated_cross_validation_averages_the_splits() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((24, 6))
    z = B.span_coordinates((y := np.tanh(x @ rng.standard_normal((6, 10)))) @ y.T)
    gammas = (0.05, 0.2)
    one = [B.cv_kernel_ridge(x, z, "rbf", gammas=gammas, folds=4, seed=s).mse for s in (3, 4, 5)]
    rep = B.cv_kernel_ridge(x, z, "rbf", gammas=gammas, folds=4, seed=3, repeats=3)
    np.testing.assert_allclose(rep.mse, np.mean(one, axis=0), rtol=1e-10)
    gi, ai = np.unravel_index(int(np.argmin(rep.mse)), rep.mse.shape)
    assert (rep.best["gamma"], rep.best["alpha"]) == (gammas[gi], B.ALPHA_GRID[ai])


def test_gradient_features_follow_the_pixels() -> None:
    x = np.zeros((1, 4, 4, 1), np.float32)
    x[0, :, 2:, 0] = 1.0  # a vertical edge between columns 1 and 2
    f = B.xray_features(x, 2, "pixels+gradient")
    np.testing.assert_array_equal(f[0, :4], [0, 1, 0, 1])  # pooled pixels
    np.testing.assert_array_equal(f[0, 4:], [0.5, 0, 0.5, 0])  # |dx| is 1 on column 1 only
    with pytest.raises(ValueError, match="features must be one of"):
        B.xray_features(x, 2, "edges")
