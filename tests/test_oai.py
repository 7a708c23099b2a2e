"""kneetf.io.oai + `kneetf import-oai` on a small fake OAI tree in the real layout."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from dicom_factory import OAI_XRAY_SHAPE, OTHER_MRI_SEQUENCES, make_oai_release, make_oai_tree
from kneetf.cli.main import main
from kneetf.errors import ConfigError, InputError
from kneetf.io.manifest import read_manifest
from kneetf.io.oai import mri_side, pair_oai, parse_split, split_participants
from kneetf.io.readers import read_mri_window, read_xray

PIDS = ["9000099", "9000296", "9000622", "9001104", "9001400"]


@pytest.fixture(scope="module")
def oai(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("oai")
    info = make_oai_tree(
        root, PIDS, sides={"9001104": ("RIGHT",)}, xray_missing=("9001400",),
        extra_rows=[["1.C.2/9009999/20050101/99999999", "9009999", "20050101", "99999999", "OAI^MR",
                     "SAG_3D_DESS_LEFT"],
                    ["1.C.2/9000099/20050101/1", "9000099", "20050101", "1", "Bilateral PA Fixed Flexion Knee",
                     "Bilateral PA Fixed Flexion Knee"],
                    ["too", "few"]])
    return root, info


def test_pairing_sides_halves_and_skips(oai) -> None:
    root, info = oai
    result = pair_oai(root, ["00m"], seed=0, split=(0.6, 0.2, 0.2))
    ids = [c.id for c in result.cases]
    assert ids == ["9000099_00m_L", "9000099_00m_R", "9000296_00m_L", "9000296_00m_R", "9000622_00m_L",
                   "9000622_00m_R", "9001104_00m_R"]
    for case in result.cases:
        pid, _, side = case.id.split("_")
        assert case.side == {"R": "right", "L": "left"}[side]
        assert case.xray_half == {"R": "left", "L": "right"}[side]  # patient's right knee = image's left half
        assert case.mri == info[pid]["RIGHT" if side == "R" else "LEFT"][0]
        assert case.xray == info[pid]["XRAY"][0]
        assert case.extra == {"participant": pid, "visit": "00m"}
    splits = {}
    for case in result.cases:  # both knees of a participant share a split
        splits.setdefault(case.extra["participant"], set()).add(case.split)
    assert all(len(s) == 1 for s in splits.values())
    reasons = {(s.participant, s.reason.split(":")[0]) for s in result.skipped}
    assert ("9001400", "unpaired MRI") in reasons  # no X-ray: both knees reported
    assert sum(s.participant == "9001400" for s in result.skipped) == 2
    assert ("9009999", "folder not found") in reasons
    assert ("9000099", "folder not found") in reasons  # the listed second X-ray is missing on disk
    assert any("malformed contents.csv row" in s.reason for s in result.skipped)
    assert result.participants == 4


def test_cli_end_to_end(oai, capsys: pytest.CaptureFixture) -> None:
    root, info = oai
    out = root / "oai.csv"  # beside the visit folders: paths stay relative
    report = root / "reports" / "skipped.csv"
    code = main(["import-oai", str(root), "--visit", "00m", "--seed", "1", "--split", "0.5,0.25,0.25",
                 "--out", str(out), "--skipped-report", str(report)])
    printed = capsys.readouterr()
    assert code == 4, printed.err  # written, with series that could not be paired
    assert "7 knees of 4 participants" in printed.out and "unpaired MRI" in printed.out
    assert report.read_text().startswith("participant,visit,what,reason,folder\n")
    header = out.read_text().splitlines()[0]
    assert header == "id,xray,mri,side,split,xray_half,participant,visit"
    assert f",00m/1.C.2/{PIDS[0]}/" in out.read_text()  # relative inside the root
    result = read_manifest(out)
    assert result.ok, result.errors
    assert len(result.cases) == 7
    for case in result.cases:
        pid = case.extra["participant"]
        image, meta = read_xray(case.xray, half=case.xray_half)
        assert image.shape == (64, 48) and meta.half == case.xray_half
        # the fake bilateral image is bright (3000) on its left half: the patient's right knee
        assert np.all(image == (3000.0 if case.side == "right" else 1000.0))
        volume, _ = read_mri_window(case.mri)
        np.testing.assert_array_equal(volume, info[pid]["RIGHT" if case.side == "right" else "LEFT"][1][20:40])
    # a manifest written elsewhere holds absolute paths, refused unless allowed explicitly
    elsewhere = root / "manifests" / "oai.csv"
    assert main(["import-oai", str(root), "--out", str(elsewhere)]) == 4
    assert "allow_outside" in capsys.readouterr().err
    errors = read_manifest(elsewhere).errors
    assert len(errors) == 14 and all("leaves the manifest's folder" in e.reason for e in errors)
    assert len(read_manifest(elsewhere, allow_outside=True).cases) == 7


def test_contents_csv_in_visit_folder_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_oai_tree(tmp_path, ["9100001"], csv_in_visit=True, visit="12m")
    result = pair_oai(tmp_path, ["12m"])
    assert [c.id for c in result.cases] == ["9100001_12m_L", "9100001_12m_R"]
    with pytest.raises(InputError, match="visit folder not found \\(folders under .*: 12m"):
        pair_oai(tmp_path, ["00m"])
    with pytest.raises(InputError, match="no SAG_IW_TSE_LEFT/_RIGHT MRI could be paired"):
        from kneetf.io.oai import import_oai
        import_oai(tmp_path, tmp_path / "m.csv", ["12m"], mri_series="SAG_IW_TSE")
    assert not (tmp_path / "m.csv").exists()
    assert main(["import-oai", str(tmp_path), "--visit", "12m", "--split", "0.5,0.5", "--out", "m.csv"]) == 1
    assert "split must be three" in capsys.readouterr().err


def test_split_participants_is_seeded_disjoint_and_proportional() -> None:
    ids = [str(9000000 + i) for i in range(200)]
    a = split_participants(ids, (0.8, 0.1, 0.1), seed=0)
    assert a == split_participants(list(reversed(ids)), (0.8, 0.1, 0.1), seed=0)
    assert a != split_participants(ids, (0.8, 0.1, 0.1), seed=1)
    counts = {s: list(a.values()).count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 160, "val": 20, "test": 20}
    assert parse_split("0.7, 0.2, 0.1") == (0.7, 0.2, 0.1)
    for bad in ("0.8,0.1", "a,b,c", "0.9,0.2,-0.1", "0.5,0.5,0.5"):
        with pytest.raises(ConfigError):
            parse_split(bad)


def test_mri_side() -> None:
    assert mri_side("SAG_3D_DESS_LEFT", "SAG_3D_DESS") == "left"
    assert mri_side("sag_3d_dess_right", "SAG_3D_DESS") == "right"
    assert mri_side("COR_IW_TSE_RIGHT", "SAG_3D_DESS") is None
    assert mri_side("SAG_3D_DESS_THIGH", "SAG_3D_DESS") is None


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("release")
    expected, unpaired = make_oai_release(root)
    return root, expected, unpaired


def test_every_knee_is_paired_with_the_knee_series_not_a_distractor(release) -> None:
    root, expected, unpaired = release
    result = pair_oai(root, ["00m"])
    got = {c.id: c for c in result.cases}
    assert sorted(got) == sorted(expected)
    for case_id, (xray, mri, value) in expected.items():
        case = got[case_id]
        assert (case.xray, case.mri) == (xray, mri), case_id
        image, _ = read_xray(case.xray, half=case.xray_half)
        assert np.all(image == value), case_id  # the knee's own half of the knee image
    skipped: dict[str, str] = {}
    for s in result.skipped:
        skipped[s.participant] = skipped.get(s.participant, "") + f" | {s.reason} @ {s.folder}"
    for pid, reasons in unpaired.items():
        assert all(r in skipped[pid] for r in reasons), (pid, skipped[pid])
        assert not any(c.startswith(pid) for c in got)
    assert "not a bilateral PA knee X-ray: listed as 'PA Hand' (a hand)" in skipped["9200001"]
    assert "DICOM header says a lateral view (SeriesDescription)" in skipped["9200002"]
    assert ("contradicts the listing 'Bilateral PA Fixed Flexion Knee': a pelvis and an AP view (SeriesDescription); "
            "BodyPartExamined PELVIS") in skipped["9200003"]
    assert "listed as 'Localizer' (a localizer)" in skipped["9200004"] and "extra X-ray: using" in skipped["9200004"]
    assert "listed as 'Lateral Right Knee' (a lateral view)" in skipped["9200005"]
    assert skipped["9200008"].count("ambiguous: 2 images") == 2
    # the other MRI sequences are listed as not used, each with its reason
    assert len(result.ignored) == len(OTHER_MRI_SEQUENCES) * (2 * 7 + 1)
    assert all(s.reason.startswith("not used: neither a SAG_3D_DESS") for s in result.ignored)


def test_import_oai_writes_the_skipped_series_beside_the_manifest(release, capsys: pytest.CaptureFixture) -> None:
    root, expected, _ = release
    out = root / "manifest.csv"
    assert main(["import-oai", str(root), "--out", str(out)]) == 4  # written, with series skipped
    printed = capsys.readouterr().out
    assert f"{len(expected)} knees of 5 participants" in printed
    assert f"reasons in {root / 'manifest.skipped.csv'}" in printed
    with (root / "manifest.skipped.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["participant", "visit", "what", "reason", "folder"]
    hand = [r for r in rows if r["participant"] == "9200001" and "PA Hand" in r["what"]]
    assert len(hand) == 1 and hand[0]["folder"].endswith("001") and "a hand" in hand[0]["reason"]
    assert sum(r["reason"].startswith("unpaired MRI") for r in rows) == 6
    assert {c.id: c.xray for c in read_manifest(out).cases} == {k: v[0] for k, v in expected.items()}


def test_xray_description() -> None:
    from kneetf.io.oai import xray_description

    assert xray_description("Bilateral PA Fixed Flexion Knee") == ("knee", "bilateral")
    assert xray_description("P.A. knees, both") == ("knee", "bilateral")
    assert xray_description("PA Fixed Flexion Left Knee") == ("other", "one knee only")
    assert xray_description("PA Hand")[0] == "other"
    assert xray_description("Lateral Left Knee") == ("other", "a lateral view")
    assert xray_description("AP Pelvis") == ("other", "a pelvis and an AP view")
    assert xray_description("")[0] == xray_description("Knee")[0] == xray_description("Image 2")[0] == "unknown"


def test_only_problems_with_the_files_count_as_failures() -> None:
    """import-oai exits 4 for a missing folder or a contradictory file, not for the hand,
    lateral or unpaired series every OAI release holds."""
    from kneetf.io.oai import OaiImport, Skipped

    by_design = [Skipped("9000001", "00m", "XRAY", "not a bilateral PA knee X-ray: listed as 'PA Hand'", "f"),
                 Skipped("9000001", "00m", "MRI", "unpaired MRI: no bilateral PA fixed flexion knee X-ray", "f"),
                 Skipped("9000001", "00m", "MRI", "extra MRI series: using SAG_3D_DESS_RIGHT", "f")]
    assert OaiImport([], skipped=by_design).failures() == []
    missing = Skipped("9000002", "00m", "MRI", "folder not found: 00m/1.C.2/9000002", "f")
    assert OaiImport([], skipped=by_design + [missing]).failures() == [missing]


def test_import_oai_never_writes_over_what_it_reads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--out (or --skipped-report) naming the release's contents.csv replaced the OAI listing
    with the manifest; an --out that is a folder failed only after the skipped report was written."""
    make_oai_tree(tmp_path / "oai", ["9100001"])
    [contents] = sorted((tmp_path / "oai").rglob("contents.csv"))
    listing = contents.read_bytes()
    image = next(p for p in (tmp_path / "oai").rglob("*") if p.is_file() and p.name != "contents.csv")
    for argv, said in [(["--out", str(contents)], "is an input of this command"),
                       (["--out", str(tmp_path / "m.csv"), "--skipped-report", str(contents)],
                        "is an input of this command"),
                       (["--out", str(image)], "is a file of the OAI tree"),
                       (["--out", str(tmp_path / "m.csv"), "--skipped-report", str(tmp_path / "m.csv")],
                        "is the --out manifest"),
                       (["--out", str(tmp_path / "oai")], "is a folder; give a file name")]:
        assert main(["import-oai", str(tmp_path / "oai"), *argv]) == 1, argv
        assert said in capsys.readouterr().err, argv
    other_visit = tmp_path / "oai" / "12m" / "contents.csv"  # a listing this import does not read
    assert main(["import-oai", str(tmp_path / "oai"), "--out", str(other_visit)]) == 1
    assert "is a file of the OAI tree" in capsys.readouterr().err and not other_visit.exists()
    assert contents.read_bytes() == listing
    assert not list(tmp_path.glob("*.csv")) and not list((tmp_path / "oai").glob("*.skipped.csv"))
    assert main(["import-oai", str(tmp_path / "oai"), "--out", str(tmp_path / "oai" / "manifest.csv")]) == 0
    assert main(["import-oai", str(tmp_path / "oai"), "--out", str(tmp_path / "oai" / "manifest.csv")]) == 0  # rerun


