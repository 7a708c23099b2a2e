"""The ROI source a model was trained with travels with it: the cache records it, training
copies it (and the detector) into the run folder, export into the SavedModel, and `kneetf
predict`, `Reconstructor` and the client crop new X-rays the same way unless told otherwise."""
from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from kneetf.config import PreprocessConfig, to_dict
from kneetf.errors import InputError
from kneetf.preprocess.roi import ClassicalRoi, CsvRoi, write_boxes

sys.path.insert(0, str(Path(__file__).parent))
from roi_factory import laden_knee, standin_set  # noqa: E402  (tests/roi_factory.py)

SPACING = 0.3


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kneetf.models.kneenet import KneeNet

    path = tmp_path_factory.mktemp("model") / "model.keras"
    KneeNet.from_preset("tiny").save(path)
    return path


def _run(root: Path, model_file: Path, roi: dict | None) -> Path:
    """A run folder of the tiny model whose training data recorded `roi` (None: nothing, as a
    run written before the record existed)."""
    import shutil

    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, root / "model.keras")
    data = {"kind": "manifest", "roi": roi} if roi is not None else {"kind": "manifest"}
    (root / "config.json").write_text(json.dumps({"preprocess": to_dict(PreprocessConfig()), "data": data}))
    return root


@pytest.fixture(scope="module")
def xrays(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Two hospital-style knee DICOMs (0.3 mm pixels) and their true boxes."""
    from kneetf.io.writers import write_dicom_xray

    folder = tmp_path_factory.mktemp("xrays")
    truth = {}
    for k in range(2):
        image, box, spacing = laden_knee(k)
        write_dicom_xray(folder / f"k{k}.dcm", image, pixel_spacing=spacing)
        truth[f"k{k}"] = box
    return folder, truth


def test_predict_crops_with_the_recorded_classical_convention(tmp_path, model_file, xrays, caplog):
    from kneetf.api import Reconstructor
    from kneetf.cli.main import main

    folder, truth = xrays
    run = _run(tmp_path / "run", model_file, {"source": "classical", "version": 2, "box_mm": 96.0,
                                               "side_scale": 1.45})
    with caplog.at_level(logging.WARNING):
        assert main(["predict", "--model", str(run), str(folder), "--out", str(tmp_path / "out"),
                     "--no-progress", "--names", "id"]) == 0
    assert "trained on crops" not in caplog.text
    rows = {r["id"]: r for r in _rows(tmp_path / "out" / "predictions.csv")}
    assert sorted(rows) == ["k0", "k1"]
    for case_id, r in rows.items():
        assert r["roi_source"] == "classical" and 0 < float(r["roi_confidence"]) <= 1
        assert float(r["x1"]) - float(r["x0"]) == pytest.approx(96.0 / SPACING, abs=0.01)  # the recorded 96 mm
        assert abs((float(r["x0"]) + float(r["x1"])) / 2 - truth[case_id].cx) < 0.05 * truth[case_id].width
    rec = Reconstructor.load(run)
    assert isinstance(rec.roi, ClassicalRoi) and rec.roi.box_mm == 96.0
    assert rec.predict(folder / "k0.dcm").box.width == pytest.approx(96.0 / SPACING)


def test_an_explicit_roi_wins_and_a_mismatch_is_warned(tmp_path, model_file, xrays, caplog):
    from kneetf.api import Reconstructor
    from kneetf.cli.main import main

    folder, truth = xrays
    write_boxes(tmp_path / "boxes.csv", truth)
    run = _run(tmp_path / "run", model_file, {"source": "classical", "version": 2, "box_mm": 100.0})
    with caplog.at_level(logging.WARNING):
        assert main(["predict", "--model", str(run), str(folder), "--out", str(tmp_path / "out"),
                     "--rois", str(tmp_path / "boxes.csv"), "--no-progress", "--names", "id"]) == 0
    assert "was trained on crops from the classical ROI; cropping with boxes from boxes.csv" in caplog.text
    rows = {r["id"]: r for r in _rows(tmp_path / "out" / "predictions.csv")}
    assert {r["roi_source"] for r in rows.values()} == {"csv"}
    assert float(rows["k1"]["x0"]) == pytest.approx(truth["k1"].x0, abs=0.01)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert isinstance(Reconstructor.load(run, roi="classical").roi, ClassicalRoi)  # the same source: quiet
    assert "trained on crops" not in caplog.text


@pytest.mark.parametrize("record, warns", [(None, False), ({"source": "truth"}, False),
                                           ({"source": "csv", "boxes": "rois.csv"}, True)])
def test_models_without_a_reusable_source_default_to_the_builtin_detector(tmp_path, model_file, record, warns,
                                                                         caplog):
    from kneetf.inference.loading import model_roi_source
    from kneetf.preprocess.roi_detector_source import DetectorRoi

    run = _run(tmp_path / "run", model_file, record)
    with caplog.at_level(logging.WARNING):
        source = model_roi_source(run)
    assert isinstance(source, DetectorRoi) and str(source.path) == "builtin"
    assert ("give their boxes" in caplog.text) == warns


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained ROI detector file."""
    rd = pytest.importorskip("kneetf.preprocess.roi_detector")
    tr = pytest.importorskip("kneetf.training.roi")
    images, boxes = standin_set(8, seed=0)
    model, _ = tr.train_detector(images, boxes, config=rd.TINY_DETECTOR,
                                 train=tr.RoiTrainConfig(epochs=1, batch_size=4), steps_per_epoch=1)
    return rd.save_detector(model, tmp_path_factory.mktemp("det") / "det.keras")


def test_a_detector_travels_from_the_cache_to_the_run_and_the_export(tmp_path, model_file, detector, caplog):
    """prepare --roi-detector keeps a copy and its hash; training copies it into the run folder;
    export into the SavedModel; predict and the client crop with that copy by default."""
    from kneetf.data.sources import copy_roi_detector, file_sha256, roi_record
    from kneetf.inference.loading import model_roi_source, read_roi_record

    record = roi_record(detector=detector)
    assert record == {"source": "detector", "name": "det.keras", "sha256": file_sha256(detector),
                      "file": "roi_detector.keras"}
    # a cache holding the copy, as prepare leaves it; training copies it beside the model
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "roi_detector.keras").write_bytes(detector.read_bytes())
    (cache / "dataset.json").write_text(json.dumps({"counts": {}, "shards": {}, "shapes": {}, "preprocess": {},
                                                    "source": {"kind": "manifest", "roi": record}}))
    run = _run(tmp_path / "run", model_file, record)
    assert copy_roi_detector(cache, run) == run / "roi_detector.keras"
    assert read_roi_record(run) == (record, run)
    source = model_roi_source(run)
    assert Path(source.path) == run / "roi_detector.keras"
    image = standin_set(1, seed=5)[0][0]
    assert model_roi_source(run / "model.keras").box_for("x", image) == source.box_for("x", image)
    # another detector given explicitly: used, with a warning
    other = tmp_path / "other.keras"
    other.write_bytes(detector.read_bytes() + b"\0")  # same weights, another file: another hash
    with caplog.at_level(logging.WARNING):
        assert Path(model_roi_source(run, detector=other).path) == other
    assert "was trained on crops from the ROI detector det.keras; cropping with the ROI detector other.keras" \
        in caplog.text
    # the copy beside the model replaced by another file: refused, not silently used
    (run / "roi_detector.keras").write_bytes(detector.read_bytes() + b"\0")
    with pytest.raises(InputError, match="SHA-256 differs"):
        model_roi_source(run)
    # the detector missing: the built-in detector, with a warning
    (run / "roi_detector.keras").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert str(model_roi_source(run).path) == "builtin"
    assert "not beside it" in caplog.text and "cropping with the built-in ROI detector" in caplog.text


