"""The in-graph kernel ridge prior: equal to the kernel ridge baseline, honest training
offsets, saved with the model, exported with plain ops."""
from __future__ import annotations

import numpy as np
import pytest

from kneetf import baselines as B
from kneetf.models.prior import KernelRidgePrior
from kneetf.training.prior import fit_prior


def _pairs(n: int, seed: int, prefix: str, size: int = 8, slices: int = 3):
    rng = np.random.default_rng(seed)
    xray = rng.random((n, size, size, 1)).astype("float32")
    w = np.random.default_rng(99).standard_normal(((size // 2) ** 2, size * size * slices))
    feats = xray.reshape(n, size // 2, 2, size // 2, 2).mean(axis=(2, 4)).reshape(n, -1)
    mri = 1 / (1 + np.exp(-(feats - 0.5) @ w)) * 0.8 + 0.1 + 0.02 * rng.standard_normal((n, size * size * slices))
    return {"id": [f"{prefix}{i}" for i in range(n)], "xray": xray,
            "mri": np.clip(mri, 0, 1).reshape(n, size, size, slices).astype("float32")}


def _layer(fit, size: int = 8, slices: int = 3, basis_size: int = 8) -> KernelRidgePrior:
    layer = KernelRidgePrior(image_size=size, num_slices=slices, downsample=2, num_landmarks=fit.num_landmarks,
                             rank=fit.rank, basis_size=basis_size)
    layer.build((None, size, size, 1))
    layer.set_prior(fit.values)
    return layer


@pytest.fixture(scope="module")
def data():
    return _pairs(30, 0, "t"), _pairs(6, 1, "e")


def test_full_rank_prior_is_the_kernel_ridge_baseline(data):
    train, evald = data
    fit = fit_prior(lambda: [train], rank=100, basis_size=8, downsample=2, folds=4)
    assert fit.rank == 29 and fit.num_landmarks == 30 and not fit.info["nystrom"]
    base = B.fit_baselines(lambda: [train], evald["xray"], evald["id"], downsample=2, folds=4)
    assert fit.info["alpha"] == base.details["krr_rbf"]["best"]["alpha"]
    prior = _layer(fit)(evald["xray"]).numpy()
    np.testing.assert_allclose(prior, base.predictions["krr_rbf"], atol=2e-5)


def test_low_rank_low_resolution_prior_and_its_size(data):
    train, evald = data
    fit = fit_prior(lambda: [train], rank=4, basis_size=4, downsample=2, folds=4, max_landmarks=20)
    assert fit.rank == 4 and fit.num_landmarks == 20 and fit.info["nystrom"]
    layer = _layer(fit, basis_size=4)
    assert sum(int(np.prod(w.shape)) for w in layer.weights) * 4 == fit.info["bytes"]
    prior = layer(evald["xray"]).numpy()
    mean = train["mri"].mean(axis=0)
    err = lambda p: np.mean((p - evald["mri"]) ** 2)  # noqa: E731
    assert err(prior) < err(np.broadcast_to(mean, prior.shape))  # still better than the mean volume


def test_gradient_features_prior_is_kernel_ridge_on_the_baselines_features(data):
    train, evald = data
    fit = fit_prior(lambda: [train], rank=100, basis_size=8, downsample=2, folds=4, features="pixels+gradient",
                    gradient_weight=0.5, cv_repeats=2)
    assert fit.info["features"] == "pixels+gradient" and fit.info["cv_repeats"] == 2
    layer = KernelRidgePrior(image_size=8, num_slices=3, downsample=2, num_landmarks=fit.num_landmarks,
                             rank=fit.rank, basis_size=8, features="pixels+gradient")
    layer.build((None, 8, 8, 1))
    layer.set_prior(fit.values)
    # the same prediction from the numpy features: pixels, then gradient magnitude at half weight
    raw = B.xray_features(train["xray"], 2, "pixels+gradient")
    assert raw.shape == (30, 32)
    std = B.Standardizer.fit(raw)
    np.testing.assert_allclose(fit.values["feature_scale"][16:], std.scale[16:] / 0.5, rtol=1e-6)
    scaler = B.Standardizer(fit.values["feature_mean"], fit.values["feature_scale"])
    f, q = scaler(raw), scaler(B.xray_features(evald["xray"], 2, "pixels+gradient"))
    y = train["mri"].reshape(30, -1)
    k = B.kernel_matrix(f, f, "rbf", fit.info["gamma"])
    pred = y.mean(0) + B.kernel_matrix(q, f, "rbf", fit.info["gamma"]) @ np.linalg.solve(
        k + fit.info["alpha"] * np.eye(30), y - y.mean(0))
    np.testing.assert_allclose(layer(evald["xray"]).numpy().reshape(6, -1), pred, atol=5e-5)


def test_training_offsets_are_the_leave_one_out_gap(data):
    train, _ = data
    fit = fit_prior(lambda: [train], rank=5, basis_size=8, downsample=2, folds=4)
    feats = B.xray_features(train["xray"], 2)
    scaler = B.Standardizer(fit.values["feature_mean"], fit.values["feature_scale"])
    f = scaler(feats)
    basis = fit.values["basis"].reshape(fit.rank, -1)
    coords = (train["mri"].reshape(30, -1) - train["mri"].reshape(30, -1).mean(0)) @ basis.T
    i = 11
    keep = np.delete(np.arange(30), i)
    k = B.kernel_matrix(f[keep], f[keep], "rbf", fit.info["gamma"])
    loo = B.kernel_matrix(f[i:i + 1], f[keep], "rbf", fit.info["gamma"]) @ np.linalg.solve(
        k + fit.info["alpha"] * np.eye(29), coords[keep])
    full = B.kernel_matrix(f[i:i + 1], f, "rbf", fit.info["gamma"]) @ fit.values["coefficients"]
    np.testing.assert_allclose(fit.offsets[i], (full - loo)[0], atol=1e-4)
    # in-sample the prior fits its training pairs better than it predicts them left out
    assert fit.info["residual_in_sample"] < fit.info["residual_loo"]
    assert fit.offset_ids == train["id"]


def test_offset_transform_adds_the_expanded_offset(data):
    import tensorflow as tf

    from kneetf.models.prior import expand_basis
    from kneetf.training.prior import offset_transform

    train, _ = data
    fit = fit_prior(lambda: [train], rank=3, basis_size=4, downsample=2, folds=4)
    transform = offset_transform(fit, 8)
    ex = {"id": tf.constant("t4"), "mri": tf.constant(train["mri"][4])}
    delta = expand_basis(fit.offsets[4:5], fit.values["basis"], 8).numpy()[0]
    np.testing.assert_allclose(transform(ex)["mri"].numpy(), train["mri"][4] + delta, atol=1e-6)
    other = {"id": tf.constant("unknown"), "mri": tf.constant(train["mri"][4])}
    np.testing.assert_array_equal(transform(other)["mri"].numpy(), train["mri"][4])


def _prior_model(seed: int = 0, features: str = "pixels"):
    from kneetf.models.kneenet import KneeNet

    model = KneeNet.from_preset("tiny", residual_template=True, residual_prior="kernel_ridge", prior_landmarks=6,
                                prior_rank=3, prior_basis_size=16, prior_features=features)
    rng = np.random.default_rng(seed)
    shapes = model.prior.weight_shapes()
    values = {name: rng.standard_normal(shape).astype("float32") * 0.1 for name, shape in shapes.items()}
    values.update(feature_scale=np.ones(shapes["feature_scale"], "float32"), gamma=np.float32(1e-3),
                  mean=rng.uniform(0.2, 0.8, shapes["mean"]).astype("float32"))
    model.set_prior(values)
    return model, values


@pytest.mark.parametrize("features", ["pixels", "pixels+gradient"])
def test_untrained_model_predicts_its_prior_and_saves_it(tmp_path, features):
    import keras

    model, values = _prior_model(features=features)
    assert model.prior.landmarks.shape[1] == (128 // 4) ** 2 * (2 if features == "pixels+gradient" else 1)
    x = np.random.default_rng(1).random((2, 128, 128, 1)).astype("float32")
    prior = model.prior(x).numpy()
    out = model.predict(x, verbose=0)["mri"]
    np.testing.assert_allclose(out, np.clip(prior, 1e-3, 1 - 1e-3), atol=1e-5)  # zero-initialised residual
    assert not model.prior.trainable_weights or all(not w.trainable for w in model.prior.weights)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0)["mri"], out, atol=1e-6)
    np.testing.assert_array_equal(loaded.prior.landmarks.numpy(), values["landmarks"])
    with pytest.raises(ValueError, match="set_prior"):
        loaded.set_template(np.zeros((128, 128, 20), "float32"))


@pytest.mark.slow
@pytest.mark.parametrize("features", ["pixels", "pixels+gradient"])
def test_prior_model_exports_to_savedmodel_and_tflite(tmp_path, features):
    import tensorflow as tf

    from kneetf.export.savedmodel import export_savedmodel
    from kneetf.export import tflite as tfl
    from kneetf.inference.trust import check_savedmodel, check_tflite

    model, _ = _prior_model(2, features)
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "model.keras")
    x = np.random.default_rng(3).random((2, 128, 128, 1)).astype("float32")
    want = model.predict(x, verbose=0)["mri"]
    result = export_savedmodel(run, tmp_path / "saved" / "kneetf")
    check_savedmodel(result.path)  # the prior's operations are on the allow list of kneetf exports
    loaded = tf.saved_model.load(str(result.path))
    got = loaded.signatures["predict_normalized"](xray=tf.constant(x))["mri"].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    report = tfl.export_tflite(model, tmp_path / "tflite", variants=("fp32",), check=x)
    assert report["fp32"]["outputs"]["mri"]["psnr"] > 80
    check_tflite(report["fp32"]["path"])


def test_prior_fits_on_a_few_pairs_and_names_too_few(data):
    from kneetf.errors import ConfigError

    train, evald = data
    few = {k: v[:4] for k, v in train.items()}
    fit = fit_prior(lambda: [few], rank=64, basis_size=8, downsample=2, folds=5)
    assert fit.rank == 3 and fit.info["cv"]["grid"]["alpha"]  # folds lowered to the 4 pairs
    with pytest.raises(ConfigError, match="at least 3 training pairs.*--recipe mean"):
        fit_prior(lambda: [{k: v[:2] for k, v in train.items()}], basis_size=8, downsample=2)


def test_saved_fit_loads_back_only_for_its_own_key(data, tmp_path):
    from kneetf.training.prior import load_fit, save_fit

    train, _ = data
    fit = fit_prior(lambda: [train], rank=5, basis_size=8, downsample=2, folds=4)
    key = {"cache": "c", "created": "2026-01-01", "model": {"prior_rank": 5}, "train": {"seed": 0}}
    path = tmp_path / "prior_fit.npz"
    save_fit(fit, path, key)
    back = load_fit(path, dict(key))
    assert back is not None and back.offset_ids == fit.offset_ids and back.info == fit.info
    np.testing.assert_array_equal(back.offsets, fit.offsets)
    assert set(back.values) == set(fit.values)
    for name, value in fit.values.items():
        np.testing.assert_array_equal(back.values[name], value, err_msg=name)
    assert load_fit(path, {**key, "created": "2026-01-02"}) is None  # the cache was prepared again
    assert load_fit(tmp_path / "missing.npz", key) is None
    path.write_bytes(path.read_bytes()[:100])  # cut short
    assert load_fit(path, key) is None


@pytest.mark.slow
def test_a_resumed_default_run_reuses_its_prior_fit(tmp_path, monkeypatch):
    from cache_factory import random_cache

    from kneetf.config import TrainConfig
    from kneetf.presets import get_preset
    from kneetf.training import prior as prior_module
    from kneetf.training import train as train_module
    from kneetf.training.recipes import get_recipe

    cache = random_cache(tmp_path / "cache", 24, 4, shard_size=16)
    model_config, train_config = get_recipe("default").apply(get_preset("tiny"), TrainConfig())
    train_config = train_module.replace(train_config, epochs=1, batch_size=8, prior_cv_repeats=1)
    out = tmp_path / "run"
    data = train_module.DataSpec(path=str(cache), workers=0)
    train_module.train(model_config, train_config, out, data=data, verbose=0)
    assert (out / train_module.PRIOR_FIT_FILE).is_file()
    saved = (out / train_module.PRIOR_FIT_FILE).read_bytes()

    def refit(*args, **kwargs):
        raise AssertionError("the resumed run fitted its prior again")

    monkeypatch.setattr(prior_module, "fit_model_prior", refit)
    metrics = train_module.train(model_config, train_module.replace(train_config, epochs=2), out, data=data,
                                 verbose=0)
    assert metrics["epochs_done"] == 2 and metrics["resumed"]
    assert (out / train_module.PRIOR_FIT_FILE).read_bytes() == saved
    # other prior settings need another fit: fitted again, never the saved one reused
    with pytest.raises(AssertionError, match="fitted its prior again"):
        train_module.train(model_config, train_module.replace(train_config, epochs=2, prior_gradient_weight=0.25),
                           out, data=data, verbose=0)
