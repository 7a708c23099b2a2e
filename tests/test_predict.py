"""`kneetf predict` and `kneetf.inference` on generated PNG / .npy / DICOM X-rays with a tiny model."""
from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest

from kneetf.config import PreprocessConfig, to_dict
from xray_factory import knee_xray as _xray

BOX = (30.0, 20.0, 130.0, 120.0)  # x0, y0, x1, y1: a 100 px square


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two run folders of one tiny model: one plain, one whose preprocessing mirrors left knees."""
    from kneetf.models.kneenet import KneeNet

    root = tmp_path_factory.mktemp("runs")
    model = KneeNet.from_preset("tiny")
    out = {}
    for name, prep in (("plain", PreprocessConfig()), ("mirror", PreprocessConfig(mirror_left=True))):
        run = root / name
        run.mkdir()
        model.save(run / "model.keras")
        (run / "config.json").write_text(json.dumps({"preprocess": to_dict(prep)}))
        out[name] = run
    return out


def _inputs(folder) -> dict:
    """PNG, .npy and DICOM X-rays (+ a boxes CSV) in `folder`; returns name -> raw array."""
    from kneetf.io.writers import write_dicom_xray, write_png
    from kneetf.preprocess.roi import Box, write_boxes

    folder.mkdir(parents=True, exist_ok=True)
    images = {"a_png": _xray(1), "b_npy": _xray(2), "c_dcm": _xray(3)}
    write_png(folder / "a_png.png", np.round(images["a_png"]).astype("uint16"))
    np.save(folder / "b_npy.npy", images["b_npy"])
    write_dicom_xray(folder / "c_dcm.dcm", np.round(images["c_dcm"]), laterality="L",
                     patient={"PatientName": "Doe^Jane", "PatientID": "P123", "PatientBirthDate": "19600101"})
    images["c_dcm"] = np.round(images["c_dcm"])
    images["a_png"] = np.round(images["a_png"])
    write_boxes(folder / "boxes.csv", {k: Box(*BOX) for k in images})
    return images


def _expected(model, image, mirror: bool) -> np.ndarray:
    """Independent reference: crop, (mirror), shared TF preprocessing, model.predict."""
    from kneetf.preprocess import ops
    from kneetf.preprocess.roi import Box, crop_box

    crop = crop_box(image, Box(*BOX))
    assert crop.shape == (100, 100)
    if mirror:
        crop = crop[:, ::-1]
    x = ops.preprocess_xray(crop[None, :, :, None].astype("float32")).numpy()
    mri = model.predict(x, verbose=0)["mri"][0]  # (H, W, slices)
    vol = np.transpose(mri, (2, 0, 1))
    return vol[::-1] if mirror else vol


def _snapshot(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


def _read_nifti(path) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    assert data.shape[0] == 20  # the documented layout: (slices, rows, columns) in the file itself
    return data, img.affine, data.dtype


def test_predict_cli_writes_nifti_dicom_png(tmp_path, runs, capsys):
    import pydicom

    from kneetf.cli.main import main
    from kneetf.io.writers import nifti_affine
    from kneetf.inference.loading import load_model
    from kneetf.inference.outputs import NOMINAL_SPACING

    images = _inputs(tmp_path / "in")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    before = _snapshot(tmp_path)
    out = tmp_path / "out"
    rc = main(["predict", "--model", str(runs["plain"]), str(tmp_path / "in"), "--out", str(out),
               "--format", "nifti,dicom,png", "--rois", str(tmp_path / "in" / "boxes.csv"), "--no-progress",
               "--names", "id"])
    assert rc == 4  # some inputs failed, the rest were written
    captured = capsys.readouterr()
    assert "wrote 3 of 4" in captured.out
    assert "broken" in captured.err

    model = load_model(runs["plain"])
    for name, image in images.items():
        vol, affine, dtype = _read_nifti(out / f"{name}.nii.gz")
        assert vol.shape == (20, 128, 128) and dtype == np.float32
        np.testing.assert_allclose(vol, _expected(model, image, mirror=False), atol=1e-5)
        np.testing.assert_allclose(affine, nifti_affine(NOMINAL_SPACING)[:, [2, 1, 0, 3]], atol=1e-6)
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"

    # DICOM: derived, anonymous by default, new UIDs, values within the 16-bit quantisation
    src = pydicom.dcmread(tmp_path / "in" / "c_dcm.dcm")
    files = sorted((out / "c_dcm_dicom").iterdir())
    assert len(files) == 20
    series = [pydicom.dcmread(f) for f in files]
    series.sort(key=lambda d: int(d.InstanceNumber))
    first = series[0]
    assert list(first.ImageType) == ["DERIVED", "SECONDARY"]
    assert "kneetf" in first.SeriesDescription and "reconstruction" in first.SeriesDescription
    assert "not for diagnostic use" in first.ImageComments
    assert first.Modality == "MR"
    assert str(first.PatientName) != "Doe^Jane" and first.PatientID != "P123"
    assert first.StudyInstanceUID != src.StudyInstanceUID and first.SeriesInstanceUID != src.SeriesInstanceUID
    uids = {d.SOPInstanceUID for d in series}
    assert len(uids) == 20 and src.SOPInstanceUID not in uids
    assert len({d.StudyInstanceUID for d in series}) == 1
    dcm_vol = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in series])
    nii_vol, _, _ = _read_nifti(out / "c_dcm.nii.gz")
    np.testing.assert_allclose(dcm_vol, nii_vol, atol=float(first.RescaleSlope))

    # failures reported in errors.csv; predictions.csv lists the others; nothing else touched
    errors = list(csv.DictReader((out / "errors.csv").open()))
    assert [e["id"] for e in errors] == ["broken"] and errors[0]["reason"]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert sorted(r["id"] for r in rows) == sorted(images)
    assert {r["side"] for r in rows if r["id"] == "c_dcm"} == {"left"}  # from the DICOM laterality
    after = _snapshot(tmp_path)
    changed = {p for p in after if after[p] != before.get(p)}
    assert changed and all(p == out or out in p.parents for p in changed)
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_keep_patient_and_left_knee_mirroring(tmp_path, runs):
    import pydicom

    from kneetf.inference.batch import predict_files
    from kneetf.inference.loading import load_model
    from kneetf.preprocess.xray import roi_source

    images = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    report = predict_files(runs["mirror"], [tmp_path / "in" / "c_dcm.dcm", tmp_path / "in" / "a_png.png"], out,
                           formats=("nifti", "dicom"), roi=roi_source(tmp_path / "in" / "boxes.csv"),
                           keep_patient=True, progress=False)
    assert report.ok == 2 and not report.errors
    model = load_model(runs["mirror"])
    # c_dcm is a left knee (ImageLaterality L): mirrored for the model, slice order restored
    vol, _, _ = _read_nifti(out / "c_dcm.nii.gz")
    np.testing.assert_allclose(vol, _expected(model, images["c_dcm"], mirror=True), atol=1e-5)
    # a_png has no side: not mirrored
    vol, _, _ = _read_nifti(out / "a_png.nii.gz")
    np.testing.assert_allclose(vol, _expected(model, images["a_png"], mirror=False), atol=1e-5)
    ds = pydicom.dcmread(sorted((out / "c_dcm_dicom").iterdir())[0])
    assert str(ds.PatientName) == "Doe^Jane" and ds.PatientID == "P123" and ds.PatientBirthDate == "19600101"
    assert ds.Laterality == "L"


def test_manifest_input_ids_and_sides(tmp_path, runs):
    from kneetf.inference.batch import predict_files
    from kneetf.inference.loading import load_model
    from kneetf.preprocess.xray import roi_source
    from kneetf.preprocess.roi import Box, write_boxes

    images = _inputs(tmp_path / "in")
    (tmp_path / "in" / "manifest.csv").write_text("id,xray,mri,side\nkneeA,a_png.png,,left\nkneeB,b_npy.npy,,right\n")
    write_boxes(tmp_path / "in" / "ids.csv", {"kneeA": Box(*BOX), "kneeB": Box(*BOX)})
    out = tmp_path / "out"
    report = predict_files(runs["mirror"], [tmp_path / "in" / "manifest.csv"], out,
                           roi=roi_source(tmp_path / "in" / "ids.csv"), progress=False, names="id")
    assert sorted(report.written) == ["kneeA", "kneeB"] and not report.errors
    model = load_model(runs["mirror"])
    vol, _, _ = _read_nifti(out / "kneeA.nii.gz")
    np.testing.assert_allclose(vol, _expected(model, images["a_png"], mirror=True), atol=1e-5)
    vol, _, _ = _read_nifti(out / "kneeB.nii.gz")
    np.testing.assert_allclose(vol, _expected(model, images["b_npy"], mirror=False), atol=1e-5)


def test_all_failures_exit_nonzero_and_name_the_files(tmp_path, runs, capsys):
    from kneetf.cli.main import main

    (tmp_path / "bad.npy").write_bytes(b"nope")
    (tmp_path / "flat.png").write_bytes(b"")
    out = tmp_path / "out"
    rc = main(["predict", "--model", str(runs["plain"]), str(tmp_path / "bad.npy"), str(tmp_path / "flat.png"),
               str(tmp_path / "missing.dcm"), "--out", str(out), "--no-progress", "--names", "id"])
    assert rc == 1
    err = capsys.readouterr().err
    for name in ("bad.npy", "flat.png", "missing.dcm", "no reconstruction was written"):
        assert name in err
    errors = list(csv.DictReader((out / "errors.csv").open()))
    assert sorted(e["id"] for e in errors) == ["bad", "flat", "missing"]


def test_unreadable_inputs_never_load_the_model_or_tensorflow(tmp_path, runs):
    """The model (and TensorFlow) loads once an X-ray is read and cropped: a batch of bad
    files fails without either, for a run folder and for a bare .keras file."""
    import subprocess
    import sys

    (tmp_path / "bad.npy").write_bytes(b"nope")
    np.save(tmp_path / "flat.npy", np.zeros((64, 64), "float32"))
    for model in (runs["plain"], runs["plain"] / "model.keras"):
        out = tmp_path / f"out-{model.name}"
        code = ("import sys; from kneetf.cli.main import main; "
                f"rc = main(['predict', '--model', {str(model)!r}, {str(tmp_path / 'bad.npy')!r}, "
                f"{str(tmp_path / 'flat.npy')!r}, '--out', {str(out)!r}, '--no-progress']); "
                "print(rc, sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
        assert result.stdout.strip().splitlines()[-1] == "1 []", result.stderr[-2000:]
        assert len(list(csv.DictReader((out / "errors.csv").open()))) == 2


def test_known_preprocess_agrees_with_the_loaded_predictor(tmp_path, runs):
    from kneetf.errors import InputError
    from kneetf.inference.batch import known_preprocess
    from kneetf.inference.predictor import load_predictor

    for model in (runs["plain"], runs["mirror"], runs["mirror"] / "model.keras"):
        assert known_preprocess(model) == load_predictor(model).preprocess
    bare = tmp_path / "bare.keras"
    bare.write_bytes((runs["plain"] / "model.keras").read_bytes())  # no config.json beside it
    assert known_preprocess(bare) == load_predictor(bare).preprocess
    with pytest.raises(InputError, match="model not found"):
        known_preprocess(tmp_path / "missing.keras")


def test_default_roi_and_bad_arguments(tmp_path, runs):
    from kneetf.errors import ConfigError, InputError
    from kneetf.inference.batch import predict_files
    from kneetf.inference.loading import resolve_model_path
    from kneetf.inference.outputs import parse_formats

    _inputs(tmp_path / "in")
    report = predict_files(runs["plain"], [tmp_path / "in" / "b_npy.npy"], tmp_path / "out", progress=False)
    assert report.ok == 1
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert float(rows[0]["x1"]) > float(rows[0]["x0"])  # a box was found without a CSV
    assert rows[0]["roi_source"] == "detector:builtin"  # no ROI record with the run: the built-in detector
    with pytest.raises(ConfigError, match="--format"):
        parse_formats("nifti,mp4")
    with pytest.raises(InputError, match="model not found"):
        resolve_model_path(tmp_path / "nope.keras")
    with pytest.raises(InputError, match="no model.keras"):
        resolve_model_path(tmp_path / "in")


def test_read_preprocess_config_sources(tmp_path, runs):
    from kneetf.inference.loading import read_preprocess_config
    from kneetf.inference.predictor import load_predictor

    assert read_preprocess_config(runs["mirror"]).mirror_left is True
    assert read_preprocess_config(runs["mirror"] / "model.keras").mirror_left is True
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "kneetf_export.json").write_text(
        json.dumps({"preprocess": {**to_dict(PreprocessConfig(high_percentile=99.0)), "unknown_key": 1}}))
    (tmp_path / "export" / "tflite").mkdir()
    assert read_preprocess_config(tmp_path / "export" / "tflite" / "m.tflite").high_percentile == 99.0
    assert read_preprocess_config(tmp_path / "nothing_here.keras") is None
    p = load_predictor(runs["plain"], preprocess=tmp_path / "export" / "kneetf_export.json")
    assert p.preprocess == dataclasses.replace(PreprocessConfig(), high_percentile=99.0)


@pytest.mark.slow
def test_savedmodel_and_tflite_predictors_match_keras(tmp_path, runs):
    from kneetf.export.savedmodel import export_savedmodel
    from kneetf.inference.loading import load_model
    from kneetf.inference.predictor import load_predictor

    result = export_savedmodel(runs["plain"], tmp_path / "saved_models" / "kneetf", warmup_batch_sizes=(),
                               tflite_variants=("fp32",))
    x = np.random.default_rng(0).random((2, 128, 128, 1)).astype("float32")
    ref = load_model(runs["plain"]).predict(x, verbose=0)["mri"]
    sm = load_predictor(tmp_path / "saved_models" / "kneetf")  # base folder: highest version
    assert sm.kind == "savedmodel"
    np.testing.assert_allclose(sm(x), ref, atol=1e-4)
    tfl = load_predictor(result.tflite["fp32"]["path"])
    assert tfl.kind == "tflite"
    np.testing.assert_allclose(tfl(x), ref, atol=1e-3)


def test_a_compiled_model_loads_for_prediction_without_optimizer_warnings(tmp_path, recwarn):
    """A run's model.keras may hold an optimizer whose variables were never built (Keras then
    warns that it skips loading them); prediction does not need the optimizer at all."""
    from kneetf.inference import load_model, load_predictor
    from kneetf.models.kneenet import KneeNet

    model = KneeNet.from_preset("tiny")
    model.compile_for_training()
    model.save(tmp_path / "model.keras")
    recwarn.clear()
    predictor = load_predictor(tmp_path / "model.keras")
    x = np.random.default_rng(0).random((2, 128, 128, 1)).astype("float32")
    assert predictor(x).shape == (2, 128, 128, 20)
    assert not [w for w in recwarn if "optimizer" in str(w.message)]
    assert load_model(tmp_path / "model.keras").optimizer is not None  # the public loader compiles
