"""Faster transposed convolutions: `Conv3DTranspose` for layers with few output channels (the
generator's last blocks) and, in 2-D and 3-D, for layers on a tiny input (the first blocks).

TensorFlow runs a 3-D transposed convolution forward as `Conv3DBackpropInputV2`, which oneDNN
executes slowly on CPU when the layer has few output channels (the generator's last layer, 4 -> 1
channel at 128x128, took 1 GFLOP/s). The same output is ONE stride-1 `Conv3D` of the input with a
kernel assembled from the same weights (`s` phases per strided axis, `s_d*s_h*s_w*filters` output
channels) followed by depth-to-space: the phase (sub-pixel) decomposition. When every kernel size
is a multiple of its stride (the generator's 4x4x4 kernels), the assembled kernel holds exactly the
layer's taps (`k/s` per axis, no zeros) and the output is cropped from a slightly larger one. It multiplies and adds
the same numbers in another order (relative difference ~1e-7 in float32). The gradients stay TF's
own for the transposed convolution. Weights, config and the saved layout are those of
`keras.layers.Conv3DTranspose`; the inference graph is pad + Conv3D + reshape/transpose, which
TFLite converts to builtins.

A layer whose input has at most `MAX_MATMUL_POSITIONS` positions (the generator's and the X-ray
decoder's first blocks: 2x2(x2) inputs, up to 33M weights) runs as two matrix products: the
input times every kernel tap (the kernel read in its stored layout), then a constant 0/1 matrix
that adds each tap's product into its output position. oneDNN's convolutions re-lay out the
whole kernel for each of their three passes (forward, input and kernel gradients), which
costs more than the products for these layers; the matrix products and their gradients read
it as it is. Same products, another summation order.
"""
from __future__ import annotations

from typing import Sequence

import keras
import numpy as np

#: the decomposition is used up to this many output channels; wider layers are faster natively
#: (measured: paper block6, 32 channels, forward 0.19 s natively vs 0.36 s decomposed)
MAX_PHASE_FILTERS = 4
#: the matrix-product form is used up to this many input positions (2x2x2 in 3-D); beyond, the
#: tap matrix grows with their square (measured: paper block3, 4x4x4 input, slower than oneDNN)
MAX_MATMUL_POSITIONS = 8


def _phase_selection(kernel: int, stride: int) -> tuple[np.ndarray, int, int]:
    """S[j, r, t] = 1 when kernel tap t feeds output phase r from input offset j - pad_before
    (TF 'SAME' padding); also the input padding (before, after) the stride-1 conv needs."""
    pad = max(kernel - stride, 0) // 2
    deltas = {(r, t): (r + pad - t) // stride for r in range(stride) for t in range(kernel)
              if (r + pad - t) % stride == 0}
    lo, hi = min(deltas.values()), max(deltas.values())
    sel = np.zeros((hi - lo + 1, stride, kernel), np.float32)
    for (r, t), d in deltas.items():
        sel[d - lo, r, t] = 1.0
    return sel, -lo, hi


def _depth_to_space(y, n, spatial: Sequence[int], strides: Sequence[int], cout: int):
    """(n, d, h, w, sd*sh*sw*cout) -> (n, d*sd, h*sh, w*sw, cout), the phases in row-major order."""
    import tensorflow as tf

    (d, h, wd), (sd, sh, sw) = spatial, strides
    # one 6-D transpose (TFLite's TRANSPOSE takes at most 6 dimensions):
    # (n*d, h, w, sd, sh, sw*c) -> (n*d, sd, h, sh, w, sw*c) is (n, d*sd, h*sh, w*sw, c) in memory
    y = tf.reshape(y, (n * d, h, wd, sd, sh, sw * cout))
    y = tf.transpose(y, (0, 3, 1, 4, 2, 5))
    return tf.reshape(y, (n, d * sd, h * sh, wd * sw, cout))


