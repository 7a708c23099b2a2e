"""`kneetf prepare` on real files: synthetic DICOM / NIfTI / PNG pairs, bad inputs, ROI sources,
resume, no patient identifiers in the cache; `kneetf-train --data manifest.csv`."""
from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from kneetf.cli.main import main
from kneetf.data.pipeline import load_arrays
from kneetf.data.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root, n=6, seed=3, workers=0, progress=False)
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _with_bad_rows(synth: Path, name: str) -> Path:
    """The synthetic manifest plus a broken DICOM, a missing file and a duplicate id."""
    rows = _rows(synth / "manifest.csv")
    (synth / "broken.dcm").write_bytes(b"DICM but not really" * 10)
    bad = [dict(rows[0], id="broken", xray="broken.dcm"), dict(rows[1], id="missing", mri="mri/nowhere"),
           dict(rows[2])]
    out = synth / name
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows + bad)
    return out


def test_prepare_dicom_manifest_skips_bad_inputs_and_resumes(synth: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    manifest = _with_bad_rows(synth, "with_bad.csv")
    rois = tmp_path / "rois.csv"  # boxes for the bad rows too, so that they fail on their files
    lines = (synth / "rois.csv").read_text().splitlines()
    rois.write_text("\n".join(lines + [lines[1].replace(lines[1].split(",")[0], "broken", 1)]) + "\n")
    cache = tmp_path / "cache"
    rc = main(["prepare", str(manifest), "--out", str(cache), "--rois", str(rois), "--workers", "2",
               "--roi-preview"])
    assert rc == 4  # three bad rows skipped, the rest written
    out = capsys.readouterr().out
    info = json.loads((cache / "dataset.json").read_text())
    assert sum(info["counts"].values()) == 6 and info["errors"] == 3
    errors = {r["id"] or r["reason"][:20]: r for r in _rows(cache / "errors.csv")}
    assert "broken" in errors and "broken.dcm" in errors["broken"]["file"]
    assert any("nowhere" in r["file"] + r["reason"] for r in errors.values())
    assert any("duplicate" in r["reason"].lower() for r in errors.values())
    assert "3 problem(s) with the inputs" in out
    # one contact sheet: a legend bar and one 96-px tile per pair (all boxes from the CSV)
    sheets = sorted((cache / "roi_preview").glob("*.png"))
    assert [p.name for p in sheets] == ["sheet-001.png"]
    import cv2

    assert cv2.imread(str(sheets[0])).shape == (22 + 96, 6 * 96, 3)
    assert "ROI boxes: csv 6; knee not found in 0 X-ray(s)" in out
    # the cache holds the manifest's ids and no patient identifier from the DICOM headers
    import pydicom

    header = pydicom.dcmread(next((synth / "mri" / _rows(synth / "manifest.csv")[0]["id"]).iterdir()))
    blob = b"".join(p.read_bytes() for p in cache.glob("*.tfrecord"))
    for uid in (header.SeriesInstanceUID, header.StudyInstanceUID, header.SOPInstanceUID):
        assert uid.encode() not in blob
    manifest_ids = {r["id"] for r in _rows(synth / "manifest.csv")}
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate"):
        value = str(header.get(keyword, "") or "")
        # the synthetic patient module reuses the knee id, which the cache keeps as the manifest id
        if len(value) > 3 and value not in manifest_ids:
            assert value.encode() not in blob, keyword
    ids = sorted(load_arrays(cache, "train")["id"] + (load_arrays(cache, "val")["id"] if info["counts"]["val"]
                                                      else []) + (load_arrays(cache, "test")["id"]
                                                                  if info["counts"]["test"] else []))
    assert ids == sorted(r["id"] for r in _rows(synth / "manifest.csv"))
    # every pair's box and its source, as the CSV gave it
    boxes = {r["id"]: r for r in _rows(rois)}
    recorded = {r["id"]: r for r in _rows(cache / "rois.csv")}
    assert sorted(recorded) == ids and {r["source"] for r in recorded.values()} == {"csv"}
    assert all(float(recorded[i][k]) == float(boxes[i][k]) for i in ids for k in ("x0", "y0", "x1", "y1"))
    assert info["rois"] == {"file": "rois.csv", "by_source": {"csv": 6}, "flagged": 0, "failed": 0}
    assert info["source"]["roi"] == {"source": "csv", "boxes": "rois.csv"}
    # a second run finds every shard complete and writes nothing new
    mtimes = {p: p.stat().st_mtime_ns for p in cache.glob("*.tfrecord")}
    assert main(["prepare", str(manifest), "--out", str(cache), "--rois", str(rois)]) == 4
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.tfrecord")} == mtimes


def test_nifti_png_manifest_gives_the_same_cache_as_dicom(synth: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "dicom", tmp_path / "nifti"
    assert main(["prepare", str(synth / "manifest.csv"), "--out", str(a), "--rois", str(synth / "rois.csv"),
                 "--workers", "0"]) == 0
    assert main(["prepare", str(synth / "manifest_nifti_png.csv"), "--out", str(b), "--rois",
                 str(synth / "rois.csv"), "--workers", "0"]) == 0
    da, db = load_arrays(a, "train"), load_arrays(b, "train")
    assert da["id"] == db["id"]
    # same MRI slices in the same order and orientation from DICOM and NIfTI
    np.testing.assert_allclose(da["mri"], db["mri"], atol=2e-3)
    # the 16-bit PNG and the DICOM X-ray hold the same image
    np.testing.assert_allclose(da["xray"], db["xray"], atol=2e-3)


def _shards(cache: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in cache.glob("*.tfrecord")}


def _later(path: Path) -> None:
    """Give `path` a modification time after everything written so far, as a later edit would."""
    later = time.time_ns() + 2_000_000_000
    os.utime(path, ns=(later, later))


def test_replaced_inputs_rebuild_only_their_shards(synth: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(synth, data)
    rows = [r for r in _rows(data / "manifest.csv") if r["split"] == "train"]
    cache = tmp_path / "cache"
    args = ["prepare", str(data / "manifest.csv"), "--out", str(cache), "--rois", str(data / "rois.csv"),
            "--workers", "0", "--shard-size", "1"]
    assert main(args) == 0
    old, before = load_arrays(cache, "train"), _shards(cache)
    # the first knee's X-ray is replaced by the second's; one slice file of the third's MRI is rewritten
    xray = data / rows[0]["xray"]
    shutil.copyfile(data / rows[1]["xray"], xray)
    _later(xray)
    import pydicom

    from kneetf.io.dicom import order_slices, scan_dicom

    slice_file = order_slices(scan_dicom(data / rows[2]["mri"])[0], "mri")[0][30].path  # in the window
    ds = pydicom.dcmread(slice_file)
    ds.PixelData = (ds.pixel_array // 2).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(slice_file)
    _later(slice_file)
    assert main(args) == 0
    new, after = load_arrays(cache, "train"), _shards(cache)
    assert new["id"] == old["id"] == [r["id"] for r in rows]
    assert sorted(n for n in before if after[n] != before[n]) == ["train-00000-of-00004.tfrecord",
                                                                   "train-00002-of-00004.tfrecord"]
    assert not np.allclose(new["xray"][0], old["xray"][0], atol=1e-3)
    assert not np.allclose(new["mri"][2], old["mri"][2], atol=1e-3)
    np.testing.assert_array_equal(new["xray"][1:], old["xray"][1:])
    np.testing.assert_array_equal(new["mri"][3], old["mri"][3])
    assert main(args) == 0 and _shards(cache) == after  # nothing changed since: nothing rebuilt


def test_cache_written_before_input_stamps_is_kept_or_rebuilt(synth: Path, tmp_path: Path) -> None:
    """Sidecars as older versions wrote them (a fingerprint of ids and paths only) stay valid
    while no input is newer than their shard."""
    from kneetf.config import PreprocessConfig, config_hash
    from kneetf.data.cache import _fingerprint, shard_plan
    from kneetf.data.sources import manifest_tasks

    data = tmp_path / "data"
    shutil.copytree(synth, data)
    cache = tmp_path / "cache"
    args = ["prepare", str(data / "manifest.csv"), "--out", str(cache), "--rois", str(data / "rois.csv"),
            "--workers", "0", "--shard-size", "2"]
    assert main(args) == 0
    tasks, _ = manifest_tasks(data / "manifest.csv", rois=data / "rois.csv")
    plan = shard_plan(tasks, 2)
    for name, chunk in plan:
        side = cache / (name + ".json")
        meta = json.loads(side.read_text())
        side.write_text(json.dumps({"fingerprint": _fingerprint(chunk, config_hash(PreprocessConfig())),
                                    "count": meta["count"], "errors": meta["errors"]}))
        os.utime(side, ns=((cache / name).stat().st_mtime_ns,) * 2)
    before = _shards(cache)
    name, chunk = plan[0]
    _later(Path(chunk[0].payload.xray))  # touched after the cache was written: its shard is stale
    assert main(args) == 0
    after = _shards(cache)
    assert sorted(n for n in before if after[n] != before[n]) == [name]
    assert all(json.loads((cache / (n + ".json")).read_text())["inputs"] == "size+mtime_ns" for n, _ in plan)
    assert main(args) == 0 and _shards(cache) == after


def test_nothing_valid_exits_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m.csv").write_text("id,xray,mri\nk1,nowhere.png,nowhere/\n")
    assert main(["prepare", str(tmp_path / "m.csv"), "--out", str(tmp_path / "c"), "--workers", "0"]) == 1
    out = capsys.readouterr().out
    assert "prepared 0 pair(s)" in out and "nowhere.png" in out and "problem(s) with the inputs" in out


@pytest.mark.slow
def test_train_on_a_manifest_prepares_it_on_the_fly(synth: Path, tmp_path: Path) -> None:
    rc = main(["train", "--preset", "tiny", "--data", str(synth / "manifest.csv"), "--epochs", "1",
               "--batch-size", "2", "--out", str(tmp_path / "run"), "--workers", "0"])
    assert rc == 0
    assert (tmp_path / "run" / "data" / "manifest-cache" / "dataset.json").exists()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train_pairs"] >= 3


def test_prepare_skips_an_xray_whose_knee_is_not_found(synth: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The classical ROI finds the knees of collimated, marker-laden hospital
    X-rays (DICOM with a pixel spacing, one stored MONOCHROME1) and reports the one without a
    knee as failed; the rest is written, each pair with its box and source, and one contact
    sheet shows every crop and the failure."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from roi_factory import laden_knee

    from kneetf.io.writers import write_dicom_xray

    rows = _rows(synth / "manifest.csv")[:4]
    lines, truth = ["id,xray,mri,split"], {}
    for k, r in enumerate(rows):
        image, box, spacing = laden_knee(k)
        if k == 3:
            image = image[:150]  # the femur above the joint: no knee joint to find
        write_dicom_xray(tmp_path / f"{r['id']}.dcm", image, pixel_spacing=spacing,
                         photometric="MONOCHROME1" if k == 1 else "MONOCHROME2")
        truth[r["id"]] = box
        lines.append(f"{r['id']},{r['id']}.dcm,{(synth / r['mri']).resolve()},train")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    cache = tmp_path / "cache"
    rc = main(["prepare", str(tmp_path / "manifest.csv"), "--out", str(cache), "--allow-outside", "--workers", "0",
               "--roi-preview", "--roi-detector", "classical"])
    assert rc == 4  # some X-rays failed, the others were prepared
    out = capsys.readouterr().out
    assert "look at their boxes (--roi-preview" in out  # the ROI source was unsure: say what to do
    assert "the built-in detector (the default) finds more knees" in out
    failed = rows[3]["id"]
    errors = _rows(cache / "errors.csv")
    assert [e["id"] for e in errors] == [failed] and "no knee joint found" in errors[0]["reason"]
    assert errors[0]["file"].endswith(f"{failed}.dcm")
    info = json.loads((cache / "dataset.json").read_text())
    assert info["counts"]["train"] == 3 and info["rois"]["failed"] == 1
    assert info["source"]["roi"]["source"] == "classical" and info["source"]["roi"]["box_mm"] == 100.0
    recorded = {r["id"]: r for r in _rows(cache / "rois.csv")}
    assert sorted(recorded) == sorted(r["id"] for r in rows[:3])
    for case_id, r in recorded.items():
        box, true = [float(r[k]) for k in ("x0", "y0", "x1", "y1")], truth[case_id]
        assert r["source"] == "classical" and 0.0 < float(r["confidence"]) <= 1.0
        assert abs((box[0] + box[2]) / 2 - true.cx) < 0.05 * true.width
        assert abs((box[1] + box[3]) / 2 - true.cy) < 0.05 * true.width
        assert box[2] - box[0] == pytest.approx(100.0 / 0.3)  # 100 mm: the DICOM's pixel spacing is used
    n_flagged = sum(r["flagged"] == "1" for r in recorded.values())
    assert "ROI boxes: classical 3" in out and "knee not found in 1 X-ray(s)" in out
    assert (f"({n_flagged} flagged for review)" in out) == (n_flagged > 0)
    # one sheet: a legend bar over 3 crops and 1 failure tile in a row
    import cv2

    sheets = sorted((cache / "roi_preview").glob("*.png"))
    assert [p.name for p in sheets] == ["sheet-001.png"]
    sheet = cv2.imread(str(sheets[0]))
    assert sheet.shape == (22 + 96, 4 * 96, 3)
    from kneetf.data.review import COLOURS

    assert tuple(sheet[22 + 1, 3 * 96 + 1]) == COLOURS["failed"]  # the last tile's frame is red


def test_prepare_refuses_a_bad_shard_size_and_an_out_that_is_a_file_or_holds_inputs(
        synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = synth / "manifest.csv"
    for size in ("0", "-1"):  # -1 once dropped the last pair of every split without a word
        assert main(["prepare", str(manifest), "--out", str(tmp_path / "c"), "--shard-size", size,
                     "--workers", "0"]) == 1
        assert f"shard_size must be at least 1. Received: shard_size={size}" in capsys.readouterr().err
    (tmp_path / "afile").write_text("not a folder")
    assert main(["prepare", str(manifest), "--out", str(tmp_path / "afile"), "--workers", "0"]) == 1
    assert "exists and is not a folder" in capsys.readouterr().err
    before = {p.name: p.read_bytes() for p in synth.iterdir() if p.is_file()}
    assert main(["prepare", str(manifest), "--out", str(synth), "--workers", "0"]) == 1
    assert f"holds the input {manifest}" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in synth.iterdir() if p.is_file()} == before  # rois.csv untouched


def test_rows_without_a_split_are_split_by_id(synth: Path) -> None:
    from kneetf.data.sources import manifest_tasks
    from kneetf.io.manifest import DEFAULT_SPLIT, split_participants

    rows = _rows(synth / "manifest.csv")
    with (synth / "nosplit.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "split"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    rows[0]["split"] = "val"  # a row that names its split keeps it
    with (synth / "somesplit.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([rows[0]] + [dict(r, split="") for r in rows[1:]])
    tasks, errors = manifest_tasks(synth / "nosplit.csv")
    splits = {t.id: t.split for t in tasks}
    assert not errors and splits == split_participants([r["id"] for r in rows], DEFAULT_SPLIT, seed=0)
    assert set(splits.values()) > {"train"}  # not every row lands in train
    tasks, _ = manifest_tasks(synth / "somesplit.csv")
    assert {t.id: t.split for t in tasks} == {rows[0]["id"]: "val", **split_participants(
        [r["id"] for r in rows[1:]], DEFAULT_SPLIT, seed=0)}


def test_bad_boxes_skip_their_pairs_and_the_rest_is_prepared(synth: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Each bad line of a boxes CSV costs its own pair, named with its line; a box far larger than
    the X-ray is refused instead of cropping a speck of knee out of gigabytes of padding."""
    rows = _rows(synth / "manifest.csv")
    boxes = {r["id"]: r for r in _rows(synth / "rois.csv")}
    ids = [r["id"] for r in rows]
    line = lambda i, *v: ",".join([i, *map(str, v)])  # noqa: E731
    good = lambda i: line(i, *(boxes[i][k] for k in ("x0", "y0", "x1", "y1")))  # noqa: E731
    text = ["id,x0,y0,x1,y1",
            line(ids[0], 50, 60, 10, 100),        # line 2: swapped x
            line(ids[1], 10, "nan", 60, 100),     # line 3: NaN
            good(ids[2]), good(ids[2]),           # lines 4, 5: a duplicate id: which box is meant?
            line(ids[3], 0, 0, 20000, 20000),     # line 6: far larger than the X-ray
            good(ids[4]), good(ids[5]),
            line("stranger", 1, 1, 0, 0)]         # an id outside the manifest: nothing lost
    (tmp_path / "boxes.csv").write_text("\n".join(text) + "\n")
    cache = tmp_path / "cache"
    rc = main(["prepare", str(synth / "manifest.csv"), "--out", str(cache), "--rois", str(tmp_path / "boxes.csv"),
               "--workers", "0"])
    assert rc == 4
    errors = {e["id"]: e["reason"] for e in _rows(cache / "errors.csv")}
    assert sorted(errors) == sorted(ids[:4])
    assert errors[ids[0]].startswith("line 2: empty box") and errors[ids[1]].startswith("line 3: y0 is not finite")
    assert errors[ids[2]].startswith("line 5: duplicate id") and "does not fit the" in errors[ids[3]]
    assert sorted(r["id"] for r in _rows(cache / "rois.csv")) == sorted(ids[4:])
    assert "4 problem(s) with the inputs" in capsys.readouterr().out


def test_a_constant_mri_is_refused(synth: Path, tmp_path: Path) -> None:
    rows = _rows(synth / "manifest.csv")[:2]
    np.save(tmp_path / "flat.npy", np.full((48, 32, 32), 7, dtype=np.int16))
    lines = ["id,xray,mri,split", f"flat,{(synth / rows[0]['xray']).resolve()},flat.npy,train",
             f"{rows[1]['id']},{(synth / rows[1]['xray']).resolve()},{(synth / rows[1]['mri']).resolve()},train"]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "boxes.csv").write_text((synth / "rois.csv").read_text().replace(rows[0]["id"] + ",", "flat,", 1))
    cache = tmp_path / "cache"
    assert main(["prepare", str(tmp_path / "m.csv"), "--out", str(cache), "--rois", str(tmp_path / "boxes.csv"),
                 "--allow-outside", "--workers", "0"]) == 4
    (error,) = _rows(cache / "errors.csv")
    assert error["id"] == "flat" and "are constant (every value 7)" in error["reason"]
    assert error["file"].endswith("flat.npy")


def test_training_on_a_manifest_names_the_pairs_it_skipped(synth: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    from kneetf.config import PreprocessConfig
    from kneetf.training.train import DataSpec, resolve_cache

    manifest = _with_bad_rows(synth, "train_with_bad.csv")
    with caplog.at_level("WARNING"):
        cache = resolve_cache(DataSpec(path=str(manifest), workers=0), tmp_path / "run", PreprocessConfig(),
                              progress=False)
    assert (cache / "dataset.json").is_file()
    (warning,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "3 pair(s) skipped, training on the other 6" in warning and "broken.dcm" in warning
