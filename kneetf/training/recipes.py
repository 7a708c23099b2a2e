"""Training recipes: named sets of model and training overrides on top of a preset.

`paper` is the paper's recipe as written (linear / BN+activation outputs, MSE, Adam 1e-3 for
encoder+decoder and 1e-4 for the generator, batch 32). `default` is what `kneetf-train` does
with no options; each of its departures from `paper` is a named option whose effect was
measured with `kneetf evaluate` (README, "Making the X-ray count").
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


RECIPES: dict[str, Recipe] = {
    "paper": Recipe(
        "paper", "the paper's recipe: MSE, Adam 1e-3 / 1e-4, outputs as in the text",
        model={"xray_output": "paper", "mri_output": "paper", "residual_template": False, "bn_momentum": 0.99},
        train={"lr_encdec": 1e-3, "lr_generator": 1e-4, "batch_size": 32, "augment": 0.0,
               "lr_schedule": "constant", "ssim_weight": 0.0, "gradient_weight": 0.0, "shift_augment": 0},
    ),
    "default": Recipe(
        "default", "residual to the mean training volume (zero-initialised head), BN momentum 0.9, "
                   "generator at 1e-3, batch 16, X-ray intensity augmentation, cosine decay, "
                   "MSE + 0.05 (1 - SSIM) MRI loss",
        model={"residual_template": True, "mri_output": "sigmoid", "xray_output": "sigmoid", "bn_momentum": 0.9},
        train={"lr_encdec": 1e-3, "lr_generator": 1e-3, "batch_size": 16, "augment": 1.0,
               "lr_schedule": "cosine", "epochs": 40, "demo_time_budget_s": 500.0, "ssim_weight": 0.05},
    ),
    "prior": Recipe(
        "prior", "the default recipe with the kernel ridge prediction from the X-ray as the residual template "
                 "(the untrained network is kernel ridge regression; it learns what that misses) and the kept "
                 "epoch chosen on the validation MRI MSE (kept untrained unless an epoch beats it)",
        model={"residual_template": True, "mri_output": "sigmoid", "xray_output": "sigmoid", "bn_momentum": 0.9,
               "residual_prior": "kernel_ridge"},
        train={"lr_encdec": 1e-3, "lr_generator": 1e-3, "batch_size": 16, "augment": 1.0,
               "lr_schedule": "cosine", "epochs": 40, "demo_time_budget_s": 500.0, "ssim_weight": 0.05,
               "monitor": "val_mri_mse"},
    ),
}


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`, with a did-you-mean error for unknown names."""
    return lookup(RECIPES, name, "recipe")
