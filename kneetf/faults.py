"""Fault injection for crash-consistency tests: kill this process at a named write point.

Every write that publishes a result is a *write point*. With the environment variable

    KNEETF_FAULT=<point>[:<n>]

the process sends itself SIGKILL the `n`-th time (default: the first) it reaches `<point>`,
exactly as the out-of-memory killer or a preempted node would: no `finally` block, no
flush, no clean-up runs. A test then runs the same command again and compares what it
leaves with the result of an uninterrupted run (`tests/test_crash.py`).

Points come in pairs around each write, `<name>.before` and `<name>.after`. For an atomic
write (`kneetf.io.atomic.atomic_path`) `.before` is the moment the new content is complete
in its temporary file and not yet renamed into place, `.after` the moment right after the
rename. Atomic writes without a name of their own are the generic point `write`; the other
names are listed in `POINTS`. Single points (no pair) mark moments between writes, such as
a training step (`train.step`).

With `KNEETF_FAULT_TRACE=<file>` each point reached is appended to that file as one line
`<point>\\t<detail>`, which tells a test which points a command passes and how often.

When neither variable is set `point()` costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal

FAULT_ENV = "KNEETF_FAULT"
TRACE_ENV = "KNEETF_FAULT_TRACE"

#: Named write points (each has a `.before` and an `.after` point) and what they write.
PAIRS: dict[str, str] = {
    "write": "any atomic write without a name of its own (kneetf.io.atomic)",
    "train.config": "config.json of the run",
    "train.tensorboard": "the epoch's TensorBoard summaries, written and flushed",
    "train.backup.weights": "the epoch's weights and optimizer state (backup/epoch-NNNNN.weights.h5), not yet committed",
    "train.backup": "the commit of an epoch: backup/training_metadata.json names the new weights",
    "train.history": "history.csv, rewritten from the committed epochs",
    "train.best": "model.keras, the best epoch so far",
    "train.prior": "prior_fit.npz, the kernel ridge prior fitted before the first epoch (a resumed run reuses it)",
    "train.template": "model.keras, the untrained model (its template) before the first epoch",
    "train.metrics": "metrics.json at the end of the run",
    "train.samples": "samples.png at the end of the run",
    "train.recover": "a resumed run's repairs: history.csv, TensorBoard events and model.keras made to "
                     "match the committed epochs",
    "prepare.shard": "one TFRecord shard of the cache",
    "prepare.shard_info": "the sidecar JSON that marks a shard complete",
    "prepare.info": "dataset.json of the cache (the cache is usable once it is written)",
    "predict.row": "the row of one finished reconstruction in predictions.csv",
    "predict.table": "predictions.csv rewritten at the end of a run: one row per output in the folder",
    "export.version": "the SavedModel version folder, renamed into place",
}
#: Single points between writes.
SINGLE: dict[str, str] = {
    "train.step": "the end of a training step (mid-epoch)",
}


def _names() -> set[str]:
    return {f"{name}.{when}" for name in PAIRS for when in ("before", "after")} | set(SINGLE)


#: every point name `KNEETF_FAULT` accepts
POINTS: frozenset[str] = frozenset(_names())

_counts: dict[str, int] = {}


def parse(spec: str) -> tuple[str, int]:
    """`"train.best.before:2"` -> ("train.best.before", 2); ValueError for unknown names."""
    name, _, count = spec.strip().partition(":")
    if name not in POINTS:
        raise ValueError(f"{FAULT_ENV}={spec!r}: unknown point {name!r}; known: {', '.join(sorted(POINTS))}")
    n = int(count) if count else 1
    if n < 1:
        raise ValueError(f"{FAULT_ENV}={spec!r}: the count must be >= 1")
    return name, n


def point(name: str, detail: object = "") -> None:
    """A write point: SIGKILL this process here if `KNEETF_FAULT` asks for it."""
    spec = os.environ.get(FAULT_ENV)
    trace = os.environ.get(TRACE_ENV)
    if not spec and not trace:
        return
    if name not in POINTS:
        raise ValueError(f"unregistered fault point {name!r}; add it to kneetf.faults")
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(f"{name}\t{detail}\n")
    if spec:
        target, n = parse(spec)
        if name == target:
            _counts[name] = _counts.get(name, 0) + 1
            if _counts[name] == n:
                os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


__all__ = ["FAULT_ENV", "TRACE_ENV", "PAIRS", "SINGLE", "POINTS", "parse", "point"]
