"""Scratch: Conv3DTranspose ('same') as ONE stride-1 Conv3D + depth-to-space (phase / sub-pixel
decomposition). Same products and sums as the transposed convolution, in another order."""
import numpy as np
import tensorflow as tf


def _selection(k, s):
    """S[j, r, t] = 1 when kernel tap t feeds output phase r from input offset dmin + j (TF 'SAME')."""
    pb = max(k - s, 0) // 2
    deltas = {(r, t): (r + pb - t) // s for r in range(s) for t in range(k) if (r + pb - t) % s == 0}
    dmin, dmax = min(deltas.values()), max(deltas.values())
    S = np.zeros((dmax - dmin + 1, s, k), np.float32)
    for (r, t), d in deltas.items():
        S[d - dmin, r, t] = 1.0
    return S, -dmin, dmax


def phase_conv3d_transpose(x, kernel, strides, kernel_size):
    """x: (N, D, H, W, Cin); kernel: Keras Conv3DTranspose layout (kd, kh, kw, Cout, Cin)."""
    sels = [_selection(k, s) for k, s in zip(kernel_size, strides)]
    (Sd, bd, ad), (Sh, bh, ah), (Sw, bw, aw) = sels
    w = tf.einsum("apd,bqe,crf,defoi->abcipqro", Sd, Sh, Sw, kernel)
    A, B, C, cin, sd, sh, sw, cout = w.shape
    w = tf.reshape(w, (A, B, C, cin, sd * sh * sw * cout))
    xp = tf.pad(x, [[0, 0], [bd, ad], [bh, ah], [bw, aw], [0, 0]])
    y = tf.nn.conv3d(xp, w, strides=[1, 1, 1, 1, 1], padding="VALID")
    n, d, h, wd = tf.shape(x)[0], x.shape[1], x.shape[2], x.shape[3]
    y = tf.reshape(y, (n, d, h, wd, sd, sh, sw, cout))
    y = tf.transpose(y, (0, 1, 4, 2, 5, 3, 6, 7))
    return tf.reshape(y, (n, d * sd, h * sh, wd * sw, cout))


if __name__ == "__main__":
    import sys, time
    import keras
    rng = np.random.default_rng(0)
    cases = {"compact7": ((32, 64, 64, 16, 4), 1, (2, 2, 1)), "compact6": ((32, 32, 32, 16, 8), 4, (2, 2, 1)),
             "compact5": ((32, 16, 16, 8, 16), 8, (2, 2, 2)),
             "paper7": ((4, 64, 64, 64, 32), 1, (2, 2, 2)), "paper6": ((4, 32, 32, 32, 64), 32, (2, 2, 2)),
             "paper5": ((4, 16, 16, 16, 128), 64, (2, 2, 2)), "paper1": ((4, 2, 2, 2, 512), 1024, (1, 1, 1))}
    for name in sys.argv[1:]:
        shape, cout, strides = cases[name]
        x = tf.constant(rng.standard_normal(shape).astype("float32"))
        layer = keras.layers.Conv3DTranspose(cout, 4, strides=strides, padding="same", use_bias=False)
        layer.build(shape)
        kern = layer.kernel
        def ref(x):
            return layer(x)
        def new(x):
            return phase_conv3d_transpose(x, kern, strides, (4, 4, 4))
        y0, y1 = ref(x), new(x)
        err = float(tf.reduce_max(tf.abs(y0 - y1))) / float(tf.reduce_max(tf.abs(y0)))
        def timed(fn):
            @tf.function
            def step():
                with tf.GradientTape() as t:
                    t.watch(x)
                    y = fn(x)
                    loss = tf.reduce_sum(y * y)
                g = t.gradient(loss, [x, kern])
                return tf.reduce_sum(g[0]) + tf.reduce_sum(g[1])
            @tf.function
            def fwd():
                return tf.reduce_sum(fn(x))
            out = []
            for f in (fwd, step):
                f(); f()
                ts = []
                for _ in range(4):
                    t0 = time.perf_counter(); float(f()); ts.append(time.perf_counter() - t0)
                out.append(min(ts))
            return out
        # gradients equal too
        with tf.GradientTape(persistent=True) as t:
            t.watch(x)
            l0 = tf.reduce_sum(tf.sin(ref(x))); l1 = tf.reduce_sum(tf.sin(new(x)))
        g0, g1 = t.gradient(l0, [x, kern]), t.gradient(l1, [x, kern])
        gerr = max(float(tf.reduce_max(tf.abs(a - b))) / float(tf.reduce_max(tf.abs(a))) for a, b in zip(g0, g1))
        r, n = timed(ref), timed(new)
        print(f"{name}: rel err fwd {err:.1e} grads {gerr:.1e}; keras fwd {r[0]:.4f} fwd+bwd {r[1]:.4f} | phase fwd {n[0]:.4f} fwd+bwd {n[1]:.4f}", flush=True)
