"""`kneetf predict` output names: same-named inputs, inputs given twice, reruns into the same
folder, scrubbed error reasons, and a user's `.tmp-*` files in the output folder."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kneetf.config import PreprocessConfig, to_dict
from kneetf.errors import InputError

from xray_factory import knee_xray as _xray


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder of a tiny model."""
    from kneetf.models.kneenet import KneeNet

    root = tmp_path_factory.mktemp("run")
    KneeNet.from_preset("tiny").save(root / "model.keras")
    (root / "config.json").write_text(json.dumps({"preprocess": to_dict(PreprocessConfig())}))
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _shared_text(out: Path) -> str:
    return "".join((out / n).read_text() for n in ("predictions.csv", "errors.csv"))


def test_a_users_tmp_files_in_out_stay_and_kneetf_debris_goes(tmp_path, run):
    from kneetf.inference.batch import predict_files

    np.save(tmp_path / "knee.npy", _xray(1))
    out = tmp_path / "out"
    assert predict_files(run, [tmp_path / "knee.npy"], out, formats=("nifti", "dicom"), progress=False,
                         names="id").ok == 1
    (out / ".tmp-notes.txt").write_text("notes")  # the user's, not kneetf's
    (out / ".tmp-project").mkdir()
    (out / ".tmp-project" / "a.txt").write_text("mine")
    (out / ".tmp-knee.nii.gz-notes.txt").write_text("mine too")
    debris = [out / ".tmp-knee.nii.gz-ab_1cd2e.nii.gz", out / ".tmp-.kneetf-outputs.json-x1y2z3w4.json",
              out / ".tmp-predictions.csv-k9k9k9k9.csv"]  # what a killed kneetf run leaves
    for p in debris:
        p.write_text("half")
    (out / ".tmp-knee_dicom-q1w2e3r4").mkdir()
    (out / ".tmp-old-knee_dicom-a1s2d3f4").mkdir()
    assert predict_files(run, [tmp_path / "knee.npy"], out, formats=("nifti", "dicom"), progress=False,
                         names="id").ok == 1
    assert sorted(p.name for p in out.glob(".tmp-*")) == [".tmp-knee.nii.gz-notes.txt", ".tmp-notes.txt",
                                                           ".tmp-project"]
    assert (out / ".tmp-project" / "a.txt").read_text() == "mine"


def test_remove_debris_with_names_removes_only_atomic_path_temporaries(tmp_path):
    from kneetf.io.atomic import atomic_path, remove_debris

    class Killed(Exception):
        pass

    folder = tmp_path / "out"
    (folder / "b_dicom").mkdir(parents=True)  # replaced by a folder: the old one is set aside
    left = []
    for final, directory in (("a.nii.gz", False), ("b_dicom", True)):
        with pytest.raises(Killed), atomic_path(folder / final, directory=directory) as tmp:
            left.append(tmp.name)  # what a kill here leaves (atomic_path removes it on an exception)
            raise Killed
    (folder / left[0]).write_text("half")
    (folder / left[1]).mkdir()
    (folder / ".tmp-old-b_dicom-abcdefgh").mkdir()
    (folder / ".tmp-notes.txt").write_text("mine")
    (folder / ".tmp-c.nii.gz-abcdefgh.nii.gz").write_text("not a listed name")
    assert remove_debris(folder, names=["a.nii.gz", "b_dicom"]) == 3
    assert sorted(p.name for p in folder.iterdir()) == [".tmp-c.nii.gz-abcdefgh.nii.gz", ".tmp-notes.txt", "b_dicom"]


def test_same_file_names_in_two_folders_get_their_own_pseudonyms(tmp_path, run):
    from kneetf.inference.batch import predict_files

    for i, who in enumerate(("JohnDoe", "JaneRoe")):
        (tmp_path / "pts" / who).mkdir(parents=True)
        np.save(tmp_path / "pts" / who / "knee.npy", _xray(i))
    np.save(tmp_path / "pts" / "JaneRoe" / "knee.npz.npy", _xray(3))  # another stem
    out = tmp_path / "out"
    report = predict_files(run, [tmp_path / "pts" / "JohnDoe", tmp_path / "pts" / "JaneRoe"], out, progress=False)
    assert report.ok == 3 and not report.errors
    key = _rows(out / "PRIVATE_pseudonym_key.csv")
    assert len({r["pseudonym"] for r in key}) == 3 and {r["result"] for r in key} == {"written"}
    assert len(list(out.glob("*.nii.gz"))) == 3
    text = _shared_text(out)
    assert "JohnDoe" not in text and "JaneRoe" not in text and "knee.npy" not in text


