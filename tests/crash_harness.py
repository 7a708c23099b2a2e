"""Kill a kneetf command at its write points (`kneetf.faults`), run it again, and compare
what it leaves with an uninterrupted run: the crash-recovery tests of `test_crash.py`.

`reference()` runs a command once without faults, recording the write points it passes
(`KNEETF_FAULT_TRACE`). Then either

- `scenarios()`: for each chosen occurrence `<point>:<n>` of the reference run, start from
  the initial state, kill the command there, check what the kill left (`invariant`), run the
  command again and compare the result with the reference (`same`); or
- `chain()` (for commands that resume, where every process costs a model compile): kill a
  process at the next point not yet covered, the next process resumes from what that left
  and is killed at the point after, and so on until a process finishes; its result is
  compared with the reference, and a new chain starts for the points left.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from kneetf.faults import FAULT_ENV, TRACE_ENV

TIMEOUT_S = 900
KILLED = -signal.SIGKILL


def env(**extra: str) -> dict[str, str]:
    """The environment of a command: TensorFlow's deterministic kernels, without oneDNN's
    and with one thread per op, so that a resumed run can be compared with an uninterrupted
    one weight by weight (oneDNN's and multi-threaded reductions may add in another order
    when the machine is busy: the last bits of a loss differ)."""
    base = {k: v for k, v in os.environ.items() if k not in (FAULT_ENV, TRACE_ENV)}
    return {**base, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", "TF_DETERMINISTIC_OPS": "1",
            "TF_ENABLE_ONEDNN_OPTS": "0", "TF_NUM_INTRAOP_THREADS": "1", "OMP_NUM_THREADS": "1", **extra}


def kneetf(args: Sequence[str], *, cwd: Path, log: Path, fault: str | None = None,
           trace: Path | None = None) -> int:
    """Run `kneetf ARGS` in a new process; returns its exit status (-9 when killed)."""
    extra = {}
    if fault:
        extra[FAULT_ENV] = fault
    if trace:
        extra[TRACE_ENV] = str(trace)
    with log.open("a") as f:
        f.write(f"\n=== kneetf {' '.join(args)}  [{FAULT_ENV}={fault or ''}]\n")
        f.flush()
        p = subprocess.run([sys.executable, "-m", "kneetf.cli.main", *args], cwd=cwd, stdout=f,
                           stderr=subprocess.STDOUT, env=env(**extra), timeout=TIMEOUT_S)
    return p.returncode


def read_trace(path: Path, details: bool = False) -> list:
    """Point names in the order they were reached (with `details`: (name, detail) pairs)."""
    if not path.exists():
        return []
    pairs = [tuple((line.split("\t", 1) + [""])[:2]) for line in path.read_text().splitlines() if line]
    return pairs if details else [name for name, _ in pairs]


def occurrences(trace: Sequence[str]) -> list[tuple[str, int]]:
    """(point, n) for every point reached: the n-th time the run reached it."""
    seen: Counter = Counter()
    out = []
    for name in trace:
        seen[name] += 1
        out.append((name, seen[name]))
    return out


def choose(events: Sequence[tuple[str, str]], kind: Callable[[str, str], object] | None = None) -> list[str]:
    """Kill targets `<point>:<n>` for a reference run's (name, detail) `events`: by default
    the middle occurrence of each point; with `kind`, the last occurrence of each kind of
    event (e.g. (point, kind of file written), for the generic `write` point)."""
    names = [name for name, _ in events]
    numbered = occurrences(names)
    if kind is None:
        counts = Counter(names)
        return [f"{name}:{n}" for name, n in numbered if n == (counts[name] + 1) // 2]
    last = {kind(name, detail): i for i, (name, detail) in enumerate(events)}
    return [f"{numbered[i][0]}:{numbered[i][1]}" for i in sorted(last.values())]


def tail(log: Path, n: int = 3000) -> str:
    return log.read_text()[-n:] if log.exists() else ""


@dataclass
class Reference:
    """An uninterrupted run: what it left (moved aside) and the points it passed, in order,
    as names and as (name, detail) events."""

    root: Path
    trace: list[str]
    events: list[tuple[str, str]]


def reference(args: Sequence[str], setup: Callable[[Path], None], root: Path, ok: int = 0) -> Reference:
    """Run the command in `root` (where the crash runs will run too: outputs may hold their
    absolute paths) and move the result to `<root>-reference`."""
    root.mkdir(parents=True)
    setup(root)
    trace = root.parent / f"{root.name}-reference.trace"
    log = root.parent / f"{root.name}-reference.log"
    rc = kneetf(args, cwd=root, log=log, trace=trace)
    assert rc == ok, tail(log)
    result = root.with_name(f"{root.name}-reference")
    root.rename(result)
    return Reference(result, read_trace(trace), read_trace(trace, details=True))


@dataclass
class Outcome:
    """What the crash tests did: the targets killed, in order, and per chain the count."""

    killed: list[str] = field(default_factory=list)
    chains: list[list[str]] = field(default_factory=list)


def scenarios(args: Sequence[str], setup: Callable[[Path], None], targets: Sequence[str], root: Path, *,
              same: Callable[[Path], None], invariant: Callable[[Path], None] = lambda root: None,
              ok: int = 0) -> Outcome:
    """Kill at each target in turn, each time from the initial state in `root`, then run
    again (and expect exit status `ok`)."""
    outcome = Outcome()
    for target in targets:
        root.mkdir(parents=True)
        setup(root)
        log = root.parent / f"{root.name}-{target.replace(':', '-')}.log"
        rc = kneetf(args, cwd=root, log=log, fault=target)
        assert rc == KILLED, f"{target}: expected a kill, got exit status {rc}\n{tail(log)}"
        invariant(root)
        rc = kneetf(args, cwd=root, log=log)
        assert rc == ok, f"rerun after a kill at {target}: exit status {rc}\n{tail(log)}"
        try:
            same(root)
        except AssertionError as e:
            raise AssertionError(f"after a kill at {target} and a rerun: {e}") from None
        outcome.killed.append(target)
        shutil.rmtree(root)
    return outcome


def chain(args: Sequence[str], setup: Callable[[Path], None], targets: Sequence[str], root: Path, *,
          same: Callable[[Path], None], invariant: Callable[[Path], None] = lambda root: None) -> Outcome:
    """Cover `targets` (point names, killed at their first occurrence in each process) with
    chains of killed processes in `root`, each resuming from the one before; see the module
    doc."""
    outcome = Outcome()
    todo = list(targets)
    n = 0
    while todo:
        n += 1
        root.mkdir(parents=True)
        setup(root)
        log = root.parent / f"{root.name}-chain{n}.log"
        done: list[str] = []
        while True:
            target = todo[0] if todo else None
            rc = kneetf(args, cwd=root, log=log, fault=f"{target}:1" if target else None)
            if rc == KILLED and target:
                done.append(todo.pop(0))
                try:
                    invariant(root)
                except AssertionError as e:
                    raise AssertionError(f"after kills at {', '.join(done)}: {e}") from None
                continue
            assert rc == 0, f"chain {n} after kills at {', '.join(done) or 'none'}: exit status {rc}\n{tail(log)}"
            break
        assert done, f"{todo[0]} is not reached by a run from the start\n{tail(log)}"
        try:
            same(root)
        except AssertionError as e:
            raise AssertionError(f"after kills at {', '.join(done)} and a run to the end: {e}") from None
        outcome.killed += done
        outcome.chains.append(done)
        shutil.rmtree(root)
    return outcome


def debris(root: Path) -> list[str]:
    """Temporary files and folders an interrupted write left anywhere under `root`."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".tmp-*"))
