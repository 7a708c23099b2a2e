"""A per-subject MRI prior computed inside the model: kernel ridge regression on the X-ray.

`KernelRidgePrior` maps the normalised X-ray (batch, H, W, 1) to a volume (batch, H, W, slices):

1. area-downsample the X-ray by `downsample` (average pooling) and flatten it; with
   `features="pixels+gradient"`, follow it by the area-downsampled gradient magnitude
   |dx| + |dy| of the full-resolution X-ray (forward differences, as
   `kneetf.baselines.gradient_magnitude`);
2. standardise the features with the stored per-feature mean and scale of the training
   X-rays (a scale can also weight a feature group: `kneetf.training.prior.fit_prior`);
3. take the kernel (RBF exp(-gamma |f - l|^2), or linear f.l / D) against `landmarks` stored
   landmark X-rays (all training X-rays, or Nystrom landmarks beyond a limit);
4. multiply by stored coefficients (landmarks, rank): the kernel ridge prediction of the
   volume's coordinates in a low-rank basis (PCA of the training MRIs at `basis_size` x
   `basis_size` in-plane);
5. expand the coordinates with the basis, upsample bilinearly to H x W, and add the
   full-resolution mean training volume.

Every weight is non-trainable and set from data (`kneetf.training.prior.fit_prior`); all ops
are plain (pooling, matmul, exp, resize), so the layer saves in `.keras` and exports to
SavedModel and TFLite like the rest of the model. Untrained, a residual head on top of it
predicts the kernel ridge regression baseline.
"""
from __future__ import annotations

from typing import Any, Mapping

import keras
import numpy as np
from keras import layers, ops

from kneetf.config import PRIOR_FEATURES, PRIOR_KERNELS
#: weight name -> shape, given the layer's sizes (see `KernelRidgePrior.weight_shapes`)
WEIGHT_NAMES = ("feature_mean", "feature_scale", "landmarks", "gamma", "coefficients", "basis", "mean")


def expand_basis(coefficients: Any, basis: Any, image_size: int) -> Any:
    """Volumes (batch, image_size, image_size, slices) from basis coordinates (batch, rank)
    and a basis (rank, b, b, slices): the low-resolution combination, upsampled bilinearly.

    The one implementation used by the layer and by the training-target offsets."""
    basis = ops.convert_to_tensor(basis, dtype="float32")
    rank, b, _, slices = basis.shape
    low = ops.matmul(ops.cast(coefficients, "float32"), ops.reshape(basis, (rank, b * b * slices)))
    low = ops.reshape(low, (-1, b, b, slices))
    if b == image_size:
        return low
    return ops.image.resize(low, (image_size, image_size), interpolation="bilinear")


