"""The fault-injection helper (`kneetf.faults`) and the writes it guards: atomic files and
folders, append-only CSV logs. Killed processes are small Python programs (no TensorFlow)."""
from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kneetf import faults
from kneetf.io.atomic import CsvLog, atomic_path, remove_debris, write_text_atomic

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """An empty folder (tmp_path holds the test's home folder)."""
    (tmp_path / "w").mkdir()
    return tmp_path / "w"


def _python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in (faults.FAULT_ENV, faults.TRACE_ENV)}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**clean, **env}, capture_output=True,
                          text=True, timeout=60)


WRITE_THREE = ("from kneetf.io.atomic import write_text_atomic\n"
               "for i in range(3):\n"
               "    write_text_atomic(f'f{i}.txt', str(i))\n")


def test_unset_is_a_no_op_and_parse_names_the_point(monkeypatch) -> None:
    monkeypatch.delenv(faults.FAULT_ENV, raising=False)
    monkeypatch.delenv(faults.TRACE_ENV, raising=False)
    faults.point("no.such.point")  # not even checked when fault injection is off
    assert faults.parse("train.best.before:2") == ("train.best.before", 2)
    assert faults.parse("write.after") == ("write.after", 1)
    with pytest.raises(ValueError, match="unknown point 'train.bset.before'"):
        faults.parse("train.bset.before")
    with pytest.raises(ValueError, match=">= 1"):
        faults.parse("write.after:0")


@pytest.mark.parametrize("spec, files", [("write.before:2", ["f0.txt"]), ("write.after:2", ["f0.txt", "f1.txt"])])
def test_the_process_is_killed_at_the_nth_pass(work: Path, spec: str, files: list[str]) -> None:
    res = _python(WRITE_THREE, work, **{faults.FAULT_ENV: spec})
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert sorted(p.name for p in work.iterdir() if not p.name.startswith(".")) == files
    debris = [p.name for p in work.iterdir() if p.name.startswith(".tmp-f1.txt-")]
    assert len(debris) == (1 if spec.startswith("write.before") else 0)  # the complete temporary file
    assert remove_debris(work) == len(debris) and not any(work.glob(".tmp-*"))


def test_trace_lists_every_point_in_order(work: Path) -> None:
    res = _python(WRITE_THREE, work, **{faults.TRACE_ENV: str(work / "trace")})
    assert res.returncode == 0, res.stderr
    lines = (work / "trace").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["write.before", "write.after"] * 3
    assert lines[0].endswith("f0.txt")


def test_an_unregistered_point_is_an_error_when_injection_is_on(work: Path) -> None:
    res = _python("from kneetf import faults; faults.point('nowhere')", work,
                  **{faults.TRACE_ENV: str(work / "trace")})
    assert res.returncode != 0 and "unregistered fault point 'nowhere'" in res.stderr


def _fault_names_in_source() -> set[str]:
    """Every literal point name the package passes to faults.point, as `fault=` or as the
    default of a `fault` parameter."""
    names = set()
    for path in (REPO / "kneetf").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):  # def f(..., fault="name")
                args = node.args
                pairs = list(zip(args.kwonlyargs, args.kw_defaults))
                pairs += list(zip(args.args[len(args.args) - len(args.defaults):], args.defaults))
                names |= {d.value + ".before" for a, d in pairs
                          if a.arg == "fault" and isinstance(d, ast.Constant) and isinstance(d.value, str)}
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Attribute) and func.attr == "point" and node.args:
                    arg = node.args[0]
                    if isinstance(arg, ast.Constant):
                        names.add(arg.value)
                    elif isinstance(arg, ast.JoinedStr):  # f"{fault}.before": the pair's prefix
                        continue
                for kw in node.keywords:
                    if kw.arg == "fault" and isinstance(kw.value, ast.Constant):
                        names.add(kw.value.value + ".before")
    return names


def test_every_point_in_the_code_is_registered() -> None:
    used = _fault_names_in_source()
    assert used - faults.POINTS == set()
    unused = {p for p in faults.POINTS if p.endswith(".before")} - used - {"write.before"}
    assert not unused, f"registered but never used: {sorted(unused)}"


def test_a_replaced_folder_is_never_half_deleted(work: Path) -> None:
    code = ("from kneetf.io.atomic import atomic_path\n"
            "with atomic_path('series', directory=True) as tmp:\n"
            "    for i in range(3):\n"
            "        (tmp / f'new{i}').write_text('new')\n")
    for spec, expected in (("write.before", "old"), ("write.after", "new")):
        folder = work / "series"
        folder.mkdir()
        for i in range(3):
            (folder / f"old{i}").write_text("old")
        res = _python(code, work, **{faults.FAULT_ENV: spec})
        assert res.returncode == -signal.SIGKILL
        assert sorted(p.name for p in folder.iterdir()) == [f"{expected}{i}" for i in range(3)]
        remove_debris(work)
        assert [p.name for p in work.iterdir()] == ["series"]
        res = _python(code, work)
        assert res.returncode == 0 and sorted(p.name for p in folder.iterdir()) == [f"new{i}" for i in range(3)]
        assert [p.name for p in work.iterdir()] == ["series"]
        import shutil

        shutil.rmtree(folder)


def test_atomic_path_keeps_every_suffix_and_cleans_up_on_error(work: Path) -> None:
    with atomic_path(work / "epoch-00001.weights.h5") as tmp:
        assert tmp.name.endswith(".weights.h5") and tmp.name.startswith(".tmp-")
        tmp.write_text("w")
    with pytest.raises(RuntimeError):
        with atomic_path(work / "x.nii.gz") as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in work.iterdir()) == ["epoch-00001.weights.h5"]


def test_csv_log_holds_whole_rows_only(work: Path) -> None:
    path = work / "rows.csv"
    write_text_atomic(path, "id,name\nstale,row\n")
    log = CsvLog(path, ["id", "name"], [{"id": "0", "name": "first"}])
    assert path.read_text() == "id,name\n0,first\n"  # opening replaces what an earlier run left
    log.append({"id": "1", "name": "a, quoted \"one\""})
    code = ("from kneetf.io.atomic import CsvLog\n"
            "log = CsvLog('rows.csv', ['id'], fault='predict.row')\n"
            "for i in range(5):\n"
            "    log.append({'id': i})\n")
    res = _python(code, work, **{faults.FAULT_ENV: "predict.row.before:4"})
    assert res.returncode == -signal.SIGKILL
    assert path.read_text() == "id\n0\n1\n2\n"
