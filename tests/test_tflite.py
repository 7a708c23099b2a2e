"""TFLite fp32 / fp16 / int8: conversion, ai_edge_litert runtime, agreement with Keras."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

from kneetf.errors import ConfigError, InputError  # noqa: E402
from kneetf.export import OUTPUT_KEYS  # noqa: E402
from kneetf.export import tflite as tfl  # noqa: E402
from kneetf.export.samples import structured_samples  # noqa: E402
from kneetf.inference.litert import TFLiteModel  # noqa: E402
from kneetf.inference.trust import custom_tflite_ops  # noqa: E402


import serving_server  # noqa: E402  (tests/serving_server.py; pytest puts tests/ on sys.path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    """The tiny preset (varied random weights) converted to all three variants once."""
    import keras

    import kneetf.models.kneenet  # noqa: F401

    root = tmp_path_factory.mktemp("tflite")
    path = serving_server.make_test_model(root / "model.keras", "tiny", seed=5)
    model = keras.saving.load_model(path, compile=False, safe_mode=True)
    calibration = structured_samples(12, 128, seed=100)
    check = structured_samples(3, 128, seed=200)
    report = tfl.export_tflite(model, root / "tflite", representative=iter(calibration), check=check)
    return {"root": root, "model": model, "report": report, "check": check}


def _keras(model, x):
    out = model.predict(x, verbose=0)
    return {k: np.asarray(out[k]) for k in OUTPUT_KEYS}


def test_files_and_report(converted):
    report = converted["report"]
    assert list(report) == ["fp32", "fp16", "int8"]
    out_dir = converted["root"] / "tflite"
    saved = json.loads((out_dir / tfl.REPORT_FILE).read_text())
    for variant, rep in report.items():
        path = Path(rep["path"])
        assert path == out_dir / f"kneetf_{variant}.tflite"
        assert path.stat().st_size == rep["bytes"] == saved["variants"][variant]["bytes"]
        assert set(rep["outputs"]) == set(OUTPUT_KEYS)
        assert custom_tflite_ops(path) == []  # loads without --trust-model
    assert report["fp16"]["bytes"] < report["fp32"]["bytes"]
    assert saved["input"]["shape"] == [1, 128, 128, 1] and "normalised" in saved["input"]["note"]
    assert saved["calibration"] == "representative" and saved["check_samples"] == 3


@pytest.mark.parametrize("variant, max_abs, min_psnr", [("fp32", 1e-5, 90.0), ("fp16", 5e-3, 60.0),
                                                        ("int8", 0.08, 30.0)])
def test_variant_matches_keras(converted, variant, max_abs, min_psnr):
    """Each variant against Keras on fresh inputs (not the calibration or check set)."""
    model = converted["model"]
    x = structured_samples(2, 128, seed=300)
    reference = _keras(model, x)
    got = TFLiteModel(converted["report"][variant]["path"]).predict(x)
    for k in OUTPUT_KEYS:
        assert got[k].shape == reference[k].shape and got[k].dtype == np.float32
        diff = np.abs(got[k] - reference[k])
        assert diff.max() <= max_abs, (variant, k, diff.max())
        mse = float(np.mean(diff.astype(np.float64) ** 2))
        assert mse == 0 or 10 * np.log10(1 / mse) >= min_psnr
    # the reported numbers are the same measurement on the check set
    rep = converted["report"][variant]["outputs"]["mri"]
    check = converted["check"]
    again = tfl.compare_outputs(TFLiteModel(converted["report"][variant]["path"]).predict(check),
                                _keras(model, check))["mri"]
    assert again["max_abs_diff"] == pytest.approx(rep["max_abs_diff"], rel=1e-6, abs=1e-9)


def test_int8_is_fully_quantised_at_the_edges(converted):
    m = TFLiteModel(converted["report"]["int8"]["path"])
    assert m.quantized and m.input_dtype == np.int8
    scale, zero = m._input["quantization"]
    assert scale == pytest.approx(1 / 255, rel=0.05) and zero == -128  # [0, 1] calibrated input range
    for k in OUTPUT_KEYS:
        assert np.dtype(m._outputs[k]["dtype"]) == np.int8
    # quantise -> dequantise of the input is exact to half a step
    x = np.linspace(0, 1, 128 * 128, dtype=np.float32).reshape(1, 128, 128, 1)
    q = m._quantize(x)
    assert q.dtype == np.int8
    assert np.max(np.abs((q.astype(np.float32) - zero) * scale - x)) <= scale / 2 + 1e-7
    f = TFLiteModel(converted["report"]["fp32"]["path"])
    assert not f.quantized and f.input_dtype == np.float32


def test_predict_batches_and_layouts(converted):
    m = TFLiteModel(converted["report"]["fp32"]["path"])
    x = structured_samples(3, 128, seed=7)
    batch = m.predict(x)
    one = m.predict(x[1, ..., 0])  # (H, W)
    three_d = m.predict(x[..., 0])  # (B, H, W)
    assert batch["mri"].shape == (3, 128, 128, 20) and batch["xray_recon"].shape == (3, 128, 128, 1)
    np.testing.assert_array_equal(one["mri"][0], batch["mri"][1])
    np.testing.assert_array_equal(three_d["xray_recon"], batch["xray_recon"])
    with pytest.raises(InputError, match="normalise"):
        m.predict(np.zeros((1, 256, 256, 1), np.float32))
    with pytest.raises(InputError, match="no such TFLite model"):
        TFLiteModel(converted["root"] / "missing.tflite")
    (converted["root"] / "junk.tflite").write_bytes(b"not a flatbuffer")
    with pytest.raises((InputError, ValueError)):
        TFLiteModel(converted["root"] / "junk.tflite")


def test_representative_samples_sources():
    arrays = [np.full((1, 128, 128, 1), i / 10, np.float32) for i in range(5)]
    got = tfl.representative_samples(3, 128, representative=iter(arrays))
    assert got.shape == (3, 128, 128, 1) and got[2, 0, 0, 0] == pytest.approx(0.2)
    got = tfl.representative_samples(2, 128, representative=[np.zeros((128, 128))] * 4)
    assert got.shape == (2, 128, 128, 1)
    fallback = tfl.representative_samples(4, 128, seed=1)
    np.testing.assert_array_equal(fallback, structured_samples(4, 128, 1))
    assert 0.0 <= fallback.min() and fallback.max() <= 1.0 and fallback.std() > 0.1
    with pytest.raises(InputError, match="empty"):
        tfl.representative_samples(3, 128, representative=[])
    with pytest.raises(ConfigError, match="unknown TFLite variant"):
        tfl.convert_tflite(None, ["int4"])


@pytest.mark.slow
def test_cli_export_tflite_calibrated_on_a_cache(tmp_path, capsys):
    """`kneetf export --tflite --data CACHE`: int8 calibrated on cache samples, files inside
    the version folder, the report checked against Keras."""
    from kneetf.cli.main import main
    from kneetf.data.pipeline import make_dataset
    from kneetf.data.sources import build_synthetic_cache

    cache = tmp_path / "cache"
    build_synthetic_cache(cache, n=6, workers=0, progress=False, fractions=(1.0, 0.0, 0.0))
    samples = tfl.samples_from_cache(cache, 4)
    first = next(iter(make_dataset(cache, "train", batch_size=4)))[0].numpy()
    np.testing.assert_array_equal(samples, first)
    model = serving_server.make_test_model(tmp_path / "model.keras", "tiny", seed=1)
    base = tmp_path / "saved_models" / "kneetf"
    assert main(["export", str(model), "--out", str(base), "--tflite", "--data", str(cache),
                 "--calibration-samples", "4", "--no-warmup"]) == 0
    text = capsys.readouterr().out
    assert "int8" in text and "PSNR" in text
    report = json.loads((base / "1" / "tflite" / tfl.REPORT_FILE).read_text())
    assert report["calibration"] == str(cache)
    assert set(report["variants"]) == {"fp32", "fp16", "int8"}
    assert report["variants"]["fp32"]["outputs"]["mri"]["max_abs_diff"] < 1e-5
    info = json.loads((base / "1" / "kneetf_export.json").read_text())
    assert info["tflite"]["int8"]["path"] == "tflite/kneetf_int8.tflite"



@pytest.mark.slow
def test_int8_of_a_trained_default_recipe_model_keeps_its_mri(tmp_path):
    """The default recipe's kernel ridge prior and its logit-space template sum, quantised to
    int8, lost the MRI of a trained model (20 dB against Keras, 0.94 at most); kept in float32
    they do not."""
    import keras

    from kneetf.cli.main import main

    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--synthetic-n", "16", "--epochs", "1", "--seed", "0",
                 "--out", str(run), "--workers", "0", "--no-progress"]) == 0
    model = keras.saving.load_model(run / "model.keras", compile=False, safe_mode=True)
    cache = run / "data" / "synthetic-n16-seed0"
    x = tfl.samples_from_cache(cache, 16)
    report = tfl.export_tflite(model, tmp_path / "tflite", ["int8"], representative=iter(x[:-4]), check=x[-4:])
    mri = report["int8"]["outputs"]["mri"]
    assert mri["psnr"] > 35 and mri["max_abs_diff"] < 0.2, mri
    m = TFLiteModel(report["int8"]["path"])  # still int8 at the edges, for integer-only hardware
    assert m.quantized and m.input_dtype == np.int8
    assert all(np.dtype(m._outputs[k]["dtype"]) == np.int8 for k in OUTPUT_KEYS)