@keras.saving.register_keras_serializable(package="kneetf")
class KernelRidgePrior(layers.Layer):
    """Kernel ridge prediction of the MRI volume from the X-ray, as a Keras layer.

    Args:
        image_size: side of the input X-ray and of the output volume.
        num_slices: slices of the output volume.
        downsample: area-downsampling factor of the X-ray features (4: 128 -> 32x32).
        num_landmarks: stored landmark X-rays.
        rank: size of the MRI basis.
        basis_size: in-plane side of the stored basis (upsampled to `image_size`).
        kernel: "rbf" or "linear".
        features: "pixels" (the downsampled X-ray) or "pixels+gradient" (followed by its
            downsampled gradient magnitude).
    """

    def __init__(self, image_size: int = 128, num_slices: int = 20, downsample: int = 4, num_landmarks: int = 1,
                 rank: int = 1, basis_size: int = 32, kernel: str = "rbf", features: str = "pixels",
                 **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if kernel not in PRIOR_KERNELS:
            raise ValueError(f"kernel must be one of {PRIOR_KERNELS}. Received: kernel={kernel!r}")
        if features not in PRIOR_FEATURES:
            raise ValueError(f"features must be one of {PRIOR_FEATURES}. Received: features={features!r}")
        if downsample < 1 or image_size % downsample:
            raise ValueError(f"downsample must divide image_size={image_size}. Received: downsample={downsample}")
        if basis_size < 1 or image_size % basis_size:
            raise ValueError(f"basis_size must divide image_size={image_size}. Received: basis_size={basis_size}")
        if num_landmarks < 1 or rank < 1:
            raise ValueError(f"num_landmarks and rank must be >= 1. Received: {num_landmarks}, {rank}")
        self.image_size = int(image_size)
        self.num_slices = int(num_slices)
        self.downsample = int(downsample)
        self.num_landmarks = int(num_landmarks)
        self.rank = int(rank)
        self.basis_size = int(basis_size)
        self.kernel = kernel
        self.features = features

    @property
    def num_features(self) -> int:
        per_map = (self.image_size // self.downsample) ** 2
        return per_map * (2 if self.features == "pixels+gradient" else 1)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        d, m, r, b = self.num_features, self.num_landmarks, self.rank, self.basis_size
        return {"feature_mean": (d,), "feature_scale": (d,), "landmarks": (m, d), "gamma": (),
                "coefficients": (m, r), "basis": (r, b, b, self.num_slices),
                "mean": (self.image_size, self.image_size, self.num_slices)}

    def build(self, input_shape: tuple) -> None:
        for name, shape in self.weight_shapes().items():
            init = "ones" if name == "feature_scale" else "zeros"
            setattr(self, name, self.add_weight(name=name, shape=shape, initializer=init, trainable=False,
                                                dtype="float32"))

    def set_prior(self, values: Mapping[str, np.ndarray | float]) -> None:
        """Assign every weight (`WEIGHT_NAMES`) from numpy values of the right shapes."""
        shapes = self.weight_shapes()
        missing = sorted(set(shapes) - set(values))
        if missing:
            raise ValueError(f"prior values missing: {', '.join(missing)}")
        for name, shape in shapes.items():
            v = np.asarray(values[name], dtype="float32")
            if v.shape != shape:
                raise ValueError(f"prior weight {name!r} has shape {v.shape}, the layer expects {shape}")
            getattr(self, name).assign(v)

    def coordinates(self, xray: Any) -> Any:
        """The kernel ridge prediction of the basis coordinates, (batch, rank)."""
        x = ops.cast(xray, "float32")
        maps = [x]
        if self.features == "pixels+gradient":
            gy = ops.pad(ops.abs(x[:, 1:] - x[:, :-1]), [[0, 0], [0, 1], [0, 0], [0, 0]])
            gx = ops.pad(ops.abs(x[:, :, 1:] - x[:, :, :-1]), [[0, 0], [0, 0], [0, 1], [0, 0]])
            maps.append(gx + gy)
        if self.downsample > 1:
            maps = [ops.average_pool(m, self.downsample, strides=self.downsample, padding="valid") for m in maps]
        per_map = (self.image_size // self.downsample) ** 2
        f = ops.concatenate([ops.reshape(m, (-1, per_map)) for m in maps], axis=1)
        f = (f - self.feature_mean) / self.feature_scale
        cross = ops.matmul(f, ops.transpose(self.landmarks))
        if self.kernel == "linear":
            k = cross / float(self.num_features)
        else:
            d2 = (ops.sum(f * f, axis=1, keepdims=True) - 2.0 * cross
                  + ops.sum(self.landmarks * self.landmarks, axis=1)[None, :])
            k = ops.exp(-self.gamma * ops.maximum(d2, 0.0))
        return ops.matmul(k, self.coefficients)

    def call(self, xray: Any) -> Any:
        return self.mean + expand_basis(self.coordinates(xray), self.basis, self.image_size)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[0], self.image_size, self.image_size, self.num_slices)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "image_size": self.image_size, "num_slices": self.num_slices,
                "downsample": self.downsample, "num_landmarks": self.num_landmarks, "rank": self.rank,
                "basis_size": self.basis_size, "kernel": self.kernel, "features": self.features}


__all__ = ["KernelRidgePrior", "expand_basis", "PRIOR_KERNELS", "PRIOR_FEATURES", "WEIGHT_NAMES"]
