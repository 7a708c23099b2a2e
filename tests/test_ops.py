"""The shared TF preprocessing ops: percentiles (partial ordering) against numpy and a full sort."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from kneetf.preprocess import ops

QS = (0.0, 0.5, 2.0, 49.9, 50.0, 75.0, 99.5, 100.0)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 9, 11, 3)])
@pytest.mark.parametrize("values", ["normal", "ties"])
def test_percentile_equals_a_full_sort(shape: tuple[int, ...], values: str) -> None:
    """A number q orders only the values near its end; a tensor q sorts them all: the same
    bits either way, and numpy's linear interpolation within float32 rounding."""
    rng = np.random.default_rng(len(shape))
    x = rng.normal(size=shape).astype("float32") * 100
    if values == "ties":
        x = np.round(x / 50) * 50
    for q in QS:
        partial = ops.percentile(x, q).numpy()
        full = ops.percentile(x, tf.constant(q)).numpy()
        np.testing.assert_array_equal(partial, full)
        np.testing.assert_allclose(partial, np.percentile(x.reshape(shape[0], -1), q, axis=1), rtol=1e-4, atol=1e-3)


def test_robust_normalize_in_a_graph_with_unknown_shapes() -> None:
    """As the export signature runs it: batch and image size unknown when traced."""
    spec = tf.TensorSpec([None, None, None, 1], tf.float32)
    graph = tf.function(ops.robust_normalize, input_signature=[spec])
    x = np.random.default_rng(0).gamma(2.0, 100.0, size=(2, 40, 30, 1)).astype("float32")
    out = graph(x).numpy()
    np.testing.assert_array_equal(out, ops.robust_normalize(x).numpy())
    for y, sample in zip(out, x):
        lo, hi = np.percentile(sample, [0.5, 99.5])
        np.testing.assert_allclose(y, np.clip((sample - lo) / (hi - lo), 0, 1), atol=1e-5)


@pytest.mark.parametrize("kind", ["xray", "mri"])
def test_traced_preprocessing_equals_the_eager_ops(kind: str) -> None:
    """`ops.traced` (one graph for every input shape) gives the eager call's bits, for each
    setting it is asked for, and traces once per setting."""
    rng = np.random.default_rng(3)
    eager = ops.preprocess_xray if kind == "xray" else ops.preprocess_mri
    channels = 1 if kind == "xray" else 5
    for size, low, high in ((16, 0.5, 99.5), (8, 2.0, 98.0)):
        fn = ops.traced(kind, size, low, high)
        assert ops.traced(kind, size, low, high) is fn
        for h, w in ((1, 1), (7, 5), (40, 33), (3, 90)):
            x = (rng.gamma(2.0, 300.0, size=(2, h, w, channels))).astype("float32")
            x[1] = np.round(x[1] / 200) * 200  # ties
            got = fn(x).numpy()
            assert got.shape == (2, size, size, channels)
            np.testing.assert_array_equal(got, eager(x, size, low, high).numpy())
        np.testing.assert_array_equal(fn(np.full((1, 9, 9, channels), 5.0, np.float32)).numpy(), 0.0)
        assert fn.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("size", [0, -3, 4, 64.0, True])
def test_a_preprocess_config_with_an_impossible_image_size_is_refused(size) -> None:
    """A run config or --preprocess JSON with image_size 0 failed in TensorFlow's resize on every input."""
    from kneetf.config import PreprocessConfig
    from kneetf.errors import ConfigError

    with pytest.raises(ConfigError, match="image_size must be an integer of at least 8"):
        PreprocessConfig(image_size=size)
    assert PreprocessConfig(image_size=np.int64(64)).image_size == 64
