"""kneetf.io.manifest: whole-file validation with line numbers, round trips."""
from __future__ import annotations

from pathlib import Path

import pytest

from kneetf.errors import ManifestError
from kneetf.io.manifest import Case, check_id, read_manifest, write_manifest


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "x").mkdir(parents=True)
    (root / "mri" / "k1").mkdir(parents=True)
    for name in ("a.png", "b.dcm", "c.npy"):
        (root / "x" / name).write_bytes(b"x")
    (root / "mri" / "k2.nii.gz").write_bytes(b"x")
    (tmp_path / "outside.png").write_bytes(b"x")
    return root


def test_good_manifest_with_bom_crlf_and_extras(data: Path) -> None:
    text = ("id,xray,mri,side,split,site\r\n"
            "k1,x/a.png,mri/k1,L,Train,A\r\n"
            "\r\n"
            "k2, x/b.dcm ,mri/k2.nii.gz,right,,B\r\n"
            "k3,x/c.npy,./mri/../mri/k1,,test,\r\n")
    (data / "m.csv").write_bytes("\ufeff".encode() + text.encode())
    result = read_manifest(data / "m.csv")
    assert result.ok, result.errors
    assert [c.id for c in result.cases] == ["k1", "k2", "k3"]
    assert [c.line for c in result.cases] == [2, 4, 5]
    k1, k2, k3 = result.cases
    assert (k1.side, k1.split, k1.extra) == ("left", "train", {"site": "A"})
    assert (k2.side, k2.split, k2.xray) == ("right", None, data / "x" / "b.dcm")
    assert k3.mri == data / "mri" / "k1" and k3.side is None and k3.xray_half is None
    assert all(c.xray.is_absolute() for c in result.cases)


def test_every_bad_line_is_reported(data: Path, tmp_path: Path) -> None:
    lines = [
        "id,xray,mri,side,split",
        "ok1,x/a.png,mri/k1,left,train",          # 2 good
        "ok1,x/b.dcm,mri/k1,left,train",          # 3 duplicate id
        "m1,x/missing.png,mri/k1,,",              # 4 missing xray
        "m2,x/a.png,mri/nope,,",                  # 5 missing mri
        "s1,x/a.png,mri/k1,up,",                  # 6 unknown side
        "s2,x/a.png,mri/k1,,training",            # 7 unknown split
        ",x/a.png,mri/k1,,",                      # 8 empty id
        "a/b,x/a.png,mri/k1,,",                   # 9 unsafe id
        "o1,../outside.png,mri/k1,,",             # 10 outside
        f"o2,{tmp_path / 'outside.png'},mri/k1,,",  # 11 absolute outside
        "f1,x/a.png,mri/k1,,,extra",              # 12 too many fields
        "f2,x/a.png",                             # 13 too few fields
        "ok2,x/c.npy,mri/k2.nii.gz,R,val",        # 14 good
        "..,x/a.png,mri/k1,,",                    # 15 unsafe id
        "tab\there,x/a.png,mri/k1,,",             # 16 control char
        f"n1,x/{'9' * 300}.png,mri/k1,,",          # 17 a name longer than a file system takes
        f"n2,x/a.png,mri/{'k' * 300},,",          # 18 the same, for the MRI
    ]
    (data / "m.csv").write_text("\n".join(lines) + "\n")
    result = read_manifest(data / "m.csv")
    assert [c.id for c in result.cases] == ["ok1", "ok2"]
    by_line = {}
    for e in result.errors:
        assert isinstance(e, ManifestError) and str(data / "m.csv") in str(e)
        by_line.setdefault(e.line, []).append(e.reason)
    assert sorted(by_line) == list(range(3, 14)) + [15, 16, 17, 18]
    expect = {3: "duplicate id 'ok1' (first on line 2)", 4: "xray file not found: x/missing.png",
              5: "mri path not found: mri/nope", 6: "unknown side 'up'", 7: "unknown split 'training'",
              8: "empty id", 9: "not safe as a file name (contains '/')", 10: "leaves the manifest's folder",
              11: "leaves the manifest's folder", 12: "has 6 field(s); the header has 5",
              13: "has 2 field(s); the header has 5", 15: "not safe as a file name", 16: "contains '\\t'",
              17: f"xray path 'x/{'9' * 78}...' cannot be looked up: File name too long",
              18: "mri path 'mri/kkk"}
    for line, fragment in expect.items():
        assert any(fragment in r for r in by_line[line]), (line, by_line[line])
    with pytest.raises(ManifestError, match=r"(?s)15 problem\(s\).*line 3: duplicate id.*line 18:"):
        result.raise_for_errors()


