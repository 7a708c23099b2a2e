"""kneetf.models.losses and the options that reach it: the MRI loss terms are what they say
(checked against scikit-image's SSIM), save and load, and the CLI flags set them."""
from __future__ import annotations

import keras
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

import kneetf
from kneetf.config import TrainConfig, replace
from kneetf.errors import ConfigError
from kneetf.models.losses import MriLoss, mri_loss
from kneetf.presets import get_preset


def _volumes(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true = gaussian_filter(rng.random((2, 32, 32, 3)), sigma=(0, 2, 2, 0)).astype("float32")
    pred = np.clip(true + 0.05 * rng.standard_normal(true.shape), 0, 1).astype("float32")
    return true, pred


def test_plain_loss_is_keras_mse() -> None:
    assert mri_loss() == "mean_squared_error"
    true, pred = _volumes()
    mse = np.mean((pred - true) ** 2)
    assert float(MriLoss()(true, pred)) == pytest.approx(mse, rel=1e-5)


def test_ssim_term_matches_scikit_image() -> None:
    true, pred = _volumes()
    ssim = np.mean([structural_similarity(true[b, :, :, s], pred[b, :, :, s], data_range=1.0, gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False)
                    for b in range(2) for s in range(3)])
    mse = np.mean((pred - true) ** 2)
    got = float(MriLoss(ssim_weight=0.5)(true, pred))
    assert got == pytest.approx(mse + 0.5 * (1 - ssim), abs=2e-3)
    assert float(MriLoss(ssim_weight=0.5)(true, true)) == pytest.approx(0.0, abs=1e-5)


def test_gradient_term_sees_edges_not_offsets() -> None:
    true, _ = _volumes()
    loss = MriLoss(gradient_weight=1.0)
    shifted = true + 0.1   # same edges: only the MSE part remains
    assert float(loss(true, shifted)) == pytest.approx(0.01, rel=1e-3)
    blurred = gaussian_filter(true, sigma=(0, 3, 3, 0)).astype("float32")
    assert float(loss(true, blurred)) > float(MriLoss()(true, blurred)) > 0


def test_model_with_loss_terms_and_latent_dropout_trains_saves_and_loads(tmp_path) -> None:
    cfg = replace(get_preset("tiny"), latent_dropout=0.25, residual_template=True)
    model = kneetf.build_model(cfg, TrainConfig(ssim_weight=0.1, gradient_weight=1.0))
    assert model.get_layer("latent_dropout").rate == 0.25
    assert "latent_dropout" not in [l.name for l in kneetf.build_model("tiny", compile=False).layers]
    rng = np.random.default_rng(0)
    x = rng.random((4, 128, 128, 1), dtype=np.float32)
    y = rng.random((4, 128, 128, 20), dtype=np.float32)
    history = model.fit(x, {"xray_recon": x, "mri": y}, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0])
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert loaded.model_config.latent_dropout == 0.25
    # dropout is off at inference: two predictions agree
    np.testing.assert_array_equal(loaded.predict(x, verbose=0)["mri"], loaded.predict(x, verbose=0)["mri"])


@pytest.mark.parametrize("field,value", [("ssim_weight", -1.0), ("gradient_weight", -0.1)])
def test_negative_loss_weights_are_refused(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})
    with pytest.raises(ConfigError, match="latent_dropout"):
        replace(get_preset("tiny"), latent_dropout=1.0)


def test_cli_flags_set_the_loss_terms_dropout_and_early_stopping(monkeypatch, tmp_path) -> None:
    import kneetf.training.train as T
    from kneetf.cli.main import main

    seen = {}

    def fake_train(model_config, train_config, out, **kwargs):
        seen.update(model=model_config, train=train_config)
        return {"chief": False}

    monkeypatch.setattr(T, "train", fake_train)
    assert main(["train", "--preset", "tiny", "--ssim-weight", "0.2", "--gradient-weight", "0.5",
                 "--latent-dropout", "0.1", "--early-stopping", "3", "--shift-augment", "4", "--out", str(tmp_path / "r")]) == 0
    assert (seen["train"].ssim_weight, seen["train"].gradient_weight) == (0.2, 0.5)
    assert seen["train"].early_stopping_patience == 3 and seen["model"].latent_dropout == 0.1
    assert seen["train"].shift_augment == 4
