"""tf.distribute strategies by name, and which worker writes files."""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from kneetf.errors import ConfigError

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "one-device", "mirrored", "multiworker")


def make_strategy(name: str = "auto") -> Any:
    """The tf.distribute strategy called `name`.

    auto: MirroredStrategy when several GPUs are visible, else the default strategy.
    multiworker: MultiWorkerMirroredStrategy configured by the standard `TF_CONFIG`.
    """
    import tensorflow as tf

    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    if name == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise ConfigError("--strategy multiworker needs the TF_CONFIG environment variable "
                              "(cluster and task of this worker); see README 'Several machines'")
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "auto" and len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    if name == "one-device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    return tf.distribute.get_strategy()


def is_chief() -> bool:
    """True unless TF_CONFIG names this task as a non-chief worker."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return True
    task = json.loads(raw).get("task", {})
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    cluster = json.loads(raw).get("cluster", {})
    if "chief" in cluster:
        return kind == "chief"
    return kind == "worker" and index == 0


def worker_index() -> int:
    raw = os.environ.get("TF_CONFIG")
    return int(json.loads(raw).get("task", {}).get("index", 0)) if raw else 0
