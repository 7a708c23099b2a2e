"""KneeNet: shared 2-D encoder, X-ray decoder head and 3-D generator head (the paper's Fig. 1)."""
from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import layers

from kneetf.config import ModelConfig, TrainConfig, from_dict, to_dict
from kneetf.models.blocks import conv_block, weights_to_be_loaded
from kneetf.models.losses import mri_loss
from kneetf.models.optimizers import TwoRateAdam
from kneetf.models.prior import KernelRidgePrior
from kneetf.models.training_state import build_training_state
from kneetf.presets import get_preset


@keras.saving.register_keras_serializable(package="kneetf")
class TemplateResidual(layers.Layer):
    """Adds the network's output to a template volume: a fixed one (the mean training MRI,
    called on `delta` alone), or a per-subject prior given as a second input (called on
    `[delta, prior]`).

    With `space="logit"` the sum is taken before a sigmoid, so the output stays in (0, 1).
    A fixed template is a non-trainable weight: it is saved with the model.
    """

    def __init__(self, space: str = "logit", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.space = space

    def build(self, input_shape: Any) -> None:
        if isinstance(input_shape, (list, tuple)) and input_shape and isinstance(input_shape[0], (list, tuple)):
            self.template = None  # the template comes in as the second input
            return
        self.template = self.add_weight(name="template", shape=tuple(input_shape[1:]), initializer="zeros",
                                        trainable=False, dtype="float32")

    def call(self, inputs: Any) -> Any:
        if isinstance(inputs, (list, tuple)):
            delta, template = keras.ops.cast(inputs[0], "float32"), keras.ops.cast(inputs[1], "float32")
        else:
            delta, template = keras.ops.cast(inputs, "float32"), self.template
        if self.space == "logit":
            t = keras.ops.clip(template, 1e-3, 1 - 1e-3)
            return keras.ops.sigmoid(keras.ops.log(t / (1 - t)) + delta)
        return template + delta

    def compute_output_shape(self, input_shape: Any) -> Any:
        if isinstance(input_shape, (list, tuple)) and input_shape and isinstance(input_shape[0], (list, tuple)):
            return tuple(input_shape[0])
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "space": self.space}


def build_encoder(cfg: ModelConfig) -> keras.Model:
    """6 blocks Conv2D 3x3 stride 2 -> BN -> LeakyReLU(0.2): 128x128x1 -> latent."""
    xray = keras.Input((cfg.image_size, cfg.image_size, 1), name="xray")
    x = xray
    for i, f in enumerate(cfg.encoder_filters, 1):
        x = conv_block(x, f, cfg.encoder_kernel, cfg.encoder_stride, name=f"encoder_block{i}",
                       leaky_slope=cfg.leaky_slope, bn_momentum=cfg.bn_momentum)
    return keras.Model(xray, x, name="encoder")


def build_decoder(cfg: ModelConfig) -> keras.Model:
    """7 blocks Conv2DTranspose 4x4 -> BN -> LeakyReLU(0.2): latent -> 128x128x1."""
    latent = keras.Input(cfg.latent_shape, name="latent")
    x = latent
    n = len(cfg.decoder_filters)
    for i, (f, s) in enumerate(zip(cfg.decoder_filters, cfg.decoder_strides), 1):
        last = i == n and cfg.xray_output != "paper"
        x = conv_block(x, f, cfg.decoder_kernel, s, name=f"decoder_block{i}", transpose=True,
                       activation=cfg.xray_output if last else "leaky_relu", batch_norm=not last,
                       leaky_slope=cfg.leaky_slope, bn_momentum=cfg.bn_momentum)
    if cfg.xray_output == "paper":
        x = layers.Activation("linear", dtype="float32", name="decoder_output")(x)
    return keras.Model(latent, x, name="decoder")


