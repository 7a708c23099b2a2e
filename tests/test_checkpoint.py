"""The run state of `kneetf.training.checkpoint` on a small Keras model: what an epoch
commits, restoring it, repairing a run folder to match it, reading Keras' older backups,
unreadable checkpoints, TensorBoard purges and the settings a resume may change."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from kneetf.errors import ConfigError, InputError
from kneetf.training import checkpoint as C
from kneetf.training.callbacks import ResumableEarlyStopping


def small_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    return model


def data(n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.random((n, 4), dtype=np.float32)
    return x, x.sum(axis=1, keepdims=True)


def fit(model: keras.Model, work: Path, state: C.RunState | None, epochs: int, start: int = 0,
        stateful: tuple = ()) -> C.RunCheckpoint:
    x, y = data()
    cb = C.RunCheckpoint(work, state, stateful=list(stateful))
    model.fit(x, y, validation_data=(x, y), initial_epoch=start, epochs=epochs, batch_size=8, verbose=0,
              shuffle=False, callbacks=[*stateful, cb])
    return cb


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_an_epoch_commits_weights_history_best_and_callback_state(tmp_path: Path) -> None:
    model = small_model()
    stopper = ResumableEarlyStopping(patience=10)
    fit(model, tmp_path, None, 3, stateful=(stopper,))
    state = json.loads((tmp_path / "backup" / C.STATE_FILE).read_text())
    assert state["epoch"] == 3 and state["weights"] == "epoch-00003.weights.h5"
    assert state["previous"]["epoch"] == 2 and "previous" not in state["previous"]
    # the last commit and the one before, nothing else
    assert sorted(p.name for p in (tmp_path / "backup").iterdir()) == [
        "epoch-00002.weights.h5", "epoch-00003.weights.h5", C.STATE_FILE]
    rows = _rows(tmp_path / "history.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert rows[0].keys() >= {"loss", "val_loss"}
    values = [float(r["val_loss"]) for r in rows]
    assert state["best"] == {"epoch": int(np.argmin(values)), "value": min(values)}
    assert state["callbacks"]["early_stopping"] == stopper.get_state()

    restored = small_model(seed=1)
    got = C.restore(restored, tmp_path / "backup", tmp_path / "history.csv")
    assert got.epoch == 3 and got.history == state["history"]
    for a, b in zip(restored.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(restored.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())


@pytest.mark.slow
def test_a_resumed_fit_continues_the_commit_and_the_callback_state(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    model = small_model()
    fit(model, first, None, 4)
    model = small_model()
    fit(model, second, None, 2)
    resumed = small_model(seed=5)
    state = C.restore(resumed, second / "backup", second / "history.csv")
    stopper = ResumableEarlyStopping(patience=10)
    fit(resumed, second, state, 4, start=state.epoch, stateful=(stopper,))
    assert (second / "history.csv").read_text() == (first / "history.csv").read_text()
    a = json.loads((first / "backup" / C.STATE_FILE).read_text())
    b = json.loads((second / "backup" / C.STATE_FILE).read_text())
    b["callbacks"] = b["previous"]["callbacks"] = {}  # the second run had early stopping
    assert b == a
    assert stopper.get_state()["best"] == pytest.approx(a["best"]["value"])


def test_recover_rolls_the_folder_back_to_the_commit(tmp_path: Path) -> None:
    model = small_model()
    fit(model, tmp_path, None, 3)
    state = C.restore(small_model(), tmp_path / "backup", tmp_path / "history.csv")
    committed = (tmp_path / "history.csv").read_text()
    # what a kill after training epoch 3 further could leave: its row, debris, no model.keras
    with (tmp_path / "history.csv").open("a") as f:
        f.write("3,1.0,1.0\n")
    (tmp_path / ".tmp-model.keras-x.keras").write_text("half")
    (tmp_path / "backup" / ".tmp-epoch-00004.weights.h5-y.weights.h5").write_text("half")
    (tmp_path / "model.keras").unlink()
    best_is_last = state.best["epoch"] == state.epoch - 1
    C.recover(tmp_path, state, model, history=tmp_path / "history.csv", model_file=tmp_path / "model.keras")
    assert (tmp_path / "history.csv").read_text() == committed
    assert not list(tmp_path.rglob(".tmp-*"))
    assert (tmp_path / "model.keras").exists() == best_is_last
    # without a commit the run starts over: outputs of an earlier run go
    (tmp_path / "metrics.json").write_text("{}")
    C.recover(tmp_path, None, model, history=tmp_path / "history.csv", model_file=tmp_path / "model.keras",
              outputs=[tmp_path / "metrics.json"])
    assert not (tmp_path / "history.csv").exists() and not (tmp_path / "metrics.json").exists()


def test_a_keras_backup_resumes_with_each_epoch_once(tmp_path: Path) -> None:
    """BackupAndRestore's files, and history.csv with epoch 2 logged but not backed up
    (then trained and logged again): the state has epochs 0 and 1, once each."""
    backup = tmp_path / "backup"
    backup.mkdir()
    model = small_model()
    model.optimizer.build(model.trainable_variables)
    model.save_weights(backup / "latest.weights.h5")
    (backup / C.STATE_FILE).write_text(json.dumps({"epoch": 2, "batch": 0}))
    (tmp_path / "history.csv").write_text("epoch,loss,val_loss\n0,3.0,2.0\n1,2.0,1.5\n1,2.5,1.0\n2,1.5,0.5\n")
    state = C.restore(small_model(seed=3), backup, tmp_path / "history.csv")
    assert state.epoch == 2 and state.weights == "latest.weights.h5"
    assert [r["epoch"] for r in state.history] == [0, 1] and state.history[1]["val_loss"] == 1.0
    assert state.best == {"epoch": 1, "value": 1.0}


def test_unreadable_checkpoints_name_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = small_model()
    fit(model, tmp_path, None, 2)
    backup = tmp_path / "backup"
    last = backup / "epoch-00002.weights.h5"
    last.write_bytes(last.read_bytes()[:500])  # truncated: the commit before is used
    with caplog.at_level(logging.WARNING):
        state = C.restore(small_model(), backup, tmp_path / "history.csv")
    assert state.epoch == 1 and "epoch-00002.weights.h5" in caplog.text
    first = backup / "epoch-00001.weights.h5"
    first.write_bytes(b"")
    with pytest.raises(InputError, match="epoch-00001.weights.h5.*--fresh"):
        C.restore(small_model(), backup, tmp_path / "history.csv")
    text = (backup / C.STATE_FILE).read_text()
    (backup / C.STATE_FILE).write_text(text[:len(text) // 2])
    with pytest.raises(InputError, match=f"{C.STATE_FILE}.*cannot be read.*--fresh"):
        C.restore(small_model(), backup, tmp_path / "history.csv")


def _steps(folder: Path) -> list[int]:
    from tensorboard.compat.proto import event_pb2

    out = []
    for path in sorted(folder.rglob("*tfevents*")):
        for raw in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(raw.numpy())
            out += [event.step for _ in event.summary.value]
    return sorted(out)


def test_purge_drops_the_epochs_to_train_again_and_a_cut_record(tmp_path: Path) -> None:
    for sub, steps in (("train", range(5)), ("validation", range(4))):
        writer = tf.summary.create_file_writer(str(tmp_path / sub))
        with writer.as_default():
            for step in steps:
                tf.summary.scalar("epoch_loss", 1.0 / (step + 1), step=step)
        writer.close()
    names = sorted(p.name for p in tmp_path.rglob("*tfevents*"))
    event_file = next((tmp_path / "train").glob("*tfevents*"))
    with event_file.open("ab") as f:  # a record a kill cut short
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00garbage")
    assert C.purge_events(tmp_path, 3) == 2
    assert _steps(tmp_path / "train") == [0, 1, 2] and _steps(tmp_path / "validation") == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.rglob("*tfevents*")) == names
    assert C.purge_events(tmp_path, 3) == 0  # nothing left to do: files untouched


def test_early_stopping_state_round_trips() -> None:
    a = ResumableEarlyStopping(patience=3)
    a.wait, a.best, a.best_epoch, a.stopped_epoch = 2, 0.25, 4, 0
    b = ResumableEarlyStopping(patience=3)
    b.on_train_begin()
    b.set_state(json.loads(json.dumps(a.get_state())))
    assert (b.wait, b.best, b.best_epoch, b.stopped_epoch) == (2, 0.25, 4, 0)


def test_a_resume_may_change_how_long_not_what_is_learned(tmp_path: Path) -> None:
    from kneetf.config import ModelConfig, TrainConfig, replace, to_dict
    from kneetf.training.train import _check_same_run, setting_changes

    def blob(train: TrainConfig, model: ModelConfig = ModelConfig()) -> dict:
        return {"model": to_dict(model), "preprocess": {"image_size": 128}, "data": "cache", "train": to_dict(train)}

    base = TrainConfig()
    assert setting_changes(blob(base), blob(replace(base, epochs=99, time_budget_s=5.0,
                                                    early_stopping_patience=3))) == []
    changes = setting_changes(blob(base), blob(replace(base, batch_size=2, lr_encdec=0.5, loss_weights=(0.0, 1.0))))
    assert changes == ["batch_size 32 -> 2", "lr_encdec 0.001 -> 0.5", "loss_weights [1.0, 1.0] -> [0.0, 1.0]"]
    assert setting_changes(blob(base), blob(base, replace(ModelConfig(), latent_dropout=0.1))) == [
        "model latent_dropout 0.0 -> 0.1"]
    old = blob(base)
    del old["train"]["ssim_weight"]  # a run written before the field existed: its default
    assert setting_changes(old, blob(base)) == []

    (tmp_path / "backup").mkdir()
    (tmp_path / "config.json").write_text(json.dumps(blob(base)))
    with pytest.raises(ConfigError, match="batch_size 32 -> 2.*--fresh"):
        _check_same_run(tmp_path, blob(replace(base, batch_size=2)), fresh=False)
    _check_same_run(tmp_path, blob(replace(base, batch_size=2)), fresh=True)
    (tmp_path / "config.json").write_text('{"model": {')
    with pytest.raises(InputError, match="config.json.*cannot be read"):
        _check_same_run(tmp_path, blob(base), fresh=False)