def _regrouped_conv3d_transpose(x, kernel, strides: Sequence[int]):
    """The phase decomposition with exactly the kernel's taps, for kernel sizes that are multiples
    of their strides: tap `s*u + r` of an axis feeds phase `r` from input offset `-u`, so one
    stride-1 Conv3D with `k/s` taps per axis of the input padded by `k/s - 1` on both sides,
    depth-to-space, and a crop of `(k - s) // 2` at the start of each axis."""
    import tensorflow as tf

    ks, cout, cin = tuple(kernel.shape[:3]), kernel.shape[3], kernel.shape[4]
    (md, mh, mw), (sd, sh, sw) = [k // s for k, s in zip(ks, strides)], strides
    w = tf.reshape(kernel, (md, sd, mh, sh, mw, sw, cout, cin))
    w = tf.transpose(w, (0, 2, 4, 7, 1, 3, 5, 6))                 # (md, mh, mw, cin, sd, sh, sw, cout)
    w = tf.reverse(tf.reshape(w, (md, mh, mw, cin, sd * sh * sw * cout)), [0, 1, 2])
    xp = tf.pad(x, [[0, 0], [md - 1, md - 1], [mh - 1, mh - 1], [mw - 1, mw - 1], [0, 0]])
    y = tf.nn.conv3d(xp, w, strides=[1, 1, 1, 1, 1], padding="VALID")
    d, h, wd = x.shape[1], x.shape[2], x.shape[3]
    y = _depth_to_space(y, tf.shape(x)[0], (d + md - 1, h + mh - 1, wd + mw - 1), strides, cout)
    pd, ph, pw = [(k - s) // 2 for k, s in zip(ks, strides)]
    return y[:, pd:pd + d * sd, ph:ph + h * sh, pw:pw + wd * sw, :]


def phase_conv3d_transpose(x, kernel, strides: Sequence[int]):
    """`conv3d_transpose(x, kernel, strides, padding="SAME")` as one Conv3D + depth-to-space.

    x: (N, D, H, W, Cin); kernel: the Keras Conv3DTranspose layout (kd, kh, kw, Cout, Cin).
    """
    import tensorflow as tf

    if all(k % s == 0 for k, s in zip(kernel.shape[:3], strides)):
        return _regrouped_conv3d_transpose(x, kernel, strides)
    sels = [_phase_selection(k, s) for k, s in zip(kernel.shape[:3], strides)]
    (sel_d, bd, ad), (sel_h, bh, ah), (sel_w, bw, aw) = sels
    w = tf.einsum("apd,bqe,crf,defoi->abcipqro", sel_d, sel_h, sel_w, kernel)
    ka, kb, kc, cin, sd, sh, sw, cout = w.shape
    w = tf.reshape(w, (ka, kb, kc, cin, sd * sh * sw * cout))
    xp = tf.pad(x, [[0, 0], [bd, ad], [bh, ah], [bw, aw], [0, 0]])
    y = tf.nn.conv3d(xp, w, strides=[1, 1, 1, 1, 1], padding="VALID")
    return _depth_to_space(y, tf.shape(x)[0], tuple(x.shape[1:4]), (sd, sh, sw), cout)


def tap_matrix(spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int]) -> np.ndarray:
    """S[j, i*T + t] = 1 when kernel tap t carries input position i to output position j of a
    'same' transposed convolution (T taps; positions and taps in row-major order)."""
    per_axis = []
    for n, k, s in zip(spatial, kernel, strides):
        pad = max(k - s, 0) // 2
        a = np.zeros((n * s, n, k), np.float32)
        for i in range(n):
            for t in range(k):
                if 0 <= i * s + t - pad < n * s:
                    a[i * s + t - pad, i, t] = 1.0
        per_axis.append(a)
    dims = len(per_axis)
    letters = "abcdefghi"
    j, i, t = letters[:dims], letters[3:3 + dims], letters[6:6 + dims]
    spec = ",".join(j[d] + i[d] + t[d] for d in range(dims)) + "->" + j + i + t
    sel = np.einsum(spec, *per_axis)
    out_positions = int(np.prod([n * s for n, s in zip(spatial, strides)]))
    return sel.reshape(out_positions, -1)


def matmul_conv_transpose(x, kernel, strides: Sequence[int]):
    """A 'same' transposed convolution (2-D or 3-D, no bias) as two matrix products.

    x: (N, *spatial, Cin) with known spatial size; kernel: Keras' layout (*taps, Cout, Cin).
    """
    import tensorflow as tf

    spatial, cin = tuple(x.shape[1:-1]), x.shape[-1]
    taps, cout = tuple(kernel.shape[:-2]), kernel.shape[-2]
    sel = tap_matrix(spatial, taps, strides)
    n = tf.shape(x)[0]
    # every input position times every tap: (N*P_in, Cin) x (T*Cout, Cin)^T
    z = tf.matmul(tf.reshape(x, (-1, cin)), tf.reshape(kernel, (-1, cin)), transpose_b=True)
    z = tf.reshape(z, (n, sel.shape[1], cout))
    y = tf.matmul(tf.constant(sel, dtype=x.dtype), z)
    return tf.reshape(y, (n, *[p * s for p, s in zip(spatial, strides)], cout))


def conv3d_transpose_same(x, kernel, strides: Sequence[int]):
    """'same' transposed 3-D convolution without bias: phase-decomposed forward, TF's gradients."""
    import tensorflow as tf

    s = [1, *strides, 1]

    @tf.custom_gradient
    def op(x, kernel):
        y = phase_conv3d_transpose(x, kernel, strides)

        def grad(dy):
            dx = tf.nn.conv3d(dy, kernel, strides=s, padding="SAME")
            dk = tf.raw_ops.Conv3DBackpropFilterV2(input=dy, filter_sizes=tf.shape(kernel), out_backprop=x,
                                                   strides=s, padding="SAME")
            return dx, dk

        return y, grad

    return op(x, kernel)


def _plain_same(layer) -> bool:
    """'same' padding, no output padding, channels-last, no dilation, TensorFlow backend: the layers
    both fast paths can take (each adds its own bound)."""
    return (layer.padding == "same" and layer.output_padding is None and layer.data_format == "channels_last"
            and all(d == 1 for d in layer.dilation_rate) and keras.backend.backend() == "tensorflow")


def _uses_matmul(layer, input_shape) -> bool:
    spatial = tuple(input_shape[1:-1])
    return (_plain_same(layer) and all(p is not None for p in spatial)
            and int(np.prod(spatial)) <= MAX_MATMUL_POSITIONS)


def _finish(layer, x):
    """The layer's bias and activation on the output `x` of its transposed convolution."""
    import tensorflow as tf

    if layer.use_bias:
        x = x + tf.cast(layer.bias, x.dtype)
    if layer.activation is not None:
        x = layer.activation(x)
    return x


def _matmul_call(layer, inputs):
    import tensorflow as tf

    return _finish(layer, matmul_conv_transpose(inputs, tf.cast(layer.kernel, inputs.dtype), tuple(layer.strides)))


@keras.saving.register_keras_serializable(package="kneetf")
class Conv2DTranspose(keras.layers.Conv2DTranspose):
    """`keras.layers.Conv2DTranspose` as two matrix products on a tiny input (at most
    `MAX_MATMUL_POSITIONS` positions, 'same' padding, channels-last, no dilation); otherwise
    exactly the parent layer. Same weights and config, so the two are interchangeable."""

    def uses_matmul(self, input_shape) -> bool:
        return _uses_matmul(self, input_shape)

    def call(self, inputs):
        if not self.uses_matmul(inputs.shape):
            return super().call(inputs)
        return _matmul_call(self, inputs)


@keras.saving.register_keras_serializable(package="kneetf")
class Conv3DTranspose(keras.layers.Conv3DTranspose):
    """`keras.layers.Conv3DTranspose` with the phase-decomposed forward pass when it is faster
    (at most `MAX_PHASE_FILTERS` filters, 'same' padding, channels-last, no dilation), as two
    matrix products on a tiny input (like `Conv2DTranspose`); otherwise exactly the parent
    layer. Same weights and config, so the two are interchangeable."""

    def uses_matmul(self, input_shape) -> bool:
        return _uses_matmul(self, input_shape)

    def uses_phase(self) -> bool:
        return _plain_same(self) and self.filters <= MAX_PHASE_FILTERS

    def call(self, inputs):
        if self.uses_matmul(inputs.shape):
            return _matmul_call(self, inputs)
        if not self.uses_phase():
            return super().call(inputs)
        import tensorflow as tf

        return _finish(self, conv3d_transpose_same(inputs, tf.cast(self.kernel, inputs.dtype), tuple(self.strides)))


__all__ = ["MAX_MATMUL_POSITIONS", "MAX_PHASE_FILTERS", "Conv2DTranspose", "Conv3DTranspose", "matmul_conv_transpose",
           "phase_conv3d_transpose", "conv3d_transpose_same", "tap_matrix"]