def test_same_stem_with_two_suffixes_is_fine_with_pseudonyms_and_a_clear_refusal_with_ids(tmp_path, run):
    from kneetf.inference.batch import predict_files
    from kneetf.io.writers import write_png

    np.save(tmp_path / "knee7.npy", _xray(1))
    write_png(tmp_path / "knee7.png", np.round(_xray(2)).astype("uint16"))
    report = predict_files(run, [tmp_path / "knee7.npy", tmp_path / "knee7.png"], tmp_path / "anon", progress=False)
    assert report.ok == 2 and not report.errors

    report = predict_files(run, [tmp_path / "knee7.npy", tmp_path / "knee7.png"], tmp_path / "ids", progress=False,
                           names="id")
    assert sorted(report.written) == ["knee7"]
    [error] = _rows(tmp_path / "ids" / "errors.csv")
    assert error["id"] == "knee7" and error["file"] == str(tmp_path / "knee7.png")
    assert error["reason"] == f"output name 'knee7' is also that of {tmp_path / 'knee7.npy'}; rename one of the files"


def test_same_stem_with_a_boxes_csv_is_refused_without_naming_the_other(tmp_path, run):
    from kneetf.inference.batch import predict_files

    for who in ("JohnDoe", "JaneRoe"):
        (tmp_path / who).mkdir()
        np.save(tmp_path / who / "knee.npy", _xray(1))
    (tmp_path / "boxes.csv").write_text("id,x0,y0,x1,y1\nknee,30,20,130,120\n")
    out = tmp_path / "out"
    report = predict_files(run, [tmp_path / "JohnDoe" / "knee.npy", tmp_path / "JaneRoe" / "knee.npy"], out,
                           roi=tmp_path / "boxes.csv", progress=False)
    assert report.ok == 1 and len(report.errors) == 1
    assert "one box per name" in report.errors[0]["reason"]
    text = _shared_text(out)
    assert "JohnDoe" not in text and "JaneRoe" not in text


def test_rerunning_a_finished_pseudonymous_run_gives_the_same_folder(tmp_path, run):
    from kneetf.inference.batch import predict_files

    for i in range(3):
        np.save(tmp_path / f"knee{i}.npy", _xray(i))
    np.save(tmp_path / "flat.npy", np.zeros((64, 64), "float32"))  # fails every time
    inputs = sorted(tmp_path.glob("*.npy"))
    out = tmp_path / "out"
    listings = []
    for _ in range(3):
        report = predict_files(run, inputs, out, formats=("nifti", "png"), progress=False)
        assert report.ok == 3 and len(report.errors) == 1
        listings.append(sorted(p.name for p in out.iterdir()))
    assert listings[0] == listings[1] == listings[2]
    assert len(list(out.glob("*.nii.gz"))) == 3
    key = _rows(out / "PRIVATE_pseudonym_key.csv")
    assert sorted(r["source"] for r in key) == [str(p) for p in inputs]  # each source once
    written = {r["pseudonym"] for r in key if r["result"] == "written"}
    assert {r["id"] for r in _rows(out / "predictions.csv")} == written
    assert {f"{n}.nii.gz" for n in written} == {p.name for p in out.glob("*.nii.gz")}
    assert [r["id"] for r in _rows(out / "errors.csv")] == [r["pseudonym"] for r in key if r["result"] == "failed"]


@pytest.mark.parametrize("name, reason", [
    ("knee.png", "no knee joint found"),
    ("image.png", "the image is constant"),
    ("pixel.dcm", "cannot decode pixel data"),
])
def test_scrubbing_keeps_ordinary_words_of_a_reason(tmp_path, name, reason):
    from kneetf.inference.batch import XrayInput, _scrub

    item = XrayInput(Path(name).stem, Path("scrub") / name, name="knee-0123456789ab")
    assert _scrub(reason, item, str(item.path), item.name) == reason
    path = Path("scrub") / name
    for where in (str(path), str(path.absolute()), f"/elsewhere/scrub/{name}", name):
        text = _scrub(f"{where}: {reason} (in {where})", item, str(path), item.name)
        assert text == f"knee-0123456789ab: {reason} (in knee-0123456789ab)"
    quoted = _scrub(f"no ROI box for id {Path(name).stem!r}", item, str(path), item.name)
    assert quoted == "no ROI box for id 'knee-0123456789ab'"


