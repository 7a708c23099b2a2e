"""Resilience of `kneetf-train`: a run killed with SIGKILL mid-epoch continues from its last
completed epoch (history, optimizer state and learning rates restored), a finished run
trains further with `--resume --epochs N+2`, and mixed precision saves a float32 model.

Each test starts real `kneetf-train` processes on a small cache of random pairs (tiny preset).
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cache_factory import random_cache

N_TRAIN, N_VAL, BATCH, EPOCHS = 64, 4, 4, 4
TIMEOUT_S = 900


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_cache(tmp_path_factory.mktemp("resume") / "cache", N_TRAIN, N_VAL, shard_size=32)


def train_cmd(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("kneetf-train")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-c", "import sys; from kneetf.cli.main import train_main; sys.exit(train_main())", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def run_train(args: list[str], log: Path) -> None:
    with log.open("w") as f:
        p = subprocess.run(train_cmd(*args), stdout=f, stderr=subprocess.STDOUT, env=_env(), timeout=TIMEOUT_S)
    assert p.returncode == 0, log.read_text()[-4000:]


def history(out: Path) -> list[dict[str, str]]:
    path = out / "history.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def steps_per_epoch(cache: Path) -> int:
    """Optimizer steps Keras counts per epoch on the training pipeline.

    ceil(n / batch); Keras 3.15 counts one more when the tf.data pipeline's cardinality is
    unknown (it runs a last, empty step when the iterator ends; weights do not change but
    `optimizer.iterations` does), so the expected value follows the pipeline.
    """
    from kneetf.data.pipeline import make_dataset

    n = math.ceil(N_TRAIN / BATCH)
    known = int(make_dataset(cache, "train", BATCH, shuffle=True).cardinality()) >= 0
    return n if known else n + 1


def run_config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


def optimizer_iterations(out: Path) -> int:
    """The optimizer's step count in the run's last backup."""
    import keras

    from kneetf.config import TrainConfig, from_dict
    from kneetf.models.kneenet import KneeNet

    cfg = run_config(out)
    train = from_dict(TrainConfig, cfg["train"])
    model = KneeNet(cfg["model"])
    # the same kind of learning rate (a schedule holds no variable), so the state files match
    lr = keras.optimizers.schedules.CosineDecay(train.lr_encdec, 1) if train.lr_schedule == "cosine" else None
    model.compile_for_training(train, learning_rate=lr)
    model.optimizer.build(model.trainable_variables)
    model.load_weights(out / "backup" / last_weights(out))
    return int(model.optimizer.iterations.numpy())


def last_weights(out: Path) -> str:
    """The weights file of the run's last commit."""
    return json.loads((out / "backup" / "training_metadata.json").read_text())["weights"]


def expected_lr(train: dict, iterations: int) -> float:
    """The encoder/decoder rate after `iterations` steps (Keras' CosineDecay, alpha 0.02,
    over the run's epochs, written out independently)."""
    if train["lr_schedule"] != "cosine":
        return train["lr_encdec"]
    total = math.ceil(N_TRAIN / train["batch_size"]) * train["epochs"]
    done = min(iterations, total) / total
    return train["lr_encdec"] * (0.98 * 0.5 * (1 + math.cos(math.pi * done)) + 0.02)


def check_learning_rates(rows: list[dict[str, str]], trains: list[dict], per_epoch: int) -> None:
    """Row e was logged after (e + 1) * per_epoch steps by the run whose config is trains[e]."""
    for e, (row, train) in enumerate(zip(rows, trains)):
        lr = expected_lr(train, (e + 1) * per_epoch)
        ratio = train["lr_generator"] / train["lr_encdec"]
        assert float(row["lr_encdec"]) == pytest.approx(lr, rel=1e-5), e
        assert float(row["lr_generator"]) == pytest.approx(lr * ratio, rel=1e-5), e


