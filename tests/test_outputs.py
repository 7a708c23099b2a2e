"""What kneetf writes: one geometry on every path, the derived DICOM series (read back with
dcm2niix, highdicom and nibabel), pseudonymous names with a private key, and an output
folder that never holds an input nor loses a file kneetf did not write."""
from __future__ import annotations

import csv
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kneetf.config import PreprocessConfig, to_dict

H, W = 150, 170
BOX = (30.0, 20.0, 130.0, 120.0)
NIFTI_HEADER_BYTES = 352  # the NIfTI-1 header and its 4 extension bytes


def _xray(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype("float32")
    bones = np.where(np.abs(yy - 70 - seed) > 6, 1.0, 0.2) * np.exp(-((xx - 80) / 45.0) ** 2)
    return np.round(1000 + 3000 * bones + 50 * rng.standard_normal((H, W))).astype("float32")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder of a tiny model with varied random weights (its outputs differ per voxel)."""
    import serving_server

    root = tmp_path_factory.mktemp("run")
    serving_server.make_test_model(root / "model.keras", "tiny", seed=3)
    (root / "config.json").write_text(json.dumps({"preprocess": to_dict(PreprocessConfig())}))
    return root


def _header(path: Path) -> bytes:
    blob = path.read_bytes()
    return (gzip.decompress(blob) if path.name.endswith(".gz") else blob)[:NIFTI_HEADER_BYTES]


def _dicom_xray(path: Path, seed: int, **attributes) -> Path:
    """A DICOM X-ray of a patient with a full patient module and study (`attributes` added)."""
    import pydicom

    from kneetf.io.writers import write_dicom_xray

    write_dicom_xray(path, _xray(seed), laterality="R",
                     patient={"PatientName": "Doe^Jane", "PatientID": "MRN123456", "PatientBirthDate": "19600101",
                              "PatientSex": "F", "PatientAge": "064Y", "OtherPatientIDs": "OTHER-999",
                              "PatientComments": "allergic to contrast"})
    ds = pydicom.dcmread(path)
    ds.AccessionNumber, ds.StudyID, ds.StudyDate, ds.StudyTime = "ACC42", "S7", "20240102", "101500"
    ds.StudyDescription, ds.SeriesNumber = "Bilateral PA Fixed Flexion Knee", 3
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.save_as(path)
    return path


# === One geometry ===

def test_geometry_is_the_documented_contract():
    import nibabel as nib

    from kneetf.inference.geometry import DESCRIP, GEOMETRY, NOMINAL_SPACING

    assert NOMINAL_SPACING == (0.7, 1.09375, 1.09375)
    affine = GEOMETRY.affine
    # slices first: axis 0 runs to the patient's right (R), rows downwards (I), columns backwards (P)
    assert nib.aff2axcodes(affine) == ("R", "I", "P")
    np.testing.assert_allclose(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)), NOMINAL_SPACING)
    assert len(DESCRIP.encode()) <= 80
    # slice k of the DICOM series sits where voxel (k, 0, 0) of the NIfTI array is (LPS vs RAS)
    for k in (0, 7, 19):
        ras = affine @ np.array([k, 0, 0, 1.0])
        np.testing.assert_allclose(GEOMETRY.slice_position(k) * [-1, -1, 1], ras[:3], atol=1e-9)


def test_predict_api_and_writer_give_identical_headers(tmp_path, run):
    import nibabel as nib

    import kneetf
    from kneetf.cli.main import main
    from kneetf.inference.geometry import DESCRIP, GEOMETRY
    from kneetf.inference.outputs import write_volume
    from kneetf.preprocess.roi import Box, write_boxes

    np.save(tmp_path / "knee.npy", _xray(1))
    write_boxes(tmp_path / "boxes.csv", {"knee": Box(*BOX)})
    assert main(["predict", "--model", str(run), str(tmp_path / "knee.npy"), "--out", str(tmp_path / "pred"),
                 "--rois", str(tmp_path / "boxes.csv"), "--names", "id", "--no-progress"]) == 0
    r = kneetf.Reconstructor.load(run, roi=Box(*BOX)).predict(tmp_path / "knee.npy")
    r.save(tmp_path / "api" / "knee.nii.gz")
    write_volume(tmp_path / "plain.nii", r.volume)

    files = [tmp_path / "pred" / "knee.nii.gz", tmp_path / "api" / "knee.nii.gz", tmp_path / "plain.nii"]
    assert _header(files[0]) == _header(files[1]) == _header(files[2])
    img = nib.load(str(files[0]))
    np.testing.assert_allclose(img.affine, r.affine, atol=1e-9)  # the API's affine is the file's
    np.testing.assert_allclose(r.affine, GEOMETRY.affine)
    assert r.spacing == GEOMETRY.spacing == img.header.get_zooms()
    np.testing.assert_allclose(np.asarray(img.dataobj), r.volume, atol=1e-6)
    h = img.header
    assert h["descrip"].item().decode() == DESCRIP
    assert (int(h["sform_code"]), int(h["qform_code"]), int(h["intent_code"])) == (1, 1, 0)
    assert (float(h["cal_min"]), float(h["cal_max"])) == (0.0, 1.0)
    assert h.get_xyzt_units()[0] == "mm" and h.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-6)


@pytest.mark.slow
def test_predict_api_evaluate_and_client_write_identical_headers(tmp_path, run):
    """The same model through all four paths; the client against the in-process test server."""
    pytest.importorskip("tensorflow_serving.apis")
    import serving_server
    from cache_factory import random_cache

    import kneetf
    from kneetf.cli.main import main
    from kneetf.evaluate import evaluate
    from kneetf.export.savedmodel import export_savedmodel
    from kneetf.preprocess.roi import Box, write_boxes

    roi = _xray(2)[int(BOX[1]):int(BOX[3]), int(BOX[0]):int(BOX[2])]
    np.save(tmp_path / "knee.npy", roi)  # an ROI crop: what every path below sees alike
    full = Box(0, 0, roi.shape[1], roi.shape[0])
    write_boxes(tmp_path / "boxes.csv", {"knee": full})
    assert main(["predict", "--model", str(run), str(tmp_path / "knee.npy"), "--out", str(tmp_path / "pred"),
                 "--rois", str(tmp_path / "boxes.csv"), "--names", "id", "--no-progress"]) == 0
    kneetf.Reconstructor.load(run, roi=full).predict(tmp_path / "knee.npy").save(tmp_path / "api.nii.gz")
    cache = random_cache(tmp_path / "cache", n_train=3, n_val=1, shard_size=4)
    evaluate(run, cache, "val", tmp_path / "eval", baseline_split="train", k=2, limit=1, progress=False,
             log_verdict=False, save_volumes=True)
    [evaluated] = sorted((tmp_path / "eval" / "volumes").glob("*.nii.gz"))
    export_savedmodel(run / "model.keras", tmp_path / "saved_models" / "kneetf", verify=False, warmup_batch_sizes=())
    server = serving_server.LocalServingServer({"kneetf": tmp_path / "saved_models" / "kneetf"}).start()
    try:
        assert main(["client", "--server", server.grpc_target, str(tmp_path / "knee.npy"), "--cropped",
                     "--out", str(tmp_path / "client.nii.gz")]) == 0
    finally:
        server.stop()

    files = [tmp_path / "pred" / "knee.nii.gz", tmp_path / "api.nii.gz", evaluated, tmp_path / "client.nii.gz"]
    headers = [_header(f) for f in files]
    assert all(h == headers[0] for h in headers), [f.name for f, h in zip(files, headers) if h != headers[0]]
    import nibabel as nib

    pred = np.asarray(nib.load(str(files[0])).dataobj)
    np.testing.assert_allclose(np.asarray(nib.load(str(files[1])).dataobj), pred, atol=1e-5)
    np.testing.assert_allclose(np.asarray(nib.load(str(files[3])).dataobj), pred, atol=1e-4)


# === The derived DICOM series ===

@pytest.fixture(scope="module")
def dicom_outputs(run, tmp_path_factory):
    """Two DICOM X-rays of one study, reconstructed with --keep-patient and with the default."""
    from kneetf.cli.main import main
    from kneetf.preprocess.roi import Box, write_boxes

    root = tmp_path_factory.mktemp("dicom")
    xr = root / "xr"
    xr.mkdir()
    first = _dicom_xray(xr / "Doe_Jane_MRN123456.dcm", 1)
    import pydicom

    study = pydicom.dcmread(first).StudyInstanceUID
    _dicom_xray(xr / "Doe_Jane_MRN123456_b.dcm", 2, StudyInstanceUID=study)
    write_boxes(root / "boxes.csv", {"Doe_Jane_MRN123456": Box(*BOX), "Doe_Jane_MRN123456_b": Box(*BOX)})
    common = ["--model", str(run), str(xr), "--rois", str(root / "boxes.csv"), "--format", "nifti,dicom,png",
              "--no-progress"]
    assert main(["predict", *common, "--out", str(root / "kept"), "--keep-patient"]) == 0
    assert main(["predict", *common, "--out", str(root / "anon")]) == 0
    return {"root": root, "xr": xr, "kept": root / "kept", "anon": root / "anon", "source": first}


def _series(folder: Path) -> list:
    import pydicom

    return sorted((pydicom.dcmread(f) for f in folder.iterdir()), key=lambda d: int(d.InstanceNumber))


def test_keep_patient_series_joins_the_xray_study_and_references_it(dicom_outputs):
    import pydicom
    from pydicom.uid import MRImageStorage

    from kneetf.inference.geometry import GEOMETRY
    from kneetf.version import __version__

    src = pydicom.dcmread(dicom_outputs["source"])
    series = _series(dicom_outputs["kept"] / "Doe_Jane_MRN123456_dicom")
    other = _series(dicom_outputs["kept"] / "Doe_Jane_MRN123456_b_dicom")
    assert len(series) == 20
    for ds in series:
        assert ds.SOPClassUID == MRImageStorage and ds.Modality == "MR"
        # the X-ray's patient (these four only) and study
        assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.PatientSex) == \
            ("Doe^Jane", "MRN123456", "19600101", "F")
        for gone in ("OtherPatientIDs", "PatientComments", "PatientAge", "PatientIdentityRemoved"):
            assert gone not in ds
        for key in ("StudyInstanceUID", "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "StudyDescription"):
            assert ds.get(key) == src.get(key), key
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.FrameOfReferenceUID
        # the source image, referenced
        [ref] = ds.SourceImageSequence
        assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (src.SOPClassUID, src.SOPInstanceUID)
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        # provenance and display
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and "not for diagnostic use" in ds.DerivationDescription
        assert ds.Manufacturer == "kneetf" and ds.SoftwareVersions == __version__
        assert len(ds.ContentDate) == 8 and ds.ContentTime and ds.SeriesDate == ds.ContentDate and ds.SeriesTime
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (0.5, 1.0)
        assert ds.Laterality == "R" and ds.BodyPartExamined == "KNEE"
        # the output geometry
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], GEOMETRY.orientation)
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], GEOMETRY.spacing[1:])
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == GEOMETRY.spacing[0]
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient],
                                   GEOMETRY.slice_position(int(ds.InstanceNumber) - 1), atol=1e-5)
    # series numbers: away from the X-ray's (3), and distinct for two reconstructions of one study
    numbers = {int(series[0].SeriesNumber), int(other[0].SeriesNumber)}
    assert len(numbers) == 2 and int(src.SeriesNumber) not in numbers
    assert other[0].StudyInstanceUID == series[0].StudyInstanceUID
    assert len({d.SeriesInstanceUID for d in series + other}) == 2


def test_default_series_is_pseudonymous_per_output(dicom_outputs):
    import pydicom

    src = pydicom.dcmread(dicom_outputs["source"])
    out = dicom_outputs["anon"]
    folders = sorted(p for p in out.iterdir() if p.name.endswith("_dicom"))
    assert len(folders) == 2
    ids = set()
    for folder in folders:
        series = _series(folder)
        ds = series[0]
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethod and "pseudonym" in str(ds.DeidentificationMethod[0])
        codes = {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
        assert "113100" in codes  # Basic Application Confidentiality Profile
        assert ds.PatientID == str(ds.PatientName) == folder.name[:-len("_dicom")]  # the output's pseudonym
        assert {d.PatientID for d in series} == {ds.PatientID}
        ids.add(ds.PatientID)
        assert ds.StudyInstanceUID != src.StudyInstanceUID
        for gone in ("SourceImageSequence", "ReferencedImageSequence", "OtherPatientIDs", "PatientComments"):
            assert gone not in ds
        text = b"".join(f.read_bytes() for f in folder.iterdir())
        for phi in (b"Doe", b"MRN123456", b"19600101", b"OTHER-999", b"allergic", b"ACC42",
                    src.SOPInstanceUID.encode(), src.StudyInstanceUID.encode()):
            assert phi not in text, phi
    assert len(ids) == 2  # a PACS does not merge two outputs into one patient


def _dcm2niix() -> str:
    exe = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    if not Path(exe).is_file():
        pytest.skip("dcm2niix is not installed (pip install dcm2niix, part of the test extra)")
    return exe


def test_series_reads_back_as_the_nifti_with_dcm2niix_highdicom_and_pydicom(dicom_outputs, tmp_path):
    import highdicom as hd
    import nibabel as nib

    from kneetf.io.readers import read_mri

    out = dicom_outputs["kept"]
    folder = out / "Doe_Jane_MRN123456_dicom"
    nii = nib.load(str(out / "Doe_Jane_MRN123456.nii.gz"))
    ref = np.asarray(nii.dataobj)
    series = _series(folder)
    step = float(series[0].RescaleSlope)

    # dcm2niix: its own layout and affine; the same voxels in the same place once both are canonical
    proc = subprocess.run([_dcm2niix(), "-z", "n", "-b", "n", "-f", "conv", "-o", str(tmp_path), str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    conv = nib.load(str(tmp_path / "conv.nii"))
    assert sorted(conv.shape) == sorted(ref.shape)
    a, b = nib.as_closest_canonical(conv), nib.as_closest_canonical(nii)
    assert a.shape == b.shape
    np.testing.assert_allclose(a.header.get_zooms(), b.header.get_zooms(), atol=1e-4)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-3)
    np.testing.assert_allclose(a.get_fdata(), b.get_fdata(), atol=step)

    # highdicom's volume of the series (its own slice order, an LPS affine): the same voxels in the same place
    vol = hd.get_volume_from_series(series)
    assert sorted(vol.spatial_shape) == sorted(ref.shape)
    c = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(vol.array, np.float32), np.diag([-1, -1, 1, 1]) @ vol.affine))
    np.testing.assert_allclose(c.affine, b.affine, atol=1e-5)
    np.testing.assert_allclose(c.get_fdata(), b.get_fdata(), atol=step)

    # kneetf's own reader (pydicom) and nibabel: same array, spacing and orientation
    mri, meta = read_mri(folder)
    np.testing.assert_allclose(mri, ref, atol=step)
    np.testing.assert_allclose(meta.spacing, nii.header.get_zooms(), atol=1e-5)
    np.testing.assert_allclose(meta.orientation, [float(v) for v in series[0].ImageOrientationPatient])


# === Pseudonymous names ===

def test_default_names_are_pseudonyms_with_a_private_key(dicom_outputs):
    out, xr = dicom_outputs["anon"], dicom_outputs["xr"]
    names = [p.name for p in out.iterdir()]
    assert not [n for n in names if "Doe" in n or "MRN" in n], names
    key = list(csv.DictReader((out / "PRIVATE_pseudonym_key.csv").open()))
    assert sorted(Path(r["source"]).name for r in key) == sorted(p.name for p in xr.iterdir())
    assert {r["result"] for r in key} == {"written"}
    for r in key:
        assert r["pseudonym"].startswith("knee-")
        assert {f"{r['pseudonym']}.nii.gz", f"{r['pseudonym']}_dicom", f"{r['pseudonym']}.png"} <= set(names)
    for shared in ("predictions.csv", "errors.csv"):
        text = (out / shared).read_text()
        assert "Doe" not in text and "MRN" not in text and str(xr) not in text, shared
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert sorted(r["id"] for r in rows) == sorted(r["pseudonym"] for r in key)


def test_failed_inputs_are_pseudonymous_in_errors_csv(tmp_path, run):
    from kneetf.inference.batch import predict_files

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "Roe_Richard_MRN777.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    np.save(tmp_path / "in" / "Poe_Edgar_MRN888.npy", _xray(4))
    report = predict_files(run, [tmp_path / "in"], tmp_path / "out", progress=False,
                           pseudonym_key=tmp_path / "keys" / "key.csv")
    assert report.ok == 1 and len(report.errors) == 1
    assert not (tmp_path / "out" / "PRIVATE_pseudonym_key.csv").exists()  # the key went where it was asked
    key = {r["result"]: r for r in csv.DictReader((tmp_path / "keys" / "key.csv").open())}
    assert Path(key["failed"]["source"]).name == "Roe_Richard_MRN777.png"
    errors = list(csv.DictReader((tmp_path / "out" / "errors.csv").open()))
    assert errors[0]["id"] == key["failed"]["pseudonym"] and errors[0]["reason"]
    for f in (tmp_path / "out").rglob("*"):
        assert "MRN" not in f.name
        if f.is_file() and f.suffix == ".csv":
            assert "MRN" not in f.read_text() and "Roe" not in f.read_text()
    # a second run keeps the first run's rows and pseudonyms: a source written again keeps its own
    predict_files(run, [tmp_path / "in" / "Poe_Edgar_MRN888.npy"], tmp_path / "out", progress=False,
                  pseudonym_key=tmp_path / "keys" / "key.csv")
    rows = list(csv.DictReader((tmp_path / "keys" / "key.csv").open()))
    assert len(rows) == 2 and {r["pseudonym"] for r in rows} == {key["failed"]["pseudonym"],
                                                                 key["written"]["pseudonym"]}


class _Killed(BaseException):
    """Stands for a SIGKILL at a write point: nothing of the run after it happens."""


def test_rerun_after_a_kill_keeps_the_pseudonyms_of_unfinished_outputs(tmp_path, run, monkeypatch):
    from kneetf import faults
    from kneetf.inference.batch import predict_files

    (tmp_path / "in").mkdir()
    for i in range(3):
        np.save(tmp_path / "in" / f"knee{i}.npy", _xray(10 + i))
    out = tmp_path / "out"
    real = faults.point

    def killed_after_first_row(name, detail=""):
        if name == "predict.row.after":
            raise _Killed
        real(name, detail)

    monkeypatch.setattr(faults, "point", killed_after_first_row)
    with pytest.raises(_Killed):
        predict_files(run, [tmp_path / "in"], out, progress=False)
    monkeypatch.setattr(faults, "point", real)
    key = list(csv.DictReader((out / "PRIVATE_pseudonym_key.csv").open()))
    assert len(key) == 3 and {r["result"] for r in key} == {""}  # written before any output
    first = {r["pseudonym"] for r in key}
    done = [r["id"] for r in csv.DictReader((out / "predictions.csv").open())]
    assert len(done) == 1 and (out / f"{done[0]}.nii.gz").exists()

    report = predict_files(run, [tmp_path / "in"], out, progress=False)
    assert report.ok == 3
    key = list(csv.DictReader((out / "PRIVATE_pseudonym_key.csv").open()))
    assert len(key) == 3 and {r["pseudonym"] for r in key} == first and {r["result"] for r in key} == {"written"}
    assert {r["id"] for r in csv.DictReader((out / "predictions.csv").open())} == first
    # the killed run's output was replaced, not left beside a new one
    assert {p.name for p in out.glob("*.nii.gz")} == {f"{n}.nii.gz" for n in first}


# === The output folder ===

def test_out_that_is_or_holds_an_input_is_refused(tmp_path, run):
    from kneetf.errors import ConfigError
    from kneetf.inference.batch import predict_files

    xr = tmp_path / "xr"
    xr.mkdir()
    np.save(xr / "knee.npy", _xray(5))
    before = (xr / "knee.npy").read_bytes()
    for out in (xr, tmp_path, xr / "knee.npy"):
        with pytest.raises(ConfigError, match="--out"):
            predict_files(run, [xr], out, progress=False, names="id")
    manifest = tmp_path / "m" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text(f"id,xray\nk,{xr / 'knee.npy'}\n")
    with pytest.raises(ConfigError, match="holds the input"):
        predict_files(run, [manifest], xr, progress=False, allow_outside=True)
    assert (xr / "knee.npy").read_bytes() == before and sorted(p.name for p in xr.iterdir()) == ["knee.npy"]


def test_cli_out_equal_to_the_input_folder_exits_nonzero(tmp_path, run, capsys):
    from kneetf.cli.main import main
    from kneetf.io.writers import write_png

    (tmp_path / "xr").mkdir()
    write_png(tmp_path / "xr" / "knee.png", _xray(6).astype("uint16"))
    before = (tmp_path / "xr" / "knee.png").read_bytes()
    rc = main(["predict", "--model", str(run), str(tmp_path / "xr"), "--out", str(tmp_path / "xr"),
               "--format", "nifti,png", "--names", "id", "--no-progress"])
    assert rc != 0 and "--out" in capsys.readouterr().err
    assert (tmp_path / "xr" / "knee.png").read_bytes() == before


def test_kneetf_outputs_are_not_read_as_xrays_and_foreign_files_are_kept(tmp_path, run):
    from kneetf.inference.batch import predict_files

    xr = tmp_path / "xr"
    xr.mkdir()
    np.save(xr / "knee.npy", _xray(7))
    np.save(xr / "other.npy", _xray(8))
    out = tmp_path / "out"
    out.mkdir()
    (out / "other.png").write_bytes(b"the user's own file")       # not kneetf's: never replaced
    (out / "other_dicom").mkdir()
    (out / "other_dicom" / "notes.txt").write_text("mine")
    report = predict_files(run, [xr], out, formats=("nifti", "png", "dicom"), progress=False, names="id")
    assert sorted(report.written) == ["knee"]
    [error] = report.errors
    assert error["id"] == "other" and "not written by kneetf" in error["reason"]
    assert (out / "other.png").read_bytes() == b"the user's own file"
    assert (out / "other_dicom" / "notes.txt").read_text() == "mine"
    assert not (out / "other.nii.gz").exists()

    # a second run into the same folder replaces kneetf's own files
    report = predict_files(run, [xr / "knee.npy"], out, formats=("nifti", "png", "dicom"), progress=False,
                           names="id")
    assert report.ok == 1 and not report.errors

    # kneetf's outputs given as inputs (the montage PNG, a slice of the series) are refused, the rest done
    report = predict_files(run, [out / "knee.png", out / "knee_dicom", xr / "other.npy"], tmp_path / "again",
                           progress=False, names="id")
    assert sorted(report.written) == ["other"]
    refused = {Path(e["file"]).name: e["reason"] for e in report.errors}
    assert len(refused) == 21 and all("is an output of kneetf" in r for r in refused.values())
    assert "knee.png" in refused and len([n for n in refused if n.startswith("IM")]) == 20


def test_predictions_csv_not_written_by_kneetf_is_refused(tmp_path, run):
    from kneetf.errors import ConfigError
    from kneetf.inference.batch import predict_files

    np.save(tmp_path / "knee.npy", _xray(9))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "predictions.csv").write_text("mine\n")
    with pytest.raises(ConfigError, match="not written by kneetf"):
        predict_files(run, [tmp_path / "knee.npy"], tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "predictions.csv").read_text() == "mine\n"


def test_keep_patient_drops_source_values_a_dicom_cannot_carry(tmp_path):
    """Malformed UIDs of the source are not copied (no reference, a study of its own), and a
    SeriesNumber near the IS limit does not push the derived one past it."""
    import pydicom

    from kneetf.inference.outputs import MAX_SOURCE_SERIES_NUMBER, SeriesNumbers, SourceXray
    from kneetf.io.writers import write_dicom_xray

    path = tmp_path / "x.dcm"
    write_dicom_xray(path, np.zeros((32, 32), np.uint16))
    good = SourceXray.read(path)
    assert good.sop_instance_uid and good.study["StudyInstanceUID"]
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SOPInstanceUID, ds.SeriesNumber = "not a uid !!", "1." + "2" * 100, 2**31 - 1
    ds.save_as(path)
    bad = SourceXray.read(path)
    assert bad.study == {} and bad.sop_instance_uid == bad.sop_class_uid == "" and bad.series_number is None
    assert SeriesNumbers().next(bad) == 1
    ds.StudyInstanceUID, ds.SeriesNumber = good.study["StudyInstanceUID"], MAX_SOURCE_SERIES_NUMBER
    ds.save_as(path)
    assert SeriesNumbers().next(SourceXray.read(path)) <= 2**31 - 1
