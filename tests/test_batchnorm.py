"""kneetf.models.batchnorm: the fused training pass on bfloat16 inputs equals Keras' layer
(output, gradients, moving statistics); every other case is Keras' own code."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kneetf.models.batchnorm import MIN_FUSED_CHANNELS, BatchNormalization
from kneetf.models.kneenet import KneeNet


@pytest.fixture
def bf16_policy():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def _pair(shape, **kwargs):
    ref, new = keras.layers.BatchNormalization(**kwargs), BatchNormalization(**kwargs)
    ref.build(shape)
    new.build(shape)
    rng = np.random.default_rng(0)
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        value = rng.random(shape[-1]).astype("float32") + 0.5
        getattr(ref, name).assign(value)
        getattr(new, name).assign(value)
    return ref, new


def _train_pass(layer, x, w):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * w)
    gx, gg, gb = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return [tf.cast(v, tf.float32).numpy() for v in (y, gx, gg, gb, layer.moving_mean, layer.moving_variance)]


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 16), (4, 5, 6, 24)])
def test_fused_training_pass_equals_keras(bf16_policy, shape) -> None:
    ref, new = _pair(shape, momentum=0.9)
    rng = np.random.default_rng(1)
    x = tf.cast(tf.constant(rng.normal(2.0, 3.0, shape).astype("float32")), tf.bfloat16)
    w = tf.constant(rng.standard_normal(shape).astype("float32"))
    assert new.uses_fused(x, training=True) and not new.uses_fused(x, training=False)
    got, want = _train_pass(new, x, w), _train_pass(ref, x, w)
    assert got[0].dtype == want[0].dtype == np.float32 and new(x, training=True).dtype == tf.bfloat16
    # y and dx are bfloat16: one unit in the last place (2**-7 relative) at most
    for a, b in zip(got[:2], want[:2]):
        np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=2 ** -7 * np.abs(b).max())
    # the float32 gradients of gamma and beta and the moving statistics (biased variance)
    for a, b in zip(got[2:], want[2:]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    start = _pair(shape, momentum=0.9)[0]
    assert not np.allclose(got[4], start.moving_mean.numpy()) and not np.allclose(got[5], start.moving_variance.numpy())


def test_float32_inference_and_masks_run_keras_code(bf16_policy) -> None:
    layer = BatchNormalization()
    x16 = tf.zeros((2, 3, 3, 4), tf.bfloat16)
    layer.build(x16.shape)
    assert not layer.uses_fused(tf.zeros((2, 3, 3, 4)), training=True)       # float32 input
    assert not layer.uses_fused(x16, training=False)                          # inference
    assert not layer.uses_fused(x16, training=True, mask=tf.ones((2, 3, 3)))  # masked
    assert not BatchNormalization(axis=1).uses_fused(x16, training=True)      # not the last axis
    assert not layer.uses_fused(x16, training=True)                           # 4 < MIN_FUSED_CHANNELS channels
    assert layer.uses_fused(tf.zeros((2, 3, 3, MIN_FUSED_CHANNELS), tf.bfloat16), training=True)


def test_kneenet_uses_it_and_saves_and_loads(tmp_path) -> None:
    model = KneeNet("tiny")
    bns = [layer for sub in (model.encoder, model.decoder, model.generator) for layer in sub.layers
           if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(isinstance(layer, BatchNormalization) for layer in bns)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = np.random.default_rng(0).random((1, 128, 128, 1), dtype=np.float32)
    np.testing.assert_array_equal(loaded.predict_on_batch(x)["mri"], model.predict_on_batch(x)["mri"])