def _wait_for(cond, proc: subprocess.Popen, log: Path, timeout: float = TIMEOUT_S) -> None:
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, "trainer ended before the condition was met:\n" + log.read_text()[-4000:]
        assert time.monotonic() - t0 < timeout, "timed out waiting for the trainer"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_from_last_epoch_then_trains_further(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--data", str(cache), "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
            "--out", str(out), "--seed", "3"]
    log1 = tmp_path / "first.log"
    with log1.open("w") as f:
        proc = subprocess.Popen(train_cmd(*args), stdout=f, stderr=subprocess.STDOUT, env=_env())
    try:
        # epoch 1 done (its history row is written after its backup) and epoch 2 begun
        # (the progress bar's "Epoch 2/N" line); 0.3 s into its 16 steps, kill
        _wait_for(lambda: len(history(out)) >= 1 and "Epoch 2/" in log1.read_text(), proc, log1)
        time.sleep(0.3)
        rows_at_kill = len(history(out))
        assert proc.poll() is None and rows_at_kill < EPOCHS
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    meta = json.loads((out / "backup" / "training_metadata.json").read_text())
    completed = int(meta["epoch"])
    assert completed == rows_at_kill >= 1, (meta, rows_at_kill)
    assert not (out / "metrics.json").exists()  # the first run never finished

    # the same command again continues from the last completed epoch
    run_train(args, tmp_path / "second.log")
    rows = history(out)
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))  # continued: no gap, no repeat
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed"] is True
    assert metrics["epochs_run"] == EPOCHS - completed  # at most the interrupted epoch was lost
    per_epoch = steps_per_epoch(cache)
    assert optimizer_iterations(out) == EPOCHS * per_epoch  # optimizer state restored, not restarted
    train = run_config(out)["train"]
    # the schedule went on where it stopped (a restarted optimizer would log epoch 1's rate again)
    check_learning_rates(rows, [train] * EPOCHS, per_epoch)

    # a finished run trains two more epochs with --resume --epochs N+2
    run_train(args[:5] + [str(EPOCHS + 2)] + args[6:] + ["--resume"], tmp_path / "third.log")
    rows = history(out)
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS + 2))
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 2
    assert optimizer_iterations(out) == (EPOCHS + 2) * per_epoch
    # the longer run's schedule (decay over N+2 epochs) applies to the new epochs
    longer = run_config(out)["train"]
    assert longer["epochs"] == EPOCHS + 2
    check_learning_rates(rows, [train] * EPOCHS + [longer] * 2, per_epoch)

    # settings that define the loss or the model cannot change on a resume
    config = (out / "config.json").read_text()
    p = subprocess.run(train_cmd(*args, "--resume", "--batch-size", "2", "--lr-encdec", "0.5", "--loss-weights", "0,1"),
                       capture_output=True, text=True, env=_env(), timeout=TIMEOUT_S)
    assert p.returncode == 1, p.stderr[-3000:]
    for setting in ("batch_size 4 -> 2", "lr_encdec", "loss_weights [1.0, 1.0] -> [0.0, 1.0]", "--fresh"):
        assert setting in p.stderr
    assert "Traceback" not in p.stderr and (out / "config.json").read_text() == config


def test_resume_without_a_run_is_an_error(tmp_path: Path) -> None:
    p = subprocess.run(train_cmd("--preset", "tiny", "--out", str(tmp_path / "none"), "--resume"),
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 1 and "no run to resume" in p.stderr


@pytest.mark.slow
def test_mixed_float16_trains_and_saves_a_float32_model(cache: Path, tmp_path: Path) -> None:
    import keras

    out = tmp_path / "mixed"
    run_train(["--preset", "tiny", "--data", str(cache), "--epochs", "1", "--batch-size", "16", "--out", str(out),
               "--precision", "mixed_float16"], tmp_path / "mixed.log")
    assert json.loads((out / "config.json").read_text())["run"]["precision"] == "mixed_float16"
    model = keras.saving.load_model(out / "model.keras", safe_mode=True)
    assert model.dtype_policy.name == "float32"
    assert {v.dtype for v in model.weights} == {"float32"}
    assert all(layer.dtype_policy.compute_dtype == "float32" for layer in _all_layers(model))
    x = np.random.default_rng(0).random((2, 128, 128, 1), dtype=np.float32)
    pred = model.predict(x, verbose=0)
    assert pred["mri"].dtype == np.float32 and np.isfinite(pred["mri"]).all()
    # the saved weights are the trained ones (one epoch: the best is the last, as in the backup)
    trained = h5_weights(out / "backup" / last_weights(out), run_config(out)["model"])
    saved = {v.path: np.asarray(v) for v in model.weights}
    assert set(saved) <= set(trained)
    for path, value in saved.items():
        np.testing.assert_array_equal(value, trained[path], err_msg=path)


def h5_weights(path: Path, config: dict) -> dict[str, np.ndarray]:
    """Layer variables of a weights file by variable path, read into a float32 KneeNet."""
    from kneetf.models.kneenet import KneeNet

    model = KneeNet(config)
    model.load_weights(path, skip_mismatch=True)
    return {v.path: np.asarray(v) for v in model.weights}


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)
