"""kneetf.models.optimizers: TwoRateAdam is Keras' Adam, with the generator's variables at
their own rate."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kneetf.models.optimizers import TwoRateAdam


def _train(opt, names, steps=5, eager=False):
    """The values of fresh variables named `names` after `steps` updates with random gradients
    (of a loss scaled as `fit` scales it), then the optimizer's moments m and v."""
    variables = [keras.Variable(np.random.default_rng(i).standard_normal(shape).astype("float32"), name=name)
                 for i, (name, shape) in enumerate(names)]
    opt.build(variables)

    def step(grads):
        opt.apply([g * opt.scale_loss(1.0) for g in grads], variables)

    if not eager:
        step = tf.function(step)
    rng = np.random.default_rng(7)
    for _ in range(steps):
        step([tf.constant(rng.standard_normal(v.shape).astype("float32")) for v in variables])
    assert opt.iterations.numpy() == steps
    inner = getattr(opt, "inner_optimizer", opt)
    return [v.numpy() for v in [*variables, *inner._momentums, *inner._velocities]]


@pytest.mark.parametrize("epsilon", [1e-7, 1e-3])
def test_two_rate_adam_is_keras_adam_per_group(epsilon) -> None:
    names = [("encoder_kernel", (3, 4)), ("generator_block1_kernel", (2, 5, 3))]
    got = _train(TwoRateAdam(1e-2, generator_learning_rate=1e-3, epsilon=epsilon), names)
    main = _train(keras.optimizers.Adam(1e-2, epsilon=epsilon), names)
    slow = _train(keras.optimizers.Adam(1e-3, epsilon=epsilon), names)
    np.testing.assert_allclose(got[0], main[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[1], slow[1], rtol=1e-6, atol=1e-6)
    assert np.abs(got[1] - main[1]).max() > 1e-3  # the two rates really differ


@pytest.mark.parametrize("make", [
    lambda: TwoRateAdam(1e-2, generator_learning_rate=1e-3),
    lambda: TwoRateAdam(1e-2, generator_learning_rate=1e-3, epsilon=1e-3, beta_1=0.5, beta_2=0.9),
    lambda: TwoRateAdam(keras.optimizers.schedules.ExponentialDecay(1e-2, 2, 0.5), generator_learning_rate=1e-3),
    lambda: keras.optimizers.LossScaleOptimizer(TwoRateAdam(1e-2, generator_learning_rate=1e-3)),
])
@pytest.mark.parametrize("eager", [False, True])
def test_fused_update_is_keras_update(make, eager) -> None:
    def run(fused):
        opt = make()
        getattr(opt, "inner_optimizer", opt).fused = fused
        return _train(opt, [("encoder_kernel", (3, 4)), ("generator_block1_kernel", (2, 5, 3)), ("decoder_bias", (7,))],
                      eager=eager)

    # variables and moments equal to float rounding (the fused op orders its arithmetic its own way)
    for got, want in zip(run(True), run(False)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_fused_flag_is_not_in_the_config() -> None:
    opt = TwoRateAdam(1e-2, generator_learning_rate=1e-3)
    config = opt.get_config()
    assert "fused" not in config
    again = TwoRateAdam.from_config(config)
    assert again.fused and again.generator_ratio == pytest.approx(0.1)


@pytest.mark.parametrize("fused, amsgrad", [(True, False), (False, False), (True, True)])
def test_fused_update_is_one_op_per_variable(fused, amsgrad) -> None:
    opt = TwoRateAdam(1e-2, generator_learning_rate=1e-3, amsgrad=amsgrad)
    opt.fused = fused
    variables = [keras.Variable(np.ones((4, 3), "float32"), name=n) for n in ("encoder_kernel", "generator_kernel")]
    opt.build(variables)
    grads = [tf.ones((4, 3)) for _ in variables]
    graph = tf.function(lambda: opt.apply(grads, variables)).get_concrete_function().graph
    ops = [op.type for op in graph.get_operations()]
    assert ops.count("ResourceApplyAdam") == (len(variables) if fused and not amsgrad else 0)
