"""tools/fuzz_readers.py: mutated X-rays and MRIs read in a worker process; every outcome
other than a finite image or the file's own InputError is a failure it reports."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fuzz(tmp_path: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "fuzz_readers.py"), "--keep", str(tmp_path), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1][len("RESULT "):])


@pytest.mark.parametrize("kind, cases", [("xray", 40), ("mri", 16)])
def test_mutated_inputs_give_an_image_or_their_own_error(tmp_path: Path, kind: str, cases: int) -> None:
    result = _fuzz(tmp_path, "--kind", kind, "--cases", str(cases), "--seed", "7")
    assert result["failed"] == 0 and result["failures"] == []
    assert sum(result["outcomes"].values()) == cases
    assert result["outcomes"]["ok"] > 0 and result["outcomes"]["refused"] > 0
    assert not any((tmp_path / "mutated").iterdir())  # only failing inputs are kept


def test_a_worker_that_dies_or_hangs_is_reported_and_replaced(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "tools"))  # the spawned workers import the tool by name too
    import fuzz_readers

    worker = fuzz_readers.Worker(4 * 2**30)
    try:
        assert worker.run(os._exit, 3, timeout=60) == {"outcome": "died"}
        start = time.monotonic()
        assert worker.run(time.sleep, 60, timeout=2) == {"outcome": "timeout"}
        assert time.monotonic() - start < 30
        missing = str(tmp_path / "missing.dcm")
        result = worker.run(fuzz_readers.read_case, "xray", missing, False, timeout=120)
        assert result["outcome"] == "refused" and "not found" in result["message"]
    finally:
        worker.close()
