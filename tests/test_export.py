"""SavedModel export: layout, signatures, agreement with Keras, warm-up records, versions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from kneetf.cli.main import main  # noqa: E402
from kneetf.errors import ConfigError, InputError, KneetfError  # noqa: E402
from kneetf.export import (EXPORT_INFO_FILE, OUTPUT_KEYS, SIGNATURE_DEFAULT, SIGNATURE_NORMALIZED,  # noqa: E402
                           SIGNATURE_UINT16, WARMUP_FILE)
from kneetf.export import savedmodel  # noqa: E402
from kneetf.export.samples import structured_samples  # noqa: E402
from kneetf.export.savedmodel import export_savedmodel, next_version, read_batching_config  # noqa: E402
from kneetf.preprocess import ops  # noqa: E402
from kneetf.inference.trust import unsafe_savedmodel_ops  # noqa: E402
from kneetf.protocol import SERVING_BATCH_SIZES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


import serving_server  # noqa: E402  (tests/serving_server.py; pytest puts tests/ on sys.path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """The tiny preset (random weights whose outputs vary) exported once."""
    import keras

    import kneetf.models.kneenet  # noqa: F401

    root = tmp_path_factory.mktemp("export")
    model_path = serving_server.make_test_model(root / "run" / "model.keras", "tiny", seed=3)
    result = export_savedmodel(model_path.parent, root / "saved_models" / "kneetf")
    model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    loaded = tf.saved_model.load(str(result.path))
    return {"root": root, "result": result, "model": model, "loaded": loaded, "model_path": model_path}


def _raw(batch: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Raw detector-like X-rays: structured knees scaled to 12-bit with an offset."""
    rng = np.random.default_rng(seed)
    images = structured_samples(batch, max(h, w), seed)[:, :h, :w, 0]
    return (images * rng.uniform(2000, 4000) + rng.uniform(100, 500)).astype(np.float32)


def _keras(model, x: np.ndarray) -> dict[str, np.ndarray]:
    out = model.predict(x, verbose=0)
    return {k: np.asarray(out[k]) for k in OUTPUT_KEYS}


def _call(loaded, signature: str, x) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in loaded.signatures[signature](xray=tf.constant(x)).items()}


def test_layout_and_info(exported):
    result = exported["result"]
    base = result.path.parent
    assert result.version == 1 and result.path == base / "1"
    assert [p.name for p in base.iterdir()] == ["1"]  # no temporary folder left behind
    assert unsafe_savedmodel_ops(result.path) == {}  # loads without --trust-model
    for name in ("saved_model.pb", "variables", WARMUP_FILE, EXPORT_INFO_FILE):
        assert (result.path / name).exists(), name
    info = json.loads((result.path / EXPORT_INFO_FILE).read_text())
    assert info["version"] == 1 and info["model_name"] == "kneetf"
    assert info["preprocess"]["image_size"] == 128 and info["preprocess"]["low_percentile"] == 0.5
    assert info["model"]["encoder_filters"] == [2, 2, 4, 4, 8, 8]  # the tiny preset's config
    assert set(info["signatures"]) == {SIGNATURE_DEFAULT, SIGNATURE_UINT16, SIGNATURE_NORMALIZED}
    assert max(info["verify_max_abs_diff"].values()) <= 1e-5


def test_signature_specs(exported):
    loaded = exported["loaded"]
    assert {SIGNATURE_DEFAULT, SIGNATURE_UINT16, SIGNATURE_NORMALIZED} <= set(loaded.signatures)
    expected = {SIGNATURE_DEFAULT: (tf.float32, [None, None, None, 1]),
                SIGNATURE_UINT16: (tf.uint16, [None, None, None, 1]),
                SIGNATURE_NORMALIZED: (tf.float32, [None, 128, 128, 1])}
    for name, (dtype, shape) in expected.items():
        fn = loaded.signatures[name]
        spec = fn.structured_input_signature[1]
        assert list(spec) == ["xray"]
        assert spec["xray"].dtype == dtype and spec["xray"].shape.as_list() == shape
        outputs = fn.structured_outputs
        assert set(outputs) == {"xray_recon", "mri"}  # named, never output_0
        assert outputs["mri"].shape.as_list() == [None, 128, 128, 20]
        assert outputs["xray_recon"].shape.as_list() == [None, 128, 128, 1]


