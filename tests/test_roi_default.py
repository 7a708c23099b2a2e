"""The built-in detector is the default ROI source: of `roi_source`, of `kneetf prepare`
without ROI options (recorded, copied into the cache, part of the cache key), of `kneetf
predict` and the Python API for a model that records no other source; the classical fallback
is chosen by name."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kneetf.cli.main import main
from kneetf.data.synthetic import write_synthetic_dataset

sys.path.insert(0, str(Path(__file__).parent))
from roi_factory import laden_knee  # noqa: E402  (tests/roi_factory.py)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def laden(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A manifest of three hospital-style knee DICOMs (0.3 mm pixels, one MONOCHROME1) with
    synthetic MRIs, and the X-rays' true boxes."""
    from kneetf.io.writers import write_dicom_xray

    root = tmp_path_factory.mktemp("laden")
    write_synthetic_dataset(root / "synth", n=3, seed=4, workers=0, progress=False)
    lines, truth = ["id,xray,mri,split"], {}
    for k, r in enumerate(_rows(root / "synth" / "manifest.csv")):
        image, box, spacing = laden_knee(k)
        write_dicom_xray(root / f"{r['id']}.dcm", image, pixel_spacing=spacing,
                         photometric="MONOCHROME1" if k == 1 else "MONOCHROME2")
        truth[r["id"]] = box
        lines.append(f"{r['id']},{r['id']}.dcm,synth/{r['mri']},train")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root, truth


def test_the_default_source_loads_tensorflow_only_when_an_xray_needs_it() -> None:
    """Built without TensorFlow, once per process; a constant image is refused before the
    detector (which would box it anyway) loads."""
    code = ("import sys, numpy\n"
            "from kneetf.errors import RoiNotFoundError\n"
            "from kneetf.preprocess.roi import find_roi\n"
            "from kneetf.preprocess.xray import roi_source\n"
            "s = roi_source()\n"
            "assert type(s).__name__ == 'DetectorRoi' and str(s.path) == 'builtin', s\n"
            "assert roi_source(detector='builtin') is s\n"
            "try:\n"
            "    find_roi(s, 'z', numpy.full((64, 64), 7.0), where='z.png')\n"
            "    raise SystemExit('a constant image was boxed')\n"
            "except RoiNotFoundError as e:\n"
            "    assert 'the image is constant' in str(e) and 'z.png' in str(e), e\n"
            "assert 'tensorflow' not in sys.modules, 'TensorFlow loaded before any X-ray'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_resolved_detector_names_the_choice() -> None:
    from kneetf.preprocess.roi_detector_config import is_named_source, resolved_detector

    assert resolved_detector() == "builtin"
    assert resolved_detector(rois="boxes.csv") is None
    assert resolved_detector(detector="classical") is None
    assert resolved_detector(detector=Path("det.keras")) == "det.keras"
    assert is_named_source("builtin") and is_named_source("classical") and not is_named_source("det.keras")


def test_the_builtin_detector_is_part_of_the_cache_key() -> None:
    from kneetf.data.sources import FilePayload, file_sha256
    from kneetf.preprocess.roi_detector_config import BUILTIN_DETECTOR

    builtin = FilePayload(id="a", xray="a.dcm", mri="m", side="", box=None, detector="builtin")
    classical = FilePayload(id="a", xray="a.dcm", mri="m", side="", box=None, detector=None)
    assert file_sha256(BUILTIN_DETECTOR)[:16] in builtin.cache_key()
    assert "classical/" in classical.cache_key() and builtin.cache_key() != classical.cache_key()
    assert builtin.input_files() == ("a.dcm", "m")  # a name, not a file to stamp or to keep out of --out


def test_prepare_without_roi_options_uses_the_builtin_detector(laden: tuple[Path, dict], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The knees are found by the built-in detector; the cache records it with its SHA-256 and
    keeps a copy; preparing again reuses the shards, and switching to the classical fallback
    by name rebuilds them."""
    from kneetf.data.sources import file_sha256
    from kneetf.preprocess.roi_detector_config import BUILTIN_DETECTOR

    root, truth = laden
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.chdir(cache)  # "builtin" is no file that --out . could hold
    argv = ["prepare", str(root / "manifest.csv"), "--out", ".", "--workers", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    record = json.loads((cache / "dataset.json").read_text())["source"]["roi"]
    assert record == {"source": "detector", "name": "builtin", "sha256": file_sha256(BUILTIN_DETECTOR),
                      "file": "roi_detector.keras"}
    assert file_sha256(cache / "roi_detector.keras") == record["sha256"]
    rows = {r["id"]: r for r in _rows(cache / "rois.csv")}
    assert sorted(rows) == sorted(truth)
    for case_id, r in rows.items():
        box, true = [float(r[k]) for k in ("x0", "y0", "x1", "y1")], truth[case_id]
        assert r["source"] == "detector:builtin" and 0.0 < float(r["confidence"]) <= 1.0
        assert abs((box[0] + box[2]) / 2 - true.cx) < 0.15 * true.width
        assert abs((box[1] + box[3]) / 2 - true.cy) < 0.15 * true.width
    assert "ROI boxes: detector:builtin 3" in out
    assert main(argv) == 0
    assert "1 shard(s) were already complete" in capsys.readouterr().out
    assert main(argv + ["--roi-detector", "classical"]) == 0
    assert "0 shard(s) were already complete" in capsys.readouterr().out
    assert json.loads((cache / "dataset.json").read_text())["source"]["roi"]["source"] == "classical"
    assert {r["source"] for r in _rows(cache / "rois.csv")} == {"classical"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model file with no ROI record beside it."""
    from kneetf.models.kneenet import KneeNet

    path = tmp_path_factory.mktemp("model") / "model.keras"
    KneeNet.from_preset("tiny").save(path)
    return path


def test_predict_crops_with_the_builtin_detector_when_the_model_records_no_source(
        laden: tuple[Path, dict], model: Path, tmp_path: Path) -> None:
    from kneetf.api import Reconstructor

    root, truth = laden
    case_id = sorted(truth)[0]
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(model), str(root / f"{case_id}.dcm"), "--out", str(out)]) == 0
    (row,) = _rows(out / "predictions.csv")
    assert row["roi_source"] == "detector:builtin"
    box, true = [float(row[k]) for k in ("x0", "y0", "x1", "y1")], truth[case_id]
    assert abs((box[0] + box[2]) / 2 - true.cx) < 0.15 * true.width
    reconstructor = Reconstructor.load(model)
    assert str(reconstructor.roi.path) == "builtin"
    result = reconstructor.predict(root / f"{case_id}.dcm")  # the file: its pixel spacing is used
    assert result.box.as_tuple() == pytest.approx(tuple(box), abs=1.0)


