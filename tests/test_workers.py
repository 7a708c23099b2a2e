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


WATCHED = """
import multiprocessing, os, sys, time

def child(parent):
    import kneetf.workers as w
    os.getppid = lambda: parent  # as on Windows, where a dead parent's pid stays the parent pid
    w._watch_parent(parent, 0.05)

if __name__ == "__main__":
    p = multiprocessing.get_context("spawn").Process(target=child, args=(os.getpid(),))
    p.start()
    print(p.pid, flush=True)
    time.sleep(120)
"""


def test_the_watch_thread_sees_the_parent_die_even_when_its_pid_stays(tmp_path: Path) -> None:
    """The path off Linux (no PDEATHSIG): the watcher asks multiprocessing whether the parent
    still runs, since Windows keeps reporting the dead parent's pid."""
    (tmp_path / "parent.py").write_text(WATCHED)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        time.sleep(1.0)
        assert _alive(child)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)
