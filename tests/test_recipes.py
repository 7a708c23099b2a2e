"""Training recipes: the paper's recipe is the paper's, and the CLI applies recipes."""
from __future__ import annotations

import pytest

from kneetf.config import TrainConfig
from kneetf.errors import ConfigError
from kneetf.presets import get_preset
from kneetf.training.recipes import RECIPES, get_recipe


def test_paper_recipe_is_the_papers_training() -> None:
    model, train = get_recipe("paper").apply(get_preset("compact"), TrainConfig())
    assert (train.lr_encdec, train.lr_generator, train.batch_size) == (1e-3, 1e-4, 32)
    assert train.loss_weights == (1.0, 1.0) and train.augment == 0.0 and train.lr_schedule == "constant"
    assert train.ssim_weight == 0.0 and train.gradient_weight == 0.0 and train.shift_augment == 0  # MSE only
    assert model.xray_output == "paper" and model.mri_output == "paper" and not model.residual_template
    # the paper preset under the paper recipe is the paper preset unchanged
    assert get_recipe("paper").apply(get_preset("paper"), TrainConfig())[0] == get_preset("paper")


def test_default_recipe_differs_from_paper_by_named_options_only() -> None:
    model, train = get_recipe("default").apply(get_preset("compact"), TrainConfig())
    base = get_preset("compact")
    changed = {k for k in RECIPES["default"].model if getattr(model, k) != getattr(base, k)}
    assert changed <= set(RECIPES["default"].model)
    assert model.residual_template and train.lr_schedule == "cosine" and train.ssim_weight > 0


def test_unknown_recipe_is_named() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'paper'"):
        get_recipe("papr")


def test_default_recipe_is_the_mean_recipe_with_the_kernel_ridge_template() -> None:
    mean_model, mean_train = get_recipe("mean").apply(get_preset("compact"), TrainConfig())
    model, train = get_recipe("default").apply(get_preset("compact"), TrainConfig())
    assert model.residual_prior == "kernel_ridge" and mean_model.residual_prior == "mean"
    assert model.prior_features == "pixels+gradient" and mean_model.prior_features == "pixels"
    assert train.monitor == "val_mri_mse" and mean_train.monitor == "val_loss"
    from kneetf.config import replace

    prior_fields = {k: getattr(mean_model, k) for k in RECIPES["default"].model
                    if k.startswith(("prior_", "residual_"))}
    assert replace(model, **prior_fields) == mean_model
    assert train.augment == 0.0 and mean_train.augment == 1.0  # the prior sees the model's input X-ray
    assert replace(train, monitor="val_loss", augment=1.0) == mean_train
    # `prior` is another name of the default recipe
    assert get_recipe("prior").apply(get_preset("compact"), TrainConfig()) == (model, train)