def test_patient_names_of_failed_inputs_stay_out_of_shared_files(tmp_path, run, capsys):
    from kneetf.cli.main import main

    (tmp_path / "Doe_John").mkdir()
    (tmp_path / "Doe_John" / "Roe_Richard.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    np.save(tmp_path / "Doe_John" / "Poe_Edgar.npy", np.zeros((64, 64), "float32"))
    np.save(tmp_path / "Doe_John" / "knee.npy", _xray(1))
    out = tmp_path / "out"
    assert main(["predict", "--model", str(run), str(tmp_path / "Doe_John"), "--out", str(out), "--no-progress"]) == 4
    captured = capsys.readouterr()
    for text in (_shared_text(out), captured.out):
        for phi in ("Doe_John", "Roe_Richard", "Poe_Edgar"):
            assert phi not in text


@pytest.mark.parametrize("names", ["id", "pseudonym"])
def test_the_same_file_given_twice_is_done_once(tmp_path, run, monkeypatch, names):
    from kneetf.inference.batch import predict_files

    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "knee1.npy", _xray(1))
    np.save(tmp_path / "in" / "knee2.npy", _xray(2))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    report = predict_files(run, ["in/knee1.npy", "./in/knee1.npy", tmp_path / "in" / "knee1.npy", "in",
                                 "in/knee2.npy"], out, progress=False, names=names)
    assert report.ok == 2 and not report.errors
    assert len(_rows(out / "predictions.csv")) == 2 and len(list(out.glob("*.nii.gz"))) == 2


@pytest.mark.parametrize("names", ["id", "pseudonym"])
def test_an_input_that_fails_on_a_rerun_loses_its_earlier_outputs(tmp_path, run, names):
    """A rerun wrote predictions.csv without the now-failing input but left its earlier volume:
    the folder held an output that no table listed. A user's file of that name stays."""
    from kneetf.inference.batch import predict_files

    src = tmp_path / "in"
    src.mkdir()
    np.save(src / "a.npy", _xray(1))
    np.save(src / "b.npy", _xray(2))
    out = tmp_path / "out"
    assert predict_files(run, sorted(src.glob("*.npy")), out, formats=("nifti", "dicom"), progress=False,
                         names=names).ok == 2
    first = {p.name for p in out.iterdir()}
    np.save(src / "b.npy", np.zeros((64, 64), "float32"))  # now it fails
    report = predict_files(run, sorted(src.glob("*.npy")), out, formats=("nifti", "dicom"), progress=False,
                           names=names)
    assert report.ok == 1 and len(report.errors) == 1
    b_name = report.errors[0]["id"]
    assert f"earlier outputs {b_name}.nii.gz, {b_name}_dicom removed" in report.errors[0]["reason"]
    assert not (out / f"{b_name}.nii.gz").exists() and not (out / f"{b_name}_dicom").exists()
    listed = {r["id"] for r in _rows(out / "predictions.csv")}
    assert {p.name[:-len(".nii.gz")] for p in out.glob("*.nii.gz")} == listed and b_name not in listed
    assert not list(out.glob(".tmp-*"))
    assert {p.name for p in out.iterdir()} == first - {f"{b_name}.nii.gz", f"{b_name}_dicom"}
    user_file = out / "mine.nii.gz"  # not kneetf's: never removed, even when its name fails
    user_file.write_text("mine")
    np.save(src / "mine.npy", np.zeros((64, 64), "float32"))
    predict_files(run, [src / "mine.npy"], out, progress=False, names="id")
    assert user_file.read_text() == "mine"