def test_an_unreadable_xray_is_a_failure_named_by_its_absolute_path(tmp_path: Path, monkeypatch) -> None:
    """A file in an X-ray folder that is not DICOM, or whose pixel data the file cuts short, is
    skipped as unreadable (a failure of the release, not one of its other views), and the report
    names it by its absolute path whatever folder the import runs from."""
    info = make_oai_tree(tmp_path / "oai", PIDS[:3])
    garbage, cut = info[PIDS[0]]["XRAY"][0], info[PIDS[1]]["XRAY"][0]
    garbage.write_bytes(b"not a radiograph" * 64)
    cut.write_bytes(cut.read_bytes()[:-1000])
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    deflated = pydicom.dcmread(info[PIDS[2]]["XRAY"][0])  # whole: its offsets are the inflated stream's
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated.save_as(info[PIDS[2]]["XRAY"][0])
    monkeypatch.chdir(tmp_path)
    result = pair_oai(Path("oai"), ["00m"])
    assert sorted({c.id.split("_")[0] for c in result.cases}) == [PIDS[2]]
    unreadable = {s.participant: s for s in result.failures() if s.reason.startswith("unreadable X-ray file")}
    assert set(unreadable) == {PIDS[0], PIDS[1]}
    assert "not a DICOM file" in unreadable[PIDS[0]].reason
    assert "truncated: its pixel data ends 1000 bytes past the end of the file" in unreadable[PIDS[1]].reason
    assert unreadable[PIDS[0]].folder == str(garbage.absolute())
    assert all(Path(s.folder).is_absolute() for s in result.skipped if not s.reason.startswith("folder not found"))


