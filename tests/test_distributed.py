"""Data-parallel training with real `kneetf-train` processes.

- MultiWorkerMirroredStrategy: two worker processes on localhost (TF_CONFIG per worker, free
  ports) train on a small cache; both end with the same weights, and the run matches a
  single-process run with the same global batch.
- MirroredStrategy over two logical CPU devices (configured before TensorFlow initialises, so
  in a subprocess): the single-process twin of the two-worker run.

What may differ, and why. Under either strategy each replica normalises its BatchNorm layers
with the statistics of its own slice of the global batch (4 of 8 samples here), not of the
whole batch as one device does: the gradient of a step differs from the one-device gradient
(on this tiny network and random data, cosine about 0.93 for the first step) and Adam, which
moves every weight by about the learning rate whatever the gradient's size, turns that into
update directions that agree only partly. The moving BatchNorm statistics are not all-reduced
either: each worker keeps those of its own slices, and the chief's are the ones saved. The
trainable weights of the two workers, on the other hand, receive the same all-reduced
gradients and must be equal; and the two-worker run must reproduce the one-process, two-
replica run (same slices, same per-replica BatchNorm) up to floating-point noise.
"""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache_factory import random_cache

pytestmark = pytest.mark.slow

N_TRAIN, N_VAL, BATCH, EPOCHS, SEED = 8, 4, 8, 2, 0
TIMEOUT_S = 900
# the default recipe without its random X-ray augmentation, so that runs can be compared
ARGS = ["--preset", "tiny", "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--seed", str(SEED), "--augment", "0"]

MIRRORED_2CPU = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
assert len(tf.config.list_logical_devices("CPU")) == 2
from kneetf.cli.main import train_main
sys.exit(train_main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_cache(tmp_path_factory.mktemp("dist") / "cache", N_TRAIN, N_VAL, shard_size=16)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def train_cmd(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("kneetf-train")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-c", "import sys; from kneetf.cli.main import train_main; sys.exit(train_main())", *args]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def _check(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"{log.name}:\n" + log.read_text()[-5000:]


def run_multiworker(cache: Path, out: Path, workers: int = 2) -> None:
    hosts = [f"localhost:{p}" for p in free_ports(workers)]
    procs, logs = [], []
    for i in range(workers):
        tf_config = json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}})
        logs.append(out.parent / f"{out.name}.worker{i}.log")
        with logs[-1].open("w") as f:
            procs.append(subprocess.Popen(
                train_cmd(*ARGS, "--strategy", "multiworker", "--data", str(cache), "--out", str(out)),
                stdout=f, stderr=subprocess.STDOUT, env=_env(TF_CONFIG=tf_config)))
    _check(procs, logs)


def run_single(cache: Path, out: Path, strategy: str) -> None:
    log = out.parent / f"{out.name}.log"
    args = [*ARGS, "--strategy", strategy, "--data", str(cache), "--out", str(out)]
    cmd = [sys.executable, "-c", MIRRORED_2CPU, *args] if strategy == "mirrored" else train_cmd(*args)
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env())
    _check([proc], [log])


def model_config(run: Path) -> dict:
    """The model config a run trained (the preset with the recipe applied), from config.json."""
    return json.loads((run / "config.json").read_text())["model"]


def weights(path: Path, config: dict) -> dict[str, np.ndarray]:
    """Variables (by path) of a weights file or .keras model, read into a KneeNet."""
    from kneetf.models.kneenet import KneeNet

    model = KneeNet(config)
    model.load_weights(path, skip_mismatch=True)
    return {v.path: np.asarray(v) for v in model.weights}


def initial_weights(config: dict) -> dict[str, np.ndarray]:
    """What every run starts from: train() seeds Keras, then builds the model (any strategy
    gives the same values; the chief's are broadcast under MultiWorkerMirroredStrategy)."""
    import keras

    from kneetf.models.kneenet import KneeNet

    keras.utils.set_random_seed(SEED)
    return {v.path: np.asarray(v) for v in KneeNet(config).weights}


def trainable(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in w.items() if "moving_" not in k}


def update_cosine(a: dict[str, np.ndarray], b: dict[str, np.ndarray], init: dict[str, np.ndarray]) -> float:
    ua = np.concatenate([(a[k] - init[k]).ravel() for k in sorted(a)])
    ub = np.concatenate([(b[k] - init[k]).ravel() for k in sorted(a)])
    return float(ua @ ub / (np.linalg.norm(ua) * np.linalg.norm(ub)))


