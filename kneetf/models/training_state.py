"""A compiled Keras model's training state (optimizer slots, loss and metric trackers), built
from the shapes of the data before `fit` traces its step.

Without a distribution strategy, Keras 3 creates these variables while it traces the training
step, and a `tf.function` that creates variables is traced twice. Building them first, as
Keras itself does under a strategy (`Trainer._symbolic_build`), traces the step once: the
first `fit` of the tiny preset starts in 9 s instead of 14 s on a 2-core CPU. The variables
and their values are the ones Keras would create; no data is read.
"""
from __future__ import annotations

from typing import Any

import keras


def _symbolic(value: Any) -> Any:
    """A KerasTensor of `value`'s shape and dtype (an array, a tensor or a `tf.TensorSpec`);
    None stays None. TypeError for anything else."""
    if value is None:
        return None
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None or getattr(shape, "rank", 0) is None:
        raise TypeError(f"no static shape and dtype: {type(value).__name__}")
    return keras.KerasTensor(tuple(shape), keras.backend.standardize_dtype(dtype))


def _data_batch(x: Any, y: Any, sample_weight: Any) -> Any:
    """The symbolic `(x, y, sample_weight)` of `fit`'s arguments, None when they give no shapes
    without reading data (a generator, a `PyDataset`)."""
    import tensorflow as tf

    if isinstance(x, tf.data.Dataset):
        structure = x.element_spec
        if not isinstance(structure, (tuple, list)):  # as Keras unpacks a batch
            structure = (structure,)
    else:
        structure = (x, y, sample_weight)
    try:
        return keras.tree.map_structure(_symbolic, structure)
    except (TypeError, ValueError):  # no shape or dtype, a shape of unknown rank, a dtype Keras refuses
        return None


def build_training_state(model: keras.Model, x: Any, y: Any = None, sample_weight: Any = None) -> bool:
    """Build `model`'s optimizer, loss and metric state for `fit(x, y, sample_weight=...)`.

    True when built (or already built); False when Keras builds it itself: under a
    distribution strategy, for data without a static structure, or when the symbolic build
    fails, where `fit` builds again and reports the error.
    """
    if model.optimizer is None or not model.compiled:
        return False
    if getattr(model, "_distribute_strategy", None) is not None:  # Keras builds first itself
        return False
    symbolic_build = getattr(model, "_symbolic_build", None)
    batch = _data_batch(x, y, sample_weight) if symbolic_build is not None else None
    if batch is None:
        return False
    try:
        symbolic_build(data_batch=batch)
    except Exception:  # `fit` runs the same build inside its step and raises there, in its words
        return False
    return True