def test_header_problems(data: Path) -> None:
    (data / "m.csv").write_text("id,mri,side\nk1,mri/k1,left\n")
    result = read_manifest(data / "m.csv")
    assert result.cases == [] and len(result.errors) == 1
    assert result.errors[0].line == 1 and "lacks column(s) xray" in result.errors[0].reason
    (data / "e.csv").write_text("")
    assert "empty manifest" in read_manifest(data / "e.csv").errors[0].reason
    (data / "d.csv").write_text("id,xray,mri,ID\n")
    assert "repeats column(s) id" in read_manifest(data / "d.csv").errors[0].reason
    with pytest.raises(ManifestError, match="manifest file not found"):
        read_manifest(data / "nope.csv")


def test_options(data: Path, tmp_path: Path) -> None:
    (data / "m.csv").write_text(f"id,xray,mri\no1,../outside.png,mri/k1\no2,{data / 'x' / 'a.png'},\n"
                                "o3,x/gone.png,mri/gone\n")
    strict = read_manifest(data / "m.csv")
    assert [e.line for e in strict.errors] == [2, 3, 4, 4]
    relaxed = read_manifest(data / "m.csv", allow_outside=True, check_files=False, require_mri=False)
    assert relaxed.ok, relaxed.errors
    assert relaxed.cases[0].xray == tmp_path / "outside.png"
    assert relaxed.cases[1].mri is None and relaxed.cases[1].xray == data / "x" / "a.png"
    (data / "p.csv").write_text("id,xray\np1,x/a.png\n")  # predict-only manifest: no mri column
    assert read_manifest(data / "p.csv", require_mri=False).cases[0].mri is None
    assert "lacks column(s) mri" in read_manifest(data / "p.csv").errors[0].reason


def test_write_read_round_trip(data: Path) -> None:
    cases = [
        Case("r1", data / "x" / "a.png", data / "mri" / "k1", "right", "train", xray_half="left",
             extra={"participant": "9000099"}),
        Case("r2", data / "x" / "b.dcm", None, None, None),
    ]
    path = write_manifest(data / "sub" / ".." / "out.csv", cases)
    text = path.read_text()
    assert text.splitlines()[0] == "id,xray,mri,side,split,xray_half,participant"
    assert "r1,x/a.png,mri/k1,right,train,left,9000099" in text
    back = read_manifest(path, require_mri=False)
    assert back.ok, back.errors
    assert [(c.id, c.xray, c.mri, c.side, c.split, c.xray_half, c.extra) for c in back.cases] == [
        (c.id, c.xray, c.mri, c.side, c.split, c.xray_half, c.extra or {"participant": ""}) for c in cases]
    with pytest.raises(ManifestError, match="not safe"):
        write_manifest(data / "bad.csv", [Case("../x", data / "x" / "a.png")])
    assert not (data / "bad.csv").exists()


@pytest.mark.parametrize("case_id,ok", [("9000099_00m_R", True), ("a b-c.d", True), ("", False), (".hidden", False),
                                        ("a..b", False), ("a\\b", False), ("a:b", False), ("x" * 201, False),
                                        ("x" * 200, True), ("\u00fc" * 100, True), ("\u00fc" * 101, False),
                                        ("nul\x00", False)])
def test_check_id(case_id: str, ok: bool) -> None:
    assert (check_id(case_id) is None) == ok