def losses(out: Path) -> np.ndarray:
    with (out / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    return np.array([[float(r["loss"]), float(r["val_loss"])] for r in rows])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def multiworker(cache: Path, runs: Path) -> Path:
    run_multiworker(cache, runs / "multiworker")
    return runs / "multiworker"


@pytest.fixture(scope="module")
def mirrored(cache: Path, runs: Path) -> Path:
    run_single(cache, runs / "mirrored", "mirrored")
    return runs / "mirrored"


@pytest.fixture(scope="module")
def one_device(cache: Path, runs: Path) -> Path:
    run_single(cache, runs / "one-device", "one-device")
    return runs / "one-device"


def final(run: Path, worker: int = 0) -> dict[str, np.ndarray]:
    """The weights after the last epoch (the backup's last commit, kept after the run)."""
    folder = run if worker == 0 else run / f".worker-{worker}"
    state = json.loads((folder / "backup" / "training_metadata.json").read_text())
    return weights(folder / "backup" / state["weights"], model_config(run))


def max_gap(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def test_mirrored_over_two_logical_cpus(mirrored: Path, one_device: Path, record_property) -> None:
    assert json.loads((mirrored / "metrics.json").read_text())["epochs_run"] == EPOCHS
    log = (mirrored.parent / "mirrored.log").read_text()
    assert "num_devices = 2" in log  # tf.distribute's all-reduce over the two replicas
    init = trainable(initial_weights(model_config(mirrored)))
    w_two, w_one = trainable(final(mirrored)), trainable(final(one_device))
    # two replicas normalise over 4 samples each: other losses than one device's (the first
    # step's forward pass already differs) ...
    loss_gap = float(np.max(np.abs(losses(mirrored)[:, 0] - losses(one_device)[:, 0]) / losses(one_device)[:, 0]))
    cos = update_cosine(w_two, w_one, init)
    record_property("max_rel_train_loss_gap_two_replicas_vs_one_device", loss_gap)
    record_property("update_cosine_two_replicas_vs_one_device", cos)
    assert loss_gap > 1e-5
    # ... that still learn the same way, within 1 %
    assert loss_gap < 0.01 and cos > 0.5, (loss_gap, cos)


def test_two_workers_end_with_the_same_weights(multiworker: Path, record_property) -> None:
    # the chief writes the run folder; the other worker only its private scratch folder
    names = {p.name for p in multiworker.iterdir()}
    assert {"model.keras", "metrics.json", "history.csv", "config.json", "samples.png", "tensorboard"} <= names
    scratch = multiworker / ".worker-1"
    assert not (scratch / "metrics.json").exists() and not (scratch / "tensorboard").exists()
    assert json.loads((multiworker / "metrics.json").read_text())["epochs_run"] == EPOCHS
    chief, other = final(multiworker), final(multiworker, 1)
    # same all-reduced gradients -> identical trainable weights, identical logged losses
    for k, v in trainable(chief).items():
        np.testing.assert_array_equal(v, other[k], err_msg=k)
    np.testing.assert_allclose(losses(multiworker), losses(scratch), rtol=1e-6)
    # BatchNorm moving statistics are per worker (not all-reduced); the chief's are saved
    record_property("bn_moving_stats_max_abs_gap_between_workers",
                    max(float(np.max(np.abs(chief[k] - other[k]))) for k in chief if "moving_" in k))
    saved = weights(multiworker / "model.keras", model_config(multiworker))
    assert all(np.isfinite(v).all() for v in saved.values())


def test_two_workers_match_one_process_with_two_replicas(multiworker: Path, mirrored: Path,
                                                         record_property) -> None:
    # same global batch, same per-replica slices, same per-replica BatchNorm: only
    # floating-point noise may differ (the all-reduce goes over gRPC instead of memory)
    gap = max_gap(trainable(final(multiworker)), trainable(final(mirrored)))
    record_property("max_abs_weight_gap_two_workers_vs_two_replicas", gap)
    assert gap <= 1e-5, gap
    np.testing.assert_allclose(losses(multiworker), losses(mirrored), rtol=1e-5)


def test_two_workers_against_one_device(multiworker: Path, one_device: Path, record_property) -> None:
    # the one legitimate difference is per-replica BatchNorm (see the module docstring)
    init = trainable(initial_weights(model_config(one_device)))
    w_mw, w_one = trainable(final(multiworker)), trainable(final(one_device))
    cos = update_cosine(w_mw, w_one, init)
    loss_gap = float(np.max(np.abs(losses(multiworker) - losses(one_device)) / losses(one_device)))
    record_property("update_cosine_two_workers_vs_one_device", cos)
    record_property("max_rel_loss_gap_two_workers_vs_one_device", loss_gap)
    assert cos > 0.5 and loss_gap < 0.01, (cos, loss_gap)
    # each Adam step moves a weight by about the learning rate (1e-3) at most
    gap = max_gap(w_mw, w_one)
    record_property("max_abs_weight_gap_two_workers_vs_one_device", gap)
    assert gap <= 2 * EPOCHS * 1e-3 * 1.01