def test_matches_keras_on_the_same_preprocessed_input(exported):
    model, loaded = exported["model"], exported["loaded"]
    raw = _raw(2, 128, 128, seed=1)
    normalized = ops.preprocess_xray(raw[..., None]).numpy()
    reference = _keras(model, normalized)
    for signature, x in ((SIGNATURE_NORMALIZED, normalized), (SIGNATURE_DEFAULT, raw[..., None])):
        got = _call(loaded, signature, x)
        for k in OUTPUT_KEYS:
            np.testing.assert_allclose(got[k], reference[k], atol=1e-5, err_msg=f"{signature}/{k}")
    # the comparison means something: other inputs give other outputs
    other = _keras(model, ops.preprocess_xray(_raw(2, 128, 128, seed=9)[..., None]).numpy())
    assert np.max(np.abs(other["xray_recon"] - reference["xray_recon"])) > 1e-3


@pytest.mark.parametrize("h, w", [(300, 257), (64, 90)])
def test_any_size_equals_resize_then_predict(exported, h, w):
    model, loaded = exported["model"], exported["loaded"]
    raw = _raw(2, h, w, seed=h)[..., None]
    resized = ops.resize(raw, 128).numpy()
    normalized = ops.robust_normalize(resized, 0.5, 99.5).numpy()
    reference = _keras(model, normalized)
    got = _call(loaded, SIGNATURE_DEFAULT, raw)
    for k in OUTPUT_KEYS:
        np.testing.assert_allclose(got[k], reference[k], atol=1e-5)


def test_uint16_signature_equals_float(exported):
    loaded = exported["loaded"]
    raw = np.round(_raw(1, 200, 180, seed=4)).astype(np.uint16)[..., None]
    as_uint16 = _call(loaded, SIGNATURE_UINT16, raw)
    as_float = _call(loaded, SIGNATURE_DEFAULT, raw.astype(np.float32))
    for k in OUTPUT_KEYS:
        np.testing.assert_array_equal(as_uint16[k], as_float[k])


def test_warmup_records_replay(exported):
    from tensorflow_serving.apis import prediction_log_pb2

    loaded = exported["loaded"]
    records = list(tf.data.TFRecordDataset(str(exported["result"].path / WARMUP_FILE)).as_numpy_iterator())
    seen = set()
    for blob in records:
        log = prediction_log_pb2.PredictionLog.FromString(blob)
        request = log.predict_log.request
        assert request.model_spec.name == "kneetf"
        signature = request.model_spec.signature_name
        x = tf.make_ndarray(request.inputs["xray"])  # TF's own decoder, not kneetf's
        seen.add((signature, len(x)))
        assert x.shape[1:] == (128, 128, 1)
        assert x.dtype == (np.uint16 if signature == SIGNATURE_UINT16 else np.float32)
        out = _call(loaded, signature, x)  # what TF Serving does at load time
        assert out["mri"].shape == (len(x), 128, 128, 20)
        assert set(request.output_filter) == set(OUTPUT_KEYS)
    # every signature at every batch size the serving batching config allows
    allowed = read_batching_config(REPO / "serving" / "batching.config")
    assert allowed == SERVING_BATCH_SIZES
    assert seen == {(sig, b) for sig in (SIGNATURE_DEFAULT, SIGNATURE_UINT16, SIGNATURE_NORMALIZED) for b in allowed}
    assert exported["result"].info["warmup"]["batch_sizes"] == list(allowed)


