"""Scratch: a Conv3DTranspose whose forward pass is the phase decomposition (one stride-1 Conv3D +
depth-to-space) and whose gradients are TF's own for the transposed convolution, used for layers
with few output channels (where TF's Conv3DBackpropInputV2 forward is slow on CPU)."""
import sys
import keras
import tensorflow as tf
sys.path.insert(0, "/tmp/kb/perf")
from phase import phase_conv3d_transpose

MAX_FILTERS = 4


def conv3d_transpose_same(x, kernel, strides):
    """Keras' Conv3DTranspose(padding='same') without bias: phase forward, native gradients."""
    s = [1, *strides, 1]

    @tf.custom_gradient
    def op(x, kernel):
        y = phase_conv3d_transpose(x, kernel, strides, kernel.shape[:3])

        def grad(dy):
            dx = tf.nn.conv3d(dy, kernel, strides=s, padding="SAME")
            dk = tf.raw_ops.Conv3DBackpropFilterV2(input=dy, filter_sizes=tf.shape(kernel), out_backprop=x,
                                                   strides=s, padding="SAME")
            return dx, dk
        return y, grad
    return op(x, kernel)


@keras.saving.register_keras_serializable(package="kneetf_scratch")
class FastConv3DTranspose(keras.layers.Conv3DTranspose):
    def call(self, inputs):
        if (self.filters > MAX_FILTERS or self.padding != "same" or self.data_format != "channels_last"
                or any(d != 1 for d in self.dilation_rate)):
            return super().call(inputs)
        x = phase_or_native = conv3d_transpose_same(inputs, tf.cast(self.kernel, inputs.dtype), tuple(self.strides))
        if self.use_bias:
            x = x + tf.cast(self.bias, x.dtype)
        if self.activation is not None:
            x = self.activation(x)
        return x


def apply():
    from kneetf.models import blocks
    blocks._CONV[(3, True)] = FastConv3DTranspose


if __name__ == "__main__":
    import numpy as np, time
    rng = np.random.default_rng(0)
    for shape, cout, strides in [((32, 64, 64, 16, 4), 1, (2, 2, 1)), ((4, 64, 64, 64, 32), 1, (2, 2, 2)),
                                 ((32, 32, 32, 16, 8), 4, (2, 2, 1))]:
        x = tf.constant(rng.standard_normal(shape).astype("float32"))
        a = keras.layers.Conv3DTranspose(cout, 4, strides=strides, padding="same"); a.build(shape)
        b = FastConv3DTranspose(cout, 4, strides=strides, padding="same"); b.build(shape)
        b.set_weights(a.get_weights())
        res = []
        for layer in (a, b):
            @tf.function
            def step():
                with tf.GradientTape() as t:
                    t.watch(x)
                    y = layer(x)
                    loss = tf.reduce_sum(tf.sin(y))
                return [y] + t.gradient(loss, [x] + layer.trainable_weights)
            step(); step()
            ts = []
            for _ in range(4):
                t0 = time.perf_counter(); out = step(); float(tf.reduce_sum(out[0])); ts.append(time.perf_counter() - t0)
            res.append((min(ts), [o.numpy() for o in out]))
        errs = [float(np.max(np.abs(p - q)) / np.max(np.abs(p))) for p, q in zip(res[0][1], res[1][1])]
        print(shape, cout, strides, "keras fwd+bwd %.4f fast %.4f" % (res[0][0], res[1][0]), "rel errs y,dx,dk,db", ["%.1e" % e for e in errs], flush=True)
