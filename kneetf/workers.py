"""Worker processes for decoding and generating data: a spawn-context process pool whose
workers end when the process that started them dies, even by SIGKILL or the OOM killer
(otherwise they would wait on their task queue forever)."""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time

#: Linux prctl option: the signal a process receives when its parent dies
_PR_SET_PDEATHSIG = 1


def _watch_parent(parent: int, interval_s: float = 1.0) -> None:
    # On Windows getppid() keeps the dead parent's pid; multiprocessing's handle on the parent
    # (a process handle there, a pipe elsewhere) tells that it ended on every platform.
    handle = multiprocessing.parent_process()
    while os.getppid() == parent and (handle is None or handle.is_alive()):
        time.sleep(interval_s)
    os._exit(1)


def exit_with_parent(parent: int) -> None:
    """Pool initializer: end this process when `parent` (the pid that started it) dies.

    On Linux the kernel sends SIGTERM (`prctl(PR_SET_PDEATHSIG)`); elsewhere a daemon thread
    checks once a second that the parent still runs."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="kneetf-parent-watch").start()


def process_pool(workers: int) -> cf.ProcessPoolExecutor:
    """A pool of `workers` spawned processes that exit with this process."""
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=exit_with_parent, initargs=(os.getpid(),))


__all__ = ["exit_with_parent", "process_pool"]