def test_a_compressed_xray_cut_short_is_unreadable_and_a_report_beside_it_is_no_xray(tmp_path: Path) -> None:
    """pydicom drops compressed pixel data whose end the file cuts off, so the header alone looks
    whole: the import still refuses that X-ray as truncated. A structured report in an X-ray
    folder is another object, not a broken X-ray."""
    from dicom_factory import cut_compressed_xray, write_non_image

    info = make_oai_tree(tmp_path / "oai", PIDS[:2])
    cut = info[PIDS[0]]["XRAY"][0]
    cut_compressed_xray(cut, np.full(OAI_XRAY_SHAPE, 700.0))
    report = write_non_image(info[PIDS[1]]["XRAY"][0].parent / "1.2.840.113619.2.55.3.9")
    result = pair_oai(tmp_path / "oai", ["00m"])
    assert sorted({c.id.split("_")[0] for c in result.cases}) == [PIDS[1]]
    unreadable = {s.participant: s for s in result.failures() if s.reason.startswith("unreadable X-ray file")}
    assert set(unreadable) == {PIDS[0]}
    assert "truncated" in unreadable[PIDS[0]].reason
    about_report = [s for s in result.skipped if s.folder == str(report.absolute())]
    assert len(about_report) == 1 and "not an image: Basic Text SR Storage" in about_report[0].reason
    assert about_report[0] not in result.failures()