def build_prior(cfg: ModelConfig) -> KernelRidgePrior:
    """The kernel ridge prior layer of a `residual_prior="kernel_ridge"` config."""
    return KernelRidgePrior(image_size=cfg.image_size, num_slices=cfg.num_slices, downsample=cfg.prior_downsample,
                            num_landmarks=cfg.prior_landmarks, rank=cfg.prior_rank,
                            basis_size=cfg.prior_basis_size, kernel=cfg.prior_kernel, features=cfg.prior_features,
                            name="mri_prior")


def build_generator(cfg: ModelConfig) -> keras.Model:
    """Latent -> (H, W, D, C) volume -> 7 Conv3DTranspose 4x4x4 -> BN -> ReLU -> depth as
    channels -> 1x1 conv (8) -> BN -> ReLU -> 1x1 conv -> `num_slices` slices.

    With a kernel ridge prior the generator takes `[latent, prior]` and adds its residual to
    the prior volume instead of the fixed mean template."""
    latent = keras.Input(cfg.latent_shape, name="latent")
    with_prior = cfg.residual_template and cfg.residual_prior == "kernel_ridge"
    prior = (keras.Input((cfg.image_size, cfg.image_size, cfg.num_slices), name="prior", dtype="float32")
             if with_prior else None)
    x = layers.Reshape(cfg.generator_reshape, name="generator_reshape")(latent)
    n = len(cfg.generator_filters)
    for i, (f, s) in enumerate(zip(cfg.generator_filters, cfg.generator_strides), 1):
        plain = i == n and not cfg.generator_last_bn_act
        x = conv_block(x, f, cfg.generator_kernel, s, name=f"generator_block{i}", dims=3, transpose=True,
                       activation="linear" if plain else "relu", batch_norm=not plain, bn_momentum=cfg.bn_momentum)
    h, w, d = cfg.generator_output_shape
    x = layers.Reshape((h, w, d * cfg.generator_filters[-1]), name="generator_depth_to_channels")(x)
    x = conv_block(x, cfg.head_filters, 1, 1, name="generator_head1", activation="relu",
                   bn_momentum=cfg.bn_momentum)
    if cfg.residual_template:
        # zero or small initialisation: the untrained model predicts the template (almost)
        # exactly, and learns only the departures from it that the X-ray explains
        init = (keras.initializers.RandomNormal(stddev=cfg.residual_init_std, seed=0) if cfg.residual_init_std
                else "zeros")
        x = conv_block(x, cfg.num_slices, 1, 1, name="generator_head2", activation="linear", batch_norm=False,
                       kernel_initializer=init)
        x = TemplateResidual(space="logit" if cfg.mri_output == "sigmoid" else "linear",
                             name="generator_template", dtype="float32")([x, prior] if with_prior else x)
    else:
        act = "linear" if cfg.mri_output == "paper" else cfg.mri_output
        x = conv_block(x, cfg.num_slices, 1, 1, name="generator_head2", activation=act, batch_norm=False)
    return keras.Model([latent, prior] if with_prior else latent, x, name="generator")


