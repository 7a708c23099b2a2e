"""Configuration as frozen dataclasses: model, preprocessing and training.

Each config converts to and from a plain dict (JSON-safe), and `config_hash` gives a
stable key for caches (a preprocessing change must never reuse an old cache). A field
with `metadata={"help": ...}` can become a command-line flag (`kneetf.cli.options`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kneetf.errors import ConfigError

T = TypeVar("T")

XRAY_OUTPUTS = ("paper", "sigmoid", "linear")
MRI_OUTPUTS = ("paper", "sigmoid", "linear")
LR_SCHEDULES = ("constant", "cosine")
RESIDUAL_PRIORS = ("mean", "kernel_ridge")
MONITORS = ("val_loss", "val_mri_loss", "val_mri_mse")
PRIOR_KERNELS = ("rbf", "linear")
PRIOR_FEATURES = ("pixels", "pixels+gradient")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of KneeNet. Spatial tuples of the 3-D generator are (H, W, D).

    The defaults are the paper's widths; presets override them.
    """

    image_size: int = 128
    num_slices: int = 20
    encoder_filters: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)
    encoder_kernel: int = 3
    encoder_stride: int = 2
    decoder_filters: tuple[int, ...] = (1024, 512, 256, 128, 64, 32, 1)
    decoder_kernel: int = 4
    decoder_strides: tuple[int, ...] = (1, 2, 2, 2, 2, 2, 2)
    generator_reshape: tuple[int, int, int, int] = (2, 2, 2, 512)
    generator_filters: tuple[int, ...] = (1024, 512, 256, 128, 64, 32, 1)
    generator_kernel: int = 4
    generator_strides: tuple[tuple[int, int, int], ...] = ((1, 1, 1),) + ((2, 2, 2),) * 6
    head_filters: int = 8
    leaky_slope: float = 0.2
    # Keras' default 0.99 needs thousands of steps before the moving statistics used at
    # inference match the batches; small datasets (a few hundred pairs) want ~0.9.
    bn_momentum: float = 0.99
    # "paper": the last 1-channel block keeps BN + activation as in the text;
    # "sigmoid"/"linear": a plain conv with that activation (no BN on the output).
    xray_output: str = "sigmoid"
    mri_output: str = "sigmoid"
    # The paper puts BN + ReLU after the 1-channel last Conv3DTranspose too; False makes that
    # layer a plain linear conv (BN + ReLU on one channel discard half the volume's signal).
    generator_last_bn_act: bool = True
    # Learn the residual to a template volume (the mean training MRI) instead of the
    # volume itself; the template is a non-trainable weight set from the data.
    residual_template: bool = False
    # standard deviation of the normal initialisation of the residual head (0 = zeros: the
    # untrained model predicts the template exactly, but only the head gets gradients at first)
    residual_init_std: float = 0.0
    latent_dropout: float = field(default=0.0, metadata={
        "help": "dropout rate on the latent the generator sees (0 = no dropout layer)", "metavar": "P"})
    residual_prior: str = field(default="mean", metadata={
        "help": "template of the residual: mean (the mean training volume) or kernel_ridge (a kernel ridge "
                "prediction from the X-ray, computed in the model)", "choices": RESIDUAL_PRIORS})
    prior_kernel: str = field(default="rbf", metadata={
        "help": "kernel of the kernel ridge prior", "choices": PRIOR_KERNELS})
    prior_landmarks: int = field(default=1024, metadata={
        "help": "training X-rays the kernel ridge prior stores at most (Nystrom landmarks beyond)", "metavar": "N"})
    prior_rank: int = field(default=64, metadata={
        "help": "size of the MRI basis of the kernel ridge prior", "metavar": "R"})
    prior_basis_size: int = field(default=32, metadata={
        "help": "in-plane side of the stored MRI basis of the kernel ridge prior (upsampled to the image size)",
        "metavar": "PIXELS"})
    prior_downsample: int = field(default=4, metadata={
        "help": "area-downsampling factor of the X-ray features of the kernel ridge prior", "metavar": "F"})
    prior_features: str = field(default="pixels", metadata={
        "help": "X-ray features of the kernel ridge prior: pixels (the downsampled X-ray) or pixels+gradient "
                "(followed by its downsampled gradient magnitude)", "choices": PRIOR_FEATURES})

    def __post_init__(self) -> None:
        if self.residual_prior not in RESIDUAL_PRIORS:
            raise ConfigError(f"residual_prior must be one of {RESIDUAL_PRIORS}. "
                              f"Received: residual_prior={self.residual_prior!r}")
        if self.prior_kernel not in PRIOR_KERNELS:
            raise ConfigError(f"prior_kernel must be one of {PRIOR_KERNELS}. Received: prior_kernel={self.prior_kernel!r}")
        if self.prior_features not in PRIOR_FEATURES:
            raise ConfigError(f"prior_features must be one of {PRIOR_FEATURES}. "
                              f"Received: prior_features={self.prior_features!r}")
        for name in ("prior_landmarks", "prior_rank", "prior_basis_size", "prior_downsample"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1. Received: {name}={getattr(self, name)}")
        for name in ("prior_basis_size", "prior_downsample"):
            if self.image_size % getattr(self, name):
                raise ConfigError(f"{name} must divide image_size={self.image_size}. "
                                  f"Received: {name}={getattr(self, name)}")
        if self.residual_init_std < 0:
            raise ConfigError(f"residual_init_std must be >= 0. Received: residual_init_std={self.residual_init_std}")
        if not 0.0 <= self.latent_dropout < 1.0:
            raise ConfigError(f"latent_dropout must lie in [0, 1). Received: latent_dropout={self.latent_dropout}")
        if self.xray_output not in XRAY_OUTPUTS:
            raise ConfigError(f"xray_output must be one of {XRAY_OUTPUTS}. Received: xray_output={self.xray_output!r}")
        if self.mri_output not in MRI_OUTPUTS:
            raise ConfigError(f"mri_output must be one of {MRI_OUTPUTS}. Received: mri_output={self.mri_output!r}")
        if len(self.decoder_filters) != len(self.decoder_strides):
            raise ConfigError("decoder_filters and decoder_strides must have the same length. "
                              f"Received: {self.decoder_filters} and {self.decoder_strides}")
        if len(self.generator_filters) != len(self.generator_strides):
            raise ConfigError("generator_filters and generator_strides must have the same length. "
                              f"Received: {self.generator_filters} and {self.generator_strides}")
        latent = self.latent_shape
        h, w, d, c = self.generator_reshape
        if h * w * d * c != latent[0] * latent[1] * latent[2]:
            raise ConfigError(f"generator_reshape {self.generator_reshape} must hold the latent {latent} "
                              f"({latent[0] * latent[1] * latent[2]} values)")
        out = self.generator_output_shape
        if out[:2] != (self.image_size, self.image_size):
            raise ConfigError(f"the generator ends at {out[:2]} in-plane, not the image size {self.image_size}; "
                              "check generator_reshape and generator_strides")
        size = latent[0]
        for s in self.decoder_strides:
            size *= s
        if size != self.image_size:
            raise ConfigError(f"the decoder ends at {size} px, not the image size {self.image_size}; "
                              "check decoder_strides")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.image_size
        for _ in self.encoder_filters:
            size = -(-size // self.encoder_stride)
        return (size, size, self.encoder_filters[-1])

    @property
    def generator_output_shape(self) -> tuple[int, int, int]:
        h, w, d, _ = self.generator_reshape
        for sh, sw, sd in self.generator_strides:
            h, w, d = h * sh, w * sw, d * sd
        return (h, w, d)


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw arrays become model inputs; stored with (and hashed into) every cache."""

    image_size: int = 128
    slice_start: int = field(default=20, metadata={"help": "first kept MRI slice, 0-based"})
    num_slices: int = field(default=20, metadata={"help": "number of kept MRI slices"})
    low_percentile: float = 0.5
    high_percentile: float = 99.5
    mirror_left: bool = field(default=False, metadata={
        "help": "mirror left knees to look like right ones (undone on output)"})

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, numbers.Integral) or self.image_size < 8:
            raise ConfigError(f"image_size must be an integer of at least 8. Received: image_size={self.image_size!r}")
        if not 0 <= self.low_percentile < self.high_percentile <= 100:
            raise ConfigError("need 0 <= low_percentile < high_percentile <= 100. Received: "
                              f"{self.low_percentile}, {self.high_percentile}")
        if self.slice_start < 0 or self.num_slices < 1:
            raise ConfigError(f"slice window [{self.slice_start}, {self.slice_start + self.num_slices}) is not valid")

    @property
    def slice_stop(self) -> int:
        return self.slice_start + self.num_slices


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one training run."""

    epochs: int = field(default=60, metadata={"help": "training epochs"})
    batch_size: int = field(default=32, metadata={"help": "batch size (global: across all devices)"})
    lr_encdec: float = field(default=1e-3, metadata={"help": "Adam rate of encoder+decoder"})
    lr_generator: float = field(default=1e-4, metadata={"help": "Adam rate of the generator"})
    loss_weights: tuple[float, float] = field(default=(1.0, 1.0), metadata={
        "help": "weights of the X-ray and MRI terms of the loss", "metavar": "XRAY,MRI"})
    seed: int = field(default=0, metadata={"help": "random seed (data order, init, synthetic set)"})
    augment: float = field(default=0.0, metadata={
        "help": "X-ray intensity augmentation strength (0 = off)", "metavar": "STRENGTH"})
    shift_augment: int = field(default=0, metadata={
        "help": "move each training X-ray by up to this many pixels, like an ROI-box error (0 = off)",
        "metavar": "PIXELS"})
    lr_schedule: str = field(default="constant", metadata={
        "help": "learning-rate schedule (cosine: decay both rates over the epochs)", "choices": LR_SCHEDULES})
    early_stopping_patience: int = field(default=0, metadata={
        "help": "stop when the monitored validation loss has not improved for this many epochs (0 = off)",
        "metavar": "EPOCHS"})
    monitor: str = field(default="val_loss", metadata={
        "help": "validation value that picks the kept epoch and drives early stopping: val_loss (X-ray + MRI "
                "terms), val_mri_loss (the MRI terms) or val_mri_mse (the MRI's MSE alone, i.e. PSNR)",
        "choices": MONITORS})
    # extra MRI loss terms next to the paper's MSE (kneetf.models.losses)
    ssim_weight: float = field(default=0.0, metadata={
        "help": "weight of a 1 - SSIM (2-D slices) term in the MRI loss", "metavar": "W"})
    gradient_weight: float = field(default=0.0, metadata={
        "help": "weight of an image-gradient MSE term in the MRI loss", "metavar": "W"})
    time_budget_s: float = field(default=0.0, metadata={
        "help": "stop after the epoch that ends this long after the run started, data preparation included "
                "(0 = no limit; applies to every run, and replaces the default recipe's 500 s budget of runs on the "
                "built-in synthetic knees)", "metavar": "SECONDS"})
    ema_momentum: float = field(default=0.0, metadata={
        "help": "keep an exponential moving average of the weights with this momentum per step and validate, "
                "keep and export the averaged weights (0 = off)", "metavar": "M"})
    demo_time_budget_s: float = field(default=0.0, metadata={
        "help": "time budget of runs on the built-in synthetic knees only (0 = none)", "metavar": "SECONDS"})
    prior_loo_targets: bool = field(default=True, metadata={
        "help": "train the residual to a kernel ridge prior against the prior's leave-one-out prediction of each "
                "training pair (as on new data), not its in-sample fit"})
    prior_folds: int = field(default=5, metadata={
        "help": "cross-validation folds that choose the kernel ridge prior's ridge strength and width",
        "metavar": "K"})
    prior_cv_repeats: int = field(default=5, metadata={
        "help": "fold splits the kernel ridge prior's cross-validation error is averaged over (1 = one split)",
        "metavar": "R"})
    prior_gradient_weight: float = field(default=0.5, metadata={
        "help": "weight of the standardised gradient features against the pixel features of a kernel ridge prior "
                "with prior_features=pixels+gradient", "metavar": "W"})

    def __post_init__(self) -> None:
        # NaN passes every comparison below and inf every lower bound: a run of them trains on NaN
        for name in ("lr_encdec", "lr_generator", "ssim_weight", "gradient_weight", "augment", "shift_augment",
                     "prior_gradient_weight"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number. Received: {name}={getattr(self, name)}")
        for name in ("time_budget_s", "demo_time_budget_s"):  # inf is a budget never spent; NaN is no number
            if math.isnan(getattr(self, name)):
                raise ConfigError(f"{name} must be a number of seconds. Received: {name}={getattr(self, name)}")
        if not all(math.isfinite(w) for w in self.loss_weights):
            raise ConfigError(f"loss_weights must be finite numbers. Received: loss_weights={self.loss_weights}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must lie in [0, 2**32). Received: seed={self.seed}")
        if self.monitor not in MONITORS:
            raise ConfigError(f"monitor must be one of {MONITORS}. Received: monitor={self.monitor!r}")
        if self.prior_folds < 2:
            raise ConfigError(f"prior_folds must be >= 2. Received: prior_folds={self.prior_folds}")
        if self.prior_cv_repeats < 1:
            raise ConfigError(f"prior_cv_repeats must be >= 1. Received: prior_cv_repeats={self.prior_cv_repeats}")
        if self.prior_gradient_weight <= 0:
            raise ConfigError("prior_gradient_weight must be > 0. "
                              f"Received: prior_gradient_weight={self.prior_gradient_weight}")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ConfigError(f"ema_momentum must lie in [0, 1). Received: ema_momentum={self.ema_momentum}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1. Received: {name}={getattr(self, name)}")
        for name in ("lr_encdec", "lr_generator"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0. Received: {name}={getattr(self, name)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be 'constant' or 'cosine'. Received: {self.lr_schedule!r}")
        for name in ("ssim_weight", "gradient_weight", "augment", "shift_augment", "time_budget_s",
                     "demo_time_budget_s", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0. Received: {name}={getattr(self, name)}")
        if len(self.loss_weights) != 2 or min(self.loss_weights) < 0 or max(self.loss_weights) <= 0:
            raise ConfigError("loss_weights must be two non-negative numbers (xray_recon, mri), not both 0. "
                              f"Received: loss_weights={self.loss_weights}")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _coerce(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        return tuple(_coerce(a, v) for a, v in zip(args, value))
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build config `cls` from a dict, refusing unknown keys (with their names)."""
    if isinstance(data, cls):
        return data
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**{k: _coerce(hints[k], v) for k, v in data.items()})


def config_hash(config: Any) -> str:
    """A short stable hash of a config's values."""
    blob = json.dumps(to_dict(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def replace(config: T, **changes: Any) -> T:
    """`dataclasses.replace`, with unknown names reported as a ConfigError."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ConfigError(f"unknown {type(config).__name__} field(s): {', '.join(unknown)}")
    return dataclasses.replace(config, **changes)


__all__ = ["ModelConfig", "PreprocessConfig", "TrainConfig", "to_dict", "from_dict", "config_hash",
           "replace", "field"]
