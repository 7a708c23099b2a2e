"""Training recipes: named sets of model and training overrides on top of a preset.

`paper` is the paper's recipe as written (linear / BN+activation outputs, MSE, Adam 1e-3 for
encoder+decoder and 1e-4 for the generator, batch 32). `mean` learns the residual to the mean
training volume; each of its departures from `paper` is a named option whose effect was
measured with `kneetf evaluate` (README, "Making the X-ray count"). `default`, what
`kneetf-train` does with no options, is `mean` with a kernel ridge prediction from the X-ray
as the residual template and the kept epoch chosen on the validation MRI MSE, so that the
network starts at, and is kept no worse on validation than, the strongest classical predictor
(docs/quality.md). `prior` is another name of `default`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kneetf.config import ModelConfig, TrainConfig, replace
from kneetf.errors import lookup


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    def apply(self, model_config: ModelConfig, train_config: TrainConfig) -> tuple[ModelConfig, TrainConfig]:
        return replace(model_config, **self.model), replace(train_config, **self.train)


#: the network and training every recipe but `paper` shares
_NETWORK = {"residual_template": True, "mri_output": "sigmoid", "xray_output": "sigmoid", "bn_momentum": 0.9}
_TRAINING = {"lr_encdec": 1e-3, "lr_generator": 1e-3, "batch_size": 16, "augment": 1.0, "lr_schedule": "cosine",
             "epochs": 40, "demo_time_budget_s": 500.0, "ssim_weight": 0.05}
#: the kernel ridge prior of the default recipe (docs/quality.md measures each choice)
_PRIOR_MODEL = {**_NETWORK, "residual_prior": "kernel_ridge", "prior_features": "pixels+gradient",
                "prior_downsample": 8, "prior_rank": 128, "prior_basis_size": 64}
#: no X-ray augmentation: the prior is computed from the augmented X-ray, and augmentation
#: costs it 3.7 dB on tuneA (1.5 dB for the 32x32-pixel prior): the residual would be
#: trained against a prior that new, unaugmented X-rays never produce
_PRIOR_TRAINING = {**_TRAINING, "augment": 0.0, "monitor": "val_mri_mse"}

RECIPES: dict[str, Recipe] = {
    "paper": Recipe(
        "paper", "the paper's recipe: MSE, Adam 1e-3 / 1e-4, outputs as in the text",
        model={"xray_output": "paper", "mri_output": "paper", "residual_template": False, "bn_momentum": 0.99},
        train={"lr_encdec": 1e-3, "lr_generator": 1e-4, "batch_size": 32, "augment": 0.0,
               "lr_schedule": "constant", "ssim_weight": 0.0, "gradient_weight": 0.0, "shift_augment": 0},
    ),
    "mean": Recipe(
        "mean", "residual to the mean training volume (zero-initialised head), BN momentum 0.9, "
                "generator at 1e-3, batch 16, X-ray intensity augmentation, cosine decay, "
                "MSE + 0.05 (1 - SSIM) MRI loss (the default recipe up to version 0.x)",
        model=_NETWORK,
        train={**_TRAINING, "monitor": "val_loss"},
    ),
    "default": Recipe(
        "default", "the mean recipe with a kernel ridge prediction from the X-ray as the residual template "
                   "(downsampled pixels and gradient magnitude, 16x16, RBF kernel, rank-128 MRI basis at 64x64; "
                   "the untrained network is that kernel ridge regression and learns what it misses) and the "
                   "kept epoch chosen on the validation MRI MSE (kept untrained unless an epoch beats it); no X-ray "
                   "intensity augmentation, which the prior, computed from the X-ray, would see",
        model=_PRIOR_MODEL,
        train=_PRIOR_TRAINING,
    ),
    "prior": Recipe(
        "prior", "the default recipe (this name is kept for runs that ask for it)",
        model=_PRIOR_MODEL,
        train=_PRIOR_TRAINING,
    ),
}


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`, with a did-you-mean error for unknown names."""
    return lookup(RECIPES, name, "recipe")
