"""kneetf.metrics against scikit-image's reference implementations."""
from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from kneetf import metrics

SK_SSIM = dict(data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def _random_pair(seed: int, shape=(32, 28, 12)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = rng.random(shape)
    p = np.clip(t + rng.normal(0, 0.1, shape), 0, 1)
    return t, p


def _structured_pair(seed: int, shape=(40, 36, 20)) -> tuple[np.ndarray, np.ndarray]:
    """Smooth blobs and edges, with a blurred and shifted prediction (a realistic error)."""
    from scipy.ndimage import gaussian_filter, shift

    rng = np.random.default_rng(seed)
    yy, xx, zz = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    t = 0.5 + 0.3 * np.sin(4 * xx + 2 * yy) * np.cos(3 * zz)
    t[(xx ** 2 + yy ** 2) < 0.2] = 0.9
    t = np.clip(t + rng.normal(0, 0.02, shape), 0, 1)
    p = np.clip(shift(gaussian_filter(t, 1.0), (1.0, -2.0, 0.5), mode="nearest") + 0.05, 0, 1)
    return t, p


PAIRS = [_random_pair(0), _random_pair(1, (16, 16, 11)), _structured_pair(2), _structured_pair(3)]


@pytest.mark.parametrize("pair", PAIRS)
def test_psnr_mae_match_skimage(pair):
    t, p = pair
    assert metrics.psnr(t, p) == pytest.approx(peak_signal_noise_ratio(t, p, data_range=1.0), abs=1e-6)
    assert metrics.mse(t, p) == pytest.approx(mean_squared_error(t, p), rel=1e-12)
    assert metrics.mae(t, p) == pytest.approx(np.mean(np.abs(t - p)), rel=1e-12)


@pytest.mark.parametrize("pair", PAIRS)
def test_ssim_2d_matches_skimage_per_slice(pair):
    t, p = pair
    per = metrics.per_slice_ssim(t, p)
    ref = [structural_similarity(t[..., k], p[..., k], **SK_SSIM) for k in range(t.shape[-1])]
    np.testing.assert_allclose(per, ref, atol=1e-4)
    # channel_axis treats every slice as a channel and averages: the same number
    assert metrics.ssim_2d(t, p) == pytest.approx(structural_similarity(t, p, channel_axis=-1, **SK_SSIM), abs=1e-4)


@pytest.mark.parametrize("pair", PAIRS)
def test_ssim_3d_matches_skimage(pair):
    t, p = pair
    assert metrics.ssim_3d(t, p) == pytest.approx(structural_similarity(t, p, **SK_SSIM), abs=1e-4)


def test_slice_axis_is_explicit():
    t, p = _structured_pair(4)
    moved_t, moved_p = np.moveaxis(t, -1, 0), np.moveaxis(p, -1, 0)  # slices first
    np.testing.assert_allclose(metrics.per_slice_ssim(moved_t, moved_p, slice_axis=0),
                               metrics.per_slice_ssim(t, p), atol=1e-12)
    np.testing.assert_allclose(metrics.per_slice_psnr(moved_t, moved_p, slice_axis=0),
                               [peak_signal_noise_ratio(t[..., k], p[..., k], data_range=1.0)
                                for k in range(t.shape[-1])], atol=1e-6)


def test_identical_volumes():
    t, _ = _structured_pair(5)
    assert metrics.psnr(t, t) == math.inf
    assert metrics.psnr(t, t, cap_db=metrics.PSNR_CAP_DB) == metrics.PSNR_CAP_DB
    assert metrics.ssim_2d(t, t) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim_3d(t, t) == pytest.approx(1.0, abs=1e-12)
    assert metrics.mae(t, t) == 0.0
    summary = metrics.summarize(t[None], t[None])
    assert summary["psnr"]["mean"] == metrics.PSNR_CAP_DB  # finite, documented cap


def test_known_noise_level_gives_expected_psnr():
    rng = np.random.default_rng(6)
    t = np.full((128, 128, 20), 0.5)
    sigma = 0.05
    p = t + rng.normal(0, sigma, t.shape)
    assert metrics.psnr(t, p) == pytest.approx(10 * math.log10(1 / sigma ** 2), abs=0.05)
    assert metrics.mae(t, p) == pytest.approx(sigma * math.sqrt(2 / math.pi), rel=0.01)


def test_subject_scores_and_summary_agree_with_single_volume_functions():
    pairs = [_structured_pair(s, (24, 24, 12)) for s in (7, 8, 9)]
    t = np.stack([a for a, _ in pairs])
    p = np.stack([b for _, b in pairs])
    scores = metrics.subject_scores(t, p)
    for i, (a, b) in enumerate(pairs):
        assert scores["psnr"][i] == pytest.approx(metrics.psnr(a, b))
        assert scores["ssim_2d"][i] == pytest.approx(metrics.ssim_2d(a, b))
        assert scores["ssim_3d"][i] == pytest.approx(metrics.ssim_3d(a, b))
        assert scores["mae"][i] == pytest.approx(metrics.mae(a, b))
        np.testing.assert_allclose(scores["slice_psnr"][i], metrics.per_slice_psnr(a, b))
    summary = metrics.summarize(t, p)
    assert set(summary) == set(metrics.METRICS)
    assert summary["psnr"]["mean"] == pytest.approx(np.mean(scores["psnr"]))
    assert summary["ssim_2d"]["std"] == pytest.approx(np.std(scores["ssim_2d"]))


def test_shape_mismatch_and_small_window_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(ValueError, match=">= 11"):
        metrics.ssim_3d(np.zeros((32, 32, 8)), np.zeros((32, 32, 8)))


def test_keras_psnr_matches_numpy():
    t = np.stack([_structured_pair(s, (16, 16, 12))[0] for s in (10, 11)]).astype("float32")
    p = np.stack([_structured_pair(s, (16, 16, 12))[1] for s in (10, 11)]).astype("float32")
    p[1] = t[1]  # identical sample -> the cap, not inf
    got = np.asarray(metrics.keras_psnr(t, p))
    assert got[0] == pytest.approx(metrics.psnr(t[0], p[0]), abs=1e-3)
    assert got[1] == pytest.approx(metrics.PSNR_CAP_DB, abs=1e-3)
    assert metrics.keras_psnr.__name__ == "psnr"


def test_keras_ssim_2d_matches_numpy():
    t = np.stack([_structured_pair(s, (32, 32, 6))[0] for s in (12, 13)]).astype("float32")
    p = np.stack([_structured_pair(s, (32, 32, 6))[1] for s in (12, 13)]).astype("float32")
    got = np.asarray(metrics.keras_ssim_2d(t, p))
    for i in range(2):
        assert got[i] == pytest.approx(metrics.ssim_2d(t[i], p[i]), abs=1e-4)
