"""Block builders shared by the encoder, decoder and generator (2-D and 3-D by one `dims` arg)."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import keras
from keras import layers

from kneetf.models import deconv
from kneetf.models.batchnorm import BatchNormalization

# transposed convs: Keras' layers, faster for narrow layers and tiny inputs (same weights)
_CONV = {(2, False): layers.Conv2D, (2, True): deconv.Conv2DTranspose, (3, True): deconv.Conv3DTranspose,
         (3, False): layers.Conv3D}


_WEIGHTS_TO_LOAD = contextvars.ContextVar("kneetf_weights_to_load", default=False)


@contextlib.contextmanager
def weights_to_be_loaded() -> Iterator[None]:
    """Build kneetf's layers with zero initial weights, for a model whose weights are loaded
    next (a saved model): drawing random initial values only to overwrite them costs time and
    the memory their temporaries leave in TensorFlow's allocator (about 300 MiB for the paper
    preset)."""
    token = _WEIGHTS_TO_LOAD.set(True)
    try:
        yield
    finally:
        _WEIGHTS_TO_LOAD.reset(token)


def conv_block(
    x: keras.KerasTensor,
    filters: int,
    kernel: int,
    strides: int | Sequence[int],
    *,
    name: str,
    dims: int = 2,
    transpose: bool = False,
    activation: str = "leaky_relu",
    leaky_slope: float = 0.2,
    batch_norm: bool = True,
    bn_momentum: float = 0.99,
    kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
    dtype_policy: str | None = None,
) -> keras.KerasTensor:
    """Conv (or transposed conv) -> BatchNorm -> activation, the paper's block.

    `activation` is "leaky_relu", "relu", "sigmoid" or "linear"; the last two are used for
    output layers, which are then forced to float32 under mixed precision.
    """
    conv_cls = _CONV[(dims, transpose)]
    out_dtype = "float32" if activation in ("sigmoid", "linear") and not batch_norm else dtype_policy
    x = conv_cls(filters, kernel, strides=strides, padding="same", name=f"{name}_{'deconv' if transpose else 'conv'}",
                 kernel_initializer="zeros" if _WEIGHTS_TO_LOAD.get() else kernel_initializer, dtype=out_dtype)(x)
    if batch_norm:
        x = BatchNormalization(momentum=bn_momentum, name=f"{name}_bn")(x)
    if activation == "leaky_relu":
        x = layers.LeakyReLU(negative_slope=leaky_slope, name=f"{name}_lrelu")(x)
    elif activation == "relu":
        x = layers.ReLU(name=f"{name}_relu")(x)
    elif activation == "sigmoid":
        x = layers.Activation("sigmoid", name=f"{name}_sigmoid", dtype="float32")(x)
    elif activation != "linear":
        raise ValueError(f"unknown activation {activation!r}")
    return x
