"""kneetf.models.optimizers: TwoRateAdam is Keras' Adam, with the generator's variables at
their own rate."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kneetf.models.optimizers import TwoRateAdam


def _train(opt, names, steps=5):
    variables = [keras.Variable(np.random.default_rng(i).standard_normal(shape).astype("float32"), name=name)
                 for i, (name, shape) in enumerate(names)]
    opt.build(variables)

    @tf.function
    def step(grads):
        opt.apply(grads, variables)

    rng = np.random.default_rng(7)
    for _ in range(steps):
        step([tf.constant(rng.standard_normal(v.shape).astype("float32")) for v in variables])
    return [v.numpy() for v in variables]


@pytest.mark.parametrize("epsilon", [1e-7, 1e-3])
def test_two_rate_adam_is_keras_adam_per_group(epsilon) -> None:
    names = [("encoder_kernel", (3, 4)), ("generator_block1_kernel", (2, 5, 3))]
    got = _train(TwoRateAdam(1e-2, generator_learning_rate=1e-3, epsilon=epsilon), names)
    main = _train(keras.optimizers.Adam(1e-2, epsilon=epsilon), names)
    slow = _train(keras.optimizers.Adam(1e-3, epsilon=epsilon), names)
    np.testing.assert_allclose(got[0], main[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[1], slow[1], rtol=1e-6, atol=1e-6)
    assert np.abs(got[1] - main[1]).max() > 1e-3  # the two rates really differ
