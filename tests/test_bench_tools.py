"""tools/bench_serving.py and tools/bench_prepare.py run end to end on tiny settings and print
their RESULT line (the measurements themselves are benchmarks, not tests)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _result(args: list[str], cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, done.stdout[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_bench_serving_times_every_part(tmp_path: Path) -> None:
    """The test server in its own process answers gRPC and REST; the client's parts and the
    model's compute are timed apart."""
    result = _result([str(ROOT / "tools" / "bench_serving.py"), "--preset", "tiny", "--requests", "4",
                      "--rest-requests", "2", "--repeats", "4", "--concurrency", "1,2", "--no-tflite"], tmp_path)
    rows = {(r["path"], r["concurrency"]): r for r in result["rows"]}
    for key in [("grpc", 1), ("grpc", 2), ("rest", 1), ("rest", 2), ("grpc client build", 1),
                ("grpc client parse", 1), ("rest client build", 1), ("rest client parse", 1),
                ("model in server", 1)]:
        assert 0 < rows[key]["p50_ms"] <= rows[key]["p99_ms"], key
    sizes = result["sizes"]["1"]
    assert sizes["grpc_answer_bytes"] > 128 * 128 * 21 * 4 and sizes["rest_answer_bytes"] > sizes["grpc_answer_bytes"]


@pytest.mark.slow
def test_bench_prepare_rows_per_roi_source(tmp_path: Path) -> None:
    """One OAI-sized pair prepared with a boxes CSV, the classical ROI and the built-in
    detector, in-process, with its CPU time and peak RSS; an unknown source is refused."""
    bench = str(ROOT / "tools" / "bench_prepare.py")
    result = _result([bench, "--distinct", "1", "--pairs", "2", "--rounds", "1", "--workers", "0",
                      "--roi-sources", "classical,csv,builtin", "--keep", str(tmp_path / "inputs")], tmp_path)
    rows = {r["roi"]: r for r in result["rows"]}
    assert set(rows) == {"classical", "csv", "builtin"}
    for r in rows.values():
        assert r["pairs"] == 2 and r["errors"] == 0 and r["cpu_s_per_pair"] > 0 and r["rss_main_mb"] > 0
        assert 0 < r["cpu_main_s_per_pair"] <= r["cpu_s_per_pair"]


def test_bench_prepare_refuses_an_unknown_roi_source(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_prepare.py"), "--roi-sources", "csv,yolo"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and "yolo" in done.stderr


@pytest.mark.parametrize("args", [["bench_serving.py", "--model", "missing.keras"], ["tflite_report.py", "missing.keras"]])
def test_tools_name_a_missing_model_without_a_traceback(tmp_path: Path, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / args[0]), *args[1:]], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 1 and "error: missing.keras:" in done.stderr
    assert "Traceback" not in done.stderr


_PEAKS_SCRIPT = """
import importlib.util, os, subprocess, sys, time
import numpy as np
spec = importlib.util.spec_from_file_location("bench_prepare", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
ballast = np.ones(256 * 2**20 // 8)  # 256 MB of this process, touched
peaks = bench.ChildPeaks(every=0.01)
peaks.start()
pid = os.fork()
if pid == 0:  # a child that never runs a program of its own: this process's memory and command line
    time.sleep(0.5)
    os._exit(0)
subprocess.run([sys.executable, "-c", "import time; time.sleep(0.5)"], check=True)
os.waitpid(pid, 0)
print(round(peaks.stop()), round(bench.vm_hwm_mb()))
"""


def test_bench_prepare_worker_peak_is_the_workers_not_its_own() -> None:
    """The worker peak RSS counts children that run their own program, not one still holding
    the measuring process's memory between fork and exec."""
    done = subprocess.run([sys.executable, "-c", _PEAKS_SCRIPT, str(ROOT / "tools" / "bench_prepare.py")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    child, own = (int(v) for v in done.stdout.split())
    assert own > 256
    assert 0 < child < 100
