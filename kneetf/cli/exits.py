"""Exit statuses of every `kneetf` command, for scripts and cluster schedulers.

| status | meaning |
|---|---|
| 0 | everything asked for was done |
| 1 | error: a bad argument, an unusable input, nothing could be done; the message says why |
| 2 | usage: the command line could not be parsed (argparse) |
| 3 | crash: an unexpected exception (a bug); a short message names the log file holding the traceback |
| 4 | partly done: some inputs failed and are listed (errors.csv, the skipped report); the others were written |
| 130 | interrupted (Ctrl-C) |

A command killed by a signal (the out-of-memory killer: SIGKILL) exits as the shell reports
it (128 + signal number, 137 for SIGKILL); running it again finishes the work
(`kneetf.faults`).
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CRASH = 3
EXIT_PARTIAL = 4
EXIT_INTERRUPT = 130

__all__ = ["EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_CRASH", "EXIT_PARTIAL", "EXIT_INTERRUPT"]
