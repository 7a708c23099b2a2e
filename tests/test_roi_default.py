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
    code = ("import sys\n"
            "from kneetf.preprocess.xray import roi_source\n"
            "s = roi_source()\n"
            "assert type(s).__name__ == 'DetectorRoi' and str(s.path) == 'builtin', s\n"
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


def test_prepare_without_roi_options_uses_the_builtin_detector(laden: tuple[Path, dict], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The knees are found by the built-in detector; the cache records it with its SHA-256 and
    keeps a copy; preparing again reuses the shards, and switching to the classical fallback
    by name rebuilds them."""
    from kneetf.data.sources import file_sha256
    from kneetf.preprocess.roi_detector_config import BUILTIN_DETECTOR

    root, truth = laden
    cache = tmp_path / "cache"
    argv = ["prepare", str(root / "manifest.csv"), "--out", str(cache), "--workers", "0"]
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


def test_predict_crops_with_the_builtin_detector_when_the_model_records_no_source(
        laden: tuple[Path, dict], tmp_path: Path) -> None:
    from kneetf.api import Reconstructor
    from kneetf.models.kneenet import KneeNet

    root, truth = laden
    model = tmp_path / "model.keras"
    KneeNet.from_preset("tiny").save(model)
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
