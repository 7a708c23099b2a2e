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