def test_predict_reports_the_boxes_its_roi_source_flagged(laden: tuple[Path, dict], model: Path,
                                                          tmp_path: Path) -> None:
    """A detector boxes every non-constant image; the boxes it is unsure of are listed."""
    from types import SimpleNamespace

    from kneetf.inference.batch import predict_files
    from kneetf.preprocess.roi import Box

    class Unsure:
        def detection_for(self, case_id, image, pixel_spacing=None):
            side = float(min(image.shape[:2]))
            return SimpleNamespace(box=Box(0.0, 0.0, side, side), confidence=0.1, flagged=True)

        def box_for(self, case_id, image):
            return self.detection_for(case_id, image).box

    root, truth = laden
    first, second = sorted(truth)[:2]
    report = predict_files(model, [root / f"{first}.dcm"], tmp_path / "out", roi=Unsure(), progress=False,
                           names="id")
    assert report.flagged == [first]
    (row,) = _rows(tmp_path / "out" / "predictions.csv")
    assert row["roi_flagged"] == "1" and row["roi_confidence"] == "0.1"
    report = predict_files(model, [root / f"{second}.dcm"], tmp_path / "out2", progress=False, names="id")
    assert report.flagged == [] and _rows(tmp_path / "out2" / "predictions.csv")[0]["roi_flagged"] == "0"


def _run(root: Path, model: Path, roi: dict) -> Path:
    """A run folder of the tiny model whose training data recorded the ROI source `roi`."""
    import shutil

    from kneetf.config import PreprocessConfig, to_dict

    root.mkdir(parents=True)
    shutil.copyfile(model, root / "model.keras")
    (root / "config.json").write_text(json.dumps({"preprocess": to_dict(PreprocessConfig()),
                                                  "data": {"kind": "manifest", "roi": roi}}))
    return root


def test_recorded_sources_and_explicit_names(model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """'classical' for a model trained on classical crops keeps their box convention; a run
    trained on the built-in detector's crops whose copy is gone uses the shipped one quietly."""
    import logging

    from kneetf.data.sources import builtin_detector_sha256
    from kneetf.inference.loading import model_roi_source
    from kneetf.preprocess.roi import ClassicalRoi

    classical = _run(tmp_path / "classical", model, {"source": "classical", "version": 6, "box_mm": 96.0})
    for chosen in ({"detector": "classical"}, {"roi": "classical"}):
        source = model_roi_source(classical, **chosen)
        assert isinstance(source, ClassicalRoi) and source.box_mm == 96.0
    assert str(model_roi_source(classical).box_mm) == "96.0"
    builtin = _run(tmp_path / "builtin", model, {"source": "detector", "name": "builtin",
                                                 "sha256": builtin_detector_sha256(), "file": "roi_detector.keras"})
    with caplog.at_level(logging.WARNING):
        source = model_roi_source(builtin)  # roi_detector.keras is not beside the model
    assert str(source.path) == "builtin" and "not beside it" not in caplog.text
