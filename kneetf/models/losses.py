"""The MRI loss: the paper's MSE, optionally with SSIM and gradient terms next to it.

MSE alone rewards the blurry conditional mean; a structural term (1 - SSIM per slice, the
metric `kneetf evaluate` reports as SSIM-2D) and an edge term (MSE of the in-plane image
gradients) push towards sharp bone and cartilage boundaries. The weights are training
options (`TrainConfig.ssim_weight`, `gradient_weight`); with both 0 this is plain MSE.
"""
from __future__ import annotations

from typing import Any

import keras


@keras.saving.register_keras_serializable(package="kneetf")
class MriLoss(keras.losses.Loss):
    """MSE + `ssim_weight` * (1 - mean SSIM of the 2-D slices) + `gradient_weight` * MSE of the
    row and column differences, on (batch, H, W, slices) volumes in [0, 1]."""

    def __init__(self, ssim_weight: float = 0.0, gradient_weight: float = 0.0, name: str = "mri_loss",
                 **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.ssim_weight = float(ssim_weight)
        self.gradient_weight = float(gradient_weight)

    def call(self, y_true, y_pred):
        import tensorflow as tf

        y_true = tf.cast(y_true, tf.float32)
        y_pred = tf.cast(y_pred, tf.float32)
        loss = tf.reduce_mean(tf.square(y_pred - y_true), axis=(1, 2, 3))
        if self.ssim_weight:
            # tf.image.ssim treats the last axis as channels: one 2-D SSIM per slice, averaged
            loss += self.ssim_weight * (1.0 - tf.image.ssim(y_true, y_pred, max_val=1.0))
        if self.gradient_weight:
            def grads(v):
                return v[:, 1:, :, :] - v[:, :-1, :, :], v[:, :, 1:, :] - v[:, :, :-1, :]
            (tr, tc), (pr, pc) = grads(y_true), grads(y_pred)
            loss += self.gradient_weight * 0.5 * (tf.reduce_mean(tf.square(pr - tr), axis=(1, 2, 3))
                                                  + tf.reduce_mean(tf.square(pc - tc), axis=(1, 2, 3)))
        return loss

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "ssim_weight": self.ssim_weight, "gradient_weight": self.gradient_weight}


def mri_loss(ssim_weight: float = 0.0, gradient_weight: float = 0.0) -> Any:
    """The compile-time MRI loss: Keras' own MSE when no extra term is asked for."""
    if not ssim_weight and not gradient_weight:
        return "mean_squared_error"
    return MriLoss(ssim_weight, gradient_weight)


__all__ = ["MriLoss", "mri_loss"]
