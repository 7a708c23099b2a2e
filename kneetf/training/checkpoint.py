"""The committed state of a training run, and how every write of the run folder stays
consistent with it when the process is killed at any moment.

One file is the commit point: `backup/training_metadata.json`. It names the weights of the
last completed epoch (`backup/epoch-NNNNN.weights.h5`, model and optimizer state) and holds
what the run has decided so far: the history rows of the completed epochs, the best epoch
and its validation loss (the threshold `model.keras` must beat), whether a callback stopped
the run, and the state of callbacks that count epochs (early stopping). After every epoch
`RunCheckpoint` writes, in this order:

1. the TensorBoard summaries of the epoch, flushed (`EpochSummaries`, before this callback);
2. the new weights, atomically under a new name;
3. the commit: `training_metadata.json`, atomically; the previous commit's weights are kept
   as a fallback, older ones removed;
4. `history.csv`, rewritten from the committed rows;
5. `model.keras`, atomically, when the epoch is the best so far.

Everything after the commit is derived from it, and everything before it is rolled back by
the next run (`recover`): a killed run, started again, resumes after its last committed
epoch (at most the interrupted epoch is trained again), rewrites `history.csv` from the
committed rows, removes TensorBoard records of epochs it will train again, saves
`model.keras` again when the last committed epoch is the best one, and removes `.tmp-*`
debris. With the per-epoch data order of `make_dataset(epochs=...)` the resumed run then
trains exactly what an uninterrupted run trains.

Backups written by Keras' `BackupAndRestore` (`latest.weights.h5` and a metadata file with
the epoch only) are read too; their history comes from `history.csv`.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import keras

from kneetf import faults
from kneetf.errors import InputError, OutputError
from kneetf.io.atomic import DEBRIS_PREFIX, atomic_path, csv_text, remove_debris, write_csv_atomic, write_text_atomic

log = logging.getLogger(__name__)

STATE_FILE = "training_metadata.json"
STATE_FORMAT = "kneetf-run-state/1"
#: what Keras' BackupAndRestore wrote (read, never written)
LEGACY_WEIGHTS = "latest.weights.h5"
LEGACY_SUFFIX = ".bkp"
#: the validation value whose best epoch `model.keras` holds
MONITOR = "val_loss"


def weights_name(epoch: int) -> str:
    """Weights file of the state after `epoch` completed epochs."""
    return f"epoch-{epoch:05d}.weights.h5"


@dataclass
class RunState:
    """A commit of the run: `epoch` epochs completed, their weights file and history rows."""

    epoch: int = 0
    weights: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # {"epoch": 0-based epoch (-1: the untrained model), "value": monitored}
    stopped: bool = False  # a callback (early stopping, time budget, NaN) ended the run here
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    previous: "RunState | None" = None
    untrained: float | None = None  # the monitored value of the untrained model (its template), if scored

    def to_dict(self) -> dict[str, Any]:
        out = {"format": STATE_FORMAT, "epoch": self.epoch, "weights": self.weights, "history": self.history,
               "best": self.best, "stopped": self.stopped, "callbacks": self.callbacks, "untrained": self.untrained}
        if self.previous is not None:
            out["previous"] = {k: v for k, v in self.previous.to_dict().items() if k != "previous"}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunState":
        prev = data.get("previous")
        return cls(epoch=int(data["epoch"]), weights=data.get("weights"), history=list(data.get("history") or []),
                   best=data.get("best"), stopped=bool(data.get("stopped", False)),
                   callbacks=dict(data.get("callbacks") or {}), previous=cls.from_dict(prev) if prev else None,
                   untrained=data.get("untrained"))

    def without_previous(self) -> "RunState":
        return RunState(self.epoch, self.weights, self.history, self.best, self.stopped, self.callbacks,
                        untrained=self.untrained)


# === Reading ===

def _history_rows(path: Path, epochs: int) -> list[dict[str, Any]]:
    """The rows of epochs 0..epochs-1 of a history.csv (the last row of an epoch logged twice)."""
    if not path.exists():
        return []
    rows: dict[int, dict[str, Any]] = {}
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            try:
                e = int(r["epoch"])
            except (KeyError, TypeError, ValueError):
                continue
            if e < epochs:
                rows[e] = {"epoch": e, **{k: _number(v) for k, v in r.items() if k != "epoch" and v not in ("", None)}}
    return [rows[e] for e in sorted(rows)]


def _number(text: Any) -> Any:
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def _best_of(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    best = None
    for r in rows:
        v = r.get(MONITOR)
        if isinstance(v, float) and math.isfinite(v) and (best is None or v < best["value"]):
            best = {"epoch": int(r["epoch"]), "value": v}
    return best


def _legacy_state(backup: Path, meta: dict[str, Any], history: Path) -> RunState:
    """A Keras BackupAndRestore backup as a RunState (history and best from history.csv)."""
    def one(epoch: int, weights: str) -> RunState:
        rows = _history_rows(history, epoch)
        return RunState(epoch=epoch, weights=weights, history=rows, best=_best_of(rows))

    state = one(int(meta["epoch"]), LEGACY_WEIGHTS)
    old = backup / (STATE_FILE + LEGACY_SUFFIX)
    if (backup / (LEGACY_WEIGHTS + LEGACY_SUFFIX)).exists() and old.exists():
        try:
            state.previous = one(int(json.loads(old.read_text())["epoch"]), LEGACY_WEIGHTS + LEGACY_SUFFIX)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return state


def read_state(backup: str | Path, history: str | Path) -> RunState | None:
    """The last commit in `backup`, or None when nothing was committed. An unreadable
    commit file is an InputError naming it; `history` (history.csv) is read for backups
    written by Keras' BackupAndRestore only."""
    backup = Path(backup)
    path = backup / STATE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") == STATE_FORMAT:
            return RunState.from_dict(data)
        return _legacy_state(backup, data, Path(history))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(path, f"the run's checkpoint cannot be read ({type(e).__name__}: {e}); "
                               "use --fresh to start the run over, or another --out") from None