def test_a_run_into_a_folder_adds_to_its_table_and_replaces_a_names_other_formats(tmp_path, run):
    """A second run with other inputs rewrote predictions.csv with its own rows only (the first
    run's outputs stayed, listed nowhere), and a rerun with fewer formats left the earlier
    run's PNG and DICOM beside the new NIfTI: two reconstructions under one name."""
    from kneetf.inference.batch import predict_files

    for i in range(3):
        np.save(tmp_path / f"k{i}.npy", _xray(i))
    out = tmp_path / "out"
    assert predict_files(run, [tmp_path / "k0.npy", tmp_path / "k1.npy"], out, formats=("nifti", "png", "dicom"),
                         progress=False, names="id").ok == 2
    first = {r["id"]: r for r in _rows(out / "predictions.csv")}
    assert predict_files(run, [tmp_path / "k1.npy", tmp_path / "k2.npy"], out, formats=("nifti",),
                         progress=False, names="id").ok == 2
    rows = _rows(out / "predictions.csv")
    assert [r["id"] for r in rows] == ["k0", "k1", "k2"]  # k0's row kept as it was; k1's rewritten
    assert rows[0] == first["k0"]
    names = {p.name for p in out.iterdir()}
    assert {"k0.nii.gz", "k0.png", "k0_dicom", "k1.nii.gz", "k2.nii.gz"} <= names
    assert "k1.png" not in names and "k1_dicom" not in names
    (out / "k0.nii.gz").unlink()
    (out / "k0.png").unlink()
    shutil.rmtree(out / "k0_dicom")  # the user removed k0's outputs: its row goes with them
    assert predict_files(run, [tmp_path / "k2.npy"], out, progress=False, names="id").ok == 1
    assert [r["id"] for r in _rows(out / "predictions.csv")] == ["k1", "k2"]


def test_ids_of_any_script_name_their_outputs(tmp_path, run):
    """Non-ASCII letters became '_', so that `knee-ä` and `knee-ö` both became `knee-` and clashed."""
    from kneetf.inference.batch import predict_files, safe_id

    assert safe_id("knee-ä") == "knee-ä" and safe_id("膝") == "膝" and safe_id("a b/c") == "a_b_c"
    assert safe_id("knee-a\u0308") == "knee-ä"  # decomposed (macOS names): the same id, not knee-a_
    np.save(tmp_path / "膝.npy", _xray(1))
    np.save(tmp_path / "股.npy", _xray(2))
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,xray,mri\nknee-ä,膝.npy,\nknee-ö,股.npy,\n", encoding="utf-8")
    out = tmp_path / "out"
    report = predict_files(run, [manifest, tmp_path / "膝.npy"], out, progress=False, names="id")
    assert not [e for e in report.errors if "also that of" in e["reason"]]
    assert {"knee-ä.nii.gz", "knee-ö.nii.gz"} <= {p.name for p in out.iterdir()}


def test_a_bad_line_of_the_boxes_csv_fails_only_its_xray(tmp_path, run, capsys):
    from kneetf.cli.main import main

    for i in range(3):
        np.save(tmp_path / f"k{i}.npy", _xray(i))
    boxes = tmp_path / "b.csv"
    boxes.write_text("id,x0,y0,x1,y1\nk0,20,20,100,100\nk1,abc,1,2,3\nk2,20,20,100,100\n")
    out = tmp_path / "out"
    rc = main(["predict", "--model", str(run), *(str(tmp_path / f"k{i}.npy") for i in range(3)), "--rois",
               str(boxes), "--out", str(out), "--names", "id"])
    err = capsys.readouterr().err
    assert rc == 4 and "line 3: x0 is not a number" in err
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["k0.nii.gz", "k2.nii.gz"]


def test_a_model_file_that_is_not_a_keras_archive_is_named_as_such(tmp_path, run):
    """Keras reported a truncated or foreign .keras as 'File not found' (the file is there)."""
    from kneetf.export.savedmodel import load_for_export
    from kneetf.inference.loading import load_model
    from kneetf.preprocess.roi_detector import load_detector

    junk, cut = tmp_path / "junk.keras", tmp_path / "cut.keras"
    junk.write_text("junk")
    data = (run / "model.keras").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    for path in (junk, cut):
        for load in (load_model, load_detector, load_for_export):
            with pytest.raises(InputError, match=rf"{path.name}: is not a Keras \.keras archive \(not a zip file"):
                load(path)


