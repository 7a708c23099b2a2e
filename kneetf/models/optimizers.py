"""One Adam with two learning rates: encoder+decoder at `learning_rate`, generator at its own.

A single optimizer (rather than two optimizers and a hand-written train_step) keeps every
part of Keras that expects `model.optimizer` working unchanged: `fit`, mixed-precision loss
scaling, tf.distribute, BackupAndRestore and `.keras` saving. The generator's rate is held as
a ratio to the main rate so that a learning-rate schedule scales both groups together.

Each variable's update runs as one fused op (TensorFlow's ResourceApplyAdam: the moments and
the variable in one pass over memory, no temporaries) instead of Keras' ten element-wise ops;
the arithmetic is Keras' Adam's.
"""
from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="kneetf")
class TwoRateAdam(keras.optimizers.Adam):
    """Adam whose variables under a layer named `generator*` use `generator_learning_rate`.

    Args:
        learning_rate: rate (or schedule) of the encoder and decoder variables.
        generator_learning_rate: rate of the generator variables when `learning_rate` is at
            its initial value; with a schedule, the generator follows it at the same ratio.
        generator_prefix: a variable belongs to the generator when a component of its
            path starts with this prefix.

    `fused` (True unless set to False on the instance) selects the fused update; AMSGrad,
    sparse gradients and other Keras backends always take Keras' own update.
    """

    fused = True

    def __init__(self, learning_rate: Any = 1e-3, generator_learning_rate: float = 1e-4,
                 generator_prefix: str = "generator", **kwargs: Any) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        base = learning_rate
        if isinstance(base, keras.optimizers.schedules.LearningRateSchedule):
            base = float(keras.ops.convert_to_numpy(base(0)))
        self.generator_learning_rate = float(generator_learning_rate)
        self.generator_prefix = generator_prefix
        self._ratio = float(generator_learning_rate) / float(base)

    def is_generator_variable(self, variable: Any) -> bool:
        path = getattr(variable, "path", None) or variable.name
        return any(part.startswith(self.generator_prefix) for part in path.split("/"))

    @property
    def generator_ratio(self) -> float:
        return self._ratio

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        if self.is_generator_variable(variable):
            learning_rate = keras.ops.multiply(learning_rate, self._ratio)
        if (not self.fused or self.amsgrad or isinstance(gradient, tf.IndexedSlices)
                or keras.backend.backend() != "tensorflow"):
            super().update_step(gradient, variable, learning_rate)
            return
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(self._momentums[index]), v=_handle(self._velocities[index]),
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype), use_locking=False)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(generator_learning_rate=self.generator_learning_rate, generator_prefix=self.generator_prefix)
        return config


def _handle(variable: Any) -> Any:
    """The resource handle of a Keras or TensorFlow variable."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return variable.handle