def restore(model: Any, backup: str | Path, history: str | Path) -> RunState | None:
    """Load the last committed weights (and optimizer state) into `model`; returns the state,
    or None when there is none. Weights that cannot be read fall back to the commit before
    (one epoch is trained again); when neither can be read, an InputError names the file."""
    state = read_state(backup, history)
    if state is None:
        return None
    failures = []
    for candidate in (state, state.previous):
        if candidate is None or not candidate.weights:
            continue
        path = Path(backup) / candidate.weights
        try:
            if model.optimizer is not None and not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            model.load_weights(path)
        except Exception as e:  # h5py raises OSError, Keras ValueError; report them all the same way
            failures.append((path, e))
            log.warning("%s cannot be read (%s: %s)", path, type(e).__name__, e)
            continue
        if candidate is not state:
            log.warning("resuming from the commit before (epoch %d): the last one's weights cannot be read",
                        candidate.epoch)
        return candidate
    path, error = failures[-1] if failures else (Path(backup) / STATE_FILE, "it names no weights file")
    raise InputError(path, f"the run's checkpoint cannot be read ({error}); use --fresh to start the run over, "
                           "or another --out")


# === Writing ===

def _history_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    keys = sorted({k for r in rows for k in r} - {"epoch"})
    return ["epoch", *keys], [{k: repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows]


def write_history(path: str | Path, rows: Sequence[dict[str, Any]], *, fault: str = "train.history") -> None:
    """history.csv from the committed rows (columns: epoch, then the others sorted, as
    Keras' CSVLogger writes them); no rows: no file."""
    path = Path(path)
    if not rows:
        path.unlink(missing_ok=True)
        return
    write_csv_atomic(path, *_history_table(rows), fault=fault)


def _history_matches(path: Path, rows: Sequence[dict[str, Any]]) -> bool:
    if not rows or not path.exists():
        return not rows and not path.exists()
    return path.read_text(encoding="utf-8") == csv_text(*_history_table(rows))


def save_model(model: Any, path: str | Path, *, fault: str = "train.best") -> None:
    """`model.save(path)` atomically (a killed save never leaves a truncated .keras)."""
    with atomic_path(path, fault=fault) as tmp:
        model.save(tmp)


def purge_events(log_dir: str | Path, from_step: int, *, fault: str = "train.recover") -> int:
    """Remove the TensorBoard summaries with step >= `from_step` from every event file under
    `log_dir` (and a last record cut short by a kill); returns how many files changed.
    Each file is rewritten under a temporary name without "tfevents" (TensorBoard must not
    read it) and renamed into place."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    changed = 0
    root = Path(log_dir)
    if not root.is_dir():
        return 0
    for folder in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        remove_debris(folder)
    for path in sorted(p for p in root.rglob("*tfevents*") if p.is_file()):
        kept: list[bytes] = []
        dropped, damaged = 0, False
        try:
            for raw in tf.data.TFRecordDataset(str(path)):
                record = raw.numpy()
                event = event_pb2.Event.FromString(record)
                if event.step >= from_step and event.HasField("summary"):
                    dropped += 1
                else:
                    kept.append(record)
        except tf.errors.DataLossError:  # a record cut short: what was before it stays
            damaged = True
        if not dropped and not damaged:
            continue
        fd, name = tempfile.mkstemp(prefix=f"{DEBRIS_PREFIX}purge-", dir=path.parent)
        os.close(fd)
        try:
            with tf.io.TFRecordWriter(name) as writer:
                for record in kept:
                    writer.write(record)
            faults.point(f"{fault}.before", path)
            os.replace(name, path)
            faults.point(f"{fault}.after", path)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        changed += 1
        log.info("%s: removed %d summaries of epochs >= %d to be trained again%s", path, dropped, from_step,
                 " and a damaged last record" if damaged else "")
    return changed


def recover(work: str | Path, state: RunState | None, model: Any, *, history: str | Path, model_file: str | Path,
            tensorboard: str | Path | None = None, outputs: Sequence[str | Path] = ()) -> None:
    """Make the run folder `work` match the committed `state` before training goes on (see
    the module docstring); `model` holds the restored weights. Without a commit the run
    starts over: `model_file` and the `outputs` of an earlier run are removed."""
    work = Path(work)
    for folder in [work, *(p for p in work.iterdir() if p.is_dir() and not p.name.startswith("."))]:
        remove_debris(folder)
    epoch = state.epoch if state else 0
    rows = state.history if state else []
    history = Path(history)
    if not _history_matches(history, rows):
        write_history(history, rows, fault="train.recover")
    if tensorboard is not None:
        purge_events(tensorboard, epoch)
    if state is None:
        for path in (model_file, *outputs):
            Path(path).unlink(missing_ok=True)
    elif state.best and state.best["epoch"] == epoch - 1:
        # model.keras is saved after the commit: a kill in between leaves the one before
        save_model(model, model_file, fault="train.recover")


def _scalars(logs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in logs.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def _prune(backup: Path, keep: set[str]) -> None:
    for p in backup.iterdir():
        name = p.name
        if name in keep or name == STATE_FILE:
            continue
        if name.endswith(".weights.h5") or name.endswith(LEGACY_SUFFIX) or name.startswith(DEBRIS_PREFIX):
            p.unlink(missing_ok=True)


class RunCheckpoint(keras.callbacks.Callback):
    """Commits the run after every epoch (see the module docstring); put it last, after the
    callbacks that add to the logs or stop training. `stateful`: callbacks with `state_key`,
    `get_state()` and `set_state()`, whose state is committed and given back on resume.
    `monitor` is the validation value whose best epoch `model.keras` holds; a first `state`
    whose `best` is the untrained model (epoch -1) makes every epoch beat it first."""

    def __init__(self, work: str | Path, state: RunState | None, *, backup: str = "backup",
                 history: str = "history.csv", model_file: str = "model.keras", stateful: Sequence[Any] = (),
                 monitor: str = MONITOR):
        super().__init__()
        self.monitor = monitor
        self.work = Path(work)
        self.backup = self.work / backup
        self.history = self.work / history
        self.model_file = self.work / model_file
        self.state = state or RunState()
        self.stateful = list(stateful)

    def on_train_begin(self, logs: Any = None) -> None:
        for cb in self.stateful:  # after their own on_train_begin, which resets them
            if cb.state_key in self.state.callbacks:
                cb.set_state(self.state.callbacks[cb.state_key])

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        faults.point("train.step", batch)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        old = self.state
        row = {"epoch": epoch, **_scalars(logs or {})}
        value = row.get(self.monitor)
        improved = value is not None and math.isfinite(value) and (old.best is None or value < old.best["value"])
        new = RunState(epoch=epoch + 1, weights=weights_name(epoch + 1), history=[*old.history, row],
                       best={"epoch": epoch, "value": value} if improved else old.best,
                       stopped=bool(getattr(self.model, "stop_training", False)),
                       callbacks={cb.state_key: cb.get_state() for cb in self.stateful},
                       previous=old.without_previous() if old.weights else None, untrained=old.untrained)
        self.backup.mkdir(parents=True, exist_ok=True)
        _check_room(self.backup / new.weights, self.model)
        with atomic_path(self.backup / new.weights, fault="train.backup.weights") as tmp:
            self.model.save_weights(tmp)
        write_text_atomic(self.backup / STATE_FILE, json.dumps(new.to_dict()), fault="train.backup")
        self.state = new
        _prune(self.backup, {new.weights, old.weights or ""})
        write_history(self.history, new.history)
        if improved:
            save_model(self.model, self.model_file)


def _check_room(path: Path, model: Any) -> None:
    """OutputError unless `path`'s file system has room for the model's and optimizer's
    variables (and HDF5's bookkeeping): HDF5 that runs out of space mid-file leaves its
    library in a state that crashes the interpreter at exit."""
    import numpy as np

    optimizer = getattr(model, "optimizer", None)
    variables = [*model.variables, *(getattr(optimizer, "variables", None) or [])]
    need = sum(int(np.prod(v.shape)) * np.dtype(str(v.dtype)).itemsize for v in variables)
    need += 4096 * len(variables) + (1 << 20)
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise OutputError(path, f"no space left on device (about {need / 1e6:.1f} MB needed, "
                                f"{free / 1e6:.1f} MB free)")


__all__ = ["STATE_FILE", "RunState", "weights_name", "read_state", "restore", "write_history", "save_model",
           "purge_events", "recover", "RunCheckpoint"]
