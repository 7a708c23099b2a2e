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
        _fix_keras_multiworker()
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "auto" and len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    if name == "one-device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    return tf.distribute.get_strategy()


def _fix_keras_multiworker() -> None:
    """Keras 3 (3.15) `fit` under MultiWorkerMirroredStrategy with several workers fails twice
    (keras-team/keras#20585): it builds the model from the first batch reduced with
    `strategy.reduce(MEAN, nest)`, which collective all-reduce cannot do, and reduces each
    step's scalar logs with `axis=0`. Build from this worker's own values (only shapes matter
    there) and reduce scalars with axis=None. Patched once per process; remove when Keras
    fixes the issue."""
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    if getattr(tf_trainer, "_kneetf_multiworker_fix", False):
        return
    reduce_per_replica = tf_trainer.reduce_per_replica

    def _maybe_symbolic_build(self: Any, iterator: Any = None, data_batch: Any = None) -> None:
        if self._distribute_strategy is None:
            return
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tree.map_structure(
                    lambda v: self.distribute_strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v, next(it))
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def _reduce_per_replica(values: Any, strategy: Any, reduction: str) -> Any:
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(strategy):
            def mean(v: Any) -> Any:
                rank = strategy.experimental_local_results(v)[0].shape.rank
                return strategy.reduce("MEAN", v, axis=None if rank == 0 else 0)
            return tree.map_structure(mean, values)
        return reduce_per_replica(values, strategy, reduction)

    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    tf_trainer.reduce_per_replica = _reduce_per_replica
    tf_trainer._kneetf_multiworker_fix = True


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
