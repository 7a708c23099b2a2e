"""Decoding workers end with the process that started them, even when it is SIGKILLed."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

PARENT = """
import os, time
from kneetf.workers import process_pool
if __name__ == "__main__":
    pool = process_pool(2)
    pids = {f.result() for f in [pool.submit(os.getpid) for _ in range(4)]}
    print(" ".join(map(str, sorted(pids))), flush=True)
    time.sleep(120)
"""


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie that nobody reaped counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_workers_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    (tmp_path / "parent.py").write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert pids and all(_alive(p) for p in pids)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)]