def test_the_client_crops_with_the_recorded_source(tmp_path, model_file, xrays):
    from kneetf.client.request import crop_to_roi
    from kneetf.inference.loading import model_roi_source
    from kneetf.io.readers import read_xray
    from kneetf.preprocess.roi import crop_box

    folder, truth = xrays
    run = _run(tmp_path / "run", model_file, {"source": "classical", "version": 2, "box_mm": 100.0})
    crop = crop_to_roi(folder / "k0.dcm", model_roi_source(run))
    assert crop.shape == (round(100.0 / SPACING),) * 2
    image = read_xray(folder / "k0.dcm")[0]
    box = ClassicalRoi().box_for("k0", image, SPACING)
    np.testing.assert_array_equal(crop, crop_box(image, box))
    # boxes by file stem
    np.testing.assert_array_equal(crop_to_roi(folder / "k1.dcm", CsvRoi({"k1": truth["k1"]})),
                                  crop_box(read_xray(folder / "k1.dcm")[0], truth["k1"]))


@pytest.mark.slow
def test_prepare_train_export_predict_keep_the_detector(tmp_path, detector):
    """The whole way: prepare with a detector, train, export, predict from the export."""
    from kneetf.cli.main import main
    from kneetf.data.synthetic import write_synthetic_dataset

    data = tmp_path / "synth"
    write_synthetic_dataset(data, n=6, seed=2, formats=("dicom",), workers=0, progress=False)
    cache, run, export = tmp_path / "cache", tmp_path / "run", tmp_path / "export"
    assert main(["prepare", str(data / "manifest.csv"), "--out", str(cache), "--roi-detector", str(detector),
                 "--workers", "0"]) == 0
    info = json.loads((cache / "dataset.json").read_text())
    assert info["source"]["roi"]["source"] == "detector" and (cache / "roi_detector.keras").is_file()
    assert {r["source"] for r in _rows(cache / "rois.csv")} == {"detector:det.keras"}
    assert main(["train", "--preset", "tiny", "--data", str(cache), "--epochs", "1", "--batch-size", "2",
                 "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["roi"] == info["source"]["roi"]
    assert (run / "roi_detector.keras").read_bytes() == detector.read_bytes()
    assert main(["export", str(run), "--out", str(export), "--no-verify"]) == 0
    version = next(p for p in export.iterdir() if p.name.isdigit())
    exported = json.loads((version / "kneetf_export.json").read_text())
    assert exported["roi"]["file"] == "assets.extra/roi_detector.keras"
    assert (version / "assets.extra" / "roi_detector.keras").read_bytes() == detector.read_bytes()
    assert main(["predict", "--model", str(export), str(data / "xray"), "--out", str(tmp_path / "out"),
                 "--no-progress", "--names", "id"]) == 0
    assert {r["roi_source"] for r in _rows(tmp_path / "out" / "predictions.csv")} == {"detector:roi_detector.keras"}
