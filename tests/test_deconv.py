"""kneetf.models.deconv: the phase-decomposed Conv3DTranspose equals Keras' layer, forward and
both gradients, and is what the generator uses for its narrow layers."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import kneetf
from kneetf.models.deconv import MAX_PHASE_FILTERS, Conv2DTranspose as MatmulConv2DTranspose
from kneetf.models.deconv import Conv3DTranspose as PhaseConv3DTranspose


def _pair(shape, filters, kernel, strides, use_bias=True):
    ref = keras.layers.Conv3DTranspose(filters, kernel, strides=strides, padding="same", use_bias=use_bias)
    new = PhaseConv3DTranspose(filters, kernel, strides=strides, padding="same", use_bias=use_bias)
    ref.build(shape)
    new.build(shape)
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(w.shape).astype("float32") for w in ref.get_weights()]
    ref.set_weights(weights)
    new.set_weights(weights)
    return ref, new


def _forward_and_grads(layer, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(tf.sin(y))
    return [y, *tape.gradient(loss, [x, *layer.trainable_weights])]


@pytest.mark.parametrize("shape,filters,kernel,strides,use_bias", [
    ((2, 4, 5, 3, 3), 1, 4, (2, 2, 1), True),     # the compact generator's last layer (anisotropic)
    ((1, 3, 4, 5, 2), 4, 4, (2, 2, 2), False),
    ((2, 3, 3, 3, 2), 2, 3, (2, 2, 2), True),     # odd kernel
    ((1, 2, 3, 4, 3), 3, (4, 3, 2), (1, 2, 3), True),  # mixed kernel sizes and strides
    ((2, 3, 2, 4, 2), 2, (4, 3, 2), (2, 1, 2), True),  # every kernel size a multiple of its stride
])
def test_phase_layer_equals_keras_forward_and_gradients(shape, filters, kernel, strides, use_bias):
    ref, new = _pair(shape, filters, kernel, strides, use_bias)
    assert new.uses_phase()
    x = tf.constant(np.random.default_rng(1).standard_normal(shape).astype("float32"))
    for a, b in zip(_forward_and_grads(ref, x), _forward_and_grads(new, x)):
        assert a.shape == b.shape
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


def test_wide_layers_fall_back_to_keras_and_config_round_trips():
    layer = PhaseConv3DTranspose(MAX_PHASE_FILTERS + 1, 4, strides=2, padding="same")
    assert not layer.uses_phase()
    narrow = PhaseConv3DTranspose(2, 4, strides=(2, 2, 1), padding="same", name="g")
    clone = keras.layers.deserialize(keras.layers.serialize(narrow))
    assert type(clone) is PhaseConv3DTranspose and clone.get_config() == narrow.get_config()


def test_output_padding_takes_keras_own_path_with_keras_shape():
    shape, kwargs = (1, 3, 3, 3, 2), dict(strides=2, padding="same", output_padding=1)
    ref, new = keras.layers.Conv3DTranspose(2, 3, **kwargs), PhaseConv3DTranspose(2, 3, **kwargs)
    ref.build(shape)
    new.build(shape)
    new.set_weights(ref.get_weights())
    assert not new.uses_phase() and not new.uses_matmul(shape)
    x = tf.constant(np.random.default_rng(2).standard_normal(shape).astype("float32"))
    np.testing.assert_allclose(new(x).numpy(), ref(x).numpy(), rtol=1e-5, atol=1e-5)


def test_generator_uses_the_phase_layer_for_narrow_deconvs(tmp_path):
    model = kneetf.build_model("tiny")
    deconvs = [l for l in model._flatten_layers() if isinstance(l, keras.layers.Conv3DTranspose)]
    assert deconvs and all(type(l) is PhaseConv3DTranspose for l in deconvs)
    assert any(l.uses_phase() for l in deconvs)
    x = np.random.default_rng(0).random((2, *model.input_shape[1:]), dtype=np.float32)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0)["mri"], model.predict(x, verbose=0)["mri"], atol=1e-6)


def test_mixed_bfloat16_phase_layer_runs_and_returns_bfloat16():
    layer = PhaseConv3DTranspose(1, 4, strides=(2, 2, 1), padding="same", dtype="mixed_bfloat16")
    x = tf.ones((1, 2, 2, 2, 3))
    layer.build(x.shape)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float32))
    assert y.dtype == tf.bfloat16 and y.shape == (1, 4, 4, 2, 1)
    grads = tape.gradient(loss, [x, layer.kernel])
    assert grads[1].shape == layer.kernel.shape and bool(tf.reduce_all(tf.math.is_finite(grads[1])))


@pytest.mark.parametrize("filters", [1, 6])
def test_mixed_bfloat16_layer_matches_float32_within_bfloat16_rounding(filters):
    """Under mixed_bfloat16 (the phase forward for a narrow layer, Keras' own for a wide one) the
    output and both gradients are Keras' float32 layer's to bfloat16 precision: within 2 % of the
    largest value, or no further off than Keras' own layer under mixed_bfloat16 (a CPU without
    native bfloat16 rounds the kernel gradient's sums more coarsely)."""
    shape = (2, 6, 5, 4, 8)
    # no bias: its gradient is a bfloat16 sum over every position, Keras' own rounding
    ref = keras.layers.Conv3DTranspose(filters, 4, strides=(2, 2, 1), padding="same", use_bias=False)
    ref16 = keras.layers.Conv3DTranspose(filters, 4, strides=(2, 2, 1), padding="same", use_bias=False,
                                         dtype="mixed_bfloat16")
    new = PhaseConv3DTranspose(filters, 4, strides=(2, 2, 1), padding="same", use_bias=False, dtype="mixed_bfloat16")
    for layer in (ref, ref16, new):
        layer.build(shape)
    weights = [np.random.default_rng(0).standard_normal(w.shape).astype("float32") for w in ref.get_weights()]
    for layer in (ref, ref16, new):
        layer.set_weights(weights)
    x = tf.constant(np.random.default_rng(1).standard_normal(shape).astype("float32"))
    c = tf.constant(np.random.default_rng(2).standard_normal((2, 12, 10, 4, filters)).astype("float32"))

    def forward_and_grads(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.cast(layer(x), tf.float32)
            loss = tf.reduce_sum(y * c)  # the upstream gradient does not depend on the rounding of y
        return [y, *tape.gradient(loss, [x, *layer.trainable_weights])]

    for a, b, keras16 in zip(forward_and_grads(ref), forward_and_grads(new), forward_and_grads(ref16)):
        assert b.dtype == tf.float32 and b.shape == a.shape
        keras_error = float(tf.reduce_max(tf.abs(tf.cast(keras16, tf.float32) - a)))
        assert float(tf.reduce_max(tf.abs(b - a))) <= max(0.02 * float(tf.reduce_max(tf.abs(a))), 1.5 * keras_error)


@pytest.mark.parametrize("shape,filters,kernel,strides,use_bias", [
    ((2, 2, 2, 2, 5), 6, 4, (1, 1, 1), True),     # the generator's first block (stride 1)
    ((2, 2, 2, 1, 5), 3, 4, (2, 2, 2), False),    # its second, on the compact preset's 2x2x1 input
    ((1, 2, 2, 2, 3), 2, (4, 3, 2), (2, 1, 3), True),  # mixed kernel sizes and strides
])
def test_matmul_layer_equals_keras_forward_and_gradients_3d(shape, filters, kernel, strides, use_bias):
    ref, new = _pair(shape, filters, kernel, strides, use_bias)
    assert new.uses_matmul(shape)
    x = tf.constant(np.random.default_rng(1).standard_normal(shape).astype("float32"))
    for a, b in zip(_forward_and_grads(ref, x), _forward_and_grads(new, x)):
        assert a.shape == b.shape
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


@pytest.mark.parametrize("shape,filters,kernel,strides", [
    ((2, 2, 2, 7), 5, 4, (1, 1)),    # the X-ray decoder's first block
    ((3, 2, 2, 4), 6, 4, (2, 2)),    # its second
    ((1, 1, 3, 2), 2, (3, 4), (2, 1)),
])
def test_matmul_layer_equals_keras_forward_and_gradients_2d(shape, filters, kernel, strides):
    ref = keras.layers.Conv2DTranspose(filters, kernel, strides=strides, padding="same")
    new = MatmulConv2DTranspose(filters, kernel, strides=strides, padding="same")
    ref.build(shape)
    new.build(shape)
    weights = [np.random.default_rng(0).standard_normal(w.shape).astype("float32") for w in ref.get_weights()]
    ref.set_weights(weights)
    new.set_weights(weights)
    assert new.uses_matmul(shape)
    x = tf.constant(np.random.default_rng(1).standard_normal(shape).astype("float32"))
    for a, b in zip(_forward_and_grads(ref, x), _forward_and_grads(new, x)):
        assert a.shape == b.shape
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


def test_larger_inputs_fall_back_and_the_models_use_the_matmul_form():
    assert not PhaseConv3DTranspose(8, 4, strides=2, padding="same").uses_matmul((1, 4, 4, 4, 8))
    assert not MatmulConv2DTranspose(8, 4, strides=2, padding="same").uses_matmul((1, 4, 4, 8))
    assert not MatmulConv2DTranspose(8, 4, strides=2, padding="same", output_padding=1).uses_matmul((1, 2, 2, 8))
    model = kneetf.build_model("tiny")
    for sub in (model.generator, model.decoder):
        first = next(l for l in sub.layers if isinstance(l, (keras.layers.Conv2DTranspose,
                                                             keras.layers.Conv3DTranspose)))
        assert first.uses_matmul(first.input.shape)
    clone = keras.layers.deserialize(keras.layers.serialize(model.decoder.layers[1]))
    assert type(clone) is MatmulConv2DTranspose
