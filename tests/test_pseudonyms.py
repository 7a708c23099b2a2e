"""The pseudonym key shared by `kneetf predict` and `kneetf client`."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from kneetf.errors import ConfigError
from kneetf.inference.pseudonyms import PseudonymKey


def _items(*paths: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(path=Path(p), name="") for p in paths]


def _abs(source: str) -> str:
    """A source as the key stores it: absolute, so that a run from another folder finds it."""
    return os.path.abspath(source)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_unfinished_sources_keep_their_pseudonyms_and_finished_rows_stay(tmp_path):
    path = tmp_path / "key.csv"
    first = PseudonymKey(path)
    items = _items("a.dcm", "b.dcm", "c.dcm")
    first.assign(items)
    assert len({it.name for it in items}) == 3 and all(it.name for it in items)
    first.write((it.name, str(it.path), "") for it in items)  # then killed before the results
    old = {str(it.path): it.name for it in items}

    done = PseudonymKey(path)
    assert done.rows == [{"pseudonym": old[s], "source": _abs(s), "result": ""} for s in ("a.dcm", "b.dcm", "c.dcm")]
    again = _items("b.dcm", "d.dcm")
    done.assign(again)
    assert again[0].name == old["b.dcm"]  # replaces its output instead of adding one
    assert again[1].name not in old.values()
    done.write((it.name, str(it.path), "written") for it in again)
    rows = _rows(path)
    assert [r["source"] for r in rows] == [_abs(s) for s in ("a.dcm", "c.dcm", "b.dcm", "d.dcm")]
    assert [r["result"] for r in rows] == ["", "", "written", "written"]

    fresh = PseudonymKey(path)
    assert fresh.new() not in {r["pseudonym"] for r in rows}


def test_written_and_failed_sources_keep_their_pseudonyms_on_a_rerun(tmp_path):
    path = tmp_path / "key.csv"
    first = PseudonymKey(path)
    items = _items("a.dcm", "b.dcm", "c.dcm")
    first.assign(items)
    first.write((it.name, str(it.path), "failed" if it.name == items[1].name else "written") for it in items)
    old = {str(it.path): it.name for it in items}

    again = PseudonymKey(path)
    rerun = _items("c.dcm", "b.dcm", "d.dcm")
    again.assign(rerun)
    assert [it.name for it in rerun[:2]] == [old["c.dcm"], old["b.dcm"]]  # replaces, does not add
    assert rerun[2].name not in old.values()
    again.write((it.name, str(it.path), "written") for it in rerun)
    rows = _rows(path)
    assert [(r["source"], r["result"]) for r in rows] == [(_abs(s), "written") for s in ("a.dcm", "c.dcm", "b.dcm",
                                                                                            "d.dcm")]
    assert len({r["pseudonym"] for r in rows}) == 4
    assert PseudonymKey(path).name_for("a.dcm") == old["a.dcm"]


def test_a_file_that_is_not_a_key_is_refused_with_its_name(tmp_path):
    path = tmp_path / "key.csv"
    path.write_text("id,file\n1,x\n")
    with pytest.raises(ConfigError, match="key.csv.*not a kneetf pseudonym key"):
        PseudonymKey(path)


def test_a_source_keeps_its_pseudonym_however_its_path_is_written(tmp_path, monkeypatch):
    """A rerun from another folder (or through a link) gave the same X-ray a second pseudonym,
    and so a second output: the key matched paths as typed."""
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "knee.dcm").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "scans")
    path = tmp_path / "key.csv"
    monkeypatch.chdir(tmp_path)
    first = PseudonymKey(path)
    items = _items("scans/knee.dcm")
    first.assign(items)
    first.write((it.name, str(it.path), "written") for it in items)
    assert _rows(path)[0]["source"] == str(tmp_path / "scans" / "knee.dcm")
    monkeypatch.chdir(tmp_path / "scans")
    for spelling in ("knee.dcm", "./knee.dcm", str(tmp_path / "scans" / "knee.dcm"), "../link/knee.dcm"):
        again = _items(spelling)
        PseudonymKey(path).assign(again)
        assert again[0].name == items[0].name, spelling
    other = _items("../scans/other.dcm")
    PseudonymKey(path).assign(other)
    assert other[0].name != items[0].name
