"""BatchNormalization whose training pass runs as one fused op on bfloat16 inputs.

Under `mixed_bfloat16` Keras' BatchNormalization casts its bfloat16 input to float32, takes
the moments and normalises with separate float32 ops, and casts the result back: about ten
passes over the activations in float32, forward and backward, so BatchNorm takes longer in
bf16 than in float32. TensorFlow's FusedBatchNormV3 reads the bfloat16 input as it is, keeps
its statistics and arithmetic in float32 and writes bfloat16: the same normalisation in one
pass for the statistics and one for the output (and one fused gradient op).

Only the training pass of bfloat16 inputs with at least `MIN_FUSED_CHANNELS` channels takes
it: with fewer channels the fused op (oneDNN's, on CPU) is slower than Keras' ops (forward +
backward of the presets' shapes: 1-8 channels up to 2.6x slower, 16 and more 1.1-2.4x
faster). Float32 and float16 inputs, inference, masks, renormalisation, synchronised
statistics and other axes run Keras' own code too. Weights, config and the moving statistics'
update rule are Keras' (the moving variance is the biased batch variance, as Keras keeps it),
so the two layers are interchangeable.
"""
from __future__ import annotations

from typing import Any

import keras

#: the fused op is used from this many channels on (fewer: slower than Keras' ops on CPU)
MIN_FUSED_CHANNELS = 16


@keras.saving.register_keras_serializable(package="kneetf")
class BatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization`, fused in training on wide bfloat16 channels-last inputs."""

    def uses_fused(self, inputs: Any, training: Any = None, mask: Any = None) -> bool:
        """True when `call` runs the fused op for these arguments."""
        rank = len(inputs.shape)
        return (bool(training) and self.trainable and mask is None and keras.backend.backend() == "tensorflow"
                and keras.backend.standardize_dtype(inputs.dtype) == "bfloat16" and rank in (4, 5)
                and self.axis in (-1, rank - 1) and (inputs.shape[-1] or 0) >= MIN_FUSED_CHANNELS
                and not self.renorm and not self.synchronized)

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if not self.uses_fused(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        channels = inputs.shape[-1]
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels], tf.float32)
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels], tf.float32)
        y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=gamma, offset=beta, mean=tf.zeros([channels], tf.float32),
            variance=tf.ones([channels], tf.float32), epsilon=self.epsilon,
            data_format="NHWC" if len(inputs.shape) == 4 else "NDHWC", is_training=True)
        # the op's batch variance carries Bessel's correction; Keras averages the biased one
        n = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
        variance = variance * ((n - 1.0) / n)
        m = self.momentum
        self.moving_mean.assign(tf.cast(self.moving_mean, tf.float32) * m + mean * (1.0 - m))
        self.moving_variance.assign(tf.cast(self.moving_variance, tf.float32) * m + variance * (1.0 - m))
        return tf.cast(y, self.compute_dtype)


__all__ = ["MIN_FUSED_CHANNELS", "BatchNormalization"]