def test_read_batching_config(tmp_path):
    (tmp_path / "list.config").write_text("max_batch_size { value: 8 }  # comment: allowed_batch_sizes: 99\n"
                                          "allowed_batch_sizes: [2, 8]\nallowed_batch_sizes: 4\n")
    assert read_batching_config(tmp_path / "list.config") == (2, 4, 8)
    (tmp_path / "max.config").write_text("max_batch_size { value: 12 }\nbatch_timeout_micros { value: 5 }\n")
    assert read_batching_config(tmp_path / "max.config") == (1, 2, 4, 8, 12)
    (tmp_path / "none.config").write_text("batch_timeout_micros { value: 5 }\n")
    with pytest.raises(InputError, match="none.config.*neither"):
        read_batching_config(tmp_path / "none.config")
    (tmp_path / "binary.config").write_bytes(bytes(range(256)))
    with pytest.raises(InputError, match="binary.config: is not a text file"):
        read_batching_config(tmp_path / "binary.config")
    (tmp_path / "huge.config").write_text("max_batch_size { value: 1000000000 }\n")  # GBs of warm-up requests
    with pytest.raises(InputError, match=r"huge.config: batch sizes must lie in \[1, 1024\]"):
        read_batching_config(tmp_path / "huge.config")


@pytest.mark.slow
def test_cli_export_reads_run_config_and_takes_next_version(exported, tmp_path, capsys):
    """`kneetf export RUN`: the run's config.json percentiles reach the graph; the next free
    version is taken (temporary folders ignored)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(exported["model_path"].read_bytes())
    (run / "config.json").write_text(json.dumps({"preset": "tiny", "preprocess": {
        "image_size": 128, "low_percentile": 5.0, "high_percentile": 90.0, "cache_hash": "ignored"}}))
    base = tmp_path / "saved_models" / "kneetf"
    (base / "3").mkdir(parents=True)
    (base / ".tmp-4-junk").mkdir()
    assert next_version(base) == 4
    assert main(["export", str(run), "--out", str(base), "--no-warmup", "--no-verify"]) == 0
    text = capsys.readouterr().out
    assert "version 4" in text and "serving_uint16" in text
    info = json.loads((base / "4" / EXPORT_INFO_FILE).read_text())
    assert info["preset"] == "tiny" and info["preprocess"]["low_percentile"] == 5.0
    assert not (base / "4" / WARMUP_FILE).exists()
    loaded = tf.saved_model.load(str(base / "4"))
    raw = _raw(1, 150, 150, seed=5)[..., None]
    reference = _keras(exported["model"], ops.preprocess_xray(raw, 128, 5.0, 90.0).numpy())
    default = _keras(exported["model"], ops.preprocess_xray(raw, 128, 0.5, 99.5).numpy())
    got = _call(loaded, SIGNATURE_DEFAULT, raw)
    np.testing.assert_allclose(got["xray_recon"], reference["xray_recon"], atol=1e-5)
    assert np.max(np.abs(got["xray_recon"] - default["xray_recon"])) > 1e-4


def test_existing_version_refused_and_failed_export_leaves_nothing(exported, tmp_path, monkeypatch, capsys):
    base = exported["result"].path.parent
    with pytest.raises(ConfigError, match="already exists"):
        export_savedmodel(exported["model"], base, version=1)
    assert main(["export", str(exported["model_path"]), "--out", str(base), "--version", "1"]) == 1
    assert "already exists" in capsys.readouterr().err

    def broken(model, preprocess, directory):
        (Path(directory) / "saved_model.pb").write_bytes(b"half")
        raise RuntimeError("disk full")

    out = tmp_path / "models"
    monkeypatch.setattr(savedmodel, "write_savedmodel", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_savedmodel(exported["model"], out, version=2)
    assert list(out.iterdir()) == []  # neither 2/ nor a temporary folder


def test_verify_rejects_a_drifting_export(exported, monkeypatch):
    monkeypatch.setattr(savedmodel, "VERIFY_TOLERANCE", -1.0)  # every comparison fails
    with pytest.raises(KneetfError, match="differs from the Keras model"):
        savedmodel.verify_export(exported["result"].path, exported["model"], savedmodel.PreprocessConfig())


def test_bad_sources(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(InputError, match="without model.keras"):
        savedmodel.load_for_export(tmp_path / "empty_run")
    with pytest.raises(InputError, match="no such model file"):
        savedmodel.load_for_export(tmp_path / "missing.keras")
    (tmp_path / "model.h5").write_bytes(b"x")
    with pytest.raises(InputError, match=".keras"):
        savedmodel.load_for_export(tmp_path / "model.h5")
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 1
    assert "nope" in capsys.readouterr().err