def test_a_series_folder_holding_a_users_file_is_never_removed(tmp_path, run):
    """A rerun that failed (or wrote other formats) removed the earlier `<name>_dicom/` whole,
    though the user had put a file into it."""
    from kneetf.inference.batch import predict_files

    np.save(tmp_path / "k.npy", _xray(3))
    out = tmp_path / "out"
    assert predict_files(run, [tmp_path / "k.npy"], out, formats=("nifti", "dicom"), progress=False,
                         names="id").ok == 1
    (out / "k_dicom" / "notes.txt").write_text("mine")
    assert predict_files(run, [tmp_path / "k.npy"], out, formats=("nifti",), progress=False, names="id").ok == 1
    np.save(tmp_path / "k.npy", np.zeros((64, 64), "float32"))  # fails now
    report = predict_files(run, [tmp_path / "k.npy"], out, formats=("nifti", "dicom"), progress=False, names="id")
    assert report.ok == 0 and "k.nii.gz removed" in report.errors[0]["reason"]
    assert (out / "k_dicom" / "notes.txt").read_text() == "mine"
    assert [r["id"] for r in _rows(out / "predictions.csv")] == ["k"]  # its series is still in the folder


def test_a_killed_rerun_keeps_listing_the_outputs_it_did_not_reach(tmp_path, run, monkeypatch):
    """A rerun dropped the rows of every output it was about to write again: killed halfway,
    it left earlier outputs that no table listed."""
    from kneetf.inference.batch import predict_files
    from kneetf.io.atomic import CsvLog

    inputs = []
    for i in range(3):
        np.save(tmp_path / f"k{i}.npy", _xray(i))
        inputs.append(tmp_path / f"k{i}.npy")
    out = tmp_path / "out"
    assert predict_files(run, inputs, out, progress=False, names="id", batch_size=1).ok == 3
    real_append = CsvLog.append

    def killed_after_one(self, row):  # the process dies once k0's row of the rerun is in
        real_append(self, row)
        if self.path.name == "predictions.csv":
            raise KeyboardInterrupt

    monkeypatch.setattr(CsvLog, "append", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        predict_files(run, inputs, out, progress=False, names="id", batch_size=1)
    rows = [r["id"] for r in _rows(out / "predictions.csv")]
    assert sorted(set(rows)) == ["k0", "k1", "k2"] and rows[-1] == "k0"  # k0 twice: the later row is current
    monkeypatch.setattr(CsvLog, "append", real_append)
    assert predict_files(run, [inputs[0]], out, progress=False, names="id").ok == 1
    assert sorted(r["id"] for r in _rows(out / "predictions.csv")) == ["k0", "k1", "k2"]


def test_the_longest_file_names_give_outputs_that_fit_a_file_name(tmp_path, run):
    """An input named with all 255 bytes a file name may have (ASCII or not) is predicted under
    its id cut to fit `<name>_dicom` and `<name>.nii.gz`; two such names that differ only at
    the end keep different output names."""
    from kneetf.inference.batch import MAX_NAME_BYTES, collect_inputs, output_name, predict_files, safe_id

    names = ["k" * 250 + "a.npy", "k" * 250 + "b.npy", "\u00fc" * 125 + "x.npy",  # 255 bytes each
             "OAI." + "k" * 247 + ".npy"]  # the temporary name keeps every dot-suffix of the output name
    for name in names:
        np.save(tmp_path / name, _xray(len(name)))
    out = tmp_path / "out"
    report = predict_files(run, [tmp_path / n for n in names], out, formats=("nifti", "dicom", "png"),
                           progress=False, names="id")
    assert report.ok == 4 and not report.errors
    ids = [r["id"] for r in _rows(out / "predictions.csv")]
    assert len(set(ids)) == 4 and all(len(i.encode()) <= MAX_NAME_BYTES for i in ids)
    assert sorted(ids) == sorted(output_name(safe_id(Path(n).stem)) for n in names)
    for i in ids:
        assert (out / f"{i}.nii.gz").is_file() and (out / f"{i}_dicom").is_dir() and (out / f"{i}.png").is_file()
    assert output_name("k" * MAX_NAME_BYTES) == "k" * MAX_NAME_BYTES  # names that fit are left alone
    clash = tmp_path / "clash"  # an input named as another one's cut output name
    clash.mkdir()
    np.save(clash / names[0], _xray(1))
    np.save(clash / (output_name(Path(names[0]).stem) + ".npy"), _xray(2))
    inputs, errors = collect_inputs([clash])
    assert len(inputs) == 1 and "is also that of" in errors[0]["reason"]


def test_a_folder_leaves_out_dicom_objects_that_are_not_images_but_not_cut_images(tmp_path):
    """Reports and presentation states exported next to the X-ray (UID-named, with no image) are
    not inputs, so they are no failures; a compressed X-ray cut short is an input, and fails
    saying it was cut."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless, RLELossless

    from dicom_factory import GRAYSCALE_PRESENTATION_STATE, cut_compressed_xray, write_non_image
    from kneetf.inference.batch import collect_inputs
    from kneetf.io.dicom import read_dicom_image
    from kneetf.io.writers import write_dicom_xray

    folder = tmp_path / "export"
    folder.mkdir()
    image = (_xray(0) * 1000).astype(np.uint16)
    write_dicom_xray(folder / "1.2.840.113619.2.55.3.1", image)
    write_non_image(folder / "1.2.840.113619.2.55.3.2")
    write_non_image(folder / "1.2.840.113619.2.55.3.3.dcm", GRAYSCALE_PRESENTATION_STATE, "PR")
    write_non_image(folder / "1.2.840.113619.2.55.3.5", transfer_syntax=JPEGLSLossless)  # archive-wide compression
    write_non_image(folder / "1.2.840.113619.2.55.3.6", transfer_syntax="1.2.840.113619.5.2")  # a private syntax
    cut_compressed_xray(folder / "1.2.840.113619.2.55.3.4", image)
    icon = pydicom.Dataset()  # a report with a compressed icon: encapsulated pixel data in a sequence
    icon.Rows = icon.Columns = 2
    icon.PixelData = encapsulate([b"\0" * 64])
    icon["PixelData"].VR, icon["PixelData"].is_undefined_length = "OB", True
    report = pydicom.dcmread(write_non_image(folder / "1.2.840.113619.2.55.3.7", transfer_syntax=RLELossless))
    report.IconImageSequence = [icon]
    report.save_as(folder / "1.2.840.113619.2.55.3.7", enforce_file_format=True, implicit_vr=False, little_endian=True)
    (folder / "empty.dcm").write_bytes(b"")  # broken files stay inputs, and fail where they are seen
    (folder / "notes.dcm").write_text("not DICOM at all")
    write_dicom_xray(folder / "cut_header.dcm", image)
    (folder / "cut_header.dcm").write_bytes((folder / "cut_header.dcm").read_bytes()[:400])
    garbled = write_non_image(folder / "garbled.dcm")  # its SOP class UID as FD: pydicom cannot convert it
    garbled.write_bytes(garbled.read_bytes().replace(b"\x08\x00\x16\x00UI", b"\x08\x00\x16\x00FD", 1))
    inputs, errors = collect_inputs([folder])
    assert errors == []
    assert sorted(i.id for i in inputs) == ["1.2.840.113619.2.55.3.1", "1.2.840.113619.2.55.3.4", "cut_header",
                                            "empty", "garbled", "notes"]
    with pytest.raises(InputError, match="truncated") as e:
        read_dicom_image(folder / "1.2.840.113619.2.55.3.4")
    assert e.value.path == str(folder / "1.2.840.113619.2.55.3.4")
    only_reports = tmp_path / "reports"
    only_reports.mkdir()
    write_non_image(only_reports / "1.2.3.4")
    inputs, errors = collect_inputs([only_reports])
    assert inputs == [] and "holds no X-ray files" in errors[0]["reason"]


def test_a_folder_gives_its_dicom_files_whatever_their_names_and_not_its_dicomdir(tmp_path):
    """A PACS or CD export names DICOM files by UID (the last dot is no suffix) and carries a
    DICOMDIR index: every DICOM file is an input, with its whole name as id; the index and
    files that are neither images nor DICOM are not."""
    from kneetf.inference.batch import collect_inputs
    from kneetf.io.writers import write_dicom_xray, write_png

    folder = tmp_path / "export"
    folder.mkdir()
    image = (_xray(0) * 1000).astype(np.uint16)
    for name in ("1.2.840.113619.2.55.3.1", "1.2.840.113619.2.55.3.2", "IMG0001"):
        write_dicom_xray(folder / name, image)
    write_dicom_xray(folder / "DICOMDIR", image)
    write_png(folder / "knee.v2.png", image)
    (folder / "notes.csv").write_text("id,x\n")
    (folder / "readme.txt").write_text("exported")
    inputs, errors = collect_inputs([folder])
    assert errors == []
    assert sorted(i.id for i in inputs) == ["1.2.840.113619.2.55.3.1", "1.2.840.113619.2.55.3.2", "IMG0001",
                                            "knee.v2"]