@keras.saving.register_keras_serializable(package="kneetf")
class KneeNet(keras.Model):
    """One X-ray (batch, 128, 128, 1) in; `{"xray_recon": (batch, 128, 128, 1),
    "mri": (batch, 128, 128, 20)}` out (MRI slices as channels).

    Args:
        config: a `ModelConfig`, its dict, or a preset name.

    Example:
        >>> model = KneeNet.from_preset("tiny")
        >>> out = model.predict(np.zeros((1, 128, 128, 1), "float32"), verbose=0)
        >>> out["mri"].shape
        (1, 128, 128, 20)
    """

    def __init__(self, config: ModelConfig | dict | str = "compact", **kwargs: Any) -> None:
        if isinstance(config, str):
            config = get_preset(config)
        cfg = from_dict(ModelConfig, config) if isinstance(config, dict) else config
        # === Layers ===
        encoder = build_encoder(cfg)
        decoder = build_decoder(cfg)
        generator = build_generator(cfg)
        prior = build_prior(cfg) if cfg.residual_template and cfg.residual_prior == "kernel_ridge" else None
        # === Functional graph ===
        xray = keras.Input((cfg.image_size, cfg.image_size, 1), name="xray")
        latent = encoder(xray)
        # dropout on the generator's view of the latent only (a regulariser for small datasets)
        gen_latent = (layers.Dropout(cfg.latent_dropout, name="latent_dropout")(latent) if cfg.latent_dropout
                      else latent)
        mri = generator([gen_latent, prior(xray)] if prior is not None else gen_latent)
        outputs = {"xray_recon": decoder(latent), "mri": mri}
        kwargs.setdefault("name", "kneenet")
        super().__init__(inputs=xray, outputs=outputs, **kwargs)
        self.model_config = cfg
        self.encoder = encoder
        self.decoder = decoder
        self.generator = generator
        self.prior = prior

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "KneeNet":
        """Build the registered preset `name`, optionally overriding config fields."""
        cfg = get_preset(name)
        if overrides:
            cfg = from_dict(ModelConfig, {**to_dict(cfg), **overrides})
        return cls(cfg)

    def get_config(self) -> dict[str, Any]:
        return {"config": to_dict(self.model_config), "name": self.name, "trainable": self.trainable}

    def fit(self, x: Any = None, y: Any = None, *args: Any, **kwargs: Any) -> Any:
        """`keras.Model.fit`, with the training state built before the step is traced
        (`kneetf.models.training_state`): the step is traced once, not twice."""
        build_training_state(self, x, y, kwargs.get("sample_weight"))
        return super().fit(x, y, *args, **kwargs)

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> "KneeNet":
        return cls(**config)

    def set_template(self, volume: np.ndarray) -> None:
        """Set the template of a `residual_template` model, shape (H, W, slices) in [0, 1]."""
        layer = self.generator.get_layer("generator_template")
        if layer.template is None:
            raise ValueError("this model's template is its kernel ridge prior: use set_prior")
        layer.template.assign(np.asarray(volume, "float32").reshape(layer.template.shape))

    def set_prior(self, values: dict[str, Any]) -> None:
        """Set the weights of the kernel ridge prior (`KernelRidgePrior.set_prior`)."""
        if self.prior is None:
            raise ValueError("this model has no kernel ridge prior (residual_prior='kernel_ridge')")
        self.prior.set_prior(values)

    def compile_for_training(self, train: TrainConfig | None = None, learning_rate: Any = None,
                             **kwargs: Any) -> None:
        """Compile with the hybrid loss (weighted MSE per output) and the two-rate Adam.

        `learning_rate` may be a schedule; by default `train.lr_encdec`.
        """
        train = train or TrainConfig()
        ema = {"use_ema": True, "ema_momentum": train.ema_momentum} if train.ema_momentum else {}
        optimizer = TwoRateAdam(learning_rate=train.lr_encdec if learning_rate is None else learning_rate,
                                generator_learning_rate=train.lr_generator, **ema)
        w_xray, w_mri = train.loss_weights
        self.compile(optimizer=optimizer,
                     loss={"xray_recon": "mean_squared_error",
                           "mri": mri_loss(train.ssim_weight, train.gradient_weight)},
                     loss_weights={"xray_recon": float(w_xray), "mri": float(w_mri)},
                     # the MRI's plain MSE as well (logged as mri_mse): the loss may hold other terms
                     metrics={"mri": [keras.metrics.MeanSquaredError(name="mse")]},
                     **kwargs)


def build_model(config: ModelConfig | dict | str = "compact", train: TrainConfig | None = None,
                compile: bool = True) -> KneeNet:
    """Build KneeNet from a preset name or a config, compiled for training by default."""
    model = KneeNet(config)
    if compile:
        model.compile_for_training(train)
    return model


def load_saved_model(path: Any, *, compile: bool = True) -> Any:
    """`keras.saving.load_model(path, safe_mode=True)` with kneetf's layers built with zero
    initial weights (`weights_to_be_loaded`), which the file's replace."""
    with weights_to_be_loaded():
        return keras.saving.load_model(path, compile=compile, safe_mode=True)
